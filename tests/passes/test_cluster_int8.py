"""cluster execute=int8: int8 codebooks behind DequantizeLinear run by onnxruntime's int8 kernels,
within the quantization error of the float codebook model; the per-layer gate; CLI and errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper, numpy_helper

import onnxzip
from onnxzip.cli import main
from onnxzip.errors import ConfigError
from onnxzip.passes import PassContext
from onnxzip.passes.cluster import ClusterPass
from onnxzip.passes.cluster_decode import find_decodes
from onnxzip.passes.cluster_int8 import find_int8_decodes
from onnxzip.core.graph import import_graph
from onnxzip.core.runtime import make_session, run_session

RNG = np.random.default_rng(3)
FC_W = (RNG.standard_normal((48, 32)) * 0.2).astype(np.float32)
FC_X = {"x": RNG.standard_normal((64, 48)).astype(np.float32)}
CONV_W = (RNG.standard_normal((12, 6, 3, 3)) * 0.3).astype(np.float32)
CONV_B = RNG.standard_normal(12).astype(np.float32)
CONV_X = {"x": RNG.standard_normal((24, 6, 9, 9)).astype(np.float32)}
INT8_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QLinearConv", "ConvInteger", "MatMulInteger"}


def matmul_model(opset: int = 17) -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                      [tensor("x", ["N", 48])], [tensor("y", ["N", 32])], [init("w", FC_W)], opset=opset)


def conv_model(opset: int = 17) -> onnx.ModelProto:
    return make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                       helper.make_node("Relu", ["c"], ["y"], name="relu")],
                      [tensor("x", ["N", 6, 9, 9])], [tensor("y", ["N", 12, 9, 9])],
                      [init("w", CONV_W), init("b", CONV_B)], opset=opset)


def optimized_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    path = tmp_path / "optimized.onnx"
    make_session(model, "cpu", optimized_model_path=str(path))
    return {n.op_type for n in onnx.load(path).graph.node}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def node_inputs(model: onnx.ModelProto, op: str) -> list[list[str]]:
    return [list(n.input) for n in model.graph.node if n.op_type == op]


def test_matmul_runs_an_int8_kernel_within_the_quantization_error(tmp_path):
    context = PassContext(feeds=FC_X)
    float_model = ClusterPass(bits=4).run(matmul_model(), context).model
    result = ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(matmul_model(), context)
    model = result.model
    change = next(c for c in result.report.changes if c.layer == "w")
    assert change.details["execute"] == "int8" and change.decision.endswith("int8")
    assert find_int8_decodes(import_graph(model)) == ["w"]
    ops = optimized_ops(model, tmp_path)
    assert ops & INT8_OPS and "MatMul" not in ops
    # the codebook becomes 16 int8 values; the indices stay; a layer adds 3 nodes and 4 scalars
    assert initializer(model, "w_codebook").dtype == np.int8 and initializer(model, "w_codebook").size == 16
    assert model.ByteSize() <= float_model.ByteSize() + 300
    # the scales the file declares
    (x_q,) = node_inputs(model, "QuantizeLinear")
    x_scale, x_zero = float(initializer(model, x_q[1])), int(initializer(model, x_q[2]))
    (w_dq,) = [i for i in node_inputs(model, "DequantizeLinear") if i[1] != x_q[1]]
    w_scale = float(initializer(model, w_dq[1]))
    decoded = run_session(make_session(float_model, "cpu"), FC_X)["y"].astype(np.float64)
    actual = run_session(make_session(model, "cpu"), FC_X)["y"].astype(np.float64)
    # each centroid of the float codebook weight moves by at most w_scale/2, each input by x_scale/2
    (decode,) = find_decodes(import_graph(float_model))
    w_float = decode.stored().decode().astype(np.float64)
    x = FC_X["x"].astype(np.float64)
    x_hat = (np.clip(np.round(x / x_scale) + x_zero, 0, 255) - x_zero) * x_scale
    bound = (x_scale / 2) * np.abs(w_float).sum(axis=0) + np.abs(x_hat) @ np.full(w_float.shape, w_scale / 2)
    error = np.abs(actual - decoded)
    assert np.all(error <= bound * 1.001 + 1e-5)
    assert error.max() > 1e-3 * bound.max()  # the int8 path really ran (not the float weights)
    # the kernel computes the declared QDQ maths: x̂ · (int8 codebook · scale)
    expected = x_hat @ (np.round(w_float / w_scale) * w_scale)
    np.testing.assert_allclose(actual, expected, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("opset", [9, 17])
def test_conv_runs_qlinearconv_within_the_quantization_error(opset, tmp_path):
    context = PassContext(feeds=CONV_X)
    float_model = ClusterPass(bits=4, per_channel=True).run(conv_model(opset), context).model
    result = ClusterPass(bits=4, per_channel=True, execute="int8", int8_min_speedup=0).run(conv_model(opset), context)
    model = result.model
    assert result.report.changes[0].details["execute"] == "int8"
    if opset < 13:
        assert any("opset raised from 9 to 13" in n for n in result.report.notes)
    ops = optimized_ops(model, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops and "FusedConv" not in ops
    dq_axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert dq_axes  # per output channel scales
    decoded = run_session(make_session(float_model, "cpu"), CONV_X)["y"].astype(np.float64)
    actual = run_session(make_session(model, "cpu"), CONV_X)["y"].astype(np.float64)
    declared = run_session(make_session(model, "cpu", optimization="disabled"), CONV_X)["y"].astype(np.float64)
    scales = {i[0]: float(initializer(model, i[1])) for i in node_inputs(model, "QuantizeLinear")}
    x_scale, y_scale = scales["x"], scales[next(k for k in scales if k != "x")]
    w_scales = next(initializer(model, i[1]) for i in node_inputs(model, "DequantizeLinear")
                    if initializer(model, i[1]).size == 12 and initializer(model, i[2]).dtype == np.int8)
    # the int8 kernel computes the QDQ graph's float maths up to one output step
    assert np.abs(actual - declared).max() <= y_scale * 1.001
    # against the float codebook model: input, weight, bias and output rounding
    fan_in = CONV_W[0].size
    w_sum = np.abs(CONV_W).reshape(12, -1).sum(axis=1) * 1.5  # the codebook stays within the weight's range
    bound = (x_scale / 2) * w_sum + np.abs(CONV_X["x"]).max() * 1.01 * fan_in * w_scales / 2 \
        + x_scale * w_scales / 2 + y_scale
    error = np.abs(actual - decoded).max(axis=(0, 2, 3))
    assert np.all(error <= bound)
    assert error.max() > 0.1 * y_scale  # not the float path
    relative = np.linalg.norm(actual - decoded) / np.linalg.norm(decoded)
    assert 1e-4 < relative < 0.05


def test_value_table_decodes_turn_int8_where_the_opset_is_raised():
    """Raising opset 9 to 13 types every decode tensor float; the value table of a decode (not
    only its output) carries the codebook's values and must become int8 with it."""
    context = PassContext(feeds=FC_X)
    float_model = ClusterPass(bits=4).run(matmul_model(9), context).model
    (decoded,) = find_decodes(import_graph(float_model))
    assert decoded.node.op == "Reshape" and len(decoded.value_tensors()) == 3  # values, gathered, reshaped
    result = ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(matmul_model(9), context)
    assert result.report.changes[0].details["execute"] == "int8"
    assert any("opset raised from 9" in note for note in result.report.notes)
    expected = run_session(make_session(float_model, "cpu"), FC_X)["y"]
    actual = run_session(make_session(result.model, "cpu"), FC_X)["y"]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.05


