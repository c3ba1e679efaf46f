"""Chunked passes over a large float32 weight vector: histogram, exact nearest-centroid lookup.

Everything here streams the tensor in chunks of :data:`CHUNK` values on a small thread pool
(numpy's ufuncs and ``take`` release the GIL; ``bincount`` does not), so no full-size float64 or
index temporaries are ever allocated: the only full-size output is the index array returned.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from onnxzip.errors import DataError

CHUNK = 1 << 18
HISTOGRAM_BINS = 1 << 16
_T = TypeVar("_T")


def as_weight_vector(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``values`` as a contiguous 1-D float32 view (a copy only if dtype/layout differ), with its
    minimum and maximum.

    Raises :class:`DataError` for an empty or non-finite tensor.
    """
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        raise DataError("cannot cluster an empty tensor.")
    # min/max propagate NaN and expose +-inf without a full-size boolean temporary.
    lo, hi = float(flat.min()), float(flat.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError("weights to cluster contain NaN or infinite values.")
    return flat, lo, hi


def reduce_chunks(
    func: Callable[[int, np.ndarray], _T], values: np.ndarray, combine: Callable[[_T, _T], _T]
) -> _T:
    """Fold ``func(start, chunk)`` over consecutive chunks with ``combine``, in chunk order.

    Chunks run on a thread pool with a bounded number in flight; folding in chunk order keeps
    floating-point sums identical whatever the number of cores.
    """
    starts = range(0, values.size, CHUNK)
    workers = min(os.cpu_count() or 1, 4, len(starts))
    result: _T | None = None

    def fold(part: _T) -> None:
        nonlocal result
        result = part if result is None else combine(result, part)

    if workers <= 1:
        for start in starts:
            fold(func(start, values[start:start + CHUNK]))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[_T]] = deque()
            for start in starts:
                pending.append(pool.submit(func, start, values[start:start + CHUNK]))
                if len(pending) > 2 * workers:
                    fold(pending.popleft().result())
            while pending:
                fold(pending.popleft().result())
    return result  # type: ignore[return-value]  # values is never empty


