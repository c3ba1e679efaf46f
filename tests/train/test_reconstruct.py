"""The reconstruct step: codebook weights refit to the original's layer outputs on calibration
data, inside If branches, in recurrent layers, from the CLI; errors measured in onnxruntime on
samples the step never saw."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import TensorProto, helper

from onnxzip.api import compress
from onnxzip.cli import main
from onnxzip.recipe import Recipe
from onnxzip.core.runtime import make_session, run_session

RNG = np.random.default_rng(7)


def _inputs(samples: int, shape: tuple[int, ...], mixing: np.ndarray) -> np.ndarray:
    """Correlated inputs (the last axis mixed), so the layers' Gram matrices are far from diagonal."""
    return (RNG.standard_normal((samples, *shape)) @ mixing).astype(np.float32)


def _error(model: onnx.ModelProto | str, original: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> float:
    reference = run_session(make_session(original, "cpu"), feeds)["y"]
    output = run_session(make_session(model, "cpu"), feeds)["y"]
    return float(np.sum((output - reference) ** 2) / np.sum(reference ** 2))


def _if_model() -> onnx.ModelProto:
    """x[N,16] → If(ΣX > -1e30, always true): then MatMul(w1) + b1 → Relu → MatMul(w2);
    else MatMul(−x, w3). All weights live in the branches."""
    def branch(name, nodes, weights):
        return helper.make_graph(nodes, name, [], [tensor("y_" + name, ["N", 8])], weights)

    then = branch("then", [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y_then"], name="fc2"),
    ], [init("w1", RNG.standard_normal((16, 32)).astype(np.float32)),
        init("b1", RNG.standard_normal(32).astype(np.float32)),
        init("w2", RNG.standard_normal((32, 8)).astype(np.float32))])
    other = branch("else", [helper.make_node("Neg", ["x"], ["negated"]),
                            helper.make_node("MatMul", ["negated", "w3"], ["y_else"], name="fc3")],
                   [init("w3", RNG.standard_normal((16, 8)).astype(np.float32))])
    return make_model([
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "floor"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ], [tensor("x", ["N", 16])], [tensor("y", ["N", 8])], [init("floor", np.array(-1e30, np.float32))])


@pytest.mark.parametrize("channel_scale", [False, True])
def test_reconstruct_lowers_the_output_error_of_weights_inside_an_if_branch(channel_scale):
    model, mixing = _if_model(), np.eye(16) + 0.5 * RNG.standard_normal((16, 16))
    fit, held = _inputs(512, (16,), mixing), _inputs(512, (16,), mixing)
    cluster = {"cluster": {"bits": 2, "channel_scale": channel_scale}}
    clustered = compress(model, {"passes": [cluster]}, data={"x": fit}, check=False)
    rebuilt = compress(model, {"passes": [cluster, {"reconstruct": {}}]}, data={"x": fit}, check=False)
    step = rebuilt.report.passes[1]
    done = {c.layer: c for c in step.changes if not c.skipped}
    assert set(done) == {"w1", "w2"}  # the weights of the branch the data takes
    assert "If branch" in next(c.reason for c in step.changes if c.layer == "w3")
    for change in done.values():
        assert change.details["error_after"] < change.details["error_before"]
        assert change.details["held_rows"] > 0
    assert _error(rebuilt.model, model, {"x": held}) < 0.7 * _error(clustered.model, model, {"x": held})
    assert rebuilt.model.ByteSize() == clustered.model.ByteSize()


@pytest.mark.parametrize("channel_scale", [False, True])
def test_reconstruct_refits_gru_input_and_recurrent_weights(channel_scale):
    hidden, features = 16, 8
    model = make_model([
        helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["time_major", "w", "r", "b"], ["states"], name="gru", hidden_size=hidden,
                         linear_before_reset=1),
        helper.make_node("Transpose", ["states"], ["batch_major"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["batch_major", "flat"], ["seq"]),
        helper.make_node("MatMul", ["seq", "w_out"], ["y"], name="out"),
    ], [tensor("x", ["N", 12, features])], [tensor("y", ["N", 12, 4])], [
        init("w", 0.5 * RNG.standard_normal((1, 3 * hidden, features)).astype(np.float32)),
        init("r", 0.5 * RNG.standard_normal((1, 3 * hidden, hidden)).astype(np.float32)),
        init("b", 0.1 * RNG.standard_normal((1, 6 * hidden)).astype(np.float32)),
        init("flat", np.array([0, 12, hidden], np.int64)),
        init("w_out", RNG.standard_normal((hidden, 4)).astype(np.float32)),
    ], opset=14)
    mixing = np.eye(features) + 0.5 * RNG.standard_normal((features, features))
    fit, held = _inputs(96, (12, features), mixing), _inputs(96, (12, features), mixing)
    passes = [{"cluster": {"bits": 2, "small_params": False, "channel_scale": channel_scale}}]
    clustered = compress(model, {"passes": passes}, data={"x": fit}, check=False)
    rebuilt = compress(model, {"passes": [*passes, {"reconstruct": {"holdout": 0}}]}, data={"x": fit}, check=False)
    step = rebuilt.report.passes[1]
    assert {c.layer for c in step.changes if not c.skipped} == {"w", "r"}  # w_out is too small to cluster
    assert all(c.details.get("bias_corrected") for c in step.changes if c.layer in ("w", "r"))
    assert _error(rebuilt.model, model, {"x": held}) < 0.85 * _error(clustered.model, model, {"x": held})
    assert rebuilt.model.ByteSize() == clustered.model.ByteSize()


def test_compress_cluster_3_bits_with_reconstruct_from_the_cli(tmp_path, capsys):
    model = make_model([
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["y"], name="add2"),
    ], [tensor("x", ["N", 24])], [tensor("y", ["N", 10])], [
        init("w1", (RNG.standard_normal((40, 24)) / 5).astype(np.float32)),
        init("b1", RNG.standard_normal(40).astype(np.float32)),
        init("w2", RNG.standard_normal((40, 10)).astype(np.float32)),
        init("b2", RNG.standard_normal(10).astype(np.float32)),
    ])
    mixing = np.eye(24) + 0.5 * RNG.standard_normal((24, 24))
    source, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    np.savez(data, x=_inputs(400, (24,), mixing))
    held = {"x": _inputs(400, (24,), mixing)}
    outputs = {}
    for name, extra in (("plain", []), ("rebuilt", ["--reconstruct"])):
        outputs[name] = tmp_path / f"{name}.onnx"
        code = main(["compress", str(source), "-o", str(outputs[name]), "--data", str(data), "--cluster", "bits=3",
                     "--force", "-q", *extra])
        assert code == 0, capsys.readouterr().err
    assert _error(str(outputs["rebuilt"]), model, held) < 0.7 * _error(str(outputs["plain"]), model, held)
    assert outputs["rebuilt"].stat().st_size == outputs["plain"].stat().st_size


