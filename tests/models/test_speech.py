"""The speech-enhancement reference model, scored end to end in onnxruntime."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxzip.evaluators import Predictions, QualityGate, evaluate, score
from onnxzip.models import speech_data
from onnxzip.models.speech import build_speech_reference

pytest.importorskip("pystoi")
pytest.importorskip("pesq")

METRICS = ["stoi", "pesq", "snr"]


@pytest.fixture(scope="module")
def reference():
    """(model path, held-out dataset, ORT results, noisy-input results); trains on first use."""
    path, dataset = build_speech_reference()
    enhanced = evaluate(path, dataset, METRICS, progress=False)
    noisy = score(Predictions.of(dataset.noisy), dataset, METRICS)
    return path, dataset, enhanced, noisy


def test_exported_graph_is_lstm_layernorm_with_dynamic_axes(reference) -> None:
    path = reference[0]
    model = onnx.load(path)
    assert model.ir_version == 8
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("LSTM") == 2 and ops.count("LayerNormalization") == 2
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "frames"]


def test_enhancer_improves_stoi_pesq_and_snr_on_held_out_speech(reference) -> None:
    path, _, enhanced, noisy = reference
    for name in METRICS:
        assert enhanced[name].value > noisy[name].value, name
    trained = json.loads((path.parent / "metrics.json").read_text())
    # onnxruntime reproduces what PyTorch measured after training.
    assert enhanced["pesq"].value == pytest.approx(trained["enhanced_pesq"], abs=0.02)
    assert noisy["stoi"].value == pytest.approx(trained["noisy_stoi"], abs=1e-3)


def test_damaged_enhancer_fails_the_gate(reference, tmp_path) -> None:
    path, dataset, enhanced, _ = reference
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.size > 1000:
            noise = rng.normal(0, 2.0 * weights.std(), weights.shape).astype(weights.dtype)
            tensor.CopyFrom(numpy_helper.from_array(weights + noise, tensor.name))
    gate = QualityGate(["stoi:max_drop=0.02", "pesq:max_drop=0.2"])
    assert gate.check(enhanced, enhanced).passed
    report = gate.check(enhanced, evaluate(model, dataset, gate.metrics, progress=False))
    assert not report.passed, report.render()


def test_synthetic_fallback_when_espeak_is_missing(monkeypatch, caplog) -> None:
    monkeypatch.setattr(speech_data, "espeak_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=speech_data.__name__):
        corpus = speech_data.speech_corpus(count=6, held_out=2, seed=3)
    assert corpus.source == "synthetic" and "espeak-ng is not installed" in caplog.text
    assert len(corpus.train) == 4 and len(corpus.test) == 2
    for wave in corpus.train + corpus.test:
        assert len(wave) > 0.5 * speech_data.SAMPLE_RATE
        assert np.sqrt(np.mean(wave**2)) == pytest.approx(speech_data.CLEAN_RMS)
    noisy, clean = speech_data.held_out_mixtures(corpus)
    snr = 10 * np.log10(np.sum(clean[0] ** 2) / np.sum((noisy[0] - clean[0]) ** 2))
    assert snr == pytest.approx(speech_data.SNRS_DB[0])
