"""The denoising autoencoder reference model, scored in onnxruntime."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from onnxzip.evaluators import QualityGate, evaluate, score
from onnxzip.models.denoise import build_denoise_reference, noisy_inputs

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def reference():
    path, dataset = build_denoise_reference()
    denoised = evaluate(path, dataset, ["psnr", "snr"], progress=False)
    return path, dataset, denoised


def test_denoiser_improves_psnr_on_held_out_patches(reference) -> None:
    _, dataset, denoised = reference
    noisy = score(noisy_inputs(dataset), dataset, ["psnr", "snr"])
    assert noisy["psnr"].value == pytest.approx(20.0, abs=0.5)  # σ = 0.1
    assert denoised["psnr"].value > noisy["psnr"].value + 3.0
    assert denoised["snr"].value > noisy["snr"].value + 3.0


def test_scaled_weights_fail_the_gate(reference) -> None:
    path, dataset, denoised = reference
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.ndim == 4:
            tensor.CopyFrom(
                numpy_helper.from_array((weights * 1.3).astype(weights.dtype), tensor.name)
            )
    gate = QualityGate(["psnr:max_drop=0.5", "snr:min=10"])
    assert gate.check(denoised, denoised).passed
    report = gate.check(denoised, evaluate(model, dataset, gate.metrics, progress=False))
    assert not report.passed
    assert report.rows[0].change < -0.5
