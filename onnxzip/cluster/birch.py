"""Improved BIRCH (CN 114819143 A): the number of clusters of a weight tensor, found automatically.

A clustering feature (CF) summarises a set of points by the triple (N, LS, SS): weight, linear
sum Σx and square sum Σ|x|². CFs add, and give the centroid LS/N and the radius
R = sqrt(SS/N − |LS/N|²) (RMS distance to the centroid). The CF tree has nodes of at most
``branching`` (L) entries; a leaf entry is a sub-cluster, a non-leaf entry summarises a child.

Insertion of a point (or of a weighted CF):

1. the first point creates a leaf entry;
2. descend to the nearest leaf (nearest child centroid at every level); the point joins the
   nearest entry if the merged radius is ≤ T, else the **second-nearest** entry if its merged
   radius is ≤ T (the improvement over classic BIRCH), else it starts a new entry;
3. a node with more than L entries splits: its two farthest entries seed two nodes, every other
   entry goes to the nearer seed, and the split propagates to the parent (a root split grows the
   tree by one level);
4. the CFs along the path are updated.

The number of leaf entries is the cluster count K.
"""
from __future__ import annotations

import numpy as np

from onnxzip.cluster._scan import HISTOGRAM_BINS, Histogram, as_weight_vector, histogram
from onnxzip.errors import ConfigError

DEFAULT_BRANCHING = 16
DEFAULT_THRESHOLD_RATIO = 0.1
BIN_WIDTH_PER_THRESHOLD = 0.25


class _Node:
    """A CF-tree node: parallel arrays of its entries' CFs (and children when not a leaf)."""

    __slots__ = ("is_leaf", "counts", "sums", "squares", "children")

    def __init__(self, is_leaf: bool, counts: np.ndarray, sums: np.ndarray,
                 squares: np.ndarray, children: list[_Node]) -> None:
        self.is_leaf = is_leaf
        self.counts = counts
        self.sums = sums
        self.squares = squares
        self.children = children

    @property
    def size(self) -> int:
        return self.counts.size

    def centroids(self) -> np.ndarray:
        return self.sums / self.counts[:, None]

    def summary(self) -> tuple[float, np.ndarray, float]:
        return float(self.counts.sum()), self.sums.sum(axis=0), float(self.squares.sum())

    def append(self, count: float, linear: np.ndarray, square: float,
               child: _Node | None = None) -> None:
        self.counts = np.append(self.counts, count)
        self.sums = np.vstack([self.sums, linear])
        self.squares = np.append(self.squares, square)
        if child is not None:
            self.children.append(child)

    def subset(self, keep: np.ndarray) -> _Node:
        children = [child for child, kept in zip(self.children, keep) if kept]
        return _Node(self.is_leaf, self.counts[keep], self.sums[keep], self.squares[keep],
                     children)


def _radius_squared(counts: np.ndarray | float, sums: np.ndarray,
                    squares: np.ndarray | float) -> np.ndarray:
    """R² = SS/N − |LS/N|² of one CF (scalar N) or of many (arrays (E,), (E, d), (E,))."""
    centroids = sums / np.expand_dims(counts, -1)
    return np.maximum(squares / counts - (centroids ** 2).sum(axis=-1), 0.0)


