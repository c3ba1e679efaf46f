"""cluster vector=2: one index per pair of neighbouring output channels' weights into 4**bits
two-value codewords. The decode is exact in onnxruntime for every layout (pairs on the last axis,
on axis 0 behind a Transpose, index and value-table forms); at the same bits per weight the model's
outputs err less than with scalar codebooks (k-means and GPTQ); plans replay; weights that cannot
pair stay scalar with the reason; the later steps run on such a file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.cli import main
from onnxzip.cluster import packed_bytes
from onnxzip.core.graph import NameScope, import_graph
from onnxzip.core.runtime import make_session, run_session
from onnxzip.passes import PassContext
from onnxzip.passes.cluster import ClusterPass
from onnxzip.passes.cluster_decode import Codebook, DecodeShared, decode_bytes, find_decodes, insert_decode

RNG = np.random.default_rng(17)


def _neighbours(shape: tuple[int, ...], axis: int, rho: float = 0.85) -> np.ndarray:
    """Weights whose neighbouring output channels (2p, 2p+1 along ``axis``) are correlated, as
    trained layers' often are."""
    moved = list(shape)
    moved[0], moved[axis] = moved[axis], moved[0]
    base = RNG.standard_normal((moved[0] // 2, *moved[1:]))
    values = np.empty(moved)
    values[0::2] = base
    values[1::2] = rho * base + np.sqrt(1 - rho * rho) * RNG.standard_normal(base.shape)
    return np.moveaxis(values, 0, axis).astype(np.float32) * 0.3


CONV_W = _neighbours((16, 8, 3, 3), 0)  # Conv: output channels on axis 0
FC_W = _neighbours((40, 24), 1)  # MatMul B: output channels on the last axis
FC_IN = (RNG.standard_normal((144, 40)) * 0.1).astype(np.float32)
X = {"x": RNG.standard_normal((48, 8, 6, 6)).astype(np.float32)}


def conv_fc_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "flat"], ["f"], name="flatten"),
         helper.make_node("MatMul", ["f", "fc_in"], ["h"], name="fc_in"),
         helper.make_node("MatMul", ["h", "fc_w"], ["y"], name="fc")],
        [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 24])],
        [init("conv_w", CONV_W), init("flat", np.array([0, 144], np.int64)),
         init("fc_in", FC_IN), init("fc_w", FC_W)],
    )


def outputs(model: onnx.ModelProto) -> np.ndarray:
    return run_session(make_session(model, "cpu"), X)["y"]


def relative(model: onnx.ModelProto, reference: np.ndarray) -> float:
    return float(np.sum((outputs(model) - reference) ** 2) / np.sum(reference ** 2))


@pytest.mark.parametrize(("shape", "axis"), [((6, 8), 1), ((8, 6), 0), ((1, 16, 5), 1), ((4, 3, 1, 1), 0), ((6, 10, 3), 1)])
@pytest.mark.parametrize("index_bits", [2, 3, 4, 6, 8])
def test_decode_is_bit_exact_in_onnxruntime(shape, axis, index_bits):
    k = 2**index_bits
    index_shape = list(shape)
    index_shape[axis] //= 2
    stored = Codebook(RNG.standard_normal((k, 2)).astype(np.float32),
                      RNG.integers(0, k, index_shape).astype(np.uint8), None, index_bits, pair_axis=axis)
    assert stored.shape == shape and stored.k == k and stored.weight_bits == index_bits / 2
    graph = gs.Graph(opset=13)
    weight = gs.Constant("w", np.zeros(shape, np.float32))
    out = gs.Variable("y", dtype=np.float32, shape=list(shape))
    node = gs.Node("Identity", inputs=[weight], outputs=[out])
    graph.nodes.append(node)
    graph.outputs = [out]
    added = insert_decode(graph, weight, [(node, graph)], stored, NameScope(graph), DecodeShared(), 13)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = 8
    decoded = run_session(make_session(model, "cpu", optimization="disabled"), {})["y"]
    assert np.array_equal(decoded, stored.decode())
    (found,) = find_decodes(import_graph(model))  # read back: what reconstruct refits
    assert found.pair_axis == axis and found.shape == shape and found.bits == index_bits
    assert np.array_equal(found.stored().decode(), stored.decode())
    assert stored.nbytes == 4 * k * 2 + packed_bytes(int(np.prod(index_shape)), index_bits)
    assert decode_bytes(stored, shape, 13, "w") >= sum(c.values.nbytes for c in added)


