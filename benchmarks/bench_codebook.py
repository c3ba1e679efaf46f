"""onnxzip codebooks against onnxruntime's own quantizers, on every reference model with its data.

For each reference model (CNN, transformer: test accuracy; speech enhancer: STOI + PESQ;
denoiser: PSNR) one run measures side by side:

* ``onnxzip --cluster bits=search`` (activation-aware, per-layer widths by measured
  sensitivity, the smallest mean width meeting the task tolerance) and ``--cluster avg_bits=B``;
* ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, QInt8);
* ``onnxruntime.quantization.matmul_4bits_quantizer.MatMul4BitsQuantizer`` (4-bit MatMulNBits,
  block 32) — reported as not applicable where it does not import or the model has no MatMul;

file size (bytes on disk, ratio to the original), the task metric(s), and onnxruntime latency
(median of 20 runs on the fidelity batch, session built once). Targets of issue 13: ≥ 6× smaller
within tolerance (accuracy drop ≤ 0.5 pt, STOI ≤ 0.02, PESQ ≤ 0.2, PSNR ≤ 0.5 dB) and ≥ 1.5× the
file ratio of ORT int8 at equal or better quality.

Usage: ``python benchmarks/bench_codebook.py [--models cnn,transformer,speech,denoise]
[--avg-bits 3]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxzip
from onnxzip.evaluators import evaluate, load_dataset
from onnxzip.evaluators.quality import fidelity_feeds
from onnxzip.core.runtime import make_session

TOLERANCES = {"accuracy": 0.005, "stoi": 0.02, "pesq": 0.2, "psnr": 0.5}


def reference(name: str) -> tuple[Path, Any, list[str]]:
    """(model path, dataset source, metric conditions) of a reference model."""
    if name in ("cnn", "transformer"):
        from onnxzip.models.zoo import get_reference_model

        ref = get_reference_model(name)
        data = {ref.input_name: ref.test_inputs, "labels": ref.test_labels}
        return Path(ref.onnx_path), data, ["accuracy"]
    if name == "speech":
        from onnxzip.models.speech import build_speech_reference

        path, dataset = build_speech_reference()
        return path, dataset, ["stoi", "pesq"]
    if name == "denoise":
        from onnxzip.models.denoise import build_denoise_reference

        path, dataset = build_denoise_reference()
        return path, dataset, ["psnr"]
    raise SystemExit(f"unknown model {name}")


def latency_ms(path: Path, feeds: dict[str, np.ndarray]) -> float:
    session = make_session(str(path), "cpu")
    names = [o.name for o in session.get_outputs()]
    session.run(names, feeds)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def ort_int8(source: Path, target: Path) -> str | None:
    """QInt8 weights; where onnxruntime's CPU kernels refuse them (ConvInteger takes uint8
    only), QUInt8 — the setting a user would fall back to."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    try:
        make_session(str(target), "cpu")
    except Exception:  # noqa: BLE001 - onnxruntime's NOT_IMPLEMENTED
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
        return "QUInt8 (QInt8 ConvInteger has no CPU kernel)"
    return None


