"""Evaluators and the quality gate.

Measure a model in onnxruntime on user data, then turn the results into go / no-go::

    from onnxzip.evaluators import QualityGate, evaluate, predict

    gate = QualityGate(["accuracy:max_drop=0.01", {"metric": "cosine", "min": 0.99}])
    original = predict("model.onnx", "data.npz")
    before = evaluate("model.onnx", "data.npz", gate.metrics, reference_model=original)
    after = evaluate("small.onnx", "data.npz", gate.metrics, reference_model=original)
    report = gate.check(before, after)
    print(report)            # text table; report.passed, report.to_dict()

Metrics (:data:`EVALUATORS`): accuracy, top5_accuracy (labels); cosine, rel_l2, max_abs_error,
argmax_agreement (vs the original model); snr, psnr (vs references); stoi, estoi, pesq, pesq_nb
(speech, optional ``audio`` extra); user (``module:function`` or a callable).
"""

from __future__ import annotations

from onnxzip.evaluators.audio import SpeechDataset, Stft, load_wav_folder, read_wav
from onnxzip.evaluators.base import Dataset, Metric, MetricResult
from onnxzip.evaluators.data import ArrayDataset, load_dataset, load_image_folder
from onnxzip.evaluators.gate import (
    GateCondition,
    GateReport,
    GateRow,
    QualityGate,
    parse_conditions,
)
from onnxzip.evaluators.registry import EVALUATORS, resolve_metric, resolve_metrics, user_metric
from onnxzip.evaluators.runner import Predictions, evaluate, predict, score

__all__ = [
    "EVALUATORS",
    "ArrayDataset",
    "Dataset",
    "GateCondition",
    "GateReport",
    "GateRow",
    "Metric",
    "MetricResult",
    "Predictions",
    "QualityGate",
    "SpeechDataset",
    "Stft",
    "evaluate",
    "load_dataset",
    "load_image_folder",
    "load_wav_folder",
    "parse_conditions",
    "predict",
    "read_wav",
    "resolve_metric",
    "resolve_metrics",
    "score",
    "user_metric",
]
