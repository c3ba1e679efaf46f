"""Run a model over a dataset in onnxruntime and score its predictions.

Batching follows the model: when an input's first dimension is a fixed number the model runs
that many items at a time (the last batch is filled up by repeating its last item, whose extra
outputs are dropped); when it is symbolic, ``batch_size`` items at a time. Items whose shapes
differ (utterances of different lengths) run one at a time. Other fixed dimensions of the model
are met by zero-padding or cutting the item at the end of that axis.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxzip.errors import ConfigError, DataError
from onnxzip.evaluators.base import Dataset, Metric, MetricResult, fit_length
from onnxzip.evaluators.data import load_dataset
from onnxzip.evaluators.registry import resolve_metrics
from onnxzip.evaluators.user import ModelMetric
from onnxzip.runtime import make_session, run_batched

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
ModelSource = onnx.ModelProto | str | os.PathLike[str] | bytes

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class Predictions:
    """Post-processed model outputs, one per dataset item, in dataset order."""

    items: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, items: Iterable[np.ndarray]) -> Predictions:
        """Wrap arrays computed outside onnxruntime (a baseline, a PyTorch model)."""
        return cls(tuple(np.asarray(item) for item in items))

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class _InputSpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: type


def _input_specs(session: Any) -> list[_InputSpec]:
    specs = []
    for node in session.get_inputs():
        shape = tuple(dim if isinstance(dim, int) else None for dim in node.shape)
        specs.append(_InputSpec(node.name, shape, _NUMPY_TYPES.get(node.type, np.float32)))
    return specs


def _prepare(feeds: dict[str, np.ndarray], specs: list[_InputSpec]) -> dict[str, np.ndarray]:
    """Item inputs matched to the model inputs and fitted to them.

    A one-input dataset feeds a one-input model whatever the two names are.
    """
    names = [spec.name for spec in specs]
    if len(feeds) == 1 and len(specs) == 1 and names[0] not in feeds:
        feeds = {names[0]: next(iter(feeds.values()))}
    missing = [name for name in names if name not in feeds]
    if missing:
        raise DataError(
            f"The data lacks the model input(s) {', '.join(missing)}; it holds "
            f"{', '.join(feeds) or 'nothing'}."
        )
    return {spec.name: _fit_item(feeds[spec.name], spec) for spec in specs}


def _fit_item(array: np.ndarray, spec: _InputSpec) -> np.ndarray:
    """The item shaped for one batch slot of ``spec``: dtype cast, fixed dims padded or cut."""
    item_shape = spec.shape[1:]
    if array.ndim == len(spec.shape) and array.shape[0] == 1:
        array = array[0]
    if array.ndim != len(item_shape):
        raise DataError(
            f"Input {spec.name!r} expects items of rank {len(item_shape)} (model shape "
            f"{list(spec.shape)} without its batch axis), got shape {array.shape}."
        )
    for axis, size in enumerate(item_shape):
        if size is not None and array.shape[axis] != size:
            log.debug(
                "fitting axis %d of input %s from %d to %d",
                axis,
                spec.name,
                array.shape[axis],
                size,
            )
            array = fit_length(array, size, axis)
    return array.astype(spec.dtype, copy=False)


def _run_group(
    session: Any, specs: list[_InputSpec], items: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Run same-shaped items as one batch (in chunks a fixed-batch model accepts); outputs
    split back per item."""
    feeds = {spec.name: np.stack([row[spec.name] for row in items]) for spec in specs}
    outputs = run_batched(session, feeds)
    return [{name: value[index] for name, value in outputs.items()} for index in range(len(items))]


def _same_shapes(items: list[dict[str, np.ndarray]]) -> bool:
    first = items[0]
    return all(row[name].shape == first[name].shape for row in items[1:] for name in first)