def ort_4bit(source: Path, target: Path) -> str | None:
    model = onnx.load(str(source))
    if not any(n.op_type == "MatMul" for n in model.graph.node):
        return "no MatMul nodes (MatMulNBits quantizes MatMul only)"
    try:
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer
    except ImportError as exc:
        return f"not in this onnxruntime build ({str(exc).splitlines()[0][:70]})"
    quantizer = MatMul4BitsQuantizer(model, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,transformer,speech,denoise")
    parser.add_argument("--avg-bits", type=float, default=3.0)
    args = parser.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_codebook_"))
    for name in args.models.split(","):
        path, data, metrics = reference(name)
        dataset = load_dataset(data)
        original = onnx.load(str(path))
        feeds = fidelity_feeds(original, data, batch=8, dims={}, seed=0)
        conditions = [f"{m}:max_drop={TOLERANCES[m]}" for m in metrics]
        base = evaluate(str(path), dataset, metrics, progress=False)
        size0 = os.path.getsize(path)
        entries: list[tuple[str, Path | None, str | None, float]] = []
        for label, options in (("onnxzip bits=search", {"bits": "search"}),
                               (f"onnxzip avg_bits={args.avg_bits:g}", {"avg_bits": args.avg_bits})):
            start = time.perf_counter()
            result = onnxzip.compress(str(path), cluster=options, data=data, metrics=conditions,
                                      gate={"min_cosine": 0.0}, allow_gate_failure=True)
            target = work / f"{name}-{options.popitem()[0]}.onnx"
            result.save(target)
            entries.append((label, target, None, time.perf_counter() - start))
        for label, quantize in (("ORT quantize_dynamic int8", ort_int8),
                                ("ORT MatMulNBits 4-bit", ort_4bit)):
            target = work / f"{name}-{label.split()[1]}.onnx"
            start = time.perf_counter()
            try:
                reason = quantize(path, target)
            except Exception as exc:  # noqa: BLE001 - report the peer's failure, keep going
                reason = f"failed: {str(exc).splitlines()[0][:80]}"
            usable = target.exists() and (reason is None or reason.startswith("QUInt8"))
            entries.append((label, target if usable else None, reason, time.perf_counter() - start))
        t0 = latency_ms(path, feeds)
        rows.append((name, "original", size0, 1.0, {m: base[m].value for m in metrics}, t0, 0.0, ""))
        for label, target, reason, seconds in entries:
            prefix = f"{reason}; " if target is not None and reason else ""
            if target is None:
                rows.append((name, label, None, None, {}, None, seconds, reason))
                continue
            try:
                scores = evaluate(str(target), dataset, metrics, progress=False)
                values = {m: scores[m].value for m in metrics}
                ms = latency_ms(target, feeds)
            except Exception as exc:  # noqa: BLE001
                rows.append((name, label, os.path.getsize(target), None, {}, None, seconds,
                             f"does not run: {str(exc).splitlines()[0][:80]}"))
                continue
            size = os.path.getsize(target)
            ok = all(base[m].value - values[m] <= TOLERANCES[m] + 1e-12 for m in metrics)
            rows.append((name, label, size, size0 / size, values, ms, seconds,
                         prefix + ("within tolerance" if ok else "OUT of tolerance")))
        print_rows(rows)
    print_summary(rows)


def print_rows(rows: list[tuple]) -> None:
    print(f"\n{'model':<12}{'method':<28}{'bytes':>10}{'ratio':>8}  {'metrics':<34}"
          f"{'ORT ms':>8}{'time s':>8}  note")
    for name, label, size, ratio, values, ms, seconds, note in rows:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(f"{name:<12}{label:<28}{size if size else '-':>10}"
              f"{f'{ratio:.2f}x' if ratio else '-':>8}  {metrics:<34}"
              f"{f'{ms:.2f}' if ms is not None else '-':>8}{seconds:>8.1f}  {note}")


def print_summary(rows: list[tuple]) -> None:
    print("\nonnxzip bits=search vs ORT int8 (file ratio, both within tolerance?):")
    for name in dict.fromkeys(r[0] for r in rows):
        mine = next(r for r in rows if r[0] == name and r[1] == "onnxzip bits=search")
        int8 = next(r for r in rows if r[0] == name and r[1].startswith("ORT quantize_dynamic"))
        if mine[3] and int8[3]:
            print(f"  {name:<12} onnxzip {mine[3]:.2f}x ({mine[7]}), int8 {int8[3]:.2f}x "
                  f"({int8[7]}): {mine[3] / int8[3]:.2f}x the int8 ratio")
        else:
            print(f"  {name:<12} onnxzip {mine[3]}, int8 {int8[3]} ({int8[7]})")


if __name__ == "__main__":
    main()
