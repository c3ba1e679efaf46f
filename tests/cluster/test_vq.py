"""Vector codebooks of weight pairs (pure numpy): the pair layout, weighted 2-D k-means, and the
GPTQ fit with pairs assigned jointly."""
from __future__ import annotations

import numpy as np
import pytest

from onnxzip.cluster import assign_pairs, cluster_weights, kmeans_pairs, pair_merge, pair_split, pairable
from onnxzip.cluster.gptq import fit_codebook, gptq_assign, layer_problem

RNG = np.random.default_rng(5)


@pytest.mark.parametrize(("shape", "axis"), [((6, 8), 1), ((8, 6), 0), ((2, 16, 5), 1), ((4, 3, 1, 1), 0)])
def test_pair_split_groups_elements_2p_and_2p_plus_1_of_the_axis_and_merges_back(shape, axis):
    values = RNG.standard_normal(shape)
    pairs = pair_split(values, axis)
    expected = list(shape)
    expected[axis] //= 2
    assert pairs.shape == (*expected, 2)
    first = np.take(values, np.arange(0, shape[axis], 2), axis=axis)
    second = np.take(values, np.arange(1, shape[axis], 2), axis=axis)
    assert np.array_equal(pairs[..., 0], first) and np.array_equal(pairs[..., 1], second)
    assert np.array_equal(pair_merge(pairs, axis), values)
    assert pairable(shape, axis) == (shape[axis] % 2 == 0)
    assert not pairable((7, 4), 0) and not pairable((8,), 0) and not pairable((8, 4), None)


def _correlated(count: int, rho: float = 0.8) -> np.ndarray:
    """Pairs of neighbouring output channels' weights: correlated Gaussians."""
    a = RNG.standard_normal(count)
    return np.stack([a, rho * a + np.sqrt(1 - rho * rho) * RNG.standard_normal(count)], axis=1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pairs_at_b_bits_per_weight_err_less_than_a_scalar_codebook_at_b_bits(bits):
    points = _correlated(20000)
    codewords, labels = kmeans_pairs(points, 4**bits, seed=0)
    vector_error = np.mean((codewords[labels] - points) ** 2)
    scalar = cluster_weights(points.astype(np.float32), 2**bits, seed=0)
    scalar_error = np.mean((scalar.codebook[scalar.indices] - points) ** 2)
    assert codewords.shape == (4**bits, 2) and labels.max() < 4**bits
    assert vector_error < 0.8 * scalar_error


def test_kmeans_pairs_labels_are_the_nearest_codeword_in_the_weighted_metric_and_weights_matter():
    points = _correlated(3000, 0.0)
    weights = np.ones_like(points)
    weights[:, 1] = 1e-3  # the second coordinate hardly counts
    codewords, labels = kmeans_pairs(points, 16, weights, seed=1)
    cost = np.sum(weights[:, None, :] * (points[:, None, :] - codewords[None]) ** 2, axis=2)
    assert np.array_equal(labels, np.argmin(cost, axis=1))
    assert np.array_equal(assign_pairs(points, weights, codewords), labels)
    # the codewords spend their resolution on the coordinate that counts
    first = np.mean((codewords[labels, 0] - points[:, 0]) ** 2)
    second = np.mean((codewords[labels, 1] - points[:, 1]) ** 2)
    assert first < 0.1 * second


def test_fewer_distinct_pairs_than_codewords_reproduce_them_exactly():
    points = np.repeat(np.array([[0.0, 1.0], [2.0, -1.0], [3.0, 3.0]]), 50, axis=0)
    codewords, labels = kmeans_pairs(points, 16, seed=0)
    assert np.allclose(codewords[labels], points, rtol=0, atol=1e-12)


def _layer(m: int = 16, n: int = 24, samples: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [1, m, n] whose neighbouring rows (output channels) are correlated, inputs with a few
    strong directions, and held-back inputs."""
    base = RNG.standard_normal((m // 2, n))
    weight = np.empty((m, n))
    weight[0::2], weight[1::2] = base, 0.8 * base + 0.6 * RNG.standard_normal((m // 2, n))
    mixing = RNG.standard_normal((n, n)) * np.linspace(2.0, 0.1, n)
    fit, held = RNG.standard_normal((samples, n)) @ mixing, RNG.standard_normal((samples, n)) @ mixing
    return weight[None], fit, held


def test_gptq_with_pairs_keeps_each_pair_on_one_codeword_and_is_never_worse_than_its_start():
    weight, x, held = _layer()
    gram = (x.T @ x)[None]
    pairs = weight[0].reshape(8, 2, 24).transpose(0, 2, 1).reshape(-1, 2)
    codewords, labels = kmeans_pairs(pairs, 16, seed=0)
    index = labels.reshape(8, 24)
    entries = np.empty((1, 16, 24), dtype=np.int64)
    entries[0, 0::2], entries[0, 1::2] = 2 * index, 2 * index + 1
    rows = np.stack([np.arange(0, 16, 2), np.arange(1, 16, 2)], axis=1)[None]
    fit = fit_codebook(weight, codewords.reshape(1, -1), entries, np.zeros((1, 16), np.int64), gram, gram,
                       iterations=3, pair_rows=rows)
    assert fit.after <= fit.before
    chosen = fit.indices[0]
    assert np.array_equal(chosen[0::2] % 2, np.zeros_like(chosen[0::2]))
    assert np.array_equal(chosen[1::2], chosen[0::2] + 1)  # both rows of a pair: one codeword
    # assignment alone: each pair gets the nearest codeword of its (error-fed) column
    problem = layer_problem(weight, gram, gram)
    again = gptq_assign(problem.target, problem.order(), fit.codebook, np.zeros((1, 16), np.int64), pair_rows=rows)
    assert np.array_equal(again[0, 1::2], again[0, 0::2] + 1)


def test_gptq_pairs_err_less_on_held_back_inputs_than_scalar_gptq_at_the_same_bits():
    weight, x, held = _layer(m=32, n=48, samples=600)
    gram = (x.T @ x)[None]

    def held_error(q: np.ndarray) -> float:
        return float(np.sum((held @ (q - weight[0]).T) ** 2) / np.sum((held @ weight[0].T) ** 2))

    bits = 2
    scalar = cluster_weights(weight.astype(np.float32), 2**bits, seed=0)
    scalar_fit = fit_codebook(weight, scalar.codebook.reshape(1, -1).astype(np.float64),
                              scalar.indices.astype(np.int64), np.zeros((1, 32), np.int64), gram, gram)
    scalar_q = scalar_fit.codebook[0][scalar_fit.indices[0]]
    pairs = weight[0].reshape(16, 2, 48).transpose(0, 2, 1).reshape(-1, 2)
    codewords, labels = kmeans_pairs(pairs, 4**bits, seed=0)
    index = labels.reshape(16, 48)
    entries = np.empty((1, 32, 48), dtype=np.int64)
    entries[0, 0::2], entries[0, 1::2] = 2 * index, 2 * index + 1
    rows = np.stack([np.arange(0, 32, 2), np.arange(1, 32, 2)], axis=1)[None]
    vector_fit = fit_codebook(weight, codewords.reshape(1, -1), entries, np.zeros((1, 32), np.int64), gram, gram,
                              pair_rows=rows)
    vector_q = vector_fit.codebook[0][vector_fit.indices[0]]
    assert held_error(vector_q) < 0.8 * held_error(scalar_q)
