"""Benchmark structured channel pruning on the reference CNN.

Removes ``--ratio`` (default 50%) of the prunable channels of every channel group (``scope=layer``,
so each layer keeps half) with the ``prune-channels`` pass, then measures onnxruntime CPU
latency of the original and the pruned model at batch 1 and 32 (``intra_op_num_threads`` 2,
warm-up, then the median of many runs, interleaved so both see the same machine load), and
prints parameters and FLOPs from the pass report next to onnxruntime's own file sizes.

Usage: ``python benchmarks/bench_prune.py [--ratio 0.5] [--repeats 300]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
from onnxzip.models.zoo import get_reference_model
from onnxzip.passes import PassContext, get_pass
from onnxzip.core.runtime import make_session


def median_latencies(models: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """Median seconds per run of each model, runs interleaved round-robin after a warm-up."""
    sessions = {name: make_session(model, "cpu", intra_op_threads=2) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(20):
            session.run(None, feeds)
    for _ in range(repeats):
        for name, session in sessions.items():
            began = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - began)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    reference = get_reference_model("cnn")
    original = onnx.load(reference.onnx_path)
    context = PassContext(feeds={reference.input_name: reference.test_inputs[:8]})
    began = time.perf_counter()
    result = get_pass("prune-channels")(ratio=args.ratio, scope="layer").run(original, context)
    report = result.report
    groups = [c for c in report.changes if c.op_type == "channel group" and not c.skipped]
    before = sum(c.details["channels_before"] for c in groups)
    after = sum(c.details["channels_after"] for c in groups)
    print(f"prune-channels ratio={args.ratio} scope=layer: {time.perf_counter() - began:.2f} s, "
          f"prunable channels {before} -> {after} ({1 - after / before:.0%} removed, {len(groups)} groups)")
    print(f"parameters {report.params_before:,} -> {report.params_after:,} "
          f"({report.params_before / report.params_after:.2f}x fewer)")
    print(f"FLOPs/sample {report.flops_before:,} -> {report.flops_after:,} "
          f"({report.flops_before / report.flops_after:.2f}x fewer)")
    print(f"test accuracy without fine-tuning: {reference.accuracy(original, device='cpu'):.3f} -> "
          f"{reference.accuracy(result.model, device='cpu'):.3f}")
    for batch in (1, 32):
        feeds = {reference.input_name: np.ascontiguousarray(reference.test_inputs[:batch])}
        latency = median_latencies({"original": original, "pruned": result.model}, feeds, args.repeats)
        print(f"batch {batch:2d}: original {latency['original'] * 1e3:.3f} ms, pruned {latency['pruned'] * 1e3:.3f} ms "
              f"-> {latency['original'] / latency['pruned']:.2f}x faster (median of {args.repeats}, 2 threads)")


if __name__ == "__main__":
    main()
