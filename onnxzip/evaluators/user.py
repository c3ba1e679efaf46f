"""User code in quality conditions: scorers named ``FILE.py:function`` or ``package.module:function``.

Two contracts (documented in the README, "Your own metric"):

* ``user`` – ``function(predictions, targets) -> float`` over the whole dataset, like the
  built-in metrics: ``predictions`` are the post-processed model outputs, one array per item;
  ``targets`` the items' labels or references (option ``target``).
* ``task`` – ``function(model_path) -> float``: the user's own pipeline scores a whole model
  file (its own data, decoding, task score). onnxzip calls it for the original and for every
  candidate, each written to a temporary ``.onnx`` file, so ``max_drop`` compares the two.

A function that raises, or returns something that is not a finite or infinite number, is one
sentence naming it (:class:`~onnxzip.errors.UserFunctionError`, CLI exit 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxzip.errors import ConfigError, UserFunctionError
from onnxzip.evaluators.base import MetricResult

_modules: dict[tuple[str, int], Any] = {}  # a scorer file is executed once per version of it
_original_scores: dict[tuple[Any, str], float] = {}  # originals' task scores, by function and model digest


def _load_file(path: Path) -> Any:
    resolved = path.resolve()
    key = (str(resolved), resolved.stat().st_mtime_ns)
    if key not in _modules:
        name = f"onnxzip_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle look a module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise UserFunctionError(f"Importing the scorer file {path} raised {_describe(exc)}.") from exc
        _modules[key] = module
    return _modules[key]


def load_function(reference: str) -> Callable[..., Any]:
    """The function ``FILE.py:function`` (a path, relative to the working directory) or
    ``package.module:function`` (importable) names."""
    source, sep, attribute = reference.strip().rpartition(":")
    if not sep or not source or not attribute:
        raise ConfigError(f"Cannot load the function {reference!r}: write FILE.py:function or package.module:function.")
    if source.endswith(".py"):
        if not Path(source).is_file():
            raise ConfigError(f"Cannot load the function {reference!r}: the file {source} does not exist.")
        module = _load_file(Path(source))
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise ConfigError(f"Cannot load the function {reference!r} ({exc}).") from exc
        except Exception as exc:
            raise UserFunctionError(f"Importing {source} for {reference!r} raised {_describe(exc)}.") from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise ConfigError(f"Cannot load the function {reference!r}: {source} has no {attribute!r}.")
    if not callable(function):
        raise ConfigError(f"{reference!r} is not a function.")
    return function


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def call_user(function: Callable[..., Any], label: str, *args: Any) -> float:
    """``float(function(*args))``; anything it raises or a non-number becomes one sentence."""
    try:
        value = function(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise UserFunctionError(f"The metric function {label} raised {_describe(exc)}.") from exc
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise UserFunctionError(
            f"The metric function {label} returned {type(value).__name__} {value!r:.60}; it must return a number."
        ) from exc


def function_label(function: str | Callable[..., Any]) -> str:
    """How messages name a user function: its reference, else its qualified name."""
    if isinstance(function, str):
        return function
    return getattr(function, "__qualname__", None) or type(function).__name__


@dataclass(frozen=True)
class ModelMetric:
    """A task score of a whole model file: ``function(model_path) -> float`` (the ``task`` form)."""

    name: str
    function: Callable[[str], Any]
    higher_is_better: bool = True
    unit: str = ""
    label: str = ""

    def measure(self, model: onnx.ModelProto | str | os.PathLike[str], *, cache: bool = False) -> MetricResult:
        """Score ``model`` (a path is passed as is; a ModelProto is written to a temporary file).
        ``cache=True`` remembers the score by the model's digest: the original, judged once per
        process although a loop gates many candidates against it."""
        key = (self.function, _digest(model)) if cache else None
        if key is not None and key in _original_scores:
            return MetricResult(self.name, _original_scores[key], self.higher_is_better, self.unit)
        if isinstance(model, onnx.ModelProto):
            from onnxzip.core.io import save_model

            with tempfile.TemporaryDirectory(prefix="onnxzip-task-") as folder:
                path = save_model(model, Path(folder) / "model.onnx")
                value = call_user(self.function, self.label or self.name, str(path))
        else:
            value = call_user(self.function, self.label or self.name, os.fspath(model))
        if key is not None:
            _original_scores[key] = value
        return MetricResult(self.name, value, self.higher_is_better, self.unit)


def _digest(model: onnx.ModelProto | str | os.PathLike[str]) -> str:
    if isinstance(model, onnx.ModelProto):
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    info = os.stat(model)
    return f"{os.path.abspath(model)}|{info.st_size}|{info.st_mtime_ns}"


def task_metric(
    function: str | Callable[[str], Any],
    name: str | None = None,
    higher_is_better: bool = True,
    unit: str = "",
) -> ModelMetric:
    """A ``task`` metric: ``function(model_path) -> float`` scores a whole model file."""
    loaded = load_function(function) if isinstance(function, str) else function
    if not callable(loaded):
        raise ConfigError(f"A task metric must be callable, got {type(function).__name__}.")
    label = function_label(function)
    return ModelMetric(name or getattr(loaded, "__name__", "task"), loaded, bool(higher_is_better), unit, label)
