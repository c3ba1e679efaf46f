"""Codebook clustering of weight tensors (pure numpy).

* :func:`cluster_weights` — 1-D k-means of a tensor's values: codebook + per-weight indices;
* :func:`cluster_per_channel` — one codebook per output channel ([C, K] table);
* :func:`init_centroids` — the initialisations (linear, quantile, k-means++, k-means||);
* :func:`estimate_k_birch` / :class:`ImprovedBirch` — the automatic cluster count;
* :func:`assign_nearest`, :func:`index_entropy_bits`, :func:`pack_indices`,
  :func:`unpack_indices`, :func:`pack_planes`, :func:`storage_bits` — exact assignment and
  index storage (any width 1-8);
* :func:`allocate_bits` — per-layer widths under a mean-bits budget from sensitivity curves;
* :func:`kmeans_pairs`, :func:`pair_split`, :func:`pair_merge` — vector codebooks of weight pairs
  (:mod:`onnxzip.cluster.vq`).
"""
from __future__ import annotations

from onnxzip.cluster.allocate import allocate_bits, mean_bits
from onnxzip.cluster.birch import ImprovedBirch, estimate_k_birch
from onnxzip.cluster.channels import ChannelClusterResult, cluster_per_channel
from onnxzip.cluster.kmeans import (
    INITS,
    ClusterResult,
    assign_nearest,
    cluster_weights,
    index_entropy_bits,
    init_centroids,
    lloyd,
)
from onnxzip.cluster.vq import assign_pairs, kmeans_pairs, pair_merge, pair_split, pairable
from onnxzip.cluster.packing import (
    INDEX_BITS,
    PACK_BITS,
    pack_indices,
    pack_planes,
    packed_bytes,
    plane_widths,
    storage_bits,
    unpack_indices,
    unpack_planes,
)

__all__ = [
    "INDEX_BITS",
    "INITS",
    "PACK_BITS",
    "ChannelClusterResult",
    "ClusterResult",
    "ImprovedBirch",
    "allocate_bits",
    "assign_nearest",
    "assign_pairs",
    "cluster_per_channel",
    "cluster_weights",
    "estimate_k_birch",
    "index_entropy_bits",
    "init_centroids",
    "kmeans_pairs",
    "lloyd",
    "mean_bits",
    "pack_indices",
    "pack_planes",
    "packed_bytes",
    "pair_merge",
    "pair_split",
    "pairable",
    "plane_widths",
    "storage_bits",
    "unpack_indices",
    "unpack_planes",
]
