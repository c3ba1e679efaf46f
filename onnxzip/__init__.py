"""onnxzip: ONNX graph-level model compression."""
from __future__ import annotations

__version__ = "0.1.0"