@pytest.mark.parametrize("method", ["kmeans", "gptq"])
def test_pairs_err_less_than_scalar_codebooks_at_the_same_bits_per_weight(method):
    model, reference = conv_fc_model(), None
    reference = outputs(model)
    context = PassContext(feeds=X)
    options = {"bits": 2, "min_size": 64, "small_params": False, "method": method}
    scalar = ClusterPass(**options).run(model, context)
    vector = ClusterPass(**options, vector=2).run(model, context)
    details = {c.layer: c.details for c in vector.report.changes if not c.skipped}
    assert details["conv_w"]["pairs"] and details["conv_w"]["pair_axis"] == 0
    assert details["fc_w"]["pair_axis"] == 1 and details["fc_w"]["bits"] == 2 and details["fc_w"]["index_bits"] == 4
    assert details["fc_w"]["k"] == 16 and details["fc_w"]["codebook_shape"] == [16, 2]
    assert "codewords of pairs" in next(c.decision for c in vector.report.changes if c.layer == "fc_w")
    assert relative(vector.model, reference) < 0.75 * relative(scalar.model, reference)
    # the same index bits per weight: the files differ by the codewords' bytes only
    size = len(vector.model.SerializeToString()) - len(scalar.model.SerializeToString())
    assert 0 < size <= 2 * (16 * 2 - 4) * 4 + 200


def test_widths_above_4_bits_and_odd_channel_counts_stay_scalar_with_the_reason():
    odd = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [tensor("x", ["N", 16])], [tensor("y", ["N", 15])],
        [init("w", RNG.standard_normal((16, 15)).astype(np.float32))])
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    result = ClusterPass(bits=3, vector=2, small_params=False).run(odd, PassContext(feeds=feeds))
    change = next(c for c in result.report.changes if c.layer == "w")
    assert "pairs" not in change.details and "scalar codebook" in change.details["note"]
    wide = ClusterPass(bits=5, vector=2, min_size=64, small_params=False).run(conv_fc_model(), PassContext(feeds=X))
    assert all("pairs" not in c.details for c in wide.report.changes if not c.skipped)


def test_avg_bits_sweeps_pairs_and_the_plan_replays_bit_identically(tmp_path):
    model = conv_fc_model()
    context = PassContext(feeds=X)
    result = ClusterPass(avg_bits=2.5, vector=2, min_size=64, small_params=False).run(model, context)
    entries = result.plan.layers
    assert entries and all(e.get("pairs") == (e["bits"] <= 4) for e in entries.values())
    assert all(set(e["sensitivity"]) >= {"1", "2", "3", "4"} for e in entries.values())
    again = ClusterPass(avg_bits=2.5, vector=2, min_size=64, small_params=False).apply(model, result.plan, context)
    assert again.model.SerializeToString() == result.model.SerializeToString()


def test_the_cli_compresses_with_pairs_reconstruct_refits_them_and_int8_keeps_its_weights_scalar(tmp_path):
    source, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    onnx.save(conv_fc_model(), str(source))
    np.savez(calib, **X)
    reference = outputs(conv_fc_model())

    def compress(name: str, cluster: str, *extra: str) -> tuple[onnx.ModelProto, dict]:
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        code = main(["compress", str(source), "-o", str(out), "--data", str(calib), "-q", "--force",
                     "--cluster", cluster, *extra, "--report", str(report)])
        assert code == 0
        return onnx.load(str(out)), json.loads(report.read_text())

    plain, report = compress("plain", "bits=3,vector=2,min_size=64,small_params=false")
    changes = report["passes"][0]["changes"]
    assert {c["layer"] for c in changes if c["details"].get("pairs")} == {"conv_w", "fc_in", "fc_w"}
    decodes = {d.name: d for d in find_decodes(import_graph(plain))}
    assert {name: d.pair_axis for name, d in decodes.items()} == {"conv_w": 0, "fc_in": 1, "fc_w": 1}
    assert np.array_equal(decodes["conv_w"].stored().decode(), weights_of(plain, "conv_w"))
    refit, report = compress("refit", "bits=3,vector=2,min_size=64,small_params=false", "--reconstruct")
    assert relative(refit, reference) < 0.7 * relative(plain, reference)
    assert len(refit.SerializeToString()) == len(plain.SerializeToString())
    _int8, report = compress("int8", "bits=3,vector=2,min_size=64,small_params=false,execute=int8,int8_min_speedup=0")
    details = [c["details"] for c in report["passes"][0]["changes"]]
    assert not any(d.get("pairs") for d in details) and any(d.get("execute") == "int8" for d in details)


