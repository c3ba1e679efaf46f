from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from onnxzip.errors import ConfigError
from onnxzip.svd import (
    RankRule,
    Spectrum,
    break_even_rank,
    check_rank,
    choose_svd_method,
    factorize,
    factorize_preserving_dtype,
    is_profitable,
    rank_for_keep_ratio,
    truncated_svd,
)


def _matrix_with_spectrum(m: int, n: int, singular_values: np.ndarray, seed: int = 0) -> np.ndarray:
    """U·diag(σ)·Vᵀ with random orthonormal U, V: a matrix whose spectrum is known exactly."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * singular_values) @ v.T


def _rel_error(matrix: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    matrix = matrix.astype(np.float64)
    return float(np.linalg.norm(matrix - first.astype(np.float64) @ second.astype(np.float64)) / np.linalg.norm(matrix))


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_full_rank_reproduces(dtype: type, tolerance: float) -> None:
    matrix = np.random.default_rng(1).standard_normal((40, 70)).astype(dtype)
    first, second = factorize(matrix, 40)
    assert first.shape == (40, 40) and second.shape == (40, 70)
    assert first.dtype == dtype and second.dtype == dtype
    assert _rel_error(matrix, first, second) < tolerance


def test_error_is_the_spectral_tail_and_non_increasing() -> None:
    matrix = _matrix_with_spectrum(60, 50, 0.8 ** np.arange(50))
    spectrum = Spectrum.of(matrix)
    ranks = range(1, 51, 3)
    errors = [_rel_error(matrix, *factorize(matrix, rank)) for rank in ranks]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))
    np.testing.assert_allclose(errors[:10], [spectrum.tail(rank) for rank in ranks][:10], rtol=1e-6)


def test_factors_share_the_scale() -> None:
    """A = U·√Σ and B = √Σ·Vᵀ: the i-th column of A and row of B both have norm √σ_i."""
    matrix = _matrix_with_spectrum(30, 20, np.linspace(5.0, 1.0, 20))
    first, second = factorize(matrix, 5)
    np.testing.assert_allclose(np.linalg.norm(first, axis=0), np.linalg.norm(second, axis=1))


@pytest.mark.parametrize("singular_values", [
    np.exp(-np.arange(300) / 20.0),          # exponential decay
    1.0 / (1.0 + np.arange(300)) ** 0.7,     # slow power-law decay
    np.exp(-np.arange(300) / 30.0) + 0.02,   # decay onto a noise floor
], ids=["exponential", "power-law", "noise-floor"])
def test_randomized_within_one_percent_of_optimal(singular_values: np.ndarray) -> None:
    matrix = _matrix_with_spectrum(400, 300, singular_values).astype(np.float32)
    spectrum = Spectrum((400, 300), singular_values)
    for rank in (10, 50):
        for candidate in (matrix, matrix.T):  # tall and wide
            randomized = _rel_error(candidate, *factorize(candidate, rank, method="randomized"))
            assert randomized <= 1.01 * spectrum.tail(rank)


def test_randomized_is_deterministic() -> None:
    matrix = np.random.default_rng(2).standard_normal((200, 150)).astype(np.float32)
    first = factorize(matrix, 16, method="randomized")
    second = factorize(matrix, 16, method="randomized")
    np.testing.assert_array_equal(first[0], second[0])


def test_method_switching_rule() -> None:
    assert choose_svd_method(768, 768, 100) == "randomized"
    assert choose_svd_method(768, 768, 192) == "exact"  # not below 0.25·768
    assert choose_svd_method(400, 3000, 10) == "exact"  # too small to gain


def test_float16_goes_through_float32_and_back() -> None:
    matrix = np.random.default_rng(3).standard_normal((32, 48)).astype(np.float16)
    first, second = factorize(matrix, 32)
    assert first.dtype == np.float32
    first, second = factorize_preserving_dtype(matrix, 32)
    assert first.dtype == np.float16 and second.dtype == np.float16
    assert _rel_error(matrix, first, second) < 2e-3


def test_truncated_svd_matches_numpy() -> None:
    matrix = np.random.default_rng(4).standard_normal((25, 35))
    _, values, _ = truncated_svd(matrix, 7)
    np.testing.assert_allclose(values, np.linalg.svd(matrix, compute_uv=False)[:7])


def test_spectrum_energy_rules() -> None:
    # σ² = 50, 25, 12.5, 6.25, 6.25 → total 100; cumulative 0.5, 0.75, 0.875, 0.9375, 1.
    spectrum = Spectrum((5, 8), np.sqrt([50.0, 25.0, 12.5, 6.25, 6.25]))
    assert spectrum.energy == pytest.approx(100.0)
    assert spectrum.energy_kept(2) == pytest.approx(0.75)
    assert spectrum.tail(3) == pytest.approx(np.sqrt(0.125))
    assert spectrum.tail(5) == 0.0
    assert [spectrum.rank_for_energy(f) for f in (0.1, 0.5, 0.51, 0.875, 0.9, 1.0)] == [1, 1, 2, 3, 4, 5]
    assert Spectrum((3, 3), np.zeros(3)).rank_for_energy(0.99) == 1


def test_spectrum_summary_is_json() -> None:
    spectrum = Spectrum.of(_matrix_with_spectrum(50, 40, 0.9 ** np.arange(40)))
    summary = json.loads(json.dumps(spectrum.summary(max_values=4)))
    assert summary["shape"] == [50, 40] and len(summary["singular_values"]) == 4
    assert summary["rank_for_energy"]["0.9"] == spectrum.rank_for_energy(0.9)


def test_rank_rules() -> None:
    spectrum = Spectrum((100, 100), 0.5 ** np.arange(100))
    assert RankRule(rank=7).resolve((100, 100)) == 7
    assert RankRule(keep_ratio=0.5).resolve((100, 100)) == 25  # 25·200 = 0.5·100·100
    assert RankRule(keep_ratio=0.1).resolve((300, 100)) == 7   # ⌊0.1·30000/400⌋
    assert rank_for_keep_ratio(4, 4, 0.01) == 1                 # never below rank 1
    # σ² = 4^-i: the first r values keep 1 − 4^-r of the energy.
    assert RankRule(energy=0.99).resolve((100, 100), spectrum) == 4
    with pytest.raises(ConfigError):
        RankRule(energy=0.9).resolve((100, 100))


def test_break_even() -> None:
    assert break_even_rank(100, 100) == 50
    assert is_profitable(100, 100, 49) and not is_profitable(100, 100, 50)
    assert break_even_rank(768, 3072) == pytest.approx(614.4)
    assert is_profitable(768, 3072, 614) and not is_profitable(768, 3072, 615)


@pytest.mark.parametrize("rank", [0, -1, 11, 2.5, True, None])
def test_bad_ranks_raise(rank: object) -> None:
    with pytest.raises(ConfigError, match="rank"):
        check_rank(10, 20, rank)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        factorize(np.ones((10, 20)), rank)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.9}, {"keep_ratio": 0.0}, {"energy": 1.5}, {"rank": 0}])
def test_bad_rank_rules_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        RankRule(**kwargs)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="2-D float"):
        factorize(np.ones((2, 3, 4)), 1)
    with pytest.raises(ConfigError, match="2-D float"):
        factorize(np.ones((4, 4), dtype=np.int64), 1)
    with pytest.raises(ConfigError, match="SVD method"):
        factorize(np.ones((4, 4)), 1, method="qr")  # type: ignore[arg-type]
