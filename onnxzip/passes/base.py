"""The contract every pass follows.

A pass is configured by a typed dataclass, **plans** first (per-layer decisions as plain data
that can be printed, saved as JSON, edited and replayed) and **applies** second::

    result = SomePass(rank=32).run(model, context)      # plan + apply
    result = SomePass().run(model, context, plan=plan)  # replay a saved/edited plan
    result.model, result.report, result.plan

``run`` checks preconditions (a supported opset) and postconditions (the output is valid ONNX,
loadable by onnxruntime 1.19), and fills the report's model totals (parameters, FLOPs, bytes).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx

from onnxzip.core.inputs import Samples
from onnxzip.core.compat import check_opsets, make_compatible
from onnxzip.measure.cost import ModelCost, model_cost, observed_shapes
from onnxzip.errors import ConfigError, OnnxzipError
from onnxzip.core.graph import dedupe_initializers
from onnxzip.core.io import write_json
from onnxzip.core.report import PassReport
from onnxzip.core.schema import build_config

PLAN_FORMAT = 1
T = TypeVar("T")


def is_onnxruntime_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by onnxruntime itself (a model it refuses or cannot run)."""
    return type(exc).__module__.startswith("onnxruntime")


class PassError(OnnxzipError):
    """A pass produced an invalid model (a bug in onnxzip; the input is untouched)."""

    exit_code = 3


@dataclass
class Plan:
    """Per-layer decisions of one pass: ``layers`` maps a layer (node or weight) name to its
    decision, e.g. ``{"fc1": {"rank": 32}}``. Plain data: JSON in, JSON out."""

    pass_name: str
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What planning measured on the way (notes, timings) for apply's report; not saved, so a
    # replayed plan has none.
    found: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "config": self.config, "layers": self.layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or "pass" not in data:
            raise ConfigError("A plan step must be a mapping with a 'pass' key.")
        layers = data.get("layers", {})
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise ConfigError(f"Plan step '{data['pass']}': 'layers' must map layer names to mappings.")
        return cls(str(data["pass"]), dict(data.get("config", {})), {str(k): dict(v) for k, v in layers.items()})


@dataclass
class PipelinePlan:
    """The plans of every step of a pipeline, in order; saved with ``--save-plan``, replayed
    with ``--plan``."""

    steps: list[Plan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"onnxzip_plan": PLAN_FORMAT, "steps": [s.to_dict() for s in self.steps]}

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PipelinePlan:
        source = Path(path)
        if not source.is_file():
            raise ConfigError(f"Plan file {source} does not exist.")
        try:
            data = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Plan file {source} is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict) or data.get("onnxzip_plan") != PLAN_FORMAT:
            raise ConfigError(f"{source} is not an onnxzip plan (format {PLAN_FORMAT}).")
        return cls([Plan.from_dict(step) for step in data.get("steps", [])])



@dataclass
class PassContext:
    """What passes may need besides the model: sample inputs for measurements, the device,
    a seed, progress-bar switch, symbolic dimension sizes, the original model and data (for
    training steps), and ``accept``: whether a candidate model meets the run's metric conditions
    (set by ``compress`` when metrics are given; passes that search for the smallest acceptable
    model call it). Shapes (one onnxruntime run at
    batch 1) and costs are cached per model object, so passes never probe the same model twice."""

    feeds: dict[str, np.ndarray] | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = False
    dims: dict[str, int] = field(default_factory=dict)
    original: onnx.ModelProto | None = None  # the pipeline's input model (a training step's teacher)
    data: Any = None  # the pipeline's data (.npz path or arrays), for training steps
    val: Any = None  # the pipeline's held-out data (a training step's validation set)
    accept: Callable[[onnx.ModelProto], bool] | None = None
    metrics: list[Any] = field(default_factory=list)  # the run's --metric conditions (a finetune step's epoch choice)
    sample_axes: dict[str, int | None] = field(default_factory=dict)  # --sample-axis: settles the data layout
    generated: bool = False  # feeds were generated from the signature (no --data): no calibration data
    timing: Any = None  # an onnxzip.measure.latency.Timing for latency_budget (None: onnxruntime, one thread)
    _cache: dict[tuple[str, int], tuple[onnx.ModelProto, Any]] = field(default_factory=dict, repr=False)

    def _memo(self, kind: str, model: onnx.ModelProto, compute: Any) -> Any:
        key = (kind, id(model))
        cached = self._cache.get(key)
        if cached is None or cached[0] is not model:  # ids are reused after garbage collection
            cached = self._cache[key] = (model, compute(model))
        return cached[1]

    def shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
        """Every main-graph tensor's shape, observed at batch 1 on the context's inputs."""
        return self._memo("shapes", model, lambda m: observed_shapes(m, self._batch_one_feeds()))

    def cost(self, model: onnx.ModelProto) -> ModelCost:
        return self._memo("cost", model, lambda m: model_cost(m, self.shapes(m)))

    def latency(self, model: onnx.ModelProto) -> float | None:
        """Median onnxruntime latency (ms) at batch 1 on the context's inputs, or None without inputs."""
        from onnxzip.core.runtime import measure_latency

        feeds = self._batch_one_feeds()
        return None if feeds is None else self._memo("latency", model, lambda m: measure_latency(m, feeds, self.device))

    def run_error(self, model: onnx.ModelProto) -> str | None:
        """None when ``model`` runs once in onnxruntime at batch 1 on the context's inputs (or
        there are none), else onnxruntime's reason in one line."""
        from onnxzip.core.runtime import make_session, onnxruntime_reason, run_session

        def attempt(m: onnx.ModelProto) -> str | None:
            feeds = self._batch_one_feeds()
            if feeds is None:
                return None
            try:
                run_session(make_session(m, "cpu"), feeds)
            except Exception as exc:  # noqa: BLE001 - only onnxruntime's own errors are an answer
                if not is_onnxruntime_error(exc):
                    raise
                return onnxruntime_reason(exc)
            return None

        return self._memo("run_error", model, attempt)

    def timer(self) -> Any:
        """The :class:`onnxzip.measure.latency.Timing` that latency budgets measure with (made once,
        on the context's batch-1 inputs, when none was given)."""
        if self.timing is None:
            from onnxzip.measure.latency import Timing

            self.timing = Timing(feeds=self._batch_one_feeds())
        return self.timing

    def track(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        """``items`` with a progress bar (per layer) when progress is on."""
        if not self.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, unit="layer", leave=False)

    def _batch_one_feeds(self) -> dict[str, np.ndarray] | None:
        if not self.feeds:
            return None
        if isinstance(self.feeds, Samples):
            return dict(self.feeds.take(slice(0, 1)))
        return {k: v[:1] if np.ndim(v) else v for k, v in self.feeds.items()}