def weights_of(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The weight ``name`` as onnxruntime decodes it (its decode output made a graph output)."""
    decoded = next(d for d in find_decodes(import_graph(model)) if d.name == name)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=decoded.output.name))
    return run_session(make_session(probe, "cpu", optimization="disabled"), X)[decoded.output.name]


def test_channel_scaled_pairs_decode_read_back_refit_and_beat_unscaled_pairs_on_channels_of_different_range():
    gain = np.exp(RNG.uniform(np.log(0.05), np.log(3.0), 8)).repeat(2)  # pairs share a range, channels differ
    weight = (_neighbours((16, 8, 3, 3), 0) * gain[:, None, None, None].astype(np.float32)).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["y0"], name="relu"),
         helper.make_node("Reshape", ["y0", "flat"], ["y"], name="flatten")],
        [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 144])],
        [init("conv_w", weight), init("flat", np.array([0, 144], np.int64))])
    reference = outputs(model)
    context = PassContext(feeds=X)
    options = {"bits": 2, "vector": 2, "small_params": False, "min_size": 64}
    plain = ClusterPass(**options).run(model, context)
    scaled = ClusterPass(**options, channel_scale=True).run(model, context)
    details = next(c.details for c in scaled.report.changes if c.layer == "conv_w")
    assert details["pairs"] and details["channel_scale"]
    (found,) = find_decodes(import_graph(scaled.model))
    assert found.pair_axis == 0 and found.scale_axis == 0
    decoded = weights_of(scaled.model, "conv_w")
    assert np.allclose(decoded, found.stored().decode(), rtol=1e-6, atol=1e-7)
    def per_channel(candidate: onnx.ModelProto) -> float:
        """The mean over the 16 output channels of each one's relative error (a small channel's
        error counts as much as a large one's: what an unscaled codebook gets wrong)."""
        diff = (outputs(candidate) - reference).reshape(-1, 16, 9)
        ref = reference.reshape(-1, 16, 9)
        return float(np.mean(np.sum(diff ** 2, axis=(0, 2)) / np.sum(ref ** 2, axis=(0, 2))))

    assert per_channel(scaled.model) < 0.5 * per_channel(plain.model)
    gptq = ClusterPass(**options, channel_scale=True, method="gptq").run(model, context)
    assert relative(gptq.model, reference) < relative(scaled.model, reference)


def test_with_execute_int8_matmul_weights_stay_scalar_for_the_int8_kernels_and_recurrent_weights_pair():
    hidden, width = 16, 32
    model = make_model(
        [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="proj"),
         helper.make_node("Unsqueeze", ["h", "axis1"], ["seq"], name="seq"),
         helper.make_node("GRU", ["seq", "gru_w", "gru_r"], ["", "y_h"], name="gru", hidden_size=hidden),
         helper.make_node("Squeeze", ["y_h", "axis0"], ["y"], name="out")],
        [tensor("x", ["N", 16])], [tensor("y", ["N", hidden])],
        [init("w_in", _neighbours((16, width), 1)), init("axis1", np.array([0], np.int64)),
         init("axis0", np.array([0], np.int64)), init("gru_w", _neighbours((1, 3 * hidden, width), 1)),
         init("gru_r", _neighbours((1, 3 * hidden, hidden), 1))])
    feeds = {"x": RNG.standard_normal((32, 16)).astype(np.float32)}
    result = ClusterPass(bits=3, vector=2, execute="int8", int8_min_speedup=0, small_params=False).run(
        model, PassContext(feeds=feeds))
    details = {c.layer: c.details for c in result.report.changes if not c.skipped}
    assert "pairs" not in details["w_in"] and details["gru_w"]["pairs"] and details["gru_r"]["pairs"]
