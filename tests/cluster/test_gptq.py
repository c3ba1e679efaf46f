"""Second-order codebook fitting: the closed-form centroid refit against numpy least squares,
GPTQ assignment against plain k-means on held-back rows (measured in onnxruntime)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.cluster.gptq import damped, fit_codebook, refit_centroids, target_weight
from onnxzip.passes import PassContext
from onnxzip.passes.cluster import ClusterPass
from onnxzip.core.runtime import make_session, run_session

RNG = np.random.default_rng(3)


def _design(inputs: np.ndarray, indices: np.ndarray, channels: np.ndarray, rows: int, k: int) -> np.ndarray:
    """The explicit least-squares design: sample s, output i → Σ_{j: idx_ij = k} x̃_sj in the
    column of codebook entry (channels[i], k)."""
    samples, (m, _n) = inputs.shape[0], indices.shape
    design = np.zeros((samples * m, rows * k))
    for i in range(m):
        for entry in range(k):
            design[np.arange(samples) * m + i, channels[i] * k + entry] = inputs[:, indices[i] == entry].sum(axis=1)
    return design


@pytest.mark.parametrize("per_channel", [False, True])
def test_closed_form_centroid_refit_equals_numpy_least_squares(per_channel):
    m, n, k, samples = 6, 12, 4, 300
    weight = RNG.standard_normal((m, n))
    original = RNG.standard_normal((samples, n))
    current = original + 0.2 * RNG.standard_normal((samples, n))  # the layer sees x̃ ≠ x
    indices = RNG.integers(0, k, (m, n))
    channels = np.arange(m) if per_channel else np.zeros(m, dtype=np.int64)
    rows = m if per_channel else 1
    gram, cross = (current.T @ current)[None], (current.T @ original)[None]
    damp = 1e-12  # λ → 0: the plain problem min Σ‖Q x̃ − W x‖²
    fitted = refit_centroids(indices[None], RNG.standard_normal((rows, k)), channels[None],
                             target_weight(weight[None], gram, cross, damp), damped(gram, damp)[0])
    design = _design(current, indices, channels, rows, k)
    used = np.abs(design).sum(axis=0) > 0
    expected = np.linalg.lstsq(design[:, used], (original @ weight.T).reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(fitted.reshape(-1)[used], expected, rtol=1e-6, atol=1e-8)


def test_fit_codebook_never_worse_than_its_start_and_gptq_beats_the_refit_alone():
    m, n, k = 16, 24, 4
    weight = RNG.standard_normal((1, m, n))
    inputs = RNG.standard_normal((400, n)) @ (np.eye(n) + 0.5 * RNG.standard_normal((n, n)))
    gram = (inputs.T @ inputs)[None]
    codebook = np.linspace(-1.5, 1.5, k)[None]
    nearest = np.argmin(np.abs(weight[..., None] - codebook[0]), axis=-1)
    channels = np.zeros((1, m), dtype=np.int64)
    refit_only = fit_codebook(weight, codebook, nearest, channels, gram, gram, iterations=0)
    full = fit_codebook(weight, codebook, nearest, channels, gram, gram, iterations=3)
    assert refit_only.after <= refit_only.before and full.before == refit_only.before
    assert full.step.startswith("gptq") and full.after < 0.8 * refit_only.after


def _relative_error(model, reference, feeds) -> float:
    out = run_session(make_session(model, "cpu"), feeds)["y"]
    return float(np.sum((out - reference) ** 2) / np.sum(reference ** 2))


@pytest.mark.parametrize("per_channel", [False, True])
def test_cluster_method_gptq_lowers_the_output_error_on_held_back_rows(per_channel):
    n, m = 48, 32
    weight = RNG.standard_normal((n, m)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [tensor("x", ["N", n])], [tensor("y", ["N", m])], [init("w", weight)])
    mixing = np.eye(n) + 0.4 * RNG.standard_normal((n, n))  # correlated inputs: H is far from diagonal
    fit, held = ((RNG.standard_normal((rows, n)) @ mixing).astype(np.float32) for rows in (512, 512))
    reference = held @ weight
    errors = {}
    for method in ("kmeans", "gptq"):
        result = ClusterPass(bits=2, method=method, per_channel=per_channel).run(
            model, PassContext(feeds={"x": fit}, device="cpu"))
        errors[method] = _relative_error(result.model, reference, {"x": held})
        sizes = errors.setdefault("bytes", set())
        sizes.add(result.model.ByteSize())
        change = result.report.changes[0]
        assert ("gptq_error_after" in change.details) == (method == "gptq")
    assert len(errors["bytes"]) == 1  # same K and width: the same file size
    assert errors["gptq"] < 0.85 * errors["kmeans"]
