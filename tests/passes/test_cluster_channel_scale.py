"""cluster channel_scale: one codebook per tensor for weights divided by a per-channel scale.

The decode (codebook[indices] · s, a Mul folded at load) is exact in onnxruntime; on weights whose
channels differ in range it beats a per-tensor codebook at nearly its size; method=gptq refits
centroids and scales; find_decodes reads it back for reconstruct and fine-tuning; execute=int8
turns the scale into the per-channel DequantizeLinear scale of an int8 kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper, numpy_helper

from onnxzip.cli import main
from onnxzip.cluster.gptq import damped, fit_codebook, refit_scales, target_weight
from onnxzip.core.graph import import_graph
from onnxzip.core.runtime import make_session, run_session
from onnxzip.passes import PassContext
from onnxzip.passes.cluster import ClusterPass
from onnxzip.passes.cluster_decode import find_decodes

RNG = np.random.default_rng(11)
# BatchNorm folded into a Conv: each output channel's filter scaled by its own γ/σ (0.02 to 3)
CHANNEL_GAIN = np.exp(RNG.uniform(np.log(0.02), np.log(3.0), 16)).astype(np.float32)
CONV_W = (RNG.standard_normal((16, 8, 3, 3)) * CHANNEL_GAIN[:, None, None, None]).astype(np.float32)
FC_GAIN = np.exp(RNG.uniform(np.log(0.05), np.log(2.0), 24)).astype(np.float32)
FC_W = (RNG.standard_normal((40, 24)) * FC_GAIN[None, :]).astype(np.float32)  # MatMul: channels on axis 1
X = {"x": RNG.standard_normal((32, 8, 6, 6)).astype(np.float32)}


def conv_fc_model() -> onnx.ModelProto:
    """x[N,8,6,6] → Conv(16×8×3×3, stride 2) → Relu → Reshape[N, 40]·… → MatMul(40×24) → y."""
    return make_model(
        [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("MatMul", ["f", "fc_in"], ["h"], name="fc_in"),
         helper.make_node("MatMul", ["h", "fc_w"], ["y"], name="fc")],
        [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 24])],
        [init("conv_w", CONV_W), init("conv_b", RNG.standard_normal(16).astype(np.float32)),
         init("fc_in", RNG.standard_normal((16, 40)).astype(np.float32)), init("fc_w", FC_W)],
    )


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each clustered weight as onnxruntime decodes it (decode outputs made graph outputs)."""
    graph = import_graph(model)
    names = {d.name: d.output.name for d in find_decodes(graph)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=out) for out in names.values())
    result = run_session(make_session(probe, "cpu", optimization="disabled"), X)
    return {name: result[out] for name, out in names.items()}


def relative_error(decoded: np.ndarray, original: np.ndarray) -> float:
    return float(np.sum((decoded - original) ** 2) / np.sum(original ** 2))


def channel_error(decoded: np.ndarray, original: np.ndarray, axis: int) -> float:
    """The mean over output channels of each channel's relative error (a small channel's error
    counts as much as a large one's: what a per-tensor codebook gets wrong)."""
    diff, ref = np.moveaxis(decoded - original, axis, 0), np.moveaxis(original, axis, 0)
    per = np.sum(diff.reshape(len(diff), -1) ** 2, axis=1) / np.sum(ref.reshape(len(ref), -1) ** 2, axis=1)
    return float(np.mean(per))


@pytest.mark.parametrize("bits", [3, 8])
def test_decode_is_exact_in_onnxruntime_and_reads_back(bits):
    result = ClusterPass(bits=bits, channel_scale=True, min_size=16, small_params=False).run(conv_fc_model(), PassContext())
    details = {c.layer: c.details for c in result.report.changes if not c.skipped}
    assert details["conv_w"]["channel_scale"] and details["fc_w"]["channel_scale"]
    assert details["conv_w"]["codebook_shape"] == [2**bits]
    decodes = {d.name: d for d in find_decodes(import_graph(result.model))}
    assert decodes["conv_w"].scale_axis == 0 and decodes["fc_w"].scale_axis == 1
    decoded = weights_of(result.model)
    for name in ("conv_w", "fc_w"):
        stored = decodes[name].stored()
        assert stored.scale is not None and stored.codebook.shape == (2**bits,)
        np.testing.assert_array_equal(decoded[name], stored.decode())  # bit for bit


def test_beats_a_per_tensor_codebook_at_nearly_its_size():
    model = conv_fc_model()
    plain = ClusterPass(bits=3, min_size=16, small_params=False).run(model, PassContext())
    scaled = ClusterPass(bits=3, channel_scale=True, min_size=16, small_params=False).run(model, PassContext())
    per_channel = ClusterPass(bits=3, per_channel=True, min_size=16, small_params=False).run(model, PassContext())
    errors = {name: {key: channel_error(weights_of(result.model)[name], original, axis)
                     for key, result in (("plain", plain), ("scaled", scaled), ("channel", per_channel))}
              for name, original, axis in (("conv_w", CONV_W, 0), ("fc_w", FC_W, 1))}
    for name, error in errors.items():
        assert error["scaled"] < 0.5 * error["plain"], (name, error)
    size = {key: result.model.ByteSize() for key, result in (("plain", plain), ("scaled", scaled), ("channel", per_channel))}
    channels = 16 + 40 + 24  # conv_w, fc_in, fc_w
    assert size["scaled"] <= size["plain"] + 4 * channels + 3 * 120  # the scales, a Mul and names per weight
    assert size["scaled"] < size["channel"]


