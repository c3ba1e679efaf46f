"""One tiny graph per op that onnxruntime-training 1.19 cannot differentiate on the CPU as it is:
the training copy (rewritten, or with a registered gradient) computes the original's outputs, and
onnxruntime-training's gradient of an MSE loss matches a central finite difference of the
original model's loss in onnxruntime."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import init, make_model, tensor
from onnxzip.measure.cost import observed_shapes
from onnxzip.core.runtime import make_session, run_session
from onnxzip.train import _artifacts
from onnxzip.train.engine import _open
from onnxzip.train.losses import LossTerm, add_loss
from onnxzip.train.trainable import prepare, with_weights
from onnxzip.train.availability import training_available

pytestmark = pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")
f32 = np.float32


def _weights(rng: np.random.Generator, **shapes: tuple[int, ...]) -> list[onnx.TensorProto]:
    return [init(name, (rng.standard_normal(shape) * 0.5).astype(f32)) for name, shape in shapes.items()]


def _dense(op_nodes, rng, opset=17, extra=(), width=4, out=None):
    """x[N, 4] → MatMul w → <op nodes reading h, writing y>."""
    return make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), *op_nodes],
                      [tensor("x", ["N", 4])], [tensor("y", out or ["N", width])],
                      [*_weights(rng, w=(4, width)), *extra], opset=opset)


def _conv(op_nodes, rng, size=5, channels=3, opset=17, extra=(), out_rank=4):
    """x[N, 2, size, size] → Conv w (3×3, pad 1) → <op nodes reading h, writing y>."""
    return make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), *op_nodes],
                      [tensor("x", ["N", 2, size, size])], [tensor("y", None)],
                      [*_weights(rng, w=(channels, 2, 3, 3)), *extra], opset=opset)


def _rnn(op, direction, rng, default_activations=False):
    hidden, feat, gates = 3, 4, 4 if op == "LSTM" else 3
    count = 2 if direction == "bidirectional" else 1
    activations = {"activations": (["Sigmoid", "Tanh", "Tanh"] if op == "LSTM" else ["Sigmoid", "Tanh"]) * count} \
        if default_activations else {}
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    return make_model(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
         helper.make_node(op, ["xt", "W", "R", "B", "", "h0"], ["Y", "Yh"], name="rnn", hidden_size=hidden,
                          direction=direction, **activations, **extra),
         helper.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3]),
         helper.make_node("Flatten", ["Yt"], ["yf"], axis=1),
         helper.make_node("Flatten", ["Yh"], ["hf"], axis=0),
         helper.make_node("ReduceSum", ["hf", "one"], ["hs"], keepdims=1),
         helper.make_node("Add", ["yf", "hs"], ["y"])],
        [tensor("x", ["N", 5, feat]), tensor("h0", [count, "N", hidden])], [tensor("y", None)],
        [*_weights(rng, W=(count, gates * hidden, feat), R=(count, gates * hidden, hidden), B=(count, 2 * gates * hidden)),
         init("one", np.asarray([1], np.int64))],
        opset=13)


def _cases():
    rng = np.random.default_rng(0)
    n = helper.make_node
    ints = lambda name, v: init(name, np.asarray(v, np.int64))  # noqa: E731
    floats = lambda name, v: init(name, np.asarray(v, f32))  # noqa: E731
    yield "HardSigmoid at opset 11", _dense([n("HardSigmoid", ["h"], ["y"], alpha=0.3, beta=0.4)], rng, opset=11)
    yield "HardSwish", _dense([n("HardSwish", ["h"], ["y"])], rng)
    yield "PRelu", _dense([n("PRelu", ["h", "slope"], ["y"])], rng, extra=[floats("slope", [0.1, -0.2, 0.3, 0.5])])
    yield "Softplus", _dense([n("Softplus", ["h"], ["y"])], rng)
    yield "ReduceMax", _dense([n("ReduceMax", ["h"], ["y"], axes=[1], keepdims=0)], rng, out=["N"])
    yield "ReduceMax opset 18", _dense([n("ReduceMax", ["h", "axes"], ["y"], keepdims=1)], rng, opset=18,
                                       extra=[ints("axes", [1])], out=["N", 1])
    yield "GlobalMaxPool", _conv([n("GlobalMaxPool", ["h"], ["y"])], rng)
    yield "AveragePool", _conv([n("AveragePool", ["h"], ["y"], kernel_shape=[4, 4], strides=[1, 1])], rng)
    yield "InstanceNormalization", _conv([n("InstanceNormalization", ["h", "g", "b"], ["y"])], rng,
                                         extra=[floats("g", [1.0, 0.5, -0.7]), floats("b", [0.1, 0.0, 0.2])])
    yield "Resize linear", _conv([n("Resize", ["h", "", "scales"], ["y"], mode="linear")], rng,
                                 extra=[floats("scales", [1, 1, 1.6, 2.2])])
    yield "Resize nearest by 1.5", _conv([n("Resize", ["h", "", "scales"], ["y"], mode="nearest",
                                            coordinate_transformation_mode="asymmetric")], rng,
                                         extra=[floats("scales", [1, 1, 1.5, 1.8])])
    yield "Resize cubic align_corners", _conv([n("Resize", ["h", "", "scales"], ["y"], mode="cubic",
                                                 coordinate_transformation_mode="align_corners")], rng,
                                              extra=[floats("scales", [1, 1, 2, 2])])
    yield "Resize linear to sizes computed in the graph", _conv(  # F.interpolate(size=...) as PyTorch exports it
        [n("Shape", ["h"], ["hs"]), n("Slice", ["hs", "s0", "s2"], ["nc"]), n("Concat", ["nc", "hw"], ["sizes"], axis=0),
         n("Resize", ["h", "", "", "sizes"], ["y"], mode="linear")], rng,
        extra=[ints("s0", [0]), ints("s2", [2]), ints("hw", [8, 9])])
    yield "ConvTranspose", _conv([n("ConvTranspose", ["h", "wt", "bt"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1],
                                    output_padding=[1, 0])], rng,
                                 extra=[*_weights(rng, wt=(3, 2, 3, 3), bt=(2,))])
    yield "ConvTranspose grouped dilated", _conv(
        [n("ConvTranspose", ["h", "wt"], ["y"], strides=[3, 1], dilations=[2, 1], group=3, pads=[2, 0, 0, 1])], rng,
        extra=_weights(rng, wt=(3, 1, 2, 3)))
    yield "ConvTranspose SAME_UPPER", _conv([n("ConvTranspose", ["h", "wt"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
                                            rng, extra=_weights(rng, wt=(3, 2, 4, 4)))
    yield "Pad reflect", _conv([n("Pad", ["h", "pads"], ["y"], mode="reflect")], rng,
                               extra=[ints("pads", [0, 0, 2, 1, 0, 0, 1, 3])])
    yield "Pad edge", _dense([n("Pad", ["h", "pads"], ["y"], mode="edge")], rng, extra=[ints("pads", [0, 2, 0, 3])],
                             out=["N", 9])
    yield "DepthToSpace", _conv([n("DepthToSpace", ["h"], ["y"], blocksize=2, mode="CRD")], rng, channels=8)
    yield "CumSum", _dense([n("CumSum", ["h", "axis"], ["y"], reverse=1)], rng, extra=[ints("axis", 1)])
    yield "Sign", _dense([n("Sign", ["h"], ["s"]), n("Mul", ["h", "s"], ["y"])], rng)
    yield "Floor", _dense([n("Floor", ["h"], ["s"]), n("Add", ["h", "s"], ["y"])], rng)
    yield "Gemm at opset 9", make_model(
        [n("MatMul", ["x", "w"], ["h"]), n("Gemm", ["h", "w2", "b2"], ["y"], transB=1)],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 3])], _weights(rng, w=(4, 4), w2=(3, 4), b2=(3,)), opset=9)
    yield "bidirectional GRU", _rnn("GRU", "bidirectional", rng)
    yield "reverse LSTM with its default activations listed", _rnn("LSTM", "reverse", rng, default_activations=True)
    yield "bidirectional LSTM", _rnn("LSTM", "bidirectional", rng)
    then_branch = helper.make_graph([n("Mul", ["h", "inner"], ["t"])], "then", [], [tensor("t", ["N", 4])],
                                    _weights(rng, inner=(4,)))
    else_branch = helper.make_graph([n("Neg", ["h"], ["e"])], "else", [], [tensor("e", ["N", 4])])
    yield "If fixed by the data", _dense(
        [n("Greater", ["rate", "threshold"], ["big"]), n("Squeeze", ["big"], ["cond"]),
         n("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)], rng,
        extra=[floats("rate", [16000.0]), floats("threshold", [8000.0])])


CASES = list(_cases())


def _feeds(model: onnx.ModelProto, rng: np.random.Generator, count: int = 6) -> dict[str, np.ndarray]:
    feeds = {}
    initialized = {t.name for t in model.graph.initializer}
    for info in model.graph.input:
        if info.name in initialized:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else count for d in info.type.tensor_type.shape.dim]
        if info.name == "h0":
            dims[1] = count
        feeds[info.name] = rng.standard_normal(dims).astype(f32)
    return feeds


def _loss(model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: np.ndarray) -> float:
    y = next(iter(run_session(make_session(model, "cpu"), feeds).values())).astype(np.float64)
    return float(np.mean((y - target) ** 2))


@pytest.mark.parametrize("label,model", CASES, ids=[c[0] for c in CASES])
def test_gradient_matches_finite_differences(label, model):
    rng = np.random.default_rng(1)
    feeds = _feeds(model, rng)
    output = model.graph.output[0].name
    expected = run_session(make_session(model, "cpu"), feeds)[output]
    target = rng.standard_normal(expected.shape).astype(f32)
    probe = {k: v[:1] if k != "h0" else v[:, :1] for k, v in feeds.items()}
    plan = prepare(model, observed_shapes(model, probe), data=feeds, probe=probe)
    weights = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1}
    weights = (weights - {"scales"}) | ({"inner"} if label.startswith("If") else set())
    assert set(plan.trainable) == weights, plan.frozen
    # the training copy computes what the model computes
    copy_out = run_session(make_session(plan.model, "cpu"), feeds)[output]
    np.testing.assert_allclose(copy_out, expected, rtol=1e-5, atol=1e-5)
    add_loss(plan.model, [LossTerm(output, "mse", "target")], {"target": ["N", *target.shape[1:]]})
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        onnx.save(plan.model, str(work / "model.onnx"))
        assert _artifacts.generate(work, work / "model.onnx", plan.trainable, "sgd", 0.0) is None
        state, module, _ = _open(work, "cpu")
        module.train()
        arrays = {**feeds, "target": target}
        module(*[arrays[name] for name in module.input_names()])
        gradients = {name: np.array(state.parameters[name].grad, np.float64) for name in plan.trainable}
    values = {name: np.array(state.parameters[name].data) for name in plan.trainable}
    eps = 1e-3
    for name, gradient in gradients.items():
        flat = values[name].ravel()
        picks = rng.choice(flat.size, size=min(flat.size, 6), replace=False)
        numeric = []
        for index in picks:
            moved = []
            for sign in (1, -1):
                changed = flat.copy()
                changed[index] += sign * eps
                candidate = with_weights(model, {name: changed.reshape(values[name].shape)}, plan.locations)
                moved.append(_loss(candidate, feeds, target))
            numeric.append((moved[0] - moved[1]) / (2 * eps))
        analytic = gradient.ravel()[picks]
        scale = max(np.abs(gradient).max(), 1e-3)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-2 * scale, err_msg=f"{label}: {name}")
