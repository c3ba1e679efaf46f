"""Hand-built deployment-like files (what real exports look like, in a few kB): dynamic dims,
named and unnamed, a fixed batch of 1, weights in Constant nodes and behind constant chains in
nested ``If`` branches, wrong declared output shapes, old IR/opset."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node",
                            value=numpy_helper.from_array(np.asarray(array), f"{name}_value"))


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return _const(name, np.array(values, dtype=np.int64))


def _trained_like(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Weights bunched around a dozen values, as trained weights often are (4-bit codebooks
    then keep them nearly exactly)."""
    levels = np.linspace(-1.0, 1.0, 12)
    return ((rng.choice(levels, size=shape) + rng.normal(0, 0.005, size=shape)) * scale).astype(np.float32)


def vision_model(seed: int = 0) -> onnx.ModelProto:
    """x[?, 3, ?, ?] (axis 0 unnamed, axis 2 ``'?'``, axis 3 without value or name) → Conv(s2) →
    Relu → Conv(s2) → Reshape[0, 2048] (only 32×32 images fit) → Gemm → logits[N, 10]; every
    weight in a Constant node; the output declared [1, 5] (wrong). IR 6, opset 12."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    dims = x.type.tensor_type.shape.dim
    for param in ("", None, "?", None):
        dim = dims.add()
        if param is None and len(dims) == 2:
            dim.dim_value = 3
        elif param:
            dim.dim_param = param
    nodes = [
        _const("w1", _trained_like(rng, (32, 3, 3, 3), 0.3)),
        _const("w2", _trained_like(rng, (32, 32, 3, 3), 0.1)),
        _const("b2", _trained_like(rng, (32,), 0.1)),
        _const("fc", _trained_like(rng, (2048, 10), 0.05)),
        _ints("flat", [0, 2048]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["c2", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "vision", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], producer_name="pytorch",
                              producer_version="1.4")
    model.ir_version = 6
    return model


def _lstm_branch(name: str, hidden: int) -> onnx.GraphProto:
    """A branch running an LSTM on the outer ``seq`` with W = Slice(outer Wbig) and R =
    Concat(outer halves): the constant chains every branch repeats."""
    nodes = [
        _ints(f"{name}_starts", [0]), _ints(f"{name}_ends", [4 * hidden]), _ints(f"{name}_axes", [1]),
        helper.make_node("Slice", ["wbig", f"{name}_starts", f"{name}_ends", f"{name}_axes"], [f"{name}_w"]),
        helper.make_node("Concat", ["r_top", "r_bottom"], [f"{name}_r"], axis=1),
        helper.make_node("LSTM", ["seq", f"{name}_w", f"{name}_r"], [f"{name}_y"], hidden_size=hidden,
                         name=f"{name}_lstm"),
    ]
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
    return helper.make_graph(nodes, name, [], [out])


def speech_model(seed: int = 0, hidden: int = 32, features: int = 64) -> onnx.ModelProto:
    """input1[1, 1, 64, T] (batch fixed at 1) → Squeeze/Transpose → If(T > 0) with an LSTM in the
    then branch and a nested If holding LSTMs in both of its branches, all reading their weights
    through Slice/Concat chains of the same outer tensors → MatMul (weight in a Constant node) →
    mask[1, T, 257], declared [1, 'seqlen'] (wrong rank). IR 6, opset 12 (an old PyTorch export)."""
    rng = np.random.default_rng(seed)
    wbig = rng.standard_normal((1, 8 * hidden, features)).astype(np.float32) * 0.2
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.2
    inner = helper.make_node("If", ["cond"], ["inner_y"], name="inner_if",
                             then_branch=_lstm_branch("inner_then", hidden),
                             else_branch=_lstm_branch("inner_else", hidden))
    else_graph = helper.make_graph([inner], "outer_else", [], [helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, None)])
    nodes = [
        _const("r_top", r[:, : 2 * hidden]), _const("r_bottom", r[:, 2 * hidden:]),
        _const("wout", rng.standard_normal((hidden, 257)).astype(np.float32) * 0.2),
        _const("three", np.array(3, dtype=np.int64)), _const("zero", np.array(0, dtype=np.int64)),
        helper.make_node("Squeeze", ["input1"], ["sq"], axes=[1]),
        helper.make_node("Transpose", ["sq"], ["seq"], perm=[2, 0, 1]),
        helper.make_node("Shape", ["input1"], ["shape"]),
        helper.make_node("Gather", ["shape", "three"], ["frames"], axis=0),
        helper.make_node("Greater", ["frames", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="outer_if",
                         then_branch=_lstm_branch("outer_then", hidden), else_branch=else_graph),
        helper.make_node("Squeeze", ["y"], ["y2"], axes=[1, 2]),
        helper.make_node("MatMul", ["y2", "wout"], ["proj"], name="proj"),
        helper.make_node("Sigmoid", ["proj"], ["m"]),
        helper.make_node("Unsqueeze", ["m"], ["mask"], axes=[0]),
    ]
    graph = helper.make_graph(
        nodes, "speech", [helper.make_tensor_value_info("input1", TensorProto.FLOAT, [1, 1, features, "T"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, "seqlen"])],
        [numpy_helper.from_array(wbig, "wbig")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], producer_name="pytorch",
                              producer_version="1.3")
    model.ir_version = 6
    return model