def test_refit_scales_is_the_least_squares_scale_per_channel():
    m, n = 6, 10
    gram = RNG.standard_normal((200, n))
    gram = (gram.T @ gram)[None]
    target = RNG.standard_normal((1, m, n))
    q = RNG.standard_normal((1, m, n))
    ids = np.array([[0, 0, 1, 1, 2, 2]])  # two view rows per channel
    fitted = refit_scales(q, target, gram, ids, np.ones(3))
    for c in range(3):  # minimise Σ_{r∈c} (s q_r − w_r)ᵀ H (s q_r − w_r) over s on a fine grid
        rows = ids[0] == c
        grid = np.linspace(fitted[c] - 1, fitted[c] + 1, 2001)
        cost = [sum((s * q[0, r] - target[0, r]) @ gram[0] @ (s * q[0, r] - target[0, r]) for r in np.flatnonzero(rows))
                for s in grid]
        assert abs(grid[int(np.argmin(cost))] - fitted[c]) <= 1e-3


def test_gptq_fit_with_scales_is_never_worse_and_lowers_the_error():
    m, n, k = 12, 32, 8
    gains = np.exp(RNG.uniform(-3, 1, m))
    weight = RNG.standard_normal((1, m, n)) * gains[None, :, None]
    inputs = RNG.standard_normal((500, n)) @ (np.eye(n) + 0.5 * RNG.standard_normal((n, n)))
    gram = (inputs.T @ inputs)[None]
    scale = np.sqrt(np.mean(weight[0] ** 2, axis=1))
    codebook = np.linspace(-2, 2, k)[None]
    nearest = np.argmin(np.abs((weight / scale[None, :, None])[..., None] - codebook[0]), axis=-1)
    ids = np.arange(m)[None]
    fit = fit_codebook(weight, codebook, nearest, np.zeros((1, m), np.int64), gram, gram, iterations=2,
                       scale=scale, scale_ids=ids)
    assert fit.scale is not None and fit.after < 0.7 * fit.before
    q = fit.codebook[0][fit.indices] * fit.scale[ids][..., None]
    gram_d = damped(gram, 0.01)[0]
    goal = target_weight(weight, gram, gram, 0.01)
    error = np.sum(((q - goal) @ gram_d) * (q - goal)) / np.sum((goal @ gram_d) * goal)
    assert error == pytest.approx(fit.after, rel=1e-6)


def test_method_gptq_with_channel_scales_lowers_the_held_back_output_error():
    n, m = 48, 32
    weight = (RNG.standard_normal((n, m)) * np.exp(RNG.uniform(-3, 1, m))[None, :]).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [tensor("x", ["N", n])], [tensor("y", ["N", m])], [init("w", weight)])
    mixing = np.eye(n) + 0.4 * RNG.standard_normal((n, n))
    fit, held = ((RNG.standard_normal((rows, n)) @ mixing).astype(np.float32) for rows in (512, 512))
    reference = held @ weight
    errors = {}
    for method in ("kmeans", "gptq"):
        result = ClusterPass(bits=2, method=method, channel_scale=True).run(model, PassContext(feeds={"x": fit}, device="cpu"))
        out = run_session(make_session(result.model, "cpu"), {"x": held})["y"]
        errors[method] = float(np.sum((out - reference) ** 2) / np.sum(reference ** 2))
    assert errors["gptq"] < 0.8 * errors["kmeans"], errors


def test_execute_int8_makes_the_scale_the_per_channel_weight_scale(tmp_path):
    conv = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                       helper.make_node("Relu", ["c"], ["y"], name="relu")],
                      [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 16, 6, 6])],
                      [init("w", CONV_W), init("b", RNG.standard_normal(16).astype(np.float32))])
    context = PassContext(feeds=X)
    float_model = ClusterPass(bits=4, channel_scale=True).run(conv, context).model
    result = ClusterPass(bits=4, channel_scale=True, execute="int8", int8_min_speedup=0).run(conv, context)
    weight = next(n for n in result.model.graph.node if n.op_type == "Conv").input[1]
    dequantize = next(n for n in result.model.graph.node if n.output[0] == weight)
    assert dequantize.op_type == "DequantizeLinear" and [a.i for a in dequantize.attribute if a.name == "axis"] == [0]
    w_scale = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == dequantize.input[1]))
    assert w_scale.shape == (16,) and not any(n.op_type == "Mul" for n in result.model.graph.node)
    path = tmp_path / "optimized.onnx"
    make_session(result.model, "cpu", optimized_model_path=str(path))
    assert "QLinearConv" in {n.op_type for n in onnx.load(path).graph.node}
    reference = run_session(make_session(float_model, "cpu"), X)["y"]
    out = run_session(make_session(result.model, "cpu"), X)["y"]
    error = float(np.sum((out - reference) ** 2) / np.sum(reference ** 2))
    assert error < 1e-3  # int8 activations and a 4-bit codebook held in int8


def test_per_channel_and_channel_scale_together_exit_2(tmp_path, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(conv_fc_model(), path)
    code = main(["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--cluster", "bits=3,per_channel=true,channel_scale=true"])
    assert code == 2 and "channel_scale" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_find_decodes_store_changes_what_onnxruntime_computes():
    result = ClusterPass(bits=3, channel_scale=True, min_size=16, small_params=False).run(conv_fc_model(), PassContext())
    graph = import_graph(result.model)
    decoded = next(d for d in find_decodes(graph) if d.name == "fc_w")
    stored = decoded.stored()
    stored.scale = (stored.scale * 2).astype(stored.scale.dtype)
    decoded.store(stored)
    from onnxzip.core.graph import export_model
    changed = export_model(graph, result.model)
    before, after = weights_of(result.model)["fc_w"], weights_of(changed)["fc_w"]
    np.testing.assert_array_equal(after, 2 * before)
    assert numpy_helper.to_array(next(t for t in changed.graph.initializer if t.name.endswith("channel_scale")
                                      and "fc_w" in t.name)).size == 24
