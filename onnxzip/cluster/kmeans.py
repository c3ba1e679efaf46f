"""1-D k-means for weight tensors: a codebook of K float32 centroids plus one index per weight.

k-means minimises the sum of squared errors Σ_i (x_i − c_{a(i)})² over the codebook c and the
assignment a. In one dimension the clusters of any Lloyd iterate are intervals of the sorted
values separated by the midpoints m_j = (c_j + c_{j+1}) / 2, so:

* a Lloyd step is a ``searchsorted`` of the K−1 midpoints into sorted points plus prefix sums —
  O(K log P) instead of O(N K);
* on large tensors the points are the means of a fine histogram (2**16 bins, each weighted by
  its count): one streaming pass, after which Lloyd runs to its fixed point in milliseconds. The
  centroids then differ from exact Lloyd only through the values of the few bins a midpoint cuts;
* the final assignment is always exact: every weight gets its truly nearest float32 centroid
  (see :class:`onnxzip.cluster._scan.NearestCentroid`), and ``mse`` is measured on the raw
  weights.

Tensors of up to :data:`EXACT_MAX_SIZE` weights run Lloyd on their exact distinct values instead.
No float64 copy of the tensor is made on the histogram path: peak extra memory is the index
array plus O(chunk + bins).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxzip.cluster._scan import (
    HISTOGRAM_BINS,
    Histogram,
    NearestCentroid,
    as_weight_vector,
    histogram,
)
from onnxzip.cluster.birch import DEFAULT_BRANCHING, DEFAULT_THRESHOLD_RATIO, birch_k_from_histogram
from onnxzip.errors import ConfigError

INITS = ("kmeans||", "kmeans++", "linear", "quantile")
EXACT_MAX_SIZE = 1 << 22
MAX_K = 1 << 16
KMEANS_PARALLEL_ROUNDS = 5


@dataclass(frozen=True)
class ClusterResult:
    """A clustered tensor: ``codebook[indices]`` is the quantized tensor.

    ``codebook`` is float32, sorted ascending, distinct, of length ``k`` (≤ the requested K:
    coinciding centroids are merged and a tensor with fewer distinct values gets fewer).
    ``indices`` has the input's shape, uint8 when k ≤ 256 else uint16. ``mse`` is the mean of
    (x − codebook[index])² and ``sqnr_db`` = 10·log10(Σx² / Σ(x − q)²) (inf when exact).
    """

    codebook: np.ndarray
    indices: np.ndarray
    mse: float
    sqnr_db: float
    k: int

    def decode(self) -> np.ndarray:
        """The quantized tensor ``codebook[indices]`` (float32, input shape)."""
        return self.codebook[self.indices]


def index_entropy_bits(indices: np.ndarray, k: int) -> float:
    """Shannon entropy H = −Σ_j p_j log2 p_j of the index distribution, in bits per index.

    It is the size an ideal entropy coder would reach, against ceil(log2 k) for plain packing.
    """
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=k).astype(np.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())


def assign_nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the truly nearest centroid of every value (ties go to the larger centroid).

    ``codebook`` must be sorted ascending and distinct, as in :class:`ClusterResult`; use this to
    re-assign weights after a codebook was fine-tuned.
    """
    flat, lo, hi = as_weight_vector(values)
    codebook = np.asarray(codebook, dtype=np.float32)
    if codebook.size == 0 or np.any(np.diff(codebook) <= 0):
        raise ConfigError("codebook must be non-empty, sorted ascending and without duplicates.")
    lookup = NearestCentroid(codebook, lo, hi, _grid_cells(flat.size, codebook.size))
    return lookup.assign(flat)[0].reshape(np.shape(values))


def init_centroids(
    values: np.ndarray,
    k: int,
    method: str = "kmeans||",
    *,
    seed: int = 0,
    keep_zero: bool = True,
) -> np.ndarray:
    """Initial centroids (float64, sorted, distinct, at most ``k``) by one of :data:`INITS`.

    * ``linear``: K values evenly spaced from w_min to w_max (CN 115456169 A);
    * ``quantile``: the (j + ½)/K quantiles of the weights;
    * ``kmeans++``: D²-sampling (Arthur & Vassilvitskii 2007);
    * ``kmeans||``: scalable k-means++ (Bahmani et al. 2012, CN 114819143 A), oversampling
      ℓ = 2K for :data:`KMEANS_PARALLEL_ROUNDS` rounds, candidates weighted by the number of
      weights nearest to them, then reduced to K by weighted k-means++ and Lloyd.

    The sampling methods run on at most :data:`HISTOGRAM_BINS` weighted points (the distinct
    values, or the histogram bin means of a larger tensor) and are deterministic for a ``seed``.
    With ``keep_zero`` and exact zeros in the tensor, the centroid nearest 0 is moved to 0.0.
    """
    flat, lo, hi = as_weight_vector(values)
    _check_k(k)
    return _start(flat, histogram(flat, lo, hi, HISTOGRAM_BINS), k, method, seed, keep_zero)[0]


