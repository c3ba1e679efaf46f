"""Each built-in metric against its definition or its library, on known signals."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy.signal import resample_poly

from onnxzip.errors import ConfigError, DataError, RuntimeUnavailableError
from onnxzip.evaluators import ArrayDataset, Predictions, SpeechDataset, resolve_metric, score

pystoi = pytest.importorskip("pystoi")
pesq_lib = pytest.importorskip("pesq")

RATE = 16000


def _speech_like(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated harmonics: enough structure for STOI and PESQ to judge."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(h * phase) / h for h in range(1, 25))
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None)
    return 0.1 * voiced * syllables + 0.001 * rng.normal(size=t.size)


def _audio_scores(out: np.ndarray, ref: np.ndarray, metrics: list[str]) -> dict[str, float]:
    dataset = SpeechDataset([ref], [ref], sample_rate=RATE)
    return {k: v.value for k, v in score(Predictions.of([out]), dataset, metrics).items()}


def test_snr_and_psnr_follow_their_formulas() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(1, 8, 8))
    out = ref + rng.normal(0, 0.05, ref.shape)
    dataset = ArrayDataset({"x": [ref]}, references=[ref])
    results = score(Predictions.of([out]), dataset, ["snr", "psnr"])
    mse = np.mean((ref - out) ** 2)
    assert results["snr"].value == pytest.approx(
        10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    )
    assert results["psnr"].unit == "dB" and results["psnr"].higher_is_better
    assert results["psnr"].value == pytest.approx(10 * np.log10(1 / mse))
    exact = score(Predictions.of([ref]), dataset, ["snr", "psnr"])
    assert math.isinf(exact["snr"].value) and math.isinf(exact["psnr"].value)


def test_snr_falls_as_noise_grows() -> None:
    ref = _speech_like()
    values = [
        _audio_scores(ref + np.random.default_rng(1).normal(0, level, ref.size), ref, ["snr"])[
            "snr"
        ]
        for level in (0.001, 0.01, 0.05)
    ]
    assert values[0] > values[1] > values[2]


def test_stoi_equals_pystoi_and_is_one_for_identical_signals() -> None:
    ref = _speech_like()
    noisy = ref + np.random.default_rng(2).normal(0, 0.05, ref.size)
    assert _audio_scores(ref, ref, ["stoi"])["stoi"] == pytest.approx(1.0, abs=1e-6)
    measured = _audio_scores(noisy, ref, ["stoi", "estoi"])
    assert measured["stoi"] == pytest.approx(pystoi.stoi(ref, noisy, RATE))
    assert measured["estoi"] == pytest.approx(pystoi.stoi(ref, noisy, RATE, extended=True))
    assert measured["stoi"] < 0.99


def test_pesq_equals_the_library_and_peaks_for_identical_signals() -> None:
    ref = _speech_like()
    noisy = ref + np.random.default_rng(3).normal(0, 0.02, ref.size)
    assert _audio_scores(ref, ref, ["pesq"])["pesq"] == pytest.approx(4.64, abs=0.01)
    measured = _audio_scores(noisy, ref, ["pesq", "pesq_nb"])
    assert measured["pesq"] == pytest.approx(pesq_lib.pesq(RATE, ref, noisy, "wb"))
    assert measured["pesq"] < 4.0
    ref_8k, noisy_8k = resample_poly(ref, 1, 2), resample_poly(noisy, 1, 2)
    assert measured["pesq_nb"] == pytest.approx(pesq_lib.pesq(8000, ref_8k, noisy_8k, "nb"))


def test_audio_lengths_are_aligned_and_rates_resampled() -> None:
    ref = _speech_like()
    longer = np.concatenate([ref, np.zeros(500)])
    assert _audio_scores(longer, ref, ["stoi"])["stoi"] == pytest.approx(1.0, abs=1e-6)
    dataset = SpeechDataset([ref[::2]], [ref[::2]], sample_rate=8000)
    assert score(Predictions.of([ref[::2]]), dataset, ["pesq"])["pesq"].value > 4.5


def test_missing_audio_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pystoi", None)
    monkeypatch.setitem(sys.modules, "pesq", None)
    for name in ("stoi", "pesq"):
        with pytest.raises(RuntimeUnavailableError, match=r"pip install onnxzip\[audio\]"):
            resolve_metric(name)


def test_accuracy_top_k_from_logits_or_probabilities() -> None:
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    labels = np.array([0, 2, 2, 0])
    dataset = ArrayDataset({"x": logits}, labels=labels)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for outputs in (logits, probabilities):
        results = score(Predictions.of(outputs), dataset, ["accuracy", "accuracy:k=2"])
        assert results["accuracy"].value == pytest.approx(0.5)
        assert results["top2_accuracy"].value == pytest.approx(0.75)
    with pytest.raises(DataError, match="labels"):
        score(Predictions.of(logits), ArrayDataset({"x": logits}), ["accuracy"])


def test_fidelity_metrics_against_the_reference_model() -> None:
    reference = Predictions.of([np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0, 0.0])])
    candidate = Predictions.of([np.array([1.0, 2.0, 3.5]), np.array([0.0, 4.0, 0.0])])
    dataset = ArrayDataset({"x": [np.zeros(1)] * 2})
    names = ["cosine", "rel_l2", "max_abs_error", "argmax_agreement"]
    results = score(candidate, dataset, names, reference=reference)
    first = np.array([1.0, 2.0, 3.5]) @ np.array([1.0, 2.0, 3.0])
    cosine = first / (np.linalg.norm([1, 2, 3.5]) * np.linalg.norm([1, 2, 3]))
    assert results["cosine"].value == pytest.approx((cosine + 1) / 2)
    assert results["rel_l2"].value == pytest.approx((0.5 / np.linalg.norm([1, 2, 3])) / 2)
    assert results["max_abs_error"].value == pytest.approx(0.5)
    assert not results["max_abs_error"].higher_is_better
    assert results["argmax_agreement"].value == 1.0
    with pytest.raises(DataError, match="reference_model"):
        score(candidate, dataset, ["cosine"])


def test_fidelity_of_one_value_items_is_measured_over_the_dataset() -> None:
    """A speech probability per item: the cosine of two one-value items is their sign agreement
    (1 for any two positive values), so cosine and rel_l2 pool the items into one vector."""
    reference = Predictions.of([np.array([0.9]), np.array([0.1]), np.array([0.5])])
    candidate = Predictions.of([np.array([0.1]), np.array([0.9]), np.array([0.5])])
    dataset = ArrayDataset({"x": [np.zeros(1)] * 3})
    results = score(candidate, dataset, ["cosine", "rel_l2"], reference=reference)
    r, p = np.array([0.9, 0.1, 0.5]), np.array([0.1, 0.9, 0.5])
    assert results["cosine"].value == pytest.approx(p @ r / (np.linalg.norm(p) * np.linalg.norm(r)))
    assert results["cosine"].value < 0.6
    assert results["rel_l2"].value == pytest.approx(np.linalg.norm(p - r) / np.linalg.norm(r))


def test_metric_specifications_and_their_errors() -> None:
    assert resolve_metric({"name": "pesq", "mode": "nb"}).name == "pesq_nb"
    assert resolve_metric("psnr:data_range=255").unit == "dB"
    with pytest.raises(ConfigError, match="Unknown metric"):
        resolve_metric("loudness")
    with pytest.raises(ConfigError, match="does not accept"):
        resolve_metric("snr:k=3")
    with pytest.raises(ConfigError, match="positive data_range"):
        resolve_metric("psnr:data_range=-1")
    with pytest.raises(ConfigError, match="key=value"):
        resolve_metric("accuracy:k")