@dataclass
class PassResult:
    model: onnx.ModelProto
    report: PassReport
    plan: Plan


class Pass:
    """Base class. Subclasses set ``name``, ``config_class``, ``summary`` and implement
    :meth:`apply` (and :meth:`plan` when they make per-layer decisions)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    summary: ClassVar[str] = ""
    shorthand: ClassVar[str | None] = None  # the option a bare flag value sets (--cluster auto)
    # Plans from the weights alone (no onnxruntime run, no sample inputs needed).
    weight_only: ClassVar[bool] = False
    # The pass exists to make files smaller: an output that is not is discarded (see run).
    reduces_bytes: ClassVar[bool] = True

    def __init__(self, config: Any = None, **options: Any) -> None:
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            values = {**dataclasses.asdict(config), **options}
        elif config is None or isinstance(config, dict):
            values = {**(config or {}), **options}
        else:
            raise ConfigError(f"Pass '{self.name}' takes a {self.config_class.__name__} or a mapping.")
        self.config = build_config(self.config_class, values, owner=f"pass '{self.name}'")

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def needs_data(self) -> str | None:
        """What this pass, as configured, cannot do on inputs generated from the signature (one
        phrase naming it), or None. A run without ``--data`` stops on it before any work."""
        return None

    def per_model(self, kind: str, model: onnx.ModelProto, compute: Callable[[], T]) -> T:
        """``compute()`` once per model object and ``kind`` for this pass (its plan and apply read
        the same calibration statistics; the last model's value is kept)."""
        memo: dict[str, tuple[onnx.ModelProto, Any]] = self.__dict__.setdefault("_per_model", {})
        cached = memo.get(kind)
        if cached is None or cached[0] is not model:
            cached = memo[kind] = (model, compute())
        return cached[1]

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        """Decide per layer. The default plan has no per-layer decisions."""
        return Plan(self.name, self.config_dict())

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        raise NotImplementedError

    def applies_to(self, weight: Any) -> bool:
        """Whether this pass could rewrite ``weight`` (a :class:`onnxzip.core.weights.Weight`); used
        by ``onnxzip inspect``."""
        return False

    def run(
        self, model: onnx.ModelProto, context: PassContext | None = None, plan: Plan | None = None
    ) -> PassResult:
        context = context or PassContext()
        check_opsets(model)
        start = time.perf_counter()
        if plan is None:
            plan = self.plan(model, context)
        elif plan.pass_name != self.name:
            raise ConfigError(f"A plan for pass '{plan.pass_name}' cannot be replayed by pass '{self.name}'.")
        result = self.apply(model, plan, context)
        report = result.report
        if result.model is not model:  # rewrites repeated per If branch: identical weights stored once
            report.notes.extend(dedupe_initializers(result.model))
        self._check_output(result.model)
        forced = bool(getattr(self.config, "allow_unprofitable", False))  # opted in to growth
        if self.reduces_bytes and not forced and report.modified and result.model.ByteSize() >= model.ByteSize():
            reason = (f"the rewritten model ({result.model.ByteSize()} B) would not be smaller than "
                      f"its input ({model.ByteSize()} B); rewrite skipped")
            for change in report.changes:
                if not change.skipped:
                    change.decision, change.reason = "skipped", reason
            report.notes.append(reason)
            report.modified = False
            result = PassResult(model, report, result.plan)
        before, after = context.cost(model), context.cost(result.model)
        report.params_before, report.params_after = before.params, after.params
        report.flops_before, report.flops_after = before.flops, after.flops
        report.bytes_before, report.bytes_after = model.ByteSize(), result.model.ByteSize()
        report.seconds = time.perf_counter() - start
        return result

    def _check_output(self, model: onnx.ModelProto) -> None:
        try:
            make_compatible(model)
            if model.ByteSize() < 2**31 - 1:
                onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, OnnxzipError) as exc:
            raise PassError(f"Pass '{self.name}' produced an invalid model: {str(exc).splitlines()[0]}") from exc

    def new_report(self) -> PassReport:
        return PassReport(self.name, self.config_dict())


def matches(name: str, op_type: str, include: list[str], exclude: list[str]) -> bool:
    """Layer selection by name glob or op type: included (empty include = all) and not excluded."""
    def hit(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or p == op_type for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry (recipes, CLI flags and the API read it)."""
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    key = name.replace("_", "-")
    if key not in PASSES:
        raise ConfigError(f"Unknown pass '{name}'; available passes: {', '.join(sorted(PASSES))}.")
    return PASSES[key]
