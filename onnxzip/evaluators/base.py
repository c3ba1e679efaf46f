"""The evaluator contract: datasets, metrics, results.

A :class:`Dataset` gives, per item, the model inputs (no batch axis), an optional label, an
optional reference (the "standard" output: clean image, clean speech), and a ``postprocess``
hook that turns the model's outputs for that item into the prediction the metrics score (a
spectral mask becomes a waveform, a logit vector stays as it is).

A :class:`Metric` scores all predictions of a dataset against their targets in one call and
says whether higher is better, so a quality gate can compare any two results generically
(the idea of Olive's ``MetricResult``). Its ``target`` names what it compares against:

* ``"label"`` – the dataset's labels (accuracy);
* ``"reference"`` – the dataset's references, or the reference model's predictions when the
  dataset has none (SNR, PSNR, STOI, PESQ);
* ``"reference_model"`` – the predictions of the original model (fidelity metrics).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxzip.errors import ConfigError, DataError
from onnxzip.measure.compare import same_shape

TARGETS = ("label", "reference", "reference_model")

ScoreFunction = Callable[[Sequence[np.ndarray], Sequence[Any], "Dataset"], float]


class Dataset(abc.ABC):
    """Items for evaluation, addressed by index so two models see them in the same order."""

    #: Sample rate in Hz of audio items (None for other data); audio metrics read it.
    sample_rate: int | None = None
    #: Name of the model output that ``postprocess`` uses by default (None: the first output).
    output: str | None = None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abc.abstractmethod
    def inputs(self, index: int) -> dict[str, np.ndarray]:
        """Model inputs of item ``index`` by input name, without the batch axis."""

    def label(self, index: int) -> Any | None:
        """Label of item ``index`` (class index or array of them), or None."""
        return None

    def reference(self, index: int) -> np.ndarray | None:
        """Reference output of item ``index`` (what a perfect model would give), or None."""
        return None

    def postprocess(self, outputs: Mapping[str, np.ndarray], index: int) -> np.ndarray:
        """The prediction scored for item ``index``: by default the selected model output."""
        if self.output is None:
            return next(iter(outputs.values()))
        if self.output not in outputs:
            raise DataError(
                f"The dataset scores output {self.output!r}, but the model's outputs are "
                f"{', '.join(outputs)}."
            )
        return outputs[self.output]


@dataclass(frozen=True)
class MetricResult:
    """One measured value and how to read it."""

    name: str
    value: float
    higher_is_better: bool = True
    unit: str = ""

    def drop_from(self, original: MetricResult) -> float:
        """How much worse this result is than ``original`` (negative when it is better)."""
        difference = original.value - self.value
        return difference if self.higher_is_better else -difference

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data; non-finite values become the strings ``"inf"``, ``"nan"``."""
        return {
            "name": self.name,
            "value": json_number(self.value),
            "higher_is_better": self.higher_is_better,
            "unit": self.unit,
        }

    def __str__(self) -> str:
        return f"{self.name} = {format_number(self.value)}{' ' + self.unit if self.unit else ''}"


@dataclass(frozen=True)
class Metric:
    """A named score over a whole dataset: ``score(predictions, targets, dataset) -> float``."""

    name: str
    score: ScoreFunction
    higher_is_better: bool = True
    unit: str = ""
    target: str = "reference"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(
                f"Metric {self.name!r} has target {self.target!r}; choose one of "
                f"{', '.join(TARGETS)}."
            )

    def result(self, value: float) -> MetricResult:
        """Wrap a measured value."""
        return MetricResult(self.name, float(value), self.higher_is_better, self.unit)


def per_item(
    function: Callable[..., float], reduce: Callable[[np.ndarray], float] = np.mean, *,
    pool_scalars: bool = False, **options: Any
) -> ScoreFunction:
    """A score function applying ``function(prediction, target, **options)`` per item, then
    reducing (mean by default) over items. With ``pool_scalars``, items of one value each (a
    speech probability, a score) are scored as one vector over the dataset: the cosine of two
    one-value items is only their sign agreement."""

    def score(predictions: Sequence[np.ndarray], targets: Sequence[Any], dataset: Dataset) -> float:
        if pool_scalars and predictions and all(np.size(p) == 1 and np.size(t) == 1
                                                for p, t in zip(predictions, targets)):
            pooled = np.asarray([np.ravel(p)[0] for p in predictions], dtype=np.float64)
            return float(function(pooled, np.asarray([np.ravel(t)[0] for t in targets], dtype=np.float64), **options))
        values = [function(p, t, **options) for p, t in zip(predictions, targets)]
        return float(reduce(np.asarray(values, dtype=np.float64)))

    return score


def fit_length(array: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    """``array`` cut or zero-padded at the end of ``axis`` to ``length`` entries."""
    size = array.shape[axis]
    if size >= length:
        return np.take(array, np.arange(length), axis=axis)
    padding = [(0, 0)] * array.ndim
    padding[axis] = (0, length - size)
    return np.pad(array, padding)


#: Metric names that carry a user function: ``user:SOURCE:FUNCTION``, ``task:SOURCE:FUNCTION``.
FUNCTION_KINDS = ("user", "task")


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:key=value,key=value"`` into the name and its options (values as text).

    Only the first ``:`` separates, so values may contain colons (``function=pkg.mod:fn``),
    except after ``user`` or ``task``: ``user:scorer.py:fn:max_drop=1`` names the metric
    ``user:scorer.py:fn`` (a file or ``package.module``, then the function) with options after.
    """
    name, _, rest = text.strip().partition(":")
    if name.strip() in FUNCTION_KINDS and rest and "=" not in rest.partition(":")[0]:
        source, sep, tail = rest.partition(":")
        function, _, rest = tail.partition(":")
        if not sep or not function.strip() or "=" in function:
            raise ConfigError(
                f"{text!r}: write {name.strip()}:FILE.py:FUNCTION or {name.strip()}:package.module:FUNCTION, "
                "then the bounds (e.g. ':max_drop=0.5')."
            )
        name = f"{name.strip()}:{source.strip()}:{function.strip()}"
    options: dict[str, str] = {}
    for part in filter(None, (piece.strip() for piece in rest.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise ConfigError(f"{text!r}: expected key=value after {name!r}:, got {part!r}.")
        options[key.strip()] = value.strip()
    if not name.strip():
        raise ConfigError(f"{text!r} names no metric.")
    return name.strip(), options


def coerce(value: Any) -> Any:
    """Turn option text into bool, int or float where it reads as one; other values pass."""
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def format_number(value: float | None) -> str:
    """Short human form: 4 significant digits, ``inf`` spelled out, ``-`` for missing."""
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def json_number(value: float | None) -> float | str | None:
    """A float JSON can hold: non-finite values become ``"inf"``, ``"-inf"``, ``"nan"``."""
    if value is None or math.isfinite(value):
        return value
    return str(value)
