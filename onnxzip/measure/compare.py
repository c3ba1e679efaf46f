"""Distances between two arrays of equal shape (a model's output and the original's): cosine,
relative L2, max |difference|, argmax agreement. Plain numpy, so any layer may measure with
them; the evaluators wrap them as metrics (:mod:`onnxzip.evaluators.metrics`) and
:func:`onnxzip.evaluators.fidelity.compare_arrays` reports them per output."""

from __future__ import annotations

import math

import numpy as np

from onnxzip.errors import DataError


def same_shape(prediction: np.ndarray, target: np.ndarray, metric: str) -> tuple[np.ndarray, ...]:
    """Both as float64 arrays, refusing a shape mismatch with one sentence."""
    prediction = np.asarray(prediction, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if prediction.shape != target.shape:
        raise DataError(
            f"{metric} compares arrays of equal shape, got prediction {prediction.shape} and "
            f"target {target.shape}."
        )
    return prediction, target


def quiet_nonfinite() -> np.errstate:
    """Outputs that overflow (huge inputs) make these numbers NaN or infinite, which fails any
    limit; numpy's warnings about it would only add lines to the one-sentence result."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def cosine_similarity(prediction: np.ndarray, reference: np.ndarray) -> float:
    """cos = ⟨p, r⟩ / (‖p‖·‖r‖) over the flattened arrays; 1 when both are zero."""
    p, r = same_shape(prediction, reference, "cosine")
    with quiet_nonfinite():
        norms = np.linalg.norm(p) * np.linalg.norm(r)
        if norms == 0.0:
            return 1.0 if not p.any() and not r.any() else 0.0
        return float(np.dot(p.ravel(), r.ravel()) / norms)


def relative_l2_error(prediction: np.ndarray, reference: np.ndarray) -> float:
    """‖p − r‖ / ‖r‖ (0 when both are zero, infinite when only r is)."""
    p, r = same_shape(prediction, reference, "rel_l2")
    with quiet_nonfinite():
        error = float(np.linalg.norm(p - r))
    scale = float(np.linalg.norm(r))
    if scale == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / scale


def max_abs_difference(prediction: np.ndarray, reference: np.ndarray) -> float:
    """max |p − r| over the item."""
    p, r = same_shape(prediction, reference, "max_abs_error")
    with quiet_nonfinite():
        return float(np.max(np.abs(p - r))) if p.size else 0.0


def argmax_share(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Share of positions whose argmax over the last axis agrees."""
    p, r = same_shape(prediction, reference, "argmax_agreement")
    return float(np.mean(p.argmax(axis=-1) == r.argmax(axis=-1)))
