"""``onnxzip demo``: the main job on a built-in default.

Takes the reference CNN (trained on scikit-learn's digits on first use, then cached), runs the
default demo recipe, validates the result in onnxruntime and prints the before/after table with
test accuracy on the held-back digits split.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from onnxzip.errors import ConfigError

# Passes of the demo, in order. Each pass that lands extends this list.
DEMO_PASSES: list[dict[str, Any]] = [{"cleanup": {}}]
CALIBRATION_ROWS = 64


def demo_recipe() -> dict[str, Any]:
    return {"passes": [dict(step) for step in DEMO_PASSES], "gate": {"min_cosine": 0.95}}


def run_demo(name: str, output_dir: Path, *, quiet: bool = False) -> int:
    """Compress reference model ``name`` into ``output_dir``; returns the exit code."""
    from onnxzip.api import compress
    from onnxzip.models.zoo import REFERENCE_MODELS, get_reference_model

    if name not in REFERENCE_MODELS:
        raise ConfigError(f"Unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}.")
    if not quiet:
        print(f"preparing reference model '{name}' (trained once, then cached)...")
    reference = get_reference_model(name, quiet=quiet)
    output_dir.mkdir(parents=True, exist_ok=True)
    original_path = output_dir / f"{name}.onnx"
    shutil.copyfile(reference.onnx_path, original_path)
    calibration = {reference.input_name: reference.test_inputs[:CALIBRATION_ROWS]}
    result = compress(original_path, demo_recipe(), data=calibration, progress=not quiet)
    compressed_path = output_dir / f"{name}.compressed.onnx"
    result.save(compressed_path)
    result.report.after.bytes = compressed_path.stat().st_size
    if reference.task == "classification":
        before = reference.accuracy(original_path)
        after = reference.accuracy(compressed_path)
        result.report.metrics["test accuracy"] = [f"{before:.2%}", f"{after:.2%}", f"{(after - before) * 100:+.2f} pt"]
    print(result.report.table())
    if not quiet:
        for report in result.report.passes:
            print(f"pass {report.pass_name}: {sum(not c.skipped for c in report.changes)} layers changed ({report.seconds:.1f} s)")
    print(f"\nwrote {original_path} and {compressed_path}")
    return 0
