"""Run a model over a dataset in onnxruntime and score its predictions.

Batching follows the model (:func:`onnxzip.core.runtime.run_samples`): items are stacked on each
input's declared batch axis (not always axis 0: a state ``[layers, batch, hidden]``); a model
that fixes its batch runs that many items at a time, a symbolic batch ``batch_size`` at a time;
an item that is the declared shape exactly (a scalar sample rate) is fed whole. Items whose shapes
differ (utterances of different lengths) run one at a time. Other fixed dimensions of the model
are met by zero-padding or cutting the item at the end of that axis.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxzip.errors import ConfigError, DataError
from onnxzip.evaluators.base import Dataset, Metric, MetricResult, fit_length
from onnxzip.evaluators.data import load_dataset, model_dataset
from onnxzip.core.io import load_model
from onnxzip.evaluators.registry import resolve_metrics
from onnxzip.evaluators.user import ModelMetric
from onnxzip.core.inputs import BATCH_NAMES, session_shapes, take
from onnxzip.core.runtime import make_session, run_samples

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
    shape: tuple[int | str | None, ...]
    dtype: type
    axis: int  # where an item's sample axis goes: the declared batch (not always axis 0)
    named: bool = False  # the axis is a symbol named like a batch (else axis 0 by default)


def _input_specs(session: Any) -> list[_InputSpec]:
    shapes = session_shapes(session)
    symbols = {shape[0] for shape in shapes.values() if shape and isinstance(shape[0], str)}
    specs = []
    for node in session.get_inputs():
        shape = shapes[node.name] or ()
        named = [axis for axis, dim in enumerate(shape) if isinstance(dim, str)
                 and (dim in BATCH_NAMES or "batch" in dim.lower() or dim in symbols)]
        specs.append(_InputSpec(node.name, shape, _NUMPY_TYPES.get(node.type, np.float32),
                                named[0] if named else 0, bool(named)))
    return specs


def _prepare(feeds: dict[str, np.ndarray], specs: list[_InputSpec]) -> dict[str, tuple[np.ndarray, int | None]]:
    """Item inputs matched to the model inputs and fitted to them, each with the axis it is
    stacked on (None: the same for every item, fed whole).

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
    return {spec.name: _fit_item(np.asarray(feeds[spec.name]), spec) for spec in specs}


def _fit_item(array: np.ndarray, spec: _InputSpec) -> tuple[np.ndarray, int | None]:
    """The item shaped for one batch slot of ``spec`` (dtype cast, fixed dims padded or cut)
    and its stacking axis; an array that is the declared shape exactly is fed whole."""
    rank = len(spec.shape)
    if array.ndim == rank and all(isinstance(d, int) for d in spec.shape) and array.shape == spec.shape:
        return array.astype(spec.dtype, copy=False), None
    axis = spec.axis
    if array.ndim == rank:
        if not rank or array.shape[axis] != 1:
            raise DataError(
                f"Input {spec.name!r} expects items of rank {rank - 1} (model shape {list(spec.shape)} "
                f"without its sample axis {axis}), got shape {array.shape}."
            )
        array = np.squeeze(array, axis)
    if array.ndim != rank - 1:
        raise DataError(
            f"Input {spec.name!r} expects items of rank {rank - 1} (model shape {list(spec.shape)} "
            f"without its sample axis {axis}), got shape {array.shape}."
        )
    # The item's axes are the declared ones without the sample axis; where no axis is named like a
    # batch and that reading does not fit the fixed sizes while another axis's removal does (a
    # state [2, 1, 128] with items [2, 128]), the item is stacked there instead.
    fits = [a for a in range(rank) if all(
        not isinstance(d, int) or d == size for d, size in zip(spec.shape[:a] + spec.shape[a + 1:], array.shape))]
    if not spec.named and fits and axis not in fits:
        axis = fits[0]
    item_shape = spec.shape[:axis] + spec.shape[axis + 1:]
    for index, size in enumerate(item_shape):
        if isinstance(size, int) and array.shape[index] != size:
            log.debug("fitting axis %d of input %s from %d to %d", index, spec.name, array.shape[index], size)
            array = fit_length(array, size, index)
    return array.astype(spec.dtype, copy=False), axis


def _run_group(
    session: Any, specs: list[_InputSpec], items: list[dict[str, tuple[np.ndarray, int | None]]]
) -> list[dict[str, np.ndarray]]:
    """Run same-shaped items as one batch (in chunks a fixed-batch model accepts); outputs
    split back per item."""
    feeds, axes = {}, {}
    for spec in specs:
        first, axis = items[0][spec.name]
        axes[spec.name] = axis
        feeds[spec.name] = first if axis is None else np.stack([row[spec.name][0] for row in items], axis=axis)
    outputs, out_axes = run_samples(session, feeds, sample_axes=axes)
    return [{name: take(value, index, out_axes[name]) if out_axes[name] is not None else value
             for name, value in outputs.items()} for index in range(len(items))]


def _same_shapes(items: list[dict[str, tuple[np.ndarray, int | None]]]) -> bool:
    first = items[0]
    return all(row[name][0].shape == first[name][0].shape and row[name][1] == first[name][1]
               for row in items[1:] for name in first)


def predict(
    model: ModelSource,
    dataset: Dataset | Any,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> Predictions:
    """Run ``model`` on every item and post-process the outputs with ``dataset.postprocess``;
    arrays are laid out by the model's declared shapes (:func:`model_dataset`)."""
    dataset = _dataset_for(model, dataset)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if len(dataset) == 0:
        raise DataError("The dataset is empty.")
    session = make_session(model, device)
    specs = _input_specs(session)
    known = getattr(dataset, "sample_axes", None) or {}  # the data's layout (e.g. --sample-axis state=1)
    specs = [replace(spec, axis=known[spec.name], named=True) if known.get(spec.name) is not None
             else spec for spec in specs]
    group_size = batch_size or DEFAULT_BATCH_SIZE
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


def _dataset_for(model: ModelSource, dataset: Any) -> Dataset:
    """``dataset`` as a :class:`Dataset`, array data laid out for ``model``."""
    if isinstance(dataset, Dataset) or isinstance(model, bytes):
        return load_dataset(dataset)
    return model_dataset(load_model(model), dataset)


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
                          "use them in a quality gate (onnxzip.evaluators.quality.quality_gate).")
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
    dataset = _dataset_for(model, dataset)
    resolved = resolve_metrics(metrics)
    run = dict(device=device, batch_size=batch_size, progress=progress)
    reference = (
        reference_model
        if isinstance(reference_model, Predictions) or reference_model is None
        else predict(reference_model, dataset, **run)
    )
    return score(predict(model, dataset, **run), dataset, resolved, reference=reference)
