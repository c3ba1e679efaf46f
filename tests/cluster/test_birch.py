from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import Birch

from onnxzip.cluster import ImprovedBirch, cluster_weights, estimate_k_birch
from onnxzip.errors import ConfigError


def _blobs(size: int, components: int, gap: float = 20.0, seed: int = 0) -> np.ndarray:
    """1-D Gaussian blobs of std 1 whose centres are ``gap`` apart."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, components, size) * gap + rng.normal(0, 1, size)).astype(np.float32)


def _tree_nodes(tree: ImprovedBirch) -> list:
    nodes, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children)
    return nodes


@pytest.mark.parametrize("components", [3, 5, 8])
def test_k_equals_the_number_of_separated_components(components: int) -> None:
    values = _blobs(30_000, components, seed=components)
    assert estimate_k_birch(values, threshold=2.0) == components


@pytest.mark.parametrize("components", [3, 5])
def test_point_by_point_tree_finds_separated_components(components: int) -> None:
    values = np.random.default_rng(1).permutation(_blobs(3_000, components))
    counts, centroids, radii = ImprovedBirch(threshold=2.0).fit(values).leaf_entries()
    assert counts.size == components and counts.sum() == values.size
    np.testing.assert_allclose(np.sort(centroids[:, 0]), np.arange(components) * 20.0, atol=0.2)
    assert np.all(radii <= 2.0)


def _sklearn_subclusters(values: np.ndarray, threshold: float) -> int:
    model = Birch(threshold=threshold, n_clusters=None, branching_factor=16).fit(values[:, None])
    return len(model.subcluster_centers_)


def test_same_k_as_sklearn_birch_on_separated_blobs_so_same_mse() -> None:
    values = _blobs(6_000, 5, gap=6.0)
    ours, theirs = estimate_k_birch(values, threshold=2.0), _sklearn_subclusters(values, 2.0)
    assert ours == theirs == 5
    assert cluster_weights(values, ours).mse <= cluster_weights(values, theirs).mse


@pytest.mark.parametrize("distribution", ["normal", "laplace"])
@pytest.mark.parametrize("ratio", [0.1, 0.2])
def test_fewer_entries_than_sklearn_birch_under_the_same_radius(distribution: str,
                                                                 ratio: float) -> None:
    """On one bell-shaped tensor the second-nearest rule and heavy-first insertion cover the
    data with fewer radius-≤T entries than classic BIRCH (sklearn): between half and all of
    its count. Fewer clusters mean a higher k-means MSE, by design of the trade-off."""
    values = getattr(np.random.default_rng(0), distribution)(0, 1, 6_000).astype(np.float32)
    threshold = ratio * float(values.std())
    ours, theirs = estimate_k_birch(values, threshold), _sklearn_subclusters(values, threshold)
    assert theirs / 2 <= ours <= theirs


def test_second_nearest_entry_takes_what_the_nearest_cannot() -> None:
    tree = ImprovedBirch(threshold=1.0)
    tree.insert_cf(2, [0.0], 2 * 0.99 ** 2)  # points at ±0.99: radius 0.99
    tree.insert_cf(3, [8.1], 3 * (2.7 ** 2 + 0.25))  # centre 2.7, radius 0.5; joint radius 1.51
    # 1.3 is nearer the first entry (1.3 < 1.4), but joining it gives radius 1.014 > T;
    # joining the second gives radius 0.745 ≤ T. Classic BIRCH would open a third entry.
    tree.insert_cf(1, [1.3], 1.3 ** 2)
    counts, _, radii = tree.leaf_entries()
    assert tree.second_nearest_merges == 1
    np.testing.assert_array_equal(counts, [2, 4])
    assert np.all(radii <= 1.0)


def test_new_entry_when_neither_nearest_entry_fits() -> None:
    tree = ImprovedBirch(threshold=1.0)
    for point in (0.0, 10.0, 5.0):
        tree.insert_cf(1, [point], point ** 2)
    assert tree.leaf_entries()[0].size == 3 and tree.second_nearest_merges == 0


def test_nodes_split_with_a_small_branching_factor() -> None:
    points = np.random.default_rng(2).permutation(np.arange(60, dtype=np.float64) * 10)
    tree = ImprovedBirch(threshold=1.0, branching=3).fit(points)
    counts, centroids, _ = tree.leaf_entries()
    assert counts.size == 60 and tree.splits > 10 and tree.height >= 4
    assert all(node.size <= 3 for node in _tree_nodes(tree))
    # Non-leaf CFs equal the sums of their subtrees (updates along the path, splits).
    assert tree.root.counts.sum() == 60
    assert tree.root.sums.sum() == pytest.approx(points.sum())
    np.testing.assert_array_equal(np.sort(centroids[:, 0]), np.sort(points))


def test_two_dimensional_points() -> None:
    rng = np.random.default_rng(3)
    centres = np.array([[0, 0], [30, 0], [0, 30], [30, 30]], dtype=float)
    points = centres[rng.integers(0, 4, 2_000)] + rng.normal(0, 1, (2_000, 2))
    assert ImprovedBirch(threshold=3.0, branching=4).fit(points).leaf_entries()[0].size == 4


def test_min_fraction_ignores_tiny_entries() -> None:
    values = np.concatenate([_blobs(10_000, 3), np.float32([500.0, 501.0])])
    assert estimate_k_birch(values, threshold=2.0) == 4
    assert estimate_k_birch(values, threshold=2.0, min_fraction=0.01) == 3


def test_default_threshold_follows_the_spread() -> None:
    values = np.random.default_rng(4).normal(0, 1, 100_000).astype(np.float32)
    assert estimate_k_birch(values) == estimate_k_birch(values * 1000)
    assert estimate_k_birch(values, threshold_ratio=0.05) > estimate_k_birch(values)
    assert estimate_k_birch(np.full(10, 3.0, dtype=np.float32)) == 1


def test_bad_parameters_raise() -> None:
    with pytest.raises(ConfigError):
        ImprovedBirch(threshold=0.0)
    with pytest.raises(ConfigError):
        ImprovedBirch(threshold=1.0, branching=1)