def cluster_weights(
    values: np.ndarray,
    k: int | Literal["auto"],
    *,
    init: str | np.ndarray = "kmeans||",
    max_iter: int = 1000,
    keep_zero: bool = True,
    seed: int = 0,
    birch_threshold_ratio: float = DEFAULT_THRESHOLD_RATIO,
    birch_branching: int = DEFAULT_BRANCHING,
    min_k: int = 2,
    max_bits: int = 8,
    sample_weight: np.ndarray | None = None,
) -> ClusterResult:
    """Cluster the values of a weight tensor into a codebook of ``k`` centroids.

    ``k="auto"`` takes K from the improved BIRCH (:func:`onnxzip.cluster.estimate_k_birch`) with
    threshold T = ``birch_threshold_ratio`` × std(values), clipped to [``min_k``, 2**``max_bits``].
    ``init`` is a method of :data:`INITS` or explicit initial centroids (then ``k`` must equal
    their number of distinct values; see :func:`init_centroids`). Lloyd runs until the
    assignment no longer changes, or ``max_iter`` steps. With ``keep_zero`` and exact zeros in
    the tensor, one centroid is pinned at exactly 0.0 (never moved), so pruned weights stay 0.
    Per-output-channel clustering: call this on each row.

    ``sample_weight`` (non-negative, the tensor's shape or broadcastable to it) makes it a
    weighted k-means: minimise Σ_i w_i (x_i − c_{a(i)})², e.g. with w_i the energy E[x_j²] of
    the input a weight multiplies (activation-aware clustering), so centroids sit where the
    layer's output error is smallest. Lloyd's centroids become weighted means; the final
    assignment (each weight to its nearest centroid) is the same for any positive weight.
    Weights are scaled to mean 1 and floored at 1e-3 so no value is ignored entirely.
    """
    flat, lo, hi = as_weight_vector(values)
    if max_iter < 1:
        raise ConfigError(f"max_iter must be at least 1, got {max_iter}.")
    weight = _sample_weights(sample_weight, np.shape(values))
    hist = histogram(flat, lo, hi, HISTOGRAM_BINS, second_moments=k == "auto",
                     sample_weight=weight)
    if k == "auto":
        if not 1 <= max_bits <= 16 or not 1 <= min_k <= 2 ** max_bits:
            raise ConfigError(f"need 1 ≤ min_k ≤ 2**max_bits ≤ 65536, got {min_k=}, {max_bits=}.")
        found = birch_k_from_histogram(hist, birch_threshold_ratio * hist.std(), birch_branching)
        k = int(np.clip(found, min_k, 2 ** max_bits))
    _check_k(k)

    centroids, pinned = _start(flat, hist, k, init, seed, keep_zero, weight)
    points, weights = (_unique_points(flat, weight) if flat.size <= EXACT_MAX_SIZE
                       else hist.points())
    centroids = lloyd(points, weights, centroids, pinned=pinned, max_iter=max_iter)
    codebook = np.unique(centroids.astype(np.float32))
    lookup = NearestCentroid(codebook, hist.lo, hist.hi, _grid_cells(flat.size, codebook.size))
    indices, squared_error, power = lookup.assign(flat)
    sqnr = 10 * np.log10(power / squared_error) if squared_error > 0 else np.inf
    return ClusterResult(codebook, indices.reshape(np.shape(values)),
                         squared_error / flat.size, float(sqnr), int(codebook.size))


