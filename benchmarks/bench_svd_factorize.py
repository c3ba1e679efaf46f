"""Time the SVD factorization of a ~100M-parameter transformer-shaped weight set.

Weights: an embedding table (vocab × d) plus, per layer, four d×d attention projections and the
d×4d / 4d×d FFN matrices (BERT-base shapes: 12 × 7.1M + 20000 × 768 ≈ 100M parameters). Each is
a random matrix with a decaying spectrum (a rank-96 exponentially decaying part plus a noise floor).

Modes:
  default     every matrix at 50 % of its parameters (rank_for_keep_ratio), method "auto";
  --global    spectra of all matrices, one global 50 % budget (allocate_ranks), then factorize;
  --compare   time the SVD backends on single matrices (torch / numpy exact SVD, onnxzip's
              torch randomized SVD / scikit-learn's randomized_svd at its defaults, 10
              oversamples and 4 power iterations) with the error over the optimal one.
  --quick     2 layers and a 2000-row embedding instead of 12 layers and 20000 rows.

    PYTHONPATH=. python benchmarks/bench_svd_factorize.py [--quick] [--global] [--compare]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from onnxzip.svd import (
    BudgetLayer,
    Spectrum,
    allocate_ranks,
    choose_svd_method,
    factorize,
    rank_for_keep_ratio,
    total_cost,
)


def decaying_matrix(m: int, n: int, rng: np.random.Generator, signal_rank: int = 96) -> np.ndarray:
    """G₁·diag(e^{−i/16})·G₂ (rank 96) plus a Gaussian noise floor, float32."""
    scales = np.exp(-np.arange(signal_rank) / 16.0).astype(np.float32)
    left = rng.standard_normal((m, signal_rank), dtype=np.float32) * scales
    signal = left @ rng.standard_normal((signal_rank, n), dtype=np.float32) / np.sqrt(signal_rank)
    return signal + 0.02 * rng.standard_normal((m, n), dtype=np.float32)


def transformer_weights(layers: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {"embedding": decaying_matrix(vocab, hidden, rng)}
    for layer in range(layers):
        for name in ("q", "k", "v", "o"):
            weights[f"layer{layer}.{name}"] = decaying_matrix(hidden, hidden, rng)
        weights[f"layer{layer}.ffn_in"] = decaying_matrix(hidden, 4 * hidden, rng)
        weights[f"layer{layer}.ffn_out"] = decaying_matrix(4 * hidden, hidden, rng)
    return weights


def factorize_all(weights: dict[str, np.ndarray], ranks: dict[str, int | None]) -> dict[tuple, list[float]]:
    """Factorize every matrix at its rank; seconds grouped by (shape, method)."""
    timings: dict[tuple, list[float]] = defaultdict(list)
    for name, matrix in weights.items():
        rank = ranks[name]
        if rank is None:
            continue
        start = time.perf_counter()
        factorize(matrix, rank)
        timings[(matrix.shape, choose_svd_method(*matrix.shape, rank))].append(time.perf_counter() - start)
    return timings


def print_timings(timings: dict[tuple, list[float]], ranks: dict[str, int | None], weights: dict[str, np.ndarray]) -> None:
    for (shape, method), seconds in sorted(timings.items()):
        shape_ranks = sorted({ranks[n] for n, w in weights.items() if w.shape == shape and ranks[n] is not None})
        print(f"  {shape[0]:>6}×{shape[1]:<5} ×{len(seconds):<3} ranks {shape_ranks[0]}..{shape_ranks[-1]:<4} "
              f"{method:<10} {sum(seconds):7.2f} s  ({np.mean(seconds):.3f} s each)")


def run_uniform(weights: dict[str, np.ndarray], keep_ratio: float) -> None:
    ranks = {name: rank_for_keep_ratio(*w.shape, keep_ratio) for name, w in weights.items()}
    start = time.perf_counter()
    timings = factorize_all(weights, ranks)
    total = time.perf_counter() - start
    kept = sum(r * sum(weights[n].shape) for n, r in ranks.items()) / sum(w.size for w in weights.values())
    print(f"uniform keep_ratio {keep_ratio}: {total:.1f} s for {len(weights)} matrices, {kept:.1%} of parameters kept")
    print_timings(timings, ranks, weights)


def run_global(weights: dict[str, np.ndarray], keep_ratio: float) -> None:
    start = time.perf_counter()
    layers = {name: BudgetLayer.of(Spectrum.of(w)) for name, w in weights.items()}
    spectra_time = time.perf_counter() - start
    dense = total_cost(layers, dict.fromkeys(layers))
    start = time.perf_counter()
    ranks = allocate_ranks(layers, keep_ratio * dense)
    allocate_time = time.perf_counter() - start
    start = time.perf_counter()
    timings = factorize_all(weights, ranks)
    factor_time = time.perf_counter() - start
    print(f"global budget {keep_ratio}: spectra {spectra_time:.1f} s, allocation {allocate_time:.2f} s, "
          f"factorization {factor_time:.1f} s; {total_cost(layers, ranks) / dense:.1%} of parameters kept, "
          f"{sum(r is None for r in ranks.values())} matrices left dense")
    print_timings(timings, ranks, weights)


def best_of(repeats: int, call, *args, **kwargs) -> tuple[float, object]:
    """Shortest of ``repeats`` timed calls (the machine is shared), and the last result."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return min(seconds), result


