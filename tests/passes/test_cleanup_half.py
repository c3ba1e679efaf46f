"""cleanup half_small: small float32 initializers stored as float16 behind a Cast onnxruntime folds.

Biases and normalization parameters the cluster pass leaves raw are a few percent of a small
compressed file; float16 halves them within 1e-3 relative, codebooks stay float32 (their decodes
are read back by later steps), and what float16 would round more is left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.core.graph import import_graph
from onnxzip.core.runtime import make_session, run_session
from onnxzip.passes import PassContext
from onnxzip.passes.cleanup import CleanupPass
from onnxzip.passes.cluster import ClusterPass
from onnxzip.passes.cluster_decode import find_decodes

RNG = np.random.default_rng(23)
X = {"x": RNG.standard_normal((16, 32)).astype(np.float32)}


def model() -> onnx.ModelProto:
    """x → MatMul(W 32×64) + bias (64) → LayerNorm-style Mul/Add (γ, β) → MatMul(V 64×8) + c, + Σ t (t > 65504)."""
    large = np.linspace(7e4, 8e4, 100).astype(np.float32)  # beyond float16's range (65504)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
         helper.make_node("Mul", ["hb", "gamma"], ["hg"]), helper.make_node("Add", ["hg", "beta"], ["hn"]),
         helper.make_node("MatMul", ["hn", "v"], ["o"]), helper.make_node("Add", ["o", "c"], ["y0"]),
         helper.make_node("Mul", ["y0", "scale8"], ["y1"]), helper.make_node("ReduceSum", ["t"], ["ts"], keepdims=0),
         helper.make_node("Add", ["y1", "ts"], ["y"])],
        [tensor("x", ["N", 32])], [tensor("y", ["N", 8])],
        [init("w", RNG.standard_normal((32, 64)).astype(np.float32)), init("b", RNG.standard_normal(64).astype(np.float32)),
         init("gamma", RNG.uniform(0.5, 2, 64).astype(np.float32)), init("beta", RNG.standard_normal(64).astype(np.float32)),
         init("v", RNG.standard_normal((64, 8)).astype(np.float32)), init("c", RNG.standard_normal(8).astype(np.float32)),
         init("scale8", np.ones(8, np.float32)), init("t", large)])


def test_small_float_initializers_become_float16_with_a_folded_cast_and_outputs_stay_within_1e_3():
    original = model()
    clustered = ClusterPass(bits=4, small_params=False, min_size=512).run(original, PassContext()).model
    assert {d.name for d in find_decodes(import_graph(clustered))} == {"w", "v"}
    result = CleanupPass(half_small=True).run(clustered, PassContext())
    halved = {t.name for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    # biases and γ/β (64 values) halve; 8-value tensors are too small to pay; t does not fit float16;
    # the clustered weights' codebooks stay float32 and still read back
    assert halved == {"b_f16", "gamma_f16", "beta_f16"}
    assert {d.name for d in find_decodes(import_graph(result.model))} == {"w", "v"}
    assert len(result.model.SerializeToString()) < len(clustered.SerializeToString()) - 2 * 64 * 3 + 200
    assert any("3 initializers stored as float16" in note for note in result.report.notes)
    before = run_session(make_session(clustered, "cpu"), X)["y"]
    after = run_session(make_session(result.model, "cpu"), X)["y"]
    assert np.max(np.abs(after - before)) <= 1e-3 * np.max(np.abs(before))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(__import__("tempfile").mkdtemp() + "/opt.onnx")
    ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert not [n for n in onnx.load(options.optimized_model_filepath).graph.node if n.op_type == "Cast"]


def test_half_small_is_off_by_default_and_leaves_graph_outputs_alone():
    result = CleanupPass().run(model(), PassContext())
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)
    exposed = model()
    exposed.graph.output.append(helper.make_tensor_value_info("gamma", onnx.TensorProto.FLOAT, [64]))
    result = CleanupPass(half_small=True).run(exposed, PassContext())
    kinds = {t.name: t.data_type for t in result.model.graph.initializer}
    assert kinds["gamma"] == onnx.TensorProto.FLOAT and kinds["b_f16"] == onnx.TensorProto.FLOAT16
    assert run_session(make_session(result.model, "cpu"), X)["gamma"].dtype == np.float32
