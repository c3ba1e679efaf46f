"""``onnxzip demo``: the main job on a built-in default.

Takes the reference CNN (trained on scikit-learn's digits on first use, then cached) through
method 2 as a loop (sparsity training → channel pruning → residual-block removal → codebooks, each
step fine-tuned through onnxruntime-training and gated on the held-back digits), and prints the
trajectory and the before/after table. By default the loop has a short budget (one try per stage,
about a minute and a half on two cores); ``--recipe method2`` runs the full sweeps of the built-in
recipe. Other reference models go through the plain pass recipe below.
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

# Method 2 with a short budget: the built-in method2 recipe (recipes/method2.yaml) with one value
# of each sweep and fewer fine-tuning epochs, so that the demo stays near a minute and a half.
DEMO_SWEEP_VALUES: dict[str, Any] = {"prune": 0.5, "blocks": 1, "cluster": 3}
DEMO_EPOCHS: dict[str, int] = {"sparsity": 2, "prune": 10, "blocks": 3, "cluster": 3}


def demo_loop() -> dict[str, Any]:
    """The demo's loop recipe, made from the built-in method2 recipe (a stage the demo does not
    name keeps its sweep and epochs)."""
    import yaml

    from onnxzip.recipe import RECIPES_DIR

    recipe = yaml.safe_load((RECIPES_DIR / "method2.yaml").read_text())
    for stage in recipe["loop"]["stages"]:
        name = stage["name"]
        if stage.get("sweep") and name in DEMO_SWEEP_VALUES:
            stage["sweep"] = [DEMO_SWEEP_VALUES[name]]
        for step in stage["steps"]:
            options = step.get("finetune")
            if options is not None and name in DEMO_EPOCHS:
                options["epochs"] = DEMO_EPOCHS[name]
    recipe["loop"].pop("time_budget_s", None)
    recipe["metrics"] = list(DEMO_METRICS)
    return recipe


def demo_recipe() -> dict[str, Any]:
    return {"passes": [dict(step) for step in DEMO_PASSES], "gate": dict(DEMO_GATE),
            "metrics": list(DEMO_METRICS)}


def run_demo(name: str, output_dir: Path, *, quiet: bool = False, recipe: str | None = None) -> int:
    """Compress reference model ``name`` into ``output_dir``; returns the exit code. ``recipe``:
    None for the default (method 2 with a short budget on the CNN), or a recipe name/file."""
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
    training = {reference.input_name: reference.train_inputs, "labels": reference.train_labels}
    loop = recipe is not None or name in ("cnn", "cnn-sparse")
    if not loop:
        result = compress(original_path, demo_recipe(), data=held_back, progress=not quiet)
        described = "recipe " + " → ".join(next(iter(step)) for step in DEMO_PASSES)
    else:
        chosen: Any = recipe if recipe is not None else demo_loop()
        metrics = None if recipe is None else list(DEMO_METRICS)
        work_dir = output_dir / f"{name}.work"
        if work_dir.exists():
            shutil.rmtree(work_dir)  # a demo always runs from the start
        result = compress(original_path, chosen, data=training, val=held_back, metrics=metrics,
                          work_dir=work_dir, progress=not quiet)
        shutil.rmtree(work_dir, ignore_errors=True)
        described = (f"loop recipe {recipe}" if recipe is not None else
                     "method 2 as a loop with a short budget (one try per stage; --recipe method2 runs the "
                     "full sweeps)") + ", trained on the training split, every try gated on the held-back digits"
    compressed_path = output_dir / f"{name}.compressed.onnx"
    result.save(compressed_path)
    print(f"{name}: {len(reference.test_labels)} held-back digits, {described}")
    if result.report.trajectory:
        from onnxzip.core.report import trajectory_table

        print(trajectory_table(result.report.trajectory))
    print(result.report.table())
    if not quiet:
        for report in result.report.passes:
            print(f"pass {report.pass_name}: {sum(not c.skipped for c in report.changes)} layers changed ({report.seconds:.1f} s)")
    print(f"\nwrote {original_path} and {compressed_path}")
    return 0