def lloyd(
    points: np.ndarray,
    weights: np.ndarray,
    centroids: np.ndarray,
    *,
    pinned: int | None = None,
    max_iter: int = 1000,
) -> np.ndarray:
    """Weighted 1-D Lloyd on sorted ``points``, from sorted distinct ``centroids`` (float64).

    Cluster j is the run of points in [m_{j−1}, m_j) with m_j = (c_j + c_{j+1})/2 (a point on a
    midpoint goes up, as in the final assignment); its new centroid is its weighted mean, found
    from prefix sums, so a step costs O(K log P). Cluster means keep the centroids sorted.
    An empty cluster's centroid is moved to the point farthest from its own centroid (as
    scikit-learn does), which lowers the SSE. Centroid ``pinned`` never moves. Stops when the
    cluster boundaries repeat (a fixed point) or after ``max_iter`` steps.
    """
    offset = float(np.average(points, weights=weights))
    cum_weights = np.concatenate([[0.0], np.cumsum(weights)])
    cum_sums = np.concatenate([[0.0], np.cumsum(weights * (points - offset))])
    centroids = np.array(centroids, dtype=np.float64)
    pinned_value = None if pinned is None else centroids[pinned]
    bounds = None
    for _ in range(max_iter):
        new_bounds = np.searchsorted(points, (centroids[:-1] + centroids[1:]) / 2, side="left")
        if bounds is not None and np.array_equal(bounds, new_bounds):
            break
        bounds = new_bounds
        edges = np.concatenate([[0], bounds, [points.size]])
        counts = cum_weights[edges[1:]] - cum_weights[edges[:-1]]
        sums = cum_sums[edges[1:]] - cum_sums[edges[:-1]]
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled] + offset
        if pinned is not None:
            centroids[pinned] = pinned_value
            filled[pinned] = True
        if np.any(np.diff(centroids) < 0):
            # Prefix sums cancel catastrophically when a tensor spans many orders of magnitude
            # (e.g. 1e-3 beside 1e30), so means can leave their run; keep the boundaries monotone.
            centroids.sort()
            if pinned is not None:
                pinned = int(np.searchsorted(centroids, pinned_value))
        if not filled.all():
            relocated = _relocate_empty(points, edges, centroids, np.flatnonzero(~filled))
            if relocated is not None:
                centroids, bounds = relocated, None
                if pinned is not None:
                    pinned = int(np.searchsorted(centroids, pinned_value))
    return centroids


def _relocate_empty(
    points: np.ndarray, edges: np.ndarray, centroids: np.ndarray, empty: np.ndarray
) -> np.ndarray | None:
    """Centroids (re-sorted) with the ``empty`` ones moved onto the points farthest from their
    cluster's centroid; None when every point sits on its centroid."""
    owner = np.repeat(np.arange(centroids.size), np.diff(edges))
    squared = (points - centroids[owner]) ** 2
    count = min(empty.size, points.size)
    farthest = np.argpartition(-squared, count - 1)[:count]
    farthest = farthest[squared[farthest] > 0]
    if farthest.size == 0:
        return None
    moved = centroids.copy()
    moved[empty[:farthest.size]] = points[farthest]
    return np.sort(moved)


def _check_k(k: object) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k must be 'auto' or an integer from 1 to {MAX_K}, got {k!r}.")


def _grid_cells(size: int, k: int) -> int:
    """Lookup-grid size: ~1024 cells per centroid keeps the cells near a decision threshold
    (resolved by slow ``searchsorted``) to a few per mille of a bell-shaped tensor, while the
    table stays small enough for the cache; never far more cells than weights."""
    cells = max(1024 * k, 1 << 12)
    return 1 << min(cells - 1, 4 * size, (1 << 18) - 1).bit_length()