class ImprovedBirch:
    """CF tree with the second-nearest rule; see the module docstring.

    ``threshold`` is T, the largest radius of a leaf entry; ``branching`` is L, the most entries
    a node holds. Counters ``splits`` and ``second_nearest_merges`` record how often a node
    split and how often a point joined its second-nearest entry.
    """

    def __init__(self, threshold: float, branching: int = DEFAULT_BRANCHING) -> None:
        if not threshold > 0:
            raise ConfigError(f"BIRCH threshold must be positive, got {threshold}.")
        if branching < 2:
            raise ConfigError(f"BIRCH branching factor must be at least 2, got {branching}.")
        self.threshold = float(threshold)
        self.branching = int(branching)
        self.root: _Node | None = None
        self.splits = 0
        self.second_nearest_merges = 0

    def fit(self, points: np.ndarray, weights: np.ndarray | None = None) -> ImprovedBirch:
        """Insert points (shape (P,) or (P, d)) in order, each with weight 1 or ``weights[i]``."""
        points = np.asarray(points, dtype=np.float64)
        points = points.reshape(points.shape[0], -1)
        weights = np.ones(points.shape[0]) if weights is None else np.asarray(weights, float)
        for point, weight in zip(points, weights):
            self.insert_cf(weight, weight * point, weight * float(point @ point))
        return self

    def insert_cf(self, count: float, linear: np.ndarray, square: float) -> None:
        """Insert a sub-cluster given by its CF (N, LS, SS); a point x is (1, x, |x|²)."""
        linear = np.atleast_1d(np.asarray(linear, dtype=np.float64))
        if self.root is None:
            self.root = _Node(True, np.array([float(count)]), linear[None, :].copy(),
                              np.array([float(square)]), [])
            return
        split = self._insert(self.root, float(count), linear, float(square))
        if split is not None:
            left, right = split
            root = _Node(False, np.empty(0), np.empty((0, linear.size)), np.empty(0), [])
            root.append(*left.summary(), left)
            root.append(*right.summary(), right)
            self.root = root

    def _insert(self, node: _Node, count: float, linear: np.ndarray,
                square: float) -> tuple[_Node, _Node] | None:
        distances = ((node.centroids() - linear / count) ** 2).sum(axis=1)
        if node.is_leaf:
            limit = self.threshold ** 2
            for rank, entry in enumerate(np.argsort(distances, kind="stable")[:2]):
                merged = (node.counts[entry] + count, node.sums[entry] + linear,
                          node.squares[entry] + square)
                if _radius_squared(*merged) <= limit:
                    node.counts[entry], node.sums[entry], node.squares[entry] = merged
                    self.second_nearest_merges += rank
                    return None
            node.append(count, linear, square)
        else:
            entry = int(np.argmin(distances))
            split = self._insert(node.children[entry], count, linear, square)
            if split is None:
                node.counts[entry] += count
                node.sums[entry] += linear
                node.squares[entry] += square
                return None
            left, right = split
            node.counts[entry], node.sums[entry], node.squares[entry] = left.summary()
            node.children[entry] = left
            node.append(*right.summary(), right)
        return self._split(node) if node.size > self.branching else None

    def _split(self, node: _Node) -> tuple[_Node, _Node]:
        """Seed two nodes with the farthest pair of entries; the others go to the nearer seed."""
        centroids = node.centroids()
        distances = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        first, second = np.unravel_index(np.argmax(distances), distances.shape)
        to_first = distances[:, first] <= distances[:, second]
        to_first[first], to_first[second] = True, False
        self.splits += 1
        return node.subset(to_first), node.subset(~to_first)

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], [] if self.root is None else [self.root]
        while stack:
            node = stack.pop()
            if node.is_leaf:
                leaves.append(node)
            else:
                stack.extend(reversed(node.children))
        return leaves

    @property
    def height(self) -> int:
        """Levels of the tree (1 while the root is a leaf, 0 when empty)."""
        levels, node = 0, self.root
        while node is not None:
            levels += 1
            node = None if node.is_leaf else node.children[0]
        return levels

    def leaf_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every leaf entry, leaves left to right: weights N (E,), centroids LS/N (E, d), radii."""
        leaves = self._leaves()
        if not leaves:
            return np.empty(0), np.empty((0, 0)), np.empty(0)
        counts = np.concatenate([leaf.counts for leaf in leaves])
        sums = np.concatenate([leaf.sums for leaf in leaves])
        squares = np.concatenate([leaf.squares for leaf in leaves])
        return counts, sums / counts[:, None], np.sqrt(_radius_squared(counts, sums, squares))


def birch_k_from_histogram(
    hist: Histogram, threshold: float, branching: int = DEFAULT_BRANCHING,
    min_fraction: float = 0.0,
) -> int:
    """K for the values summarised by ``hist`` (which needs second moments); see
    :func:`estimate_k_birch`."""
    if hist.sumsq is None:
        raise ValueError("BIRCH needs a histogram with second moments")
    if hist.hi == hist.lo:
        return 1
    width = (hist.hi - hist.lo) / hist.counts.size
    group = hist.counts.size if width == 0 else max(
        1, int(BIN_WIDTH_PER_THRESHOLD * threshold / width))
    coarse = hist.coarsen(group)
    filled = np.flatnonzero(coarse.counts > 0)
    heaviest_first = filled[np.argsort(-coarse.counts[filled], kind="stable")]
    tree = ImprovedBirch(threshold, branching)
    for cell in heaviest_first:
        tree.insert_cf(coarse.counts[cell], coarse.sums[cell : cell + 1], coarse.sumsq[cell])
    counts = tree.leaf_entries()[0]
    return max(1, int((counts >= min_fraction * hist.total).sum()))


def estimate_k_birch(
    values: np.ndarray,
    threshold: float | None = None,
    *,
    threshold_ratio: float = DEFAULT_THRESHOLD_RATIO,
    branching: int = DEFAULT_BRANCHING,
    min_fraction: float = 0.0,
) -> int:
    """Number of clusters of a weight tensor by the improved BIRCH.

    T is ``threshold``, or ``threshold_ratio`` × std(values). For speed on millions of weights,
    the points inserted are not the weights but the bins of a 2**16-bin histogram merged to a
    width of about T/4, each inserted as its exact CF (count, Σx, Σx²) — so every leaf CF is exact
    and a bin's own radius is at most T/(4√12). Bins go in by decreasing count: dense regions form
    entries first and sparse tails attach to them, where arrival order would otherwise
    split a cluster whose first two points land on opposite tails. Leaf entries holding less than
    ``min_fraction`` of the weights are not counted. The result is deterministic.
    """
    hist = histogram(*as_weight_vector(values), HISTOGRAM_BINS, second_moments=True)
    if threshold is None:
        threshold = threshold_ratio * hist.std()
    return birch_k_from_histogram(hist, threshold, branching, min_fraction)
