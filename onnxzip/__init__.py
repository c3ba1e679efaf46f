"""onnxzip: ONNX graph-level model compression checked in onnxruntime.

Python API, the twin of the command line (``help(onnxzip.compress)`` lists the parameters):

- :func:`compress` (``onnxzip compress``): run passes, a recipe or a loop; validate; return
  ``.model`` / ``.report`` / ``.plan`` / ``.save(path)``;
- :func:`validate` (``onnxzip validate``): compare two models, with metric conditions;
- :func:`finetune` (``onnxzip finetune``): train a model's weights in onnxruntime-training;
- :func:`inspect` (``onnxzip inspect``): opsets, ops, parameters, FLOPs and weights of a model;
- :func:`export`: PyTorch → ONNX with BatchNorm kept.

They are imported on first use, so ``import onnxzip`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "compress", "export", "finetune", "inspect", "validate"]

_API = {
    "compress": ("onnxzip.api", "compress"),
    "validate": ("onnxzip.api", "validate"),
    "finetune": ("onnxzip.api", "finetune"),
    "export": ("onnxzip.torch_export", "export"),
    "inspect": ("onnxzip.inspection", "inspect_model"),
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'onnxzip' has no attribute {name!r}")
    module, attribute = _API[name]
    function = getattr(importlib.import_module(module), attribute)
    globals()[name] = function
    return function


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
