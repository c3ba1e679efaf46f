"""Test helpers shared by every test: build tiny models and compare two models in onnxruntime."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxzip.core.inputs import generate_inputs

FUZZ_PATH = Path(__file__).resolve().parents[1] / "tools" / "fuzz.py"


def load_fuzz() -> ModuleType:
    """``tools/fuzz.py`` as a module (its models and cases serve the tests too)."""
    if "onnxzip_fuzz" not in sys.modules:
        spec = importlib.util.spec_from_file_location("onnxzip_fuzz", FUZZ_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["onnxzip_fuzz"] = module
        spec.loader.exec_module(module)
    return sys.modules["onnxzip_fuzz"]
from onnxzip.core.runtime import make_session, run_session


def assert_same_outputs(
    reference: onnx.ModelProto | str,
    candidate: onnx.ModelProto | str,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict[str, np.ndarray]:
    """Run both models in onnxruntime on the same inputs and assert every output is close."""
    if feeds is None:
        model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(reference)
        feeds = generate_inputs(model, batch=3, seed=1)
    expected = run_session(make_session(reference, "cpu"), feeds)
    actual = run_session(make_session(candidate, "cpu"), feeds)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)
    return actual


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = 8
    return model


def tensor(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def mlp(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """x[N,8] → MatMul(W1 8×16) + b → Relu → Gemm(W2ᵀ 4×16, transB) → y[N,4]."""
    rng = rng or np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
            helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
            helper.make_node("Gemm", ["h3", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        [tensor("x", ["N", 8])],
        [tensor("y", ["N", 4])],
        [
            init("w1", rng.standard_normal((8, 16)).astype(np.float32)),
            init("b1", rng.standard_normal(16).astype(np.float32)),
            init("w2", rng.standard_normal((4, 16)).astype(np.float32)),
            init("b2", rng.standard_normal(4).astype(np.float32)),
        ],
    )


def traced_batch_one(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """x[N,4,6] → Reshape [4,6] → MatMul(W 6×8) → Reshape [1,4,8] → y: the input declares a
    symbolic batch, but an exporter traced batch 1 into both Reshapes, so only one sample runs."""
    rng = rng or np.random.default_rng(0)
    return make_model(
        [helper.make_node("Reshape", ["x", "rows"], ["x2"], name="traced_view"),
         helper.make_node("MatMul", ["x2", "w"], ["h"], name="fc"),
         helper.make_node("Reshape", ["h", "back"], ["y"], name="traced_back")],
        [tensor("x", ["N", 4, 6])], [tensor("y", [1, 4, 8])],
        [init("rows", np.array([4, 6], np.int64)), init("back", np.array([1, 4, 8], np.int64)),
         init("w", rng.standard_normal((6, 8)).astype(np.float32))])