def _sample_weights(sample_weight: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-value weights as a flat float32 vector of mean 1, floored at 1e-3 (None: unweighted)."""
    if sample_weight is None:
        return None
    try:
        weight = np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), shape).reshape(-1)
    except ValueError as exc:
        raise ConfigError(f"sample_weight of shape {np.shape(sample_weight)} does not fit "
                          f"weights of shape {shape}.") from exc
    if not np.all(np.isfinite(weight)) or weight.min() < 0:
        raise ConfigError("sample_weight must be finite and non-negative.")
    mean = weight.mean()
    if mean <= 0:
        return None
    return np.maximum(weight / mean, 1e-3).astype(np.float32)


def _unique_points(
    flat: np.ndarray, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    if weight is None:
        points, counts = np.unique(flat, return_counts=True)
        return points.astype(np.float64), counts.astype(np.float64)
    points, inverse = np.unique(flat, return_inverse=True)
    return points.astype(np.float64), np.bincount(inverse.reshape(-1), weights=weight,
                                                  minlength=points.size)


def _init_points(
    flat: np.ndarray, hist: Histogram, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted points the initialisations sample from: distinct values if few, else bin means."""
    return _unique_points(flat, weight) if flat.size <= HISTOGRAM_BINS else hist.points()


def _start(
    flat: np.ndarray,
    hist: Histogram,
    k: int,
    init: str | np.ndarray,
    seed: int,
    keep_zero: bool,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, int | None]:
    """Initial centroids (sorted, distinct, float64) and the index of the pinned zero, if any."""
    if isinstance(init, str):
        centroids = _initial(init, *_init_points(flat, hist, weight), hist, k,
                             np.random.default_rng(seed))
    else:
        centroids = np.unique(np.asarray(init, dtype=np.float64).reshape(-1))
        if centroids.size != k:
            raise ConfigError(f"explicit init has {centroids.size} distinct centroids, k is {k}.")
    if keep_zero and np.count_nonzero(flat) < flat.size:
        centroids = _with_zero(centroids)
        return centroids, int(np.searchsorted(centroids, 0.0))
    return centroids, None


def _with_zero(centroids: np.ndarray) -> np.ndarray:
    """Move the centroid nearest 0 to exactly 0.0 (keeping the set sorted and distinct)."""
    moved = centroids.copy()
    moved[np.argmin(np.abs(moved))] = 0.0
    return np.unique(moved)


def _initial(
    method: str,
    points: np.ndarray,
    weights: np.ndarray,
    hist: Histogram,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray:
    if method == "linear":
        return np.unique(np.linspace(hist.lo, hist.hi, k))
    if method == "quantile":
        cumulative = np.cumsum(weights)
        targets = (np.arange(k) + 0.5) / k * cumulative[-1]
        return np.unique(points[np.minimum(np.searchsorted(cumulative, targets), points.size - 1)])
    if method == "kmeans++":
        return np.unique(_kmeans_plus_plus(points, weights, k, rng))
    if method == "kmeans||":
        return _kmeans_parallel(points, weights, k, rng)
    raise ConfigError(f"init must be one of {', '.join(INITS)} or an array, got {method!r}.")


def _sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to ``weights``."""
    cumulative = np.cumsum(weights)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"),
                   weights.size - 1))


def _kmeans_plus_plus(
    points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Weighted D²-sampling: the next centroid is point i with probability ∝ w_i · D(x_i)².

    Stops early when every point already coincides with a centroid.
    """
    chosen = [points[_sample(weights, rng)]]
    squared = (points - chosen[0]) ** 2
    for _ in range(1, k):
        mass = weights * squared
        if mass.sum() <= 0:
            break
        chosen.append(points[_sample(mass, rng)])
        np.minimum(squared, (points - chosen[-1]) ** 2, out=squared)
    return np.array(chosen)


def _nearest(points: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every point: index of its nearest sorted center (ties go up) and squared distance."""
    owner = np.searchsorted((centers[:-1] + centers[1:]) / 2, points, side="right")
    return owner, (points - centers[owner]) ** 2


def _kmeans_parallel(
    points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012) on weighted points.

    Each round samples every original weight independently with probability
    p = min(1, ℓ·D(x)²/φ), φ = Σ_i w_i·D(x_i)²; a point standing for w weights is therefore
    drawn with probability 1 − (1 − p)^w. The candidates are weighted by the weight of the
    points nearest to them and reduced to K centroids by weighted k-means++ then Lloyd.
    """
    oversampling = 2 * k
    centers = np.array([points[_sample(weights, rng)]])
    squared = (points - centers[0]) ** 2
    for _ in range(KMEANS_PARALLEL_ROUNDS):
        potential = float((weights * squared).sum())
        if potential <= 0:
            break
        per_weight = np.minimum(oversampling * squared / potential, 1.0)
        drawn = -np.expm1(weights * np.log1p(-np.minimum(per_weight, 1 - 1e-12)))
        drawn[per_weight >= 1.0] = 1.0
        centers = np.unique(np.concatenate([centers, points[rng.random(points.size) < drawn]]))
        squared = _nearest(points, centers)[1]
    if centers.size <= k:
        return centers
    center_weights = np.bincount(_nearest(points, centers)[0], weights=weights,
                                 minlength=centers.size)
    seeds = np.unique(_kmeans_plus_plus(centers, center_weights, k, rng))
    return np.unique(lloyd(centers, center_weights, seeds))
