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

# Passes of the demo, in order. Each pass that lands extends this list. The reference CNN was
# not sparsity-trained, so only a few channels can go without fine-tuning.
DEMO_PASSES: list[dict[str, Any]] = [
    {"prune-channels": {"ratio": 0.05}},
    {"svd": {"budget": 0.5}},
    {"cluster": {"bits": 4}},
]
# Fidelity to the original outputs, and test accuracy measured on both models in one run.
DEMO_GATE = {"min_cosine": 0.95}
DEMO_METRICS = ["accuracy:max_drop=0.02"]


def demo_recipe() -> dict[str, Any]:
    return {"passes": [dict(step) for step in DEMO_PASSES], "gate": dict(DEMO_GATE),
            "metrics": list(DEMO_METRICS)}


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
    held_back = {reference.input_name: reference.test_inputs, "labels": reference.test_labels}
    result = compress(original_path, demo_recipe(), data=held_back, progress=not quiet)
    compressed_path = output_dir / f"{name}.compressed.onnx"
    result.save(compressed_path)
    print(f"{name}: {len(reference.test_labels)} held-back digits, recipe "
          + " → ".join(next(iter(step)) for step in DEMO_PASSES))
    print(result.report.table())
    if not quiet:
        for report in result.report.passes:
            print(f"pass {report.pass_name}: {sum(not c.skipped for c in report.changes)} layers changed ({report.seconds:.1f} s)")
    print(f"\nwrote {original_path} and {compressed_path}")
    return 0
