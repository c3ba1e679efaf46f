"""Built-in numeric metrics: classification, fidelity to the original model, SNR and PSNR.

Each factory returns a :class:`~onnxzip.evaluators.base.Metric`; per-item scores are averaged
over the dataset unless stated otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from onnxzip.errors import ConfigError, DataError
from onnxzip.evaluators.base import Metric, per_item, same_shape
from onnxzip.measure.compare import argmax_share, cosine_similarity, max_abs_difference, relative_l2_error


def _top_k_hit(prediction: np.ndarray, label: Any, k: int) -> float:
    """Share of positions whose label is among the ``k`` largest scores of the last axis.

    Scores may be logits or probabilities: only their order matters. ``label`` has the shape
    of ``prediction`` without its last axis (a scalar for one classification per item).
    """
    scores = np.asarray(prediction)
    labels = np.asarray(label)
    if labels.dtype.kind not in "iub" and not (
            labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
        raise DataError(f"accuracy needs integer class labels, got {labels.dtype} values.")
    labels = labels.astype(np.int64)
    if scores.ndim == 0 or scores.shape[:-1] != labels.shape:
        raise DataError(
            f"accuracy needs class scores of shape labels.shape + (classes,), got scores "
            f"{scores.shape} for labels {labels.shape}."
        )
    if k == 1:
        return float(np.mean(scores.argmax(axis=-1) == labels))
    top = np.argpartition(-scores, min(k, scores.shape[-1]) - 1, axis=-1)[..., :k]
    return float(np.mean(np.any(top == labels[..., None], axis=-1)))


def accuracy(k: int = 1) -> Metric:
    """Top-``k`` accuracy against the labels, named ``accuracy`` (k=1) or ``top{k}_accuracy``."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"accuracy needs an integer k >= 1, got {k!r}.")
    name = "accuracy" if k == 1 else f"top{k}_accuracy"
    return Metric(name, per_item(_top_k_hit, k=k), higher_is_better=True, target="label")


def cosine() -> Metric:
    """Cosine similarity to the original model's outputs (1 is identical direction); items of
    one value each are scored as one vector over the dataset."""
    return Metric("cosine", per_item(cosine_similarity, pool_scalars=True), True, target="reference_model")


def relative_l2() -> Metric:
    """Relative L2 error ‖p − r‖/‖r‖ against the original model's outputs (items of one value
    each: over the dataset, where a per-item ratio would divide by values near zero)."""
    return Metric("rel_l2", per_item(relative_l2_error, pool_scalars=True), False, target="reference_model")


def max_abs_error() -> Metric:
    """Largest absolute difference to the original model's outputs over the whole dataset."""
    return Metric(
        "max_abs_error", per_item(max_abs_difference, reduce=np.max), False, target="reference_model"
    )


def argmax_agreement() -> Metric:
    """Share of items (positions) where candidate and original pick the same class."""
    return Metric("argmax_agreement", per_item(argmax_share), True, target="reference_model")


def snr_db(prediction: np.ndarray, reference: np.ndarray) -> float:
    """SNR = 10·log10(Σ ref² / Σ (ref − out)²) in dB; +inf for an exact match."""
    out, ref = same_shape(prediction, reference, "snr")
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr_db(prediction: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR = 10·log10(R² / mean((ref − out)²)) in dB, R the data range; +inf for a match."""
    out, ref = same_shape(prediction, reference, "psnr")
    mse = float(np.mean((ref - out) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def snr() -> Metric:
    """Mean per-item SNR (dB) of outputs against the reference images/tensors."""
    return Metric("snr", per_item(snr_db), True, unit="dB")


def psnr(data_range: float = 1.0) -> Metric:
    """Mean per-item PSNR (dB) for data spanning ``data_range`` (1.0 for images in [0, 1])."""
    if not isinstance(data_range, (int, float)) or data_range <= 0:
        raise ConfigError(f"psnr needs a positive data_range, got {data_range!r}.")
    return Metric("psnr", per_item(psnr_db, data_range=float(data_range)), True, unit="dB")
