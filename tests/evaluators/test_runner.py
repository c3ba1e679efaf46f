"""evaluate()/predict() end to end in onnxruntime on tiny hand-built models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.errors import DataError
from onnxzip.evaluators import QualityGate, evaluate, predict

sys.path.insert(0, str(Path(__file__).parent))  # user_metrics.py for module:function


def _classifier(weights: np.ndarray, batch: int | str = "N") -> onnx.ModelProto:
    """x[batch, 4] → MatMul(W 4×3) → logits[batch, 3]."""
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        [tensor("x", [batch, 4])],
        [tensor("logits", [batch, 3])],
        [init("w", weights.astype(np.float32))],
    )


def _scaler(time: int | str = "T") -> onnx.ModelProto:
    """audio[N, time] → audio · 0.5 (shape-preserving)."""
    return make_model(
        [helper.make_node("Mul", ["audio", "half"], ["out"])],
        [tensor("audio", ["N", time])],
        [tensor("out", ["N", time])],
        [init("half", np.array(0.5, dtype=np.float32))],
    )


@pytest.fixture()
def classification(tmp_path: Path) -> tuple[np.ndarray, Path]:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3))
    inputs = rng.normal(size=(40, 4)).astype(np.float32)
    labels = (inputs @ weights).argmax(axis=1)
    labels[:4] = (labels[:4] + 1) % 3  # 90 % accuracy for the true weights
    path = tmp_path / "data.npz"
    np.savez(path, x=inputs, labels=labels)
    return weights, path


def test_evaluate_with_npz_data_matches_numpy(classification) -> None:
    weights, path = classification
    results = evaluate(_classifier(weights), path, ["accuracy", "top5_accuracy"], progress=False)
    assert results["accuracy"].value == pytest.approx(0.9)
    assert results["top5_accuracy"].value == 1.0


def test_fixed_batch_dimension_runs_item_by_item(classification) -> None:
    weights, path = classification
    fixed = evaluate(_classifier(weights, batch=1), path, "accuracy", progress=False)
    assert fixed["accuracy"].value == pytest.approx(0.9)


def test_damaged_candidate_fails_the_gate(classification) -> None:
    weights, path = classification
    original = _classifier(weights)
    damaged = _classifier(weights + np.random.default_rng(5).normal(0, 2.0, weights.shape))
    gate = QualityGate(["accuracy:max_drop=0.05", "cosine:min=0.99", "argmax_agreement:min=0.9"])
    reference = predict(original, path, progress=False)
    before = evaluate(original, path, gate.metrics, reference_model=reference, progress=False)
    assert gate.check(before, before).passed
    after = evaluate(damaged, path, gate.metrics, reference_model=original, progress=False)
    report = gate.check(before, after)
    assert not report.passed
    assert {row.metric for row in report.failures} >= {"cosine", "argmax_agreement"}


def test_variable_lengths_run_one_at_a_time_and_fixed_lengths_are_fitted() -> None:
    waves = [np.ones(n, dtype=np.float32) for n in (100, 80, 100)]
    items = [{"audio": wave, "reference": 0.5 * wave} for wave in waves]
    predictions = predict(_scaler(), items, progress=False)
    assert [p.shape for p in predictions.items] == [(100,), (80,), (100,)]
    fitted = predict(_scaler(time=90), items, progress=False)
    assert all(p.shape == (90,) for p in fitted.items)
    assert fitted.items[1][80:].sum() == 0  # zero padding
    results = evaluate(_scaler(), items, ["snr", "user_metrics:mean_abs_error"], progress=False)
    assert results["snr"].value == float("inf")
    assert results["mean_abs_error"].value == 0.0


def test_callable_user_evaluator_and_reference_model_as_fallback_target() -> None:
    items = [{"x": np.full(4, i, dtype=np.float32)} for i in range(5)]
    model = _classifier(np.eye(4, 3))

    def largest(predictions, targets) -> float:
        return float(max(np.max(np.abs(p - t)) for p, t in zip(predictions, targets)))

    results = evaluate(model, items, ["snr", largest], reference_model=model, progress=False)
    assert results["largest"].value == 0.0
    assert results["snr"].value == float("inf")


def test_data_that_does_not_match_the_model_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [tensor("a", ["N", 2]), tensor("b", ["N", 2])],
        [tensor("y", ["N", 2])],
    )
    with pytest.raises(DataError, match="lacks the model input"):
        predict(model, [{"a": np.zeros(2)}], progress=False)
    with pytest.raises(DataError, match="rank"):
        predict(_scaler(), [{"audio": np.zeros((2, 3, 4))}], progress=False)
    with pytest.raises(DataError, match="not a readable .npz"):
        predict(_scaler(), (tmp_path / "bad.npz").write_bytes(b"xx") and tmp_path / "bad.npz")


def test_items_stack_back_on_the_sample_axis_the_data_was_cut_on() -> None:
    """A state [2, ?, 8] whose batch axis has no name (silero-vad declares [2, 0, 128]) with
    ``--sample-axis state=1``: each item is cut on axis 1 and stacked back there, not on axis 0,
    which the model fixes at 2."""
    from helpers import load_fuzz

    from onnxzip.evaluators.data import model_dataset

    model = onnx.load_from_string(load_fuzz().stateful())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim in dims:
            if dim.dim_param:
                dim.Clear()  # unknown, unnamed
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((5, 8)).astype(np.float32),
            "state": rng.standard_normal((2, 5, 8)).astype(np.float32), "sr": np.array(16000, np.int64)}
    dataset = model_dataset(model, data, {"state": 1, "sr": None})
    assert dataset.sample_axes == {"x": 0, "state": 1, "sr": None}
    got = predict(model, dataset, device="cpu", progress=False)
    from onnxzip.core.runtime import make_session, run_session

    run = make_session(model, "cpu")
    for i in range(5):
        expected = run_session(run, {"x": data["x"][i:i + 1], "state": data["state"][:, i:i + 1], "sr": data["sr"]})
        np.testing.assert_allclose(got.items[i], expected["y"][0], rtol=1e-5, atol=1e-6)
