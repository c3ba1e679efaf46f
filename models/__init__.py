"""Small, really trained reference models (PyTorch definition, seeded training, cached ONNX).

Installed as ``onnxzip.models``; start from :func:`onnxzip.models.zoo.get_reference_model`.
"""

from __future__ import annotations
