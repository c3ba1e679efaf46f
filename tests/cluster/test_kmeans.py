from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from onnxzip.cluster import (
    INITS,
    assign_nearest,
    cluster_weights,
    index_entropy_bits,
    init_centroids,
    pack_indices,
    unpack_indices,
)
from onnxzip.cluster import kmeans as kmeans_module
from onnxzip.errors import ConfigError, DataError


def _mixture(size: int, seed: int = 0) -> np.ndarray:
    """Bell-shaped weights with a heavier tail, like a trained layer."""
    rng = np.random.default_rng(seed)
    return np.concatenate([
        rng.normal(0.0, 0.02, size // 2), rng.laplace(0.01, 0.05, size - size // 2),
    ]).astype(np.float32)


@pytest.fixture
def histogram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Lloyd on histogram bins, as for tensors above EXACT_MAX_SIZE, on small test data."""
    monkeypatch.setattr(kmeans_module, "EXACT_MAX_SIZE", 1000)


def _assert_nearest(values: np.ndarray, codebook: np.ndarray, indices: np.ndarray) -> None:
    distances = np.abs(values.reshape(-1, 1).astype(np.float64) - codebook.astype(np.float64))
    chosen = distances[np.arange(values.size), indices.reshape(-1)]
    np.testing.assert_array_equal(chosen, distances.min(axis=1))


def _sklearn_mse(values: np.ndarray, init: np.ndarray) -> float:
    model = KMeans(n_clusters=init.size, init=init[:, None], n_init=1).fit(values[:, None])
    quantized = model.cluster_centers_[model.labels_, 0].astype(np.float64)
    return float(np.mean((values.astype(np.float64) - quantized) ** 2))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("k", [4, 16, 64])
def test_every_weight_gets_its_nearest_centroid(init: str, k: int) -> None:
    values = _mixture(20_000, seed=k)
    result = cluster_weights(values, k, init=init)
    assert result.codebook.dtype == np.float32 and np.all(np.diff(result.codebook) > 0)
    assert result.indices.dtype == np.uint8 and result.indices.shape == values.shape
    _assert_nearest(values, result.codebook, result.indices)


def test_nearest_on_the_histogram_path(histogram_path: None) -> None:
    values = _mixture(100_000, seed=3)
    result = cluster_weights(values, 256, init="quantile")
    _assert_nearest(values, result.codebook, result.indices)


def test_assignment_is_exact_around_float32_midpoints() -> None:
    codebook = np.array([1.0, np.nextafter(np.float32(1.0), np.float32(2)) * 1.5, 3.0],
                        dtype=np.float32)
    around = [np.float32(1.0)]
    for left, right in zip(codebook[:-1], codebook[1:]):
        mid = np.float32((np.float64(left) + np.float64(right)) / 2)
        around += [np.nextafter(mid, np.float32(-9)), mid, np.nextafter(mid, np.float32(9))]
    values = np.array(around * 3, dtype=np.float32)
    _assert_nearest(values, codebook, assign_nearest(values, codebook))


def test_indices_keep_the_input_shape_and_decode() -> None:
    values = _mixture(6 * 50).reshape(6, 50)
    result = cluster_weights(values, 8)
    assert result.indices.shape == (6, 50)
    np.testing.assert_array_equal(result.decode(), result.codebook[result.indices])


@pytest.mark.parametrize("init", ["kmeans||", "linear"])
@pytest.mark.parametrize("k", [8, 32])
def test_mse_not_worse_than_sklearn_from_the_same_start(init: str, k: int) -> None:
    values = _mixture(10_000, seed=k)
    start = init_centroids(values, k, init, seed=1)
    ours = cluster_weights(values, start.size, init=start)
    assert ours.mse <= _sklearn_mse(values, start) * (1 + 1e-6)


def test_mse_not_worse_than_sklearn_on_the_histogram_path(histogram_path: None) -> None:
    values = _mixture(50_000, seed=7)
    start = init_centroids(values, 16, "kmeans||")
    assert cluster_weights(values, start.size, init=start).mse <= _sklearn_mse(values, start) * (1 + 1e-6)


def test_reported_mse_and_sqnr_match_the_decoded_tensor() -> None:
    values = _mixture(10_000)
    result = cluster_weights(values, 16)
    error = values.astype(np.float64) - result.decode()
    assert result.mse == pytest.approx(np.mean(error ** 2), rel=1e-9)
    power = np.sum(values.astype(np.float64) ** 2)
    assert result.sqnr_db == pytest.approx(10 * np.log10(power / np.sum(error ** 2)), rel=1e-9)


def test_linear_init_is_evenly_spaced_from_min_to_max() -> None:
    values = _mixture(5_000)
    start = init_centroids(values, 8, "linear", keep_zero=False)
    np.testing.assert_allclose(start, np.linspace(float(values.min()), float(values.max()), 8),
                               rtol=1e-12)
    assert np.ptp(np.diff(start)) < 1e-12


@pytest.mark.parametrize("init", INITS)
def test_initialisations_are_sorted_distinct_and_inside_the_range(init: str) -> None:
    values = _mixture(50_000)
    start = init_centroids(values, 32, init)
    assert 0 < start.size <= 32 and np.all(np.diff(start) > 0)
    assert values.min() <= start[0] and start[-1] <= values.max()


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("path", ["exact", "histogram"])
def test_pruned_weights_stay_exactly_zero(init: str, path: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "histogram":
        monkeypatch.setattr(kmeans_module, "EXACT_MAX_SIZE", 1000)
    values = _mixture(40_000, seed=2)
    values[::3] = 0.0
    result = cluster_weights(values, 8, init=init)
    assert 0.0 in result.codebook
    assert np.all(result.decode()[values == 0] == 0.0)
    unpinned = cluster_weights(values, 8, init=init, keep_zero=False)
    assert np.all(unpinned.decode()[values == 0] != 0.0)


def test_pinned_zero_centroid_is_never_moved() -> None:
    values = np.array([0.0, 0.0, 0.2, 0.2, 1.0, 1.0], dtype=np.float32)
    start = np.array([0.0, 1.0])
    np.testing.assert_array_equal(cluster_weights(values, 2, init=start).codebook, [0.0, 1.0])
    np.testing.assert_allclose(cluster_weights(values, 2, init=start, keep_zero=False).codebook,
                               [0.1, 1.0], rtol=1e-6)


@pytest.mark.parametrize("init", INITS)
def test_same_seed_same_result(init: str) -> None:
    values = _mixture(30_000, seed=5)
    first, second = (cluster_weights(values, 16, init=init, seed=11) for _ in range(2))
    np.testing.assert_array_equal(first.codebook, second.codebook)
    np.testing.assert_array_equal(first.indices, second.indices)


def test_fewer_distinct_values_than_k_are_reproduced_exactly() -> None:
    values = np.tile(np.array([-1.5, 0.25, 3.0], dtype=np.float32), 100)
    result = cluster_weights(values, 16, init="kmeans++")
    assert result.k == 3 and result.mse == 0.0 and result.sqnr_db == np.inf
    np.testing.assert_array_equal(result.decode(), values)


def test_auto_k_respects_the_bit_budget_and_minimum() -> None:
    values = _mixture(200_000)
    assert 2 < cluster_weights(values, "auto").k <= 256
    assert cluster_weights(values, "auto", max_bits=3).k <= 8
    assert cluster_weights(values, "auto", birch_threshold_ratio=50.0, min_k=4).k == 4


def test_bad_options_raise_named_errors() -> None:
    values = _mixture(100)
    for bad_k in (0, 1 << 17, 2.5, "many"):
        with pytest.raises(ConfigError):
            cluster_weights(values, bad_k)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        cluster_weights(values, 4, init="random")
    with pytest.raises(DataError):
        cluster_weights(np.array([1.0, np.nan], dtype=np.float32), 2)
    with pytest.raises(ConfigError):
        assign_nearest(values, np.array([1.0, 0.0]))


def test_index_entropy() -> None:
    assert index_entropy_bits(np.arange(256, dtype=np.uint8).repeat(4), 256) == pytest.approx(8.0)
    assert index_entropy_bits(np.zeros(10, dtype=np.uint8), 16) == 0.0
    assert index_entropy_bits(np.array([0, 0, 1, 2], dtype=np.uint8), 4) == pytest.approx(1.5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 1001])
def test_packing_round_trips(bits: int, count: int) -> None:
    indices = np.random.default_rng(count).integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_indices(indices, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_indices(packed, bits, count), indices)


def test_packing_bit_order_is_first_index_in_low_bits() -> None:
    np.testing.assert_array_equal(pack_indices(np.array([1, 0, 0, 0, 0, 0, 0, 1]), 1), [0x81])
    np.testing.assert_array_equal(pack_indices(np.array([1, 2, 3]), 2), [0b111001])
    np.testing.assert_array_equal(pack_indices(np.array([0x1, 0xA, 0x3]), 4), [0xA1, 0x03])


def test_packing_rejects_what_does_not_fit() -> None:
    with pytest.raises(DataError):
        pack_indices(np.array([4]), 2)
    with pytest.raises(ConfigError):
        pack_indices(np.array([1]), 3)
    with pytest.raises(DataError):
        unpack_indices(np.array([0], dtype=np.uint8), 4, 3)


def test_explicit_init_must_match_k() -> None:
    with pytest.raises(ConfigError):
        cluster_weights(_mixture(100), 3, init=np.array([0.0, 1.0]))


@pytest.mark.parametrize("size", [3000, 100_000])
def test_weighted_k_means_lowers_the_weighted_error(size):
    """Weighting by per-value importance moves centroids to where the weighted SSE is lowest."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal(size).astype(np.float32)
    weight = np.exp(2 * rng.standard_normal(size)).astype(np.float32)
    weight[values > 1] *= 30  # the upper tail matters most

    def weighted_sse(result):
        return float(np.sum(weight * (values - result.decode()) ** 2))

    plain = cluster_weights(values, 8, seed=0)
    weighted = cluster_weights(values, 8, seed=0, sample_weight=weight)
    assert weighted_sse(weighted) < 0.6 * weighted_sse(plain)
    # still an exact nearest-centroid assignment
    np.testing.assert_array_equal(weighted.indices, assign_nearest(values, weighted.codebook))
    # uniform weights are plain k-means
    uniform = cluster_weights(values, 8, seed=0, sample_weight=np.full(size, 3.0))
    np.testing.assert_allclose(uniform.codebook, plain.codebook, rtol=1e-5)
    with pytest.raises(ConfigError, match="does not fit"):
        cluster_weights(values, 8, sample_weight=np.ones(size + 1))
