from __future__ import annotations

import numpy as np
import pytest

from onnxzip.cluster import cluster_per_channel, cluster_weights, storage_bits
from onnxzip.errors import ConfigError


def test_storage_bits_is_ceil_log2_k():
    assert [storage_bits(k) for k in (1, 2, 3, 4, 5, 9, 16, 17, 33, 65, 129, 256)] == [
        1, 1, 2, 2, 3, 4, 4, 5, 6, 7, 8, 8
    ]
    with pytest.raises(ConfigError, match="more than 8 bits"):
        storage_bits(257)


def test_per_channel_rows_are_independent_k_means():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 7, 40)).astype(np.float32) * np.geomspace(1, 100, 7)[None, :, None]
    result = cluster_per_channel(values, 4, axis=1, seed=2)
    assert result.codebook.shape == (7, 4) and result.indices.shape == values.shape
    for channel in range(7):
        alone = cluster_weights(values[:, channel], 4, seed=2)
        np.testing.assert_array_equal(result.codebook[channel], alone.codebook)
        np.testing.assert_array_equal(result.indices[:, channel], alone.indices)
        np.testing.assert_array_equal(result.decode()[:, channel], alone.decode())
    error = values.astype(np.float64) - result.decode()
    assert result.mse == pytest.approx(np.mean(error**2))
    assert 0 < result.entropy_bits() <= 2


def test_per_channel_pads_short_rows_and_keeps_zeros():
    values = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.5, 2.5]], np.float32)
    result = cluster_per_channel(values, 4, axis=0)
    assert result.k == 4 and result.codebook[0].tolist() == [0.0, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(result.decode(), values)
    assert result.sqnr_db == np.inf
