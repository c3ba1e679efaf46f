"""Benchmark onnxzip.cluster against scikit-learn.

1. ``cluster_weights`` vs ``sklearn.cluster.KMeans(n_init=1)`` from the same initial centroids
   on 10M weights: wall-time ratio and MSE of both.
2. 100M float32 weights: wall time and peak extra memory (tracemalloc) relative to the tensor.
3. ``k="auto"`` (improved BIRCH + k-means|| + k-means) on 1M weights.
4. The ``cluster`` graph pass at 4 bits on an MLP of 4 square MatMul layers (16M weights):
   pass time, file size ratio, onnxruntime session load time (which folds the decode) and
   inference time before/after.

Usage: ``python benchmarks/bench_cluster.py [--quick] [--k 16]`` (``--quick``: 10× smaller).
"""
from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np
from sklearn.cluster import KMeans

from onnxzip.cluster import cluster_weights, init_centroids


def trained_like_weights(size: int, seed: int = 0) -> np.ndarray:
    """Half Gaussian, half Laplacian (heavier tail), float32, like a trained layer."""
    rng = np.random.default_rng(seed)
    half = size // 2
    values = np.empty(size, dtype=np.float32)
    values[:half] = rng.standard_normal(half, dtype=np.float32) * np.float32(0.02)
    values[half:] = rng.laplace(0.0, 0.03, size - half).astype(np.float32)
    return values


def mse(values: np.ndarray, quantized: np.ndarray) -> float:
    total = 0.0
    for start in range(0, values.size, 1 << 20):
        error = values[start:start + (1 << 20)].astype(np.float64) - quantized[start:start + (1 << 20)]
        total += float(np.einsum("i,i->", error, error))
    return total / values.size


def versus_sklearn(size: int, k: int) -> None:
    values = trained_like_weights(size)
    start = init_centroids(values, k, "kmeans||", keep_zero=False)
    began = time.perf_counter()
    ours = cluster_weights(values, start.size, init=start, keep_zero=False)
    ours_s = time.perf_counter() - began
    began = time.perf_counter()
    model = KMeans(n_clusters=start.size, init=start[:, None], n_init=1).fit(values[:, None])
    sklearn_s = time.perf_counter() - began
    sklearn_mse = mse(values, model.cluster_centers_[model.labels_, 0])
    print(f"[1] {size / 1e6:g}M weights, K={start.size}, same kmeans|| init "
          f"(init itself {_timed(lambda: init_centroids(values, k, 'kmeans||')):.2f}s)")
    print(f"    onnxzip  {ours_s:8.2f} s   MSE {ours.mse:.6e}")
    print(f"    sklearn  {sklearn_s:8.2f} s   MSE {sklearn_mse:.6e}   ({model.n_iter_} Lloyd iterations)")
    print(f"    speed-up {sklearn_s / ours_s:6.1f}x   MSE ratio onnxzip/sklearn "
          f"{ours.mse / sklearn_mse:.6f}")


def large(size: int, k: int) -> None:
    values = trained_like_weights(size, seed=1)
    tracemalloc.start()
    began = time.perf_counter()
    result = cluster_weights(values, k)
    elapsed = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"[2] {size / 1e6:g}M float32 weights ({values.nbytes / 2**20:.0f} MiB), K={k}, "
          f"init kmeans||: {elapsed:.2f} s, peak extra memory {peak / 2**20:.0f} MiB = "
          f"{peak / values.nbytes:.2f}x the tensor, SQNR {result.sqnr_db:.1f} dB")


def auto(size: int) -> None:
    values = trained_like_weights(size, seed=2)
    began = time.perf_counter()
    result = cluster_weights(values, "auto")
    print(f"[3] k='auto' on {size / 1e6:g}M weights: K={result.k} in "
          f"{time.perf_counter() - began:.2f} s, SQNR {result.sqnr_db:.1f} dB")


def graph_pass(size: int) -> None:
    import onnxruntime  # noqa: F401 - imported before timing (it loads torch: seconds)
    from onnx import TensorProto, helper, numpy_helper

    from onnxzip.passes import PassContext
    from onnxzip.passes.cluster import ClusterPass
    from onnxzip.core.runtime import make_session

    width = int(np.sqrt(size / 4))
    layers = [trained_like_weights(width * width, seed=s).reshape(width, width) for s in range(4)]
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(4)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [8, width])],
        [helper.make_tensor_value_info("h4", TensorProto.FLOAT, [8, width])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(layers)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    began = time.perf_counter()
    clustered = ClusterPass(bits=4).run(model, PassContext()).model
    pass_s = time.perf_counter() - began
    feeds = {"h0": np.ones((8, width), np.float32)}
    timings = []
    for candidate in (model, clustered):
        began = time.perf_counter()
        session = make_session(candidate, "cpu")
        load_s = time.perf_counter() - began
        run_s = min(_timed(lambda s=session: s.run(None, feeds)) for _ in range(5))
        timings.append((load_s, run_s))
    print(f"[4] cluster pass, 4 bits, {4 * width * width / 1e6:.1f}M weights: {pass_s:.2f} s, "
          f"file {model.ByteSize() / clustered.ByteSize():.2f}x smaller")
    print(f"    onnxruntime load {timings[0][0]:.2f} s → {timings[1][0]:.2f} s (folds the decode), "
          f"inference {timings[0][1] * 1e3:.2f} ms → {timings[1][1] * 1e3:.2f} ms")


def _timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M / 10M instead of 10M / 100M")
    parser.add_argument("--k", type=int, default=16, help="K for the sklearn comparison")
    parser.add_argument("--large-k", type=int, default=256, help="K for the large tensor")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    versus_sklearn(10_000_000 // scale, args.k)
    large(100_000_000 // scale, args.large_k)
    auto(1_000_000)
    graph_pass(16_000_000 // scale)


if __name__ == "__main__":
    main()
