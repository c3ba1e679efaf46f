"""Fine-tuning on the ONNX graph through onnxruntime-training (above passes/evaluators, below
the pipeline): :func:`finetune` and the ``finetune`` pipeline step (:mod:`onnxzip.train.step`)."""
from __future__ import annotations

from onnxzip.train.engine import FinetuneConfig, FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
