"""Availability of onnxruntime's training API (onnxruntime-training), which the training steps
(sparsity training, recovery and codebook fine-tuning, the SVD loop) run on.

It ships only for Linux x86-64 with Python 3.10/3.11; elsewhere onnxzip installs plain
onnxruntime and every training feature says so in one sentence instead of failing on import.
"""
from __future__ import annotations

import functools
from types import ModuleType

from onnxzip.errors import RuntimeUnavailableError


@functools.lru_cache(maxsize=1)
def _import_training() -> ModuleType | str:
    try:
        from onnxruntime import training  # imports torch as well
    except ImportError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return training


def training_available() -> bool:
    """True when ``onnxruntime.training`` imports here."""
    return not isinstance(_import_training(), str)


def require_training(feature: str) -> ModuleType:
    """The ``onnxruntime.training`` module, or :class:`RuntimeUnavailableError` naming ``feature``."""
    module = _import_training()
    if isinstance(module, str):
        raise RuntimeUnavailableError(
            f"{feature} needs onnxruntime-training (Linux x86-64, Python 3.10/3.11), which is not "
            f"installed here ({module})."
        )
    return module