def excess_error(matrix: np.ndarray, svd: tuple[np.ndarray, np.ndarray, np.ndarray], optimal: float) -> float:
    """‖W − U·Σ·Vᵀ‖_F/‖W‖_F over the optimal rank-r error, minus 1."""
    u, s, vh = svd
    return float(np.linalg.norm(matrix - (u * s) @ vh) / np.linalg.norm(matrix) / optimal - 1)


def run_compare(repeats: int) -> None:
    from sklearn.utils.extmath import randomized_svd

    from onnxzip.svd import truncated_svd

    rng = np.random.default_rng(1)
    print(f"backends, best of {repeats} (seconds, Frobenius error over the optimal rank-r error − 1)")
    for m, n in ((512, 512), (768, 768), (768, 3072), (1024, 1024)):
        matrix = decaying_matrix(m, n, rng)
        spectrum = Spectrum.of(matrix.astype(np.float64))
        exact_torch, _ = best_of(repeats, truncated_svd, matrix, min(m, n), method="exact")
        exact_numpy, _ = best_of(repeats, np.linalg.svd, matrix, full_matrices=False)
        print(f"{m}×{n}: exact torch {exact_torch:.3f}  exact numpy {exact_numpy:.3f}")
        for fraction in (1 / 32, 1 / 8, 1 / 4, 3 / 8):
            rank = max(1, int(fraction * min(m, n)))
            optimal = spectrum.tail(rank)
            seconds_torch, ours = best_of(repeats, truncated_svd, matrix, rank, method="randomized")
            seconds_sk, theirs = best_of(repeats, randomized_svd, matrix, rank, random_state=0)
            print(f"  r={rank:<4} randomized torch {seconds_torch:.3f} ({excess_error(matrix, ours, optimal):+.2%})  "
                  f"sklearn {seconds_sk:.3f} ({excess_error(matrix, theirs, optimal):+.2%})  "
                  f"auto → {choose_svd_method(m, n, rank)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers and a 2000-row embedding")
    parser.add_argument("--global", dest="global_budget", action="store_true", help="also run the global allocation")
    parser.add_argument("--compare", action="store_true", help="time the SVD backends instead")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="repeats per backend in --compare")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    if args.compare:
        run_compare(args.repeats)
        return
    layers, vocab = (2, 2000) if args.quick else (12, 20000)
    start = time.perf_counter()
    weights = transformer_weights(layers, 768, vocab)
    print(f"{sum(w.size for w in weights.values()) / 1e6:.1f}M parameters in {len(weights)} matrices "
          f"(generated in {time.perf_counter() - start:.1f} s)")
    run_uniform(weights, args.keep_ratio)
    if args.global_budget:
        run_global(weights, args.keep_ratio)


if __name__ == "__main__":
    main()