def test_reconstruct_recipe_key_and_keyword():
    step = Recipe.from_dict({"passes": [{"cluster": {"bits": 3}}, {"reconstruct": {"iterations": 1}}]}).build_passes()[1]
    assert step.name == "reconstruct" and step.config.iterations == 1
    with pytest.raises(Exception, match="holdout"):
        Recipe.from_dict({"passes": [{"reconstruct": {"holdout": 0.9}}]}).build_passes()
    model = _if_model()
    result = compress(model, data={"x": _inputs(64, (16,), np.eye(16))}, check=False,
                      cluster={"bits": 2}, reconstruct={"iterations": 1})
    assert [p.pass_name for p in result.report.passes][:2] == ["cluster", "reconstruct"]
    scored = {c.layer for c in result.report.passes[1].changes if "error_before" in c.details}
    assert scored == {"w1", "w2"}


def test_reconstruct_with_fewer_rows_than_inputs_keeps_a_fit_that_generalises():
    """24 fitted rows for 48 inputs: GPTQ reassignment fits them and errs on the held-back ones;
    the step compares its tries (centroids alone, more damping) on the held-back rows and keeps
    one that lowers the error there, and the output error on new inputs goes down."""
    rng = np.random.default_rng(21)
    mixing = np.eye(48) + 0.5 * rng.standard_normal((48, 48))
    model = make_model([
        helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ], [tensor("x", ["N", 48])], [tensor("y", ["N", 8])],
        [init("w1", (rng.standard_normal((48, 32)) * 0.2).astype(np.float32)),
         init("w2", rng.standard_normal((32, 8)).astype(np.float32))])
    fit = (rng.standard_normal((32, 48)) @ mixing).astype(np.float32)
    fresh = {"x": (rng.standard_normal((512, 48)) @ mixing).astype(np.float32)}
    clustered = compress(model, {"passes": [{"cluster": {"bits": 2}}]}, data={"x": fit}, check=False)
    rebuilt = compress(model, {"passes": [{"cluster": {"bits": 2}}, {"reconstruct": {}}]}, data={"x": fit}, check=False)
    changes = {c.layer: c for c in rebuilt.report.passes[1].changes}
    kept = [c for c in changes.values() if c.decision.startswith("reconstructed")]
    assert kept and all(c.details["error_after"] < c.details["error_before"] for c in kept)
    assert any(c.details["step"] == "centroid refit" or c.details["damp"] > 0.01 for c in kept)
    assert _error(rebuilt.model, model, fresh) < _error(clustered.model, model, fresh)