def outlier_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """fc1 reads an input with one huge column (its uint8 step swamps the others), fc2 a normal one."""
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((64, 64)) * 0.15).astype(np.float32)
    w1[0] = 1e-4
    w2 = (rng.standard_normal((64, 32)) * 0.15).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
                        helper.make_node("MatMul", ["t", "w2"], ["y"], name="fc2")],
                       [tensor("x", ["N", 64])], [tensor("y", ["N", 32])], [init("w1", w1), init("w2", w2)])
    x = rng.standard_normal((64, 64)).astype(np.float32)
    x[:, 0] *= 3000
    return model, {"x": x}


def test_layers_over_the_budget_stay_float_codebooks(caplog):
    model, feeds = outlier_model()
    result = ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(model, PassContext(feeds=feeds))
    details = {c.layer: c.details for c in result.report.changes}
    assert details["w2"]["execute"] == "int8" and details["w2"]["int8_error"] < 1e-3
    assert details["w1"]["execute"] == "float" and "int8_max_error" in details["w1"]["int8_reason"]
    assert find_int8_decodes(import_graph(result.model)) == ["w2"]
    assert any("1 weights run int8, 1 stay float" in n for n in result.report.notes)
    # a budget no layer meets: all stay float, said once on stderr
    tight = ClusterPass(bits=4, execute="int8", int8_max_error=1e-12, int8_min_speedup=0).run(model, PassContext(feeds=feeds))
    assert not find_int8_decodes(import_graph(tight.model))
    assert sum("no weight runs int8" in r.message for r in caplog.records) == 1
    # an int8 form that must run 100x faster than the float codebooks is timed and refused
    slow = ClusterPass(bits=4, execute="int8", int8_min_speedup=100).run(model, PassContext(feeds=feeds))
    assert not find_int8_decodes(import_graph(slow.model))
    assert "was not faster" in {c.layer: c.details for c in slow.report.changes}["w2"]["int8_reason"]


