"""onnxruntime CPU latency of SVD-factorized models against their originals (run by hand).

1. The reference transformer (4 layers, d = 128, FFN 512, seq 8) factorized with the svd pass
   at ``budget=0.5`` (half the eligible parameters), at batch 1 and 32.
2. A generated transformer-shaped stack of MatMuls (d = 768, FFN 3072, seq 128, weights with a
   decaying spectrum like trained layers), same budget, at batch 1 and 8: where the matrices are
   large enough for the multiply-accumulates, not the per-node overhead, to set the time.

Each pair of sessions (``intra_op_num_threads``, default 2) runs interleaved — original,
factorized, original, ... — so background load hits both alike; the median of the repeats is
reported and every ratio is original / factorized measured in the same run.

Usage: ``python benchmarks/bench_svd_latency.py [--repeats 200] [--threads 2] [--budget 0.5]
[--quick]`` (``--quick``: fewer repeats, 1 generated layer).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxzip.models.zoo import get_reference_model
from onnxzip.passes import PassContext
from onnxzip.passes.svd import SvdPass
from onnxzip.core.runtime import make_session, run_session
from onnxzip.evaluators.fidelity import compare_arrays


def interleaved_medians(sessions: list, feeds: dict[str, np.ndarray], repeats: int) -> list[float]:
    """Median seconds per run of each session, the sessions taking turns."""
    for session in sessions:  # warm-up
        for _ in range(3):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            times[index].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def decaying_weight(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """m×n with singular values ≈ exp(−4i/k) plus a 1 % noise floor (a trained layer's shape)."""
    k = min(m, n)
    scales = np.exp(-4.0 * np.arange(k) / k) + 0.01
    left = rng.standard_normal((m, k)) / np.sqrt(m)
    right = rng.standard_normal((k, n)) / np.sqrt(n)
    return ((left * scales) @ right).astype(np.float32)


def generated_transformer(
    layers: int, d: int = 768, ffn: int = 3072, seed: int = 0
) -> onnx.ModelProto:
    """x[N, seq, d] → per layer: q/k/v/out projections (summed, no attention mixing) + residual,
    then FFN d→ffn→d with Relu + residual. Only the weight MatMuls a factorization touches."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for layer in range(layers):
        prefix = f"l{layer}"
        heads = []
        for proj in ("q", "k", "v"):
            name = f"{prefix}_{proj}"
            inits.append(numpy_helper.from_array(decaying_weight(d, d, rng), f"{name}_w"))
            nodes.append(helper.make_node("MatMul", [current, f"{name}_w"], [name], name=name))
            heads.append(name)
        nodes.append(helper.make_node("Sum", heads, [f"{prefix}_qkv"], name=f"{prefix}_sum"))
        inits.append(numpy_helper.from_array(decaying_weight(d, d, rng), f"{prefix}_o_w"))
        nodes.append(
            helper.make_node(
                "MatMul", [f"{prefix}_qkv", f"{prefix}_o_w"], [f"{prefix}_o"], name=f"{prefix}_o"
            )
        )
        nodes.append(
            helper.make_node(
                "Add", [current, f"{prefix}_o"], [f"{prefix}_r1"], name=f"{prefix}_add1"
            )
        )
        inits.append(numpy_helper.from_array(decaying_weight(d, ffn, rng), f"{prefix}_ffn1_w"))
        inits.append(numpy_helper.from_array(decaying_weight(ffn, d, rng), f"{prefix}_ffn2_w"))
        nodes += [
            helper.make_node(
                "MatMul",
                [f"{prefix}_r1", f"{prefix}_ffn1_w"],
                [f"{prefix}_h"],
                name=f"{prefix}_ffn1",
            ),
            helper.make_node("Relu", [f"{prefix}_h"], [f"{prefix}_a"], name=f"{prefix}_relu"),
            helper.make_node(
                "MatMul",
                [f"{prefix}_a", f"{prefix}_ffn2_w"],
                [f"{prefix}_f"],
                name=f"{prefix}_ffn2",
            ),
            helper.make_node(
                "Add", [f"{prefix}_r1", f"{prefix}_f"], [f"{prefix}_out"], name=f"{prefix}_add2"
            ),
        ]
        current = f"{prefix}_out"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="output"))
    graph = helper.make_graph(
        nodes,
        "generated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "seq", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def compare(
    title: str, original, feeds_by_batch, budget: float, repeats: int, threads: int, calibration
) -> None:
    start = time.perf_counter()
    result = SvdPass(budget=budget).run(original, PassContext(feeds=calibration))
    seconds = time.perf_counter() - start
    report = result.report
    factorized = result.model
    print(
        f"\n{title}: svd budget={budget} in {seconds:.1f} s; "
        f"{sum(not c.skipped for c in report.changes)} layers factorized; "
        f"params ×{report.params_after / report.params_before:.3f}, "
        f"FLOPs ×{report.flops_after / report.flops_before:.3f}, "
        f"file ×{factorized.ByteSize() / original.ByteSize():.3f}"
    )
    sessions = [make_session(m, "cpu", intra_op_threads=threads) for m in (original, factorized)]
    for batch, feeds in feeds_by_batch.items():
        expected, actual = (run_session(s, feeds) for s in sessions)
        cosine = min(compare_arrays(k, expected[k], actual[k]).cosine for k in expected)
        dense, low_rank = interleaved_medians(sessions, feeds, repeats)
        print(
            f"  batch {batch:>3}: original {dense * 1e3:8.3f} ms, factorized {low_rank * 1e3:8.3f} ms, "
            f"speed-up ×{dense / low_rank:.2f} (output cosine {cosine:.5f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 30 if args.quick else args.repeats

    reference = get_reference_model("transformer")
    original = onnx.load(reference.onnx_path)
    inputs = reference.test_inputs
    feeds = {batch: {reference.input_name: inputs[:batch]} for batch in (1, 32)}
    calibration = {reference.input_name: inputs[:64]}
    compare(
        "reference transformer (d=128, seq 8)",
        original,
        feeds,
        args.budget,
        repeats,
        args.threads,
        calibration,
    )
    print(
        f"  accuracy: original {reference.accuracy(original):.4f}, "
        f"factorized {reference.accuracy(SvdPass(budget=args.budget).run(original, PassContext(feeds=calibration)).model):.4f}"
    )

    rng = np.random.default_rng(1)
    layers = 1 if args.quick else 2
    generated = generated_transformer(layers)
    seq = 128
    feeds = {
        batch: {"x": rng.standard_normal((batch, seq, 768)).astype(np.float32)} for batch in (1, 8)
    }
    compare(
        f"generated transformer MatMuls ({layers} layers, d=768, FFN 3072, seq {seq})",
        generated,
        feeds,
        args.budget,
        max(10, repeats // 10),
        args.threads,
        feeds[1],
    )


if __name__ == "__main__":
    main()
