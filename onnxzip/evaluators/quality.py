"""Where compression meets the evaluators: feeds for the fidelity check from any dataset, and
the metric quality gate (accuracy, SNR/PSNR, STOI, PESQ, user metrics) measured on the original
and the candidate model in the same run."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxzip.evaluators import GateReport, QualityGate, load_dataset, predict, score
from onnxzip.evaluators.base import Dataset
from onnxzip.evaluators.data import model_dataset
from onnxzip.evaluators.registry import split_model_metrics
from onnxzip.core.inputs import model_feeds
from onnxzip.core.io import load_model

FIDELITY_ITEMS = 32


def is_dataset_source(data: Any) -> bool:
    """Folders, Dataset objects and iterables are evaluator datasets; .npz files and dicts of
    arrays are plain feeds (and datasets too)."""
    if isinstance(data, Dataset):
        return True
    if isinstance(data, (str, os.PathLike)):
        return os.path.isdir(data)
    return data is not None and not isinstance(data, Mapping)


def fidelity_feeds(
    model: onnx.ModelProto, data: Any, *, batch: int, dims: dict[str, int], seed: int,
    sample_axes: dict[str, int | None] | None = None,
) -> dict[str, np.ndarray]:
    """Feeds for the fidelity check: from ``data`` (.npz or arrays, as
    :class:`~onnxzip.core.inputs.Samples`; or the first items of a dataset, stacked when their
    shapes agree) or generated from the signature."""
    if not is_dataset_source(data):
        return model_feeds(model, data, batch=batch, dims=dims, seed=seed, sample_axes=sample_axes)
    dataset = load_dataset(data)
    items = [dataset.inputs(i) for i in range(min(FIDELITY_ITEMS, len(dataset)))]
    same = all(item[k].shape == items[0][k].shape for item in items for k in items[0])
    chosen = items if same else items[:1]
    return {name: np.stack([item[name] for item in chosen]) for name in chosen[0]}


def check_metric_data(
    original: onnx.ModelProto, data: Any, conditions: Any, *, device: str = "auto",
    sample_axes: dict[str, int | None] | None = None,
) -> None:
    """Score the original against itself on the first two samples of array data, so that data
    the metrics cannot use (labels that are not class indices, references of another shape) is
    one sentence before anything is compressed, not after."""
    _, metrics = split_model_metrics(QualityGate(conditions).metrics)
    if not metrics or data is None or is_dataset_source(data):
        return
    dataset = model_dataset(original, data, sample_axes, first=2)
    reference = predict(original, dataset, device=device, progress=False)
    score(reference, dataset, metrics, reference=reference)


def quality_gate(
    original: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    data: Any,
    conditions: Any,
    *,
    device: str = "auto",
    progress: bool = False,
    sample_axes: dict[str, int | None] | None = None,
) -> GateReport:
    """Evaluate the metrics that ``conditions`` name on both models (the original is run once
    and also serves as the reference of fidelity metrics) and judge the conditions. Array data
    is laid out by the original's declared shapes (:func:`onnxzip.evaluators.data.model_dataset`);
    ``task`` metrics score the two model files instead (the original's score is remembered)."""
    gate = QualityGate(conditions)
    whole_model, metrics = split_model_metrics(gate.metrics)
    before = {metric.name: metric.measure(original, cache=True) for metric in whole_model}
    after = {metric.name: metric.measure(candidate) for metric in whole_model}
    if not metrics:
        return gate.check(before, after)
    dataset = model_dataset(load_model(original) if not isinstance(original, onnx.ModelProto) else original,
                            data, sample_axes)
    reference = predict(original, dataset, device=device, progress=progress)
    before |= score(reference, dataset, metrics, reference=reference)
    after |= score(predict(candidate, dataset, device=device, progress=progress), dataset, metrics,
                   reference=reference)
    return gate.check(before, after)
