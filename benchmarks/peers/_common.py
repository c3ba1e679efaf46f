"""What the peer scripts share: calibration rows a model accepts, opset conversion, a load check.

Runs in the project venv and in the peer venv (numpy, onnx and onnxruntime only; no onnxzip).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear (per-channel int8) exists from opset 13


def calib_rows(npz_path: str | Path, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of one sample each (``x[i:i+1]`` per input): the corpus stacks samples on axis 0, and
    a row of batch 1 is what every corpus file accepts, fixed-batch ones included."""
    with np.load(npz_path) as data:
        arrays = {name: data[name] for name in data.files}
    count = min(len(array) for array in arrays.values())
    for index in range(count if limit is None else min(count, limit)):
        yield {name: array[index:index + 1] for name, array in arrays.items()}


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def at_least_opset(model: onnx.ModelProto, opset: int = MIN_QDQ_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """The model converted to ``opset`` when it declares less (per-channel Q/DQ needs opset 13),
    with a note saying so; the model unchanged otherwise."""
    current = default_opset(model)
    if current >= opset:
        return model, None
    return onnx.version_converter.convert_version(model, opset), f"converted opset {current} -> {opset}"


def check_loads(path: str | Path, feeds: dict[str, np.ndarray]) -> None:
    """Raise when onnxruntime cannot load ``path`` or run it on ``feeds``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def report(variant: str, notes: list[str]) -> None:
    """The script's result on stdout, one JSON line the benchmark reads."""
    print(json.dumps({"variant": variant, "notes": notes}))
    sys.stdout.flush()


def try_variants(variants: list[tuple[str, object]], output: Path, feeds: dict[str, np.ndarray]) -> int:
    """Run ``(name, build)`` variants in order until one writes a file onnxruntime loads and runs.

    ``build(output)`` writes the file. Each variant that fails adds a note; when none works, the
    notes of all are the script's reason (one stderr line, exit 1)."""
    notes: list[str] = []
    for name, build in variants:
        try:
            extra = build(output)  # type: ignore[operator]
            check_loads(output, feeds)
        except Exception as exc:  # noqa: BLE001 - any failure of a peer tool is its result
            notes.append(f"{name}: {one_line(exc)}")
            output.unlink(missing_ok=True)
            continue
        report(name, notes + list(extra or []))
        return 0
    print(" | ".join(notes) or "no variant", file=sys.stderr)
    return 1
