"""Recipes: which passes run in which order, with which options, and how the result is
checked. The same schema reads a YAML/JSON file, Python objects and the CLI flags::

    passes:
      - svd: {energy: 0.95}
      - cluster: {k: 16}
    gate: {min_cosine: 0.99}   # fidelity to the original, per output
    metrics: [accuracy:max_drop=0.01, {metric: snr, min: 30}]   # quality conditions on `data`
    data: calib.npz          # optional; inputs are generated from the signature otherwise
    dims: {seq: 16}
    input_shapes: {x: [1, 3, 224, 224]}   # whole input shapes, any dim (named or not)
    sample_axes: {state: 1, sr: none}   # which axis of an input's data holds the samples
    device: auto
    seed: 0
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxzip.errors import ConfigError
from onnxzip.core.inputs import parse_sample_axes
import onnxzip.train.reconstruct  # noqa: F401 - registers the reconstruct step beside the passes
import onnxzip.train.step  # noqa: F401 - registers the finetune step beside the passes
from onnxzip.passes import Pass, get_pass
from onnxzip.core.schema import build_config
from onnxzip.evaluators.fidelity import FidelityGate

DEFAULT_PASSES: list[tuple[str, dict[str, Any]]] = [("cleanup", {})]
#: Every key a recipe accepts, with what it means: the one list for the parser, --help and the README.
RECIPE_KEYS: dict[str, str] = {
    "passes": "steps in order: [{pass-name: {option: value}}] (the pass flags' names and options; finetune too)",
    "gate": "fidelity limits per output: min_cosine, max_rel_l2, max_abs, min_argmax_agreement (null: off)",
    "metrics": "quality conditions, as --metric writes them (accuracy:max_drop=0.01, task:scorer.py:fn:max_drop=1)",
    "data": "calibration/evaluation data (as --data; a relative path is relative to the recipe file)",
    "val": "held-out data for a loop's gate and finetune's validation (as --val)",
    "dims": "sizes of symbolic dimensions by name (as --dim)",
    "input_shapes": "whole input shapes by input name (as --input-shape)",
    "sample_axes": "which axis of an input's data holds the samples, none: the same for every sample (as --sample-axis)",
    "device": "auto, cpu or cuda (as --device)",
    "seed": "seed of generated inputs and of every seeded step without its own seed",
    "batch": "batch size of generated inputs (as --batch; default 2)",
    "loop": "compress until the quality limit: time_budget_s and stages (name, steps, sweep, wider, gate)",
}
_TOP_KEYS = set(RECIPE_KEYS)
RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class PassStep:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Pass:
        return get_pass(self.name)(self.options)


@dataclass
class Recipe:
    passes: list[PassStep] = field(default_factory=list)
    gate: FidelityGate = field(default_factory=FidelityGate)
    data: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    sample_axes: dict[str, int | None] = field(default_factory=dict)  # input -> axis holding the samples (None: shared)
    device: str = "auto"
    seed: int = 0
    batch: int = 2
    metrics: list[Any] = field(default_factory=list)
    val: str | None = None
    loop: Any = None  # onnxzip.search.loops.LoopConfig: compress until the quality limit

    def build_passes(self) -> list[Pass]:
        """Instantiate (and so validate) every step."""
        return [step.build() for step in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": [{s.name: s.options} for s in self.passes],
            "gate": dataclasses.asdict(self.gate),
            "data": self.data,
            "dims": self.dims,
            "input_shapes": self.input_shapes,
            "sample_axes": self.sample_axes,
            "device": self.device,
            "seed": self.seed,
            "batch": self.batch,
            "metrics": self.metrics,
            "val": self.val,
            "loop": None if self.loop is None else self.loop.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "the recipe") -> Recipe:
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping with a 'passes' list.")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"{source} has unknown keys {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP_KEYS))}.")
        steps = [parse_step(item, source) for item in data.get("passes") or []]
        gate = build_config(FidelityGate, data.get("gate") or {}, owner=f"{source} gate")
        dims = data.get("dims") or {}
        if not isinstance(dims, dict):
            raise ConfigError(f"{source}: 'dims' must map dimension names to sizes.")
        shapes = data.get("input_shapes") or {}
        if not isinstance(shapes, dict):
            raise ConfigError(f"{source}: 'input_shapes' must map input names to lists of sizes.")
        recipe = cls(
            passes=steps,
            input_shapes={str(k): _sizes(v, f"{source}: input_shapes['{k}']") for k, v in shapes.items()},
            gate=gate,
            sample_axes=parse_sample_axes(_mapping(data.get("sample_axes"), f"{source}: 'sample_axes'")),
            data=data.get("data"),
            dims={str(k): int(v) for k, v in dims.items()},
            device=str(data.get("device", "auto")),
            seed=int(data.get("seed", 0)),
            batch=int(data.get("batch", 2)),
            metrics=list(data.get("metrics") or []),
            val=data.get("val"),
        )
        recipe.build_passes()
        if data.get("loop") is not None:
            from onnxzip.search.loops import LoopConfig

            recipe.loop = LoopConfig.from_dict(data["loop"], source=source)
            recipe.loop.validate_steps()
        if recipe.metrics:
            from onnxzip.evaluators import parse_conditions

            parse_conditions(recipe.metrics)
        return recipe

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Recipe:
        """A YAML/JSON recipe file, or the name of a built-in recipe (``method1``, ``method2``, ``codebooks``)."""
        source = Path(path)
        if not source.is_file() and (RECIPES_DIR / f"{path}.yaml").is_file():
            source = RECIPES_DIR / f"{path}.yaml"
        if not source.is_file():
            names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
            raise ConfigError(f"Recipe file {source} does not exist (built-in recipes: {names}).")
        text = source.read_text()
        try:
            if source.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml and json raise their own error types
            raise ConfigError(f"Recipe file {source} cannot be parsed: {str(exc).splitlines()[0]}") from exc
        recipe = cls.from_dict(data, source=f"recipe {source.name}")
        for key in ("data", "val"):
            value = getattr(recipe, key)
            if value and not Path(value).is_absolute():
                setattr(recipe, key, str(source.parent / value))
        return recipe

    @classmethod
    def default(cls) -> Recipe:
        return cls(passes=[PassStep(name, dict(options)) for name, options in DEFAULT_PASSES])


def _sizes(value: Any, where: str) -> list[int]:
    """A list of positive sizes, from a list or a "d0,d1,..." string."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        sizes = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a list of positive sizes, got {value!r}.") from None
    if not sizes or any(v <= 0 for v in sizes):
        raise ConfigError(f"{where} must be a list of positive sizes, got {value!r}.")
    return sizes


def parse_step(item: Any, source: str) -> PassStep:
    """``{"svd": {...}}``, ``{"name": "svd", ...}`` or ``"cleanup"`` → :class:`PassStep`."""
    if isinstance(item, str):
        return PassStep(get_pass(item).name, {})
    if isinstance(item, dict) and "name" in item:
        options = {k: v for k, v in item.items() if k != "name"}
        return PassStep(get_pass(str(item["name"])).name, options)
    if isinstance(item, dict) and len(item) == 1:
        (name, options), = item.items()
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{source}: options of pass '{name}' must be a mapping.")
        return PassStep(get_pass(str(name)).name, dict(options or {}))
    raise ConfigError(f"{source}: each pass must be a name or a mapping like {{svd: {{energy: 0.95}}}}.")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """A recipe entry that must be a mapping (empty when absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}.")
    return value
