"""The metric registry and the one parser for metric specifications.

A specification is a registry name (``"psnr"``), a name with options
(``"psnr:data_range=255"``, ``"accuracy:k=3"``), a mapping (``{"name": "pesq", "mode": "nb"}``),
a user evaluator as ``"user:FILE.py:function"``, ``"user:package.module:function"``,
``"package.module:function"`` or a Python callable, a model-level task score as
``"task:FILE.py:function"`` (see :mod:`onnxzip.evaluators.user`), or a ready
:class:`~onnxzip.evaluators.base.Metric`. Result names equal the registry names for default
options, so a quality gate's metric names can be evaluated directly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxzip.errors import ConfigError
from onnxzip.evaluators import audio, metrics
from onnxzip.evaluators.base import FUNCTION_KINDS, Dataset, Metric, coerce, parse_spec
from onnxzip.evaluators.user import ModelMetric, call_user, function_label, load_function, task_metric

UserFunction = Callable[[Sequence[np.ndarray], Sequence[Any]], float]


def user_metric(
    function: str | UserFunction,
    name: str | None = None,
    higher_is_better: bool = True,
    unit: str = "",
    target: str = "reference",
) -> Metric:
    """A user evaluator ``function(predictions, targets) -> float`` over the whole dataset.

    ``function`` is a callable, ``"FILE.py:function"`` or ``"package.module:function"``;
    ``target`` chooses the targets (``label``, ``reference`` or ``reference_model``, see
    :mod:`onnxzip.evaluators.base`).
    """
    callable_ = load_function(function) if isinstance(function, str) else function
    if not callable(callable_):
        raise ConfigError(f"A user evaluator must be callable, got {type(function).__name__}.")
    label = function_label(function)

    def score(predictions: Sequence[np.ndarray], targets: Sequence[Any], dataset: Dataset) -> float:
        return call_user(callable_, label, list(predictions), list(targets))

    metric_name = name or getattr(callable_, "__name__", "user")
    return Metric(metric_name, score, bool(higher_is_better), unit, target)


EVALUATORS: dict[str, Callable[..., Metric]] = {
    "accuracy": metrics.accuracy,
    "top5_accuracy": functools.partial(metrics.accuracy, k=5),
    "cosine": metrics.cosine,
    "rel_l2": metrics.relative_l2,
    "max_abs_error": metrics.max_abs_error,
    "argmax_agreement": metrics.argmax_agreement,
    "snr": metrics.snr,
    "psnr": metrics.psnr,
    "stoi": audio.stoi,
    "estoi": functools.partial(audio.stoi, extended=True),
    "pesq": audio.pesq,
    "pesq_nb": functools.partial(audio.pesq, mode="nb"),
    "user": user_metric,
    "task": task_metric,
}


def _build(name: str, options: Mapping[str, Any]) -> Metric | ModelMetric:
    kind, _, function = name.partition(":")
    if kind in FUNCTION_KINDS and function:  # user:scorer.py:fn, named by the whole reference
        if "name" in options or "function" in options:
            raise ConfigError(f"{name!r} is named by its function; drop the option(s) name/function.")
        options = {"function": function, "name": name, **options}
        name = kind
    factory = EVALUATORS.get(name)
    if factory is None:
        raise ConfigError(f"Unknown metric {name!r}; choose one of {', '.join(EVALUATORS)}.")
    values = {key: coerce(value) for key, value in options.items()}
    try:
        inspect.signature(factory).bind(**values)
    except TypeError as exc:
        raise ConfigError(
            f"Metric {name!r} does not accept the options {sorted(values)} ({exc})."
        ) from exc
    return factory(**values)


def resolve_metric(spec: str | Mapping[str, Any] | Metric | ModelMetric | UserFunction) -> Metric | ModelMetric:
    """One metric from any specification form (see the module docstring); a ``task`` form gives
    a :class:`~onnxzip.evaluators.user.ModelMetric`, which scores model files, not predictions."""
    if isinstance(spec, (Metric, ModelMetric)):
        return spec
    if isinstance(spec, str):
        module, _, function = spec.partition(":")
        if module.strip() not in EVALUATORS and function and "=" not in function and ":" not in function:
            return user_metric(spec.strip())
        return _build(*parse_spec(spec))
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ConfigError(f"A metric mapping needs a 'name', got {dict(spec)!r}.")
        return _build(str(options.pop("name")), options)
    if callable(spec):
        return user_metric(spec)
    raise ConfigError(f"Cannot read a metric from a {type(spec).__name__}.")


def resolve_metrics(specs: Iterable[Any] | str | Metric) -> list[Metric | ModelMetric]:
    """Several metrics; names must be unique so results can be keyed by them."""
    items = [specs] if isinstance(specs, (str, Metric, Mapping)) or callable(specs) else list(specs)
    resolved = [resolve_metric(spec) for spec in items]
    names = [metric.name for metric in resolved]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"Metric names must be unique; repeated: {', '.join(duplicates)}.")
    return resolved


def split_model_metrics(specs: Iterable[Any]) -> tuple[list[ModelMetric], list[Any]]:
    """``(task metrics, resolved; every other spec, as given)``: the first score model files,
    the others predictions on data."""
    whole_model, on_data = [], []
    for spec in specs:
        metric = resolve_metric(spec)
        if isinstance(metric, ModelMetric):
            whole_model.append(metric)
        else:
            on_data.append(spec)
    return whole_model, on_data
