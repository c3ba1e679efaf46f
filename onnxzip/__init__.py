"""onnxzip: ONNX graph-level model compression checked in onnxruntime.

Python API: :func:`export` (PyTorch → ONNX with BatchNorm kept), :func:`compress` (run a recipe,
validate, return ``.model``/``.report``/``.save``), :func:`validate` (compare two models).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "compress", "export", "validate"]


def compress(*args: Any, **kwargs: Any) -> Any:
    from onnxzip.api import compress as _compress

    return _compress(*args, **kwargs)


def validate(*args: Any, **kwargs: Any) -> Any:
    from onnxzip.api import validate as _validate

    return _validate(*args, **kwargs)


def export(*args: Any, **kwargs: Any) -> Any:
    from onnxzip.torch_export import export as _export

    return _export(*args, **kwargs)


compress.__doc__ = "See :func:`onnxzip.api.compress`."
validate.__doc__ = "See :func:`onnxzip.api.validate`."
export.__doc__ = "See :func:`onnxzip.torch_export.export`."
