"""Per-output-channel codebooks: one 1-D k-means per slice along a channel axis.

Every slice ``values[..., c, ...]`` (``c`` on ``axis``) gets its own codebook of K centroids, so
the stored codebook is a [C, K] table and a weight decodes as ``codebook[c, index]``. A slice
with fewer than K distinct centroids has its row padded by repeating its largest centroid (never
indexed), so all rows have the same K: the largest number of centroids any slice uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxzip.cluster.kmeans import cluster_weights, index_entropy_bits
from onnxzip.errors import ConfigError


@dataclass(frozen=True)
class ChannelClusterResult:
    """A tensor clustered per channel: ``codebook`` [C, K] float32 (rows sorted ascending),
    ``indices`` uint8 of the input's shape, ``axis`` the channel axis. ``mse`` and ``sqnr_db``
    are measured over the whole tensor, as for :class:`onnxzip.cluster.ClusterResult`."""

    codebook: np.ndarray
    indices: np.ndarray
    axis: int
    mse: float
    sqnr_db: float
    k: int

    def decode(self) -> np.ndarray:
        """The quantized tensor: ``codebook[c, indices[..., c, ...]]`` (float32, input shape)."""
        rows = np.moveaxis(self.indices, self.axis, 0)
        flat = rows.reshape(rows.shape[0], -1).astype(np.intp)
        values = np.take_along_axis(self.codebook, flat, axis=1).reshape(rows.shape)
        return np.moveaxis(values, 0, self.axis)

    def entropy_bits(self) -> float:
        """Mean over channels of the index entropy (bits/weight): what per-channel entropy coders
        would reach."""
        rows = np.moveaxis(self.indices, self.axis, 0).reshape(self.codebook.shape[0], -1)
        return float(np.mean([index_entropy_bits(row, self.k) for row in rows]))


def cluster_per_channel(
    values: np.ndarray, k: int, axis: int, **options: Any
) -> ChannelClusterResult:
    """Cluster every slice of ``values`` along ``axis`` into its own codebook of at most ``k``
    entries (fewer when no slice has ``k`` distinct values).

    ``options`` go to :func:`onnxzip.cluster.cluster_weights` (init, keep_zero, seed, ...); with
    ``keep_zero`` a slice holding exact zeros keeps an exact 0.0 centroid.
    """
    values = np.asarray(values)
    if values.ndim == 0 or not -values.ndim <= axis < values.ndim:
        raise ConfigError(
            f"channel axis {axis} does not exist in a tensor of shape {values.shape}."
        )
    axis %= values.ndim
    if k > 256:
        raise ConfigError(f"per-channel codebooks hold at most 256 entries, got k={k}.")
    rows = np.moveaxis(values, axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    weight = options.pop("sample_weight", None)
    if weight is None:
        results = [cluster_weights(row, k, **options) for row in flat]
    else:  # per-value weights follow their rows
        weight_rows = np.moveaxis(np.broadcast_to(weight, values.shape), axis, 0)
        weight_rows = weight_rows.reshape(flat.shape)
        results = [
            cluster_weights(row, k, sample_weight=w, **options)
            for row, w in zip(flat, weight_rows)
        ]
    used = max(result.k for result in results)
    codebook = np.empty((flat.shape[0], used), dtype=np.float32)
    indices = np.empty(flat.shape, dtype=np.uint8)
    for channel, result in enumerate(results):
        codebook[channel, : result.k] = result.codebook
        codebook[channel, result.k :] = result.codebook[-1]
        indices[channel] = result.indices
    decoded = np.take_along_axis(codebook, indices.astype(np.intp), axis=1)
    error = flat.astype(np.float64) - decoded
    squared_error = float(np.einsum("ij,ij->", error, error))
    power = float(np.einsum("ij,ij->", flat.astype(np.float64), flat.astype(np.float64)))
    sqnr = 10 * np.log10(power / squared_error) if squared_error > 0 else np.inf
    return ChannelClusterResult(
        codebook,
        np.moveaxis(indices.reshape(rows.shape), 0, axis),
        axis,
        squared_error / flat.size,
        float(sqnr),
        used,
    )
