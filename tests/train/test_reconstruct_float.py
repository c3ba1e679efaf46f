"""The reconstruct step on float layers: SVD factor pairs refit by the activation-whitened
truncation and a least-squares refit of the second factor, and consumers of pruned channels
refit by least squares; errors measured in onnxruntime on samples the step never saw."""
from __future__ import annotations

import json

import numpy as np
import onnx
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.api import compress
from onnxzip.cli import main
from onnxzip.core.runtime import make_session, run_session
from onnxzip.svd.whiten import refit_second_factor, ridge_target, whitened_truncation

RNG = np.random.default_rng(11)


def _error(model: onnx.ModelProto | str, original: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> float:
    reference = run_session(make_session(original, "cpu"), feeds)["y"]
    output = run_session(make_session(model, "cpu"), feeds)["y"]
    return float(np.sum((output - reference) ** 2) / np.sum(reference ** 2))


def _correlated(samples: int, width: int, mixing: np.ndarray) -> np.ndarray:
    return (RNG.standard_normal((samples, width)) @ mixing).astype(np.float32)


def test_whitened_truncation_beats_plain_svd_and_the_second_factor_refit_is_least_squares():
    m, n, rank, rows = 20, 30, 5, 3000
    weight = RNG.standard_normal((m, n))
    mixing = RNG.standard_normal((n, n)) * np.logspace(0, -2, n)  # a few input directions dominate
    x = RNG.standard_normal((rows, n)) @ mixing
    gram = x.T @ x
    target, gram_d = ridge_target(weight, gram, gram, damp=1e-8)
    second, first = whitened_truncation(target, gram_d, rank)
    assert second.shape == (m, rank) and first.shape == (rank, n)
    u, s, vt = np.linalg.svd(weight)
    plain = (u[:, :rank] * s[:rank]) @ vt[:rank]

    def output_error(matrix: np.ndarray) -> float:
        return float(np.linalg.norm(x @ matrix.T - x @ weight.T))

    assert output_error(second @ first) < 0.8 * output_error(plain)
    # the brute-force check: no random rank-r factor pair near it does better on the rows
    best = output_error(second @ first)
    for _ in range(20):
        assert output_error((second + 1e-3 * RNG.standard_normal(second.shape))
                            @ (first + 1e-3 * RNG.standard_normal(first.shape))) >= best

    # the second factor's refit for a fixed (here: unrelated) first factor is lstsq on the rows A x̃
    other = RNG.standard_normal((rank, n))
    x_current = x + 0.1 * RNG.standard_normal(x.shape)  # the compressed model's input differs
    refit = refit_second_factor(other, weight, x_current.T @ x_current, x_current.T @ x, damp=1e-12,
                                prior=np.zeros((m, rank)))
    expected = np.linalg.lstsq(x_current @ other.T, x @ weight.T, rcond=None)[0].T
    np.testing.assert_allclose(refit, expected, rtol=1e-6, atol=1e-8)
    # a pruned input (fewer columns in x̃ than in x): the target is the same least squares
    narrow = x_current[:, ::2]
    fitted = ridge_target(weight, narrow.T @ narrow, narrow.T @ x, damp=1e-12, prior=np.zeros((m, n // 2 + n % 2)))[0]
    np.testing.assert_allclose(fitted, np.linalg.lstsq(narrow, x @ weight.T, rcond=None)[0].T, rtol=1e-6, atol=1e-8)


def _mlp() -> onnx.ModelProto:
    return make_model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h1"], name="add1"),
        helper.make_node("Tanh", ["h1"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["y"], name="fc2"),
    ], [tensor("x", ["N", 48])], [tensor("y", ["N", 32])], [
        init("w1", (RNG.standard_normal((48, 64)) / 6).astype(np.float32)),
        init("b1", (0.1 * RNG.standard_normal(64)).astype(np.float32)),
        init("w2", (RNG.standard_normal((64, 32)) / 8).astype(np.float32)),
    ])


def test_reconstruct_refits_svd_factor_pairs_from_the_cli(tmp_path, capsys):
    model = _mlp()
    rotation = np.linalg.qr(RNG.standard_normal((48, 48)))[0]
    mixing = 3 * (rotation * np.logspace(0, -2, 48)) @ rotation.T  # a few input directions dominate
    source, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    np.savez(data, x=_correlated(512, 48, mixing))
    held = {"x": _correlated(512, 48, mixing)}
    outputs = {}
    for name, extra in (("plain", []), ("rebuilt", ["--reconstruct"])):
        outputs[name] = tmp_path / f"{name}.onnx"
        code = main(["compress", str(source), "-o", str(outputs[name]), "--data", str(data),
                     "--svd", "rank=8,min_size=1", "--force", "-q", "--report", str(tmp_path / f"{name}.json"), *extra])
        assert code == 0, capsys.readouterr().err
    assert _error(str(outputs["rebuilt"]), model, held) < 0.5 * _error(str(outputs["plain"]), model, held)
    assert outputs["rebuilt"].stat().st_size == outputs["plain"].stat().st_size
    step = json.loads((tmp_path / "rebuilt.json").read_text())["passes"][1]
    assert step["pass_name"] == "reconstruct"
    done = {c["layer"]: c for c in step["changes"] if c["decision"] != "skipped"}
    assert set(done) == {"fc1", "fc2"}
    for change in done.values():
        assert change["details"]["refit"] == "svd factors" and change["details"]["rank"] == 8
        assert change["details"]["error_after"] < change["details"]["error_before"]


def _convnet() -> onnx.ModelProto:
    return make_model([
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ], [tensor("x", ["N", 3, 10, 10])], [tensor("y", ["N", 6, 10, 10])], [
        init("w1", (RNG.standard_normal((24, 3, 3, 3)) / 4).astype(np.float32)),
        init("b1", (0.2 * RNG.standard_normal(24)).astype(np.float32)),
        init("w2", (RNG.standard_normal((6, 24, 3, 3)) / 12).astype(np.float32)),
        init("b2", (0.1 * RNG.standard_normal(6)).astype(np.float32)),
    ])


def test_reconstruct_refits_the_consumer_of_pruned_channels():
    model = _convnet()
    fit = {"x": RNG.standard_normal((64, 3, 10, 10)).astype(np.float32)}
    held = {"x": RNG.standard_normal((64, 3, 10, 10)).astype(np.float32)}
    prune = {"prune-channels": {"ratio": 0.5, "importance": "l1"}}
    pruned = compress(model, {"passes": [prune]}, data=fit, check=False)
    rebuilt = compress(model, {"passes": [prune, {"reconstruct": {}}]}, data=fit, check=False)
    step = rebuilt.report.passes[1]
    done = {c.layer: c for c in step.changes if not c.skipped}
    assert set(done) == {"conv2"}  # conv1 lost outputs, not inputs
    details = done["conv2"].details
    assert details["refit"] == "pruned input" and details["inputs"] == [12 * 9, 24 * 9]
    assert details["error_after"] < details["error_before"]
    assert _error(rebuilt.model, model, held) < 0.7 * _error(pruned.model, model, held)
    assert rebuilt.model.ByteSize() == pruned.model.ByteSize()


def test_reconstruct_reports_factor_pairs_it_cannot_match_to_the_original():
    model = _mlp()
    data = {"x": RNG.standard_normal((64, 48)).astype(np.float32)}
    factored = compress(model, {"passes": [{"svd": {"rank": 8, "min_size": 1}}]}, data=data, check=False).model
    # the factorized model as the original: its fc1/fc2 hold a factor, not the composite weight
    result = compress(factored, {"passes": [{"reconstruct": {}}]}, data=data, check=False)
    changes = {c.layer: c for c in result.report.passes[0].changes}
    assert {"fc1", "fc2"} <= set(changes)
    assert all(changes[n].skipped and "do not compose" in changes[n].reason for n in ("fc1", "fc2"))
    assert not result.report.passes[0].modified