def test_lstm_weights_stay_float_with_a_reason():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((1, 32, 6)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 32, 8)) * 0.3).astype(np.float32)
    model = make_model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="lstm", hidden_size=8)],
                       [tensor("x", [5, "N", 6])], [tensor("y", [5, 1, "N", 8])], [init("w", w), init("r", r)])
    result = ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(model, PassContext(feeds={"x": rng.standard_normal((5, 4, 6)).astype(np.float32)}))
    reasons = {c.layer: c.details.get("int8_reason", "") for c in result.report.changes}
    assert all("LSTM input" in reason for reason in reasons.values()) and len(reasons) == 2


def test_cli_execute_int8_end_to_end_and_bad_combinations(tmp_path):
    path, data, out, report = tmp_path / "conv.onnx", tmp_path / "x.npz", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_model(), path)
    np.savez(data, **CONV_X)
    assert main(["compress", str(path), "-o", str(out), "--data", str(data), "--cluster", "bits=4,execute=int8,int8_min_speedup=0",
                 "--force", "--report", str(report), "-q"]) == 0
    rows = [c for c in json.loads(report.read_text())["passes"][0]["changes"] if c["decision"] != "skipped"]
    assert [r["details"]["execute"] for r in rows] == ["int8"]
    assert "QLinearConv" in optimized_ops(onnx.load(out), tmp_path)
    # execute=int8 needs data; int8 options need execute=int8; unknown modes are refused
    for flags, data_flags in [("bits=4,execute=int8", []), ("bits=4,int8_max_error=0.01", ["--data", str(data)]),
                              ("bits=4,execute=int4", ["--data", str(data)]),
                              ("bits=4,execute=int8,int8_max_error=0", ["--data", str(data)]),
                              ("bits=4,int8_min_speedup=1", ["--data", str(data)])]:
        assert main(["compress", str(path), "-o", str(tmp_path / "bad.onnx"), "--cluster", flags, *data_flags,
                     "--force", "-q"]) == 2, flags
    with pytest.raises(ConfigError):
        ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(conv_model(), PassContext())


def test_reconstruct_leaves_int8_codebooks_and_says_why():
    model, feeds = outlier_model()
    result = onnxzip.compress(model, cluster={"bits": 4, "execute": "int8", "int8_min_speedup": 0}, reconstruct={}, data=feeds,
                              gate={"min_cosine": 0, "min_argmax_agreement": None})
    plan = result.report.passes[1]
    skipped = {c.layer: c.reason for c in plan.changes if c.skipped}
    assert "int8 codebook" in skipped["w2"]
    assert "int8" not in skipped.get("w1", "")  # the float codebook is a reconstruct job


def test_a_shared_weight_runs_int8_in_every_use_with_one_int32_bias(tmp_path):
    """An unrolled cell: one weight and bias used by two Gemms; their inputs share one scale."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 64)) * 0.15).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="step1", transB=1),
                        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
                        helper.make_node("Gemm", ["t", "w", "b"], ["y"], name="step2", transB=1)],
                       [tensor("x", ["N", 64])], [tensor("y", ["N", 64])],
                       [init("w", w), init("b", rng.standard_normal(64).astype(np.float32))])
    feeds = {"x": rng.standard_normal((32, 64)).astype(np.float32)}
    result = ClusterPass(bits=4, execute="int8", int8_min_speedup=0).run(model, PassContext(feeds=feeds))
    path = tmp_path / "optimized.onnx"
    make_session(result.model, "cpu", optimized_model_path=str(path))
    assert [n.op_type for n in onnx.load(path).graph.node].count("QGemm") == 2
    int32 = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.INT32 and t.dims == [64]]
    assert len(int32) == 1
    float_model = ClusterPass(bits=4).run(model, PassContext(feeds=feeds)).model
    expected = run_session(make_session(float_model, "cpu"), feeds)["y"]
    actual = run_session(make_session(result.model, "cpu"), feeds)["y"]
    assert 0 < np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.05



def test_the_speed_gate_reads_the_contexts_timer():
    """The int8-vs-float timing is the context's Timing (one timer for every latency decision):
    an injected model timer that calls the int8 form faster keeps it, one that calls it slower
    keeps the float codebooks."""
    from onnxzip.measure.latency import Timing

    model, feeds = outlier_model()

    def int8_ms(fast: bool):
        def timer(m):
            quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
            return (1.0 if fast else 3.0) if quantized else 2.0
        return timer

    kept = ClusterPass(bits=4, execute="int8", int8_min_speedup=1.5).run(
        model, PassContext(feeds=feeds, timing=Timing(model_timer=int8_ms(True))))
    assert find_int8_decodes(import_graph(kept.model)) == ["w2"]
    assert any("2.00x the float codebooks' batch-1 speed" in n for n in kept.report.notes)
    refused = ClusterPass(bits=4, execute="int8", int8_min_speedup=1.5).run(
        model, PassContext(feeds=feeds, timing=Timing(model_timer=int8_ms(False))))
    assert not find_int8_decodes(import_graph(refused.model))
