"""`onnxzip validate` end to end on the speech and image reference models: real metrics, a
damaged candidate fails the gate with exit code 1, the original itself passes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxzip.cli import main

pytest.importorskip("pystoi")
pytest.importorskip("pesq")


def _damaged(source, target, noise: float) -> None:
    model = onnx.load(source)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype == np.float32 and value.size > 1000:
            noisy = value + noise * value.std() * rng.standard_normal(value.shape)
            tensor.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), tensor.name))
    onnx.save(model, target)


def test_speech_model_gated_on_stoi_pesq_snr(tmp_path, capsys):
    from onnxzip.models.speech import build_speech_reference

    model_path, dataset = build_speech_reference()
    folder = tmp_path / "heldout"
    dataset.save(folder)
    damaged = tmp_path / "damaged.onnx"
    _damaged(model_path, damaged, noise=2.0)
    conditions = ["--metric", "stoi:max_drop=0.02", "--metric", "pesq:max_drop=0.2", "--metric", "snr:min=5"]
    assert main(["validate", str(model_path), str(model_path), "--data", str(folder), *conditions, "-q"]) == 0
    assert "quality gate: PASSED" in capsys.readouterr().out
    assert main(["validate", str(model_path), str(damaged), "--data", str(folder), *conditions, "-q"]) == 1
    out = capsys.readouterr().out
    assert "quality gate: FAILED" in out and "stoi" in out and "pesq" in out


def test_image_model_gated_on_psnr(tmp_path, capsys):
    from onnxzip.models.denoise import build_denoise_reference

    model_path, dataset = build_denoise_reference()
    items = [dataset.inputs(i) for i in range(len(dataset))]
    name = next(iter(items[0]))
    references = np.stack([dataset.reference(i) for i in range(len(dataset))])
    np.savez(tmp_path / "patches.npz", **{name: np.stack([item[name] for item in items])}, references=references)
    damaged = tmp_path / "damaged.onnx"
    _damaged(model_path, damaged, noise=1.0)
    argv = ["--data", str(tmp_path / "patches.npz"), "--metric", "psnr:max_drop=0.5", "--metric", "snr:min=10", "-q"]
    assert main(["validate", str(model_path), str(model_path), *argv]) == 0
    assert main(["validate", str(model_path), str(damaged), *argv]) == 1
    assert "psnr" in capsys.readouterr().out