def predict(
    model: ModelSource,
    dataset: Dataset | Any,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> Predictions:
    """Run ``model`` on every item and post-process the outputs with ``dataset.postprocess``."""
    dataset = load_dataset(dataset)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if len(dataset) == 0:
        raise DataError("The dataset is empty.")
    session = make_session(model, device)
    specs = _input_specs(session)
    fixed = {spec.shape[0] for spec in specs if spec.shape and spec.shape[0] is not None}
    if len(fixed) > 1:
        raise DataError(f"The model's inputs disagree on a fixed batch size: {sorted(fixed)}.")
    fixed_batch = fixed.pop() if fixed else None
    group_size = fixed_batch or batch_size or DEFAULT_BATCH_SIZE
    results: list[np.ndarray] = []
    with tqdm(total=len(dataset), disable=not progress, desc="evaluating", unit="item") as bar:
        for start in range(0, len(dataset), group_size):
            indices = range(start, min(start + group_size, len(dataset)))
            items = [_prepare(dataset.inputs(index), specs) for index in indices]
            if _same_shapes(items):
                outputs = _run_group(session, specs, items)
            else:
                outputs = [_run_group(session, specs, [item])[0] for item in items]
            results.extend(dataset.postprocess(out, index) for out, index in zip(outputs, indices))
            bar.update(len(indices))
    return Predictions(tuple(results))


def _targets(metric: Metric, dataset: Dataset, reference: Predictions | None) -> list[Any]:
    if metric.target == "label":
        labels = [dataset.label(index) for index in range(len(dataset))]
        if any(label is None for label in labels):
            raise DataError(
                f"{metric.name} needs labels, but the dataset has none ('labels' in .npz)."
            )
        return labels
    if metric.target == "reference":
        references = [dataset.reference(index) for index in range(len(dataset))]
        if all(item is not None for item in references):
            return references
        if reference is None:
            raise DataError(
                f"{metric.name} needs reference outputs: the dataset has none "
                "('references' in .npz, a clean/ folder) and no reference model was given."
            )
        log.info(
            "%s: the dataset has no references; comparing with the reference model", metric.name
        )
        return list(reference.items)
    if reference is None:
        raise DataError(f"{metric.name} compares with the original model; pass reference_model=.")
    return list(reference.items)


def score(
    predictions: Predictions,
    dataset: Dataset | Any,
    metrics: Iterable[Any] | str,
    *,
    reference: Predictions | None = None,
) -> dict[str, MetricResult]:
    """Score ``predictions`` (e.g. the noisy input itself, for a baseline) with ``metrics``."""
    dataset = load_dataset(dataset)
    resolved = resolve_metrics(metrics)
    whole_model = [metric.name for metric in resolved if isinstance(metric, ModelMetric)]
    if whole_model:
        raise ConfigError(f"{', '.join(whole_model)} score a whole model file, not predictions; "
                          "use them in a quality gate (onnxzip.quality.quality_gate).")
    for given, name in ((predictions, "predictions"), (reference, "reference predictions")):
        if given is not None and len(given) != len(dataset):
            raise DataError(f"{len(given)} {name} for a dataset of {len(dataset)} items.")
    results = {}
    for metric in resolved:
        targets = _targets(metric, dataset, reference)
        results[metric.name] = metric.result(
            metric.score(list(predictions.items), targets, dataset)
        )
        log.debug("%s", results[metric.name])
    return results


def evaluate(
    model: ModelSource,
    dataset: Dataset | Any,
    metrics: Iterable[Any] | str,
    *,
    reference_model: ModelSource | Predictions | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, MetricResult]:
    """Measure ``model`` on ``dataset``: ``{metric name: MetricResult}``.

    ``reference_model`` (a model, or its :class:`Predictions` from :func:`predict` to avoid
    running it again) is what fidelity metrics compare with, and what reference metrics use when
    the dataset has no references.
    """
    dataset = load_dataset(dataset)
    resolved = resolve_metrics(metrics)
    run = dict(device=device, batch_size=batch_size, progress=progress)
    reference = (
        reference_model
        if isinstance(reference_model, Predictions) or reference_model is None
        else predict(reference_model, dataset, **run)
    )
    return score(predict(model, dataset, **run), dataset, resolved, reference=reference)