def _add_all(left: tuple[np.ndarray, ...], right: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(a + b for a, b in zip(left, right))


@dataclass(frozen=True)
class Histogram:
    """Uniform histogram of a weight vector with per-bin moments.

    Bin ``j`` holds the values whose float32 cell coordinate ``(x - lo) * bins / (hi - lo)``
    truncates to ``j`` (the last bin also holds ``hi``). ``counts``, ``sums`` and, when asked,
    ``sumsq`` are the CF triple (N, LS, SS) of every bin, so bins can be merged exactly.
    """

    lo: float
    hi: float
    counts: np.ndarray
    sums: np.ndarray
    sumsq: np.ndarray | None

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-empty bins as weighted points: (bin means sorted ascending, counts), float64."""
        keep = self.counts > 0
        means = self.sums[keep] / self.counts[keep]
        order = np.argsort(means, kind="stable")
        return means[order], self.counts[keep][order]

    def coarsen(self, group: int) -> Histogram:
        """Merge every ``group`` adjacent bins (CF additivity makes this exact)."""
        starts = np.arange(0, self.counts.size, group)
        counts, sums = (np.add.reduceat(moment, starts) for moment in (self.counts, self.sums))
        sumsq = None if self.sumsq is None else np.add.reduceat(self.sumsq, starts)
        return Histogram(self.lo, self.hi, counts, sums, sumsq)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def std(self) -> float:
        """Standard deviation of the underlying values (needs ``sumsq``)."""
        if self.sumsq is None:
            raise ValueError("histogram was built without second moments")
        total = self.total
        mean = self.sums.sum() / total
        return float(np.sqrt(max(self.sumsq.sum() / total - mean * mean, 0.0)))


def cell_coordinates(chunk: np.ndarray, lo: float, hi: float, cells: int) -> np.ndarray:
    """``(x - lo) * cells / (hi - lo)`` for every x of ``chunk`` (float32 values in [lo, hi]),
    in [0, cells].

    float32 arithmetic when it is safe; a range too narrow (denormal spans: cells / (hi - lo)
    overflows, 0 × inf = NaN) or too wide (hi - lo overflows float32) for float32 is computed
    in float64 and clipped, so no coordinate is NaN, infinite or negative."""
    limits = np.finfo(np.float32)
    scale = cells / (hi - lo) if hi > lo else 0.0
    if hi - lo < float(limits.max) / 2 and (scale == 0 or float(limits.tiny) <= scale < float(limits.max) / 2):
        coordinate = chunk - np.float32(lo)
        coordinate *= np.float32(scale)
        return coordinate
    coordinate = (chunk.astype(np.float64) - lo) * scale
    return np.clip(coordinate, 0, cells, out=coordinate)


def histogram(
    values: np.ndarray,
    lo: float,
    hi: float,
    bins: int,
    *,
    second_moments: bool = False,
    sample_weight: np.ndarray | None = None,
) -> Histogram:
    """Build a :class:`Histogram` of the output of :func:`as_weight_vector` in one pass. With
    ``sample_weight`` (float32, one per value) every moment is weighted: ``counts`` holds Σw,
    ``sums`` Σw·x, ``sumsq`` Σw·x²."""

    def one(start: int, chunk: np.ndarray) -> tuple[np.ndarray, ...]:
        coordinate = cell_coordinates(chunk, lo, hi, bins)
        # float32 rounding can put x == hi at coordinate ``bins``: one spare bin, folded below.
        index = coordinate.astype(np.intp)
        if sample_weight is None:
            moments = [np.bincount(index, minlength=bins + 1),
                       np.bincount(index, weights=chunk, minlength=bins + 1)]
        else:
            weight = sample_weight[start:start + chunk.size]
            moments = [np.bincount(index, weights=weight, minlength=bins + 1),
                       np.bincount(index, weights=weight * chunk, minlength=bins + 1)]
        if second_moments:
            np.square(chunk, out=coordinate)
            if sample_weight is not None:
                coordinate *= weight
            moments.append(np.bincount(index, weights=coordinate, minlength=bins + 1))
        return tuple(moments)

    folded = []
    for moment in reduce_chunks(one, values, _add_all):
        moment = moment.astype(np.float64)
        moment[bins - 1] += moment[bins]
        folded.append(moment[:bins])
    return Histogram(lo, hi, folded[0], folded[1], folded[2] if second_moments else None)


def exact_thresholds(codebook: np.ndarray) -> np.ndarray:
    """Float32 thresholds t with: float32 x is nearest to codebook[i] (i ≥ 1) iff x ≥ t[i-1].

    For sorted distinct float32 centroids c, x is nearer to c[i+1] than to c[i] iff
    x > m = (c[i] + c[i+1]) / 2 (x == m is a tie, resolved upward). m is formed in float64,
    where it is exact for centroids within 2**29 of each other in magnitude, and rounded *up*
    to float32: no float32 lies strictly between m and that value, so ``x >= t`` ⇔ ``x >= m``.
    """
    centroids = codebook.astype(np.float64)
    mids = (centroids[:-1] + centroids[1:]) / 2
    rounded = mids.astype(np.float32)
    low = rounded.astype(np.float64) < mids
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


class NearestCentroid:
    """Exact nearest-centroid lookup for float32 values in [lo, hi] (sorted distinct codebook).

    ``np.searchsorted`` costs ~100-200 ns a value and holds the GIL, so most values are looked
    up in a uniform grid of G cells instead. The float32 cell coordinate ``(x - lo) * G/(hi - lo)``
    of x is off from the exact one by < 0.2 cell (G ≤ 2**20), so when no decision threshold has
    an exact coordinate in ``[j - 1, j + 2)``, every x computed into cell j has the same nearest
    centroid, stored in ``table[j]``. The few cells near a threshold store -1 and their values
    are resolved exactly by ``searchsorted`` on :func:`exact_thresholds`.
    """

    def __init__(self, codebook: np.ndarray, lo: float, hi: float, cells: int) -> None:
        self.codebook = codebook
        self.index_dtype = np.uint8 if codebook.size <= 256 else np.uint16
        self._thresholds = exact_thresholds(codebook)
        self._lo, self._hi, self._cells = lo, hi, cells
        scale = cells / (hi - lo) if hi > lo else 0.0
        # One cell past the end: float32 rounding can put x == hi at coordinate ``cells``.
        grid = np.arange(cells + 1, dtype=np.float64)
        coords = (self._thresholds.astype(np.float64) - lo) * scale
        base = np.searchsorted(coords, grid - 1, side="right")
        top = np.searchsorted(coords, grid + 2, side="left")
        self._table = np.where(base == top, base, -1).astype(
            np.int16 if codebook.size <= 1 << 15 else np.int32)

    def lookup(self, chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the index of the nearest centroid of every value of ``chunk`` into ``out``."""
        coordinate = cell_coordinates(chunk, self._lo, self._hi, self._cells)
        picked = self._table.take(coordinate.astype(np.intp))
        unresolved = np.flatnonzero(picked < 0)
        if unresolved.size:
            picked[unresolved] = np.searchsorted(
                self._thresholds, chunk[unresolved], side="right")
        np.copyto(out, picked, casting="unsafe")
        return out

    def assign(self, values: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Nearest-centroid indices of all values, Σ(x − c)² and Σx² (both exact, float64)."""
        indices = np.empty(values.size, dtype=self.index_dtype)

        def one(start: int, chunk: np.ndarray) -> tuple[float, float]:
            picked = self.lookup(chunk, indices[start:start + chunk.size])
            error = chunk - self.codebook.take(picked)
            # einsum, not np.dot: OpenBLAS's threaded dot thrashes when called from threads.
            return (float(np.einsum("i,i->", error, error, dtype=np.float64)),
                    float(np.einsum("i,i->", chunk, chunk, dtype=np.float64)))

        squared_error, power = reduce_chunks(
            one, values, lambda left, right: (left[0] + right[0], left[1] + right[1]))
        return indices, squared_error, power
