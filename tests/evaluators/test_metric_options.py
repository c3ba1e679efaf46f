"""Metric options in conditions (``stoi:min=0.8,sample_rate=16000``) and ``sample_rate`` in an .npz."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, tensor
from onnxzip.errors import ConfigError, DataError
from onnxzip.evaluators import QualityGate, parse_conditions
from onnxzip.evaluators.data import ArrayDataset
from onnxzip.evaluators.quality import quality_gate


def test_condition_keys_other_than_bounds_are_metric_options():
    (condition,) = parse_conditions("stoi:min=0.8,sample_rate=16000")
    assert condition.kind == "min" and condition.limit == 0.8 and condition.options == (("sample_rate", 16000),)
    assert QualityGate(["stoi:min=0.8,sample_rate=16000", "accuracy:max_drop=0.01"]).metrics == [
        {"name": "stoi", "sample_rate": 16000}, "accuracy"]
    with pytest.raises(ConfigError, match="unknown bound"):
        parse_conditions("stoi:min=0.8,rate=16000")
    with pytest.raises(ConfigError, match="sets no bound"):
        parse_conditions({"metric": "stoi", "sample_rate": 16000})


def _noisy_speech(tmp_path, with_rate: bool):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clean = (np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) * 0.3)[None].repeat(2, 0)
    noisy = (clean + 0.01 * rng.standard_normal(clean.shape)).astype(np.float32)
    path = tmp_path / "speech.npz"
    arrays = {"x": noisy, "references": clean.astype(np.float32)}
    if with_rate:
        arrays["sample_rate"] = np.array(16000)
    np.savez(path, **arrays)
    return path


def test_stoi_sample_rate_from_the_condition_or_the_npz(tmp_path):
    pytest.importorskip("pystoi")
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", ["N", "L"])], [tensor("y", ["N", "L"])])
    bare = _noisy_speech(tmp_path, with_rate=False)
    with pytest.raises(DataError, match="sample_rate=16000"):
        quality_gate(model, model, bare, ["stoi:min=0.8"], device="cpu")
    report = quality_gate(model, model, bare, ["stoi:min=0.3,sample_rate=16000"], device="cpu")
    assert report.passed and 0.3 < report.rows[0].candidate <= 1
    rated = _noisy_speech(tmp_path, with_rate=True)
    assert ArrayDataset.from_npz(rated).sample_rate == 16000
    assert quality_gate(model, model, rated, ["stoi:min=0.3"], device="cpu").passed
