"""Compress until the quality limit: staged loops with a gate, roll-back, checkpoints and resume.

A loop is a list of **stages**. A stage runs its pipeline steps (passes and training steps) on
the last accepted model and is judged by the gate, always against the *original* model:

* a plain stage is accepted when the gate passes and rolled back when it fails;
* an **ungated** stage (``gate: false``) is an intermediate step such as method 2's sparsity
  training, which costs quality that the next stage's fine-tuning recovers: it is measured and
  always continued from (decision ``ungated`` when it fails the gate), but only a model that
  passed the gate can be the loop's output;
* a **sweep** stage repeats its steps for each value of ``sweep`` (``$value`` in a step's
  options is replaced by it), from most to least conservative, each try starting from the model
  the stage started with. Tries are accepted while the gate passes; the first failure ends the
  sweep, and the stage keeps the last (most compressed) passing try. When the very first value
  fails, the stage's ``wider`` values (if any: less compressed ones, e.g. ``[5, 6]`` bits) are
  tried in order and the first that passes is kept, so a file more sensitive than the sweep
  assumed still gets the compression it can take instead of none. This is method 1's "lower
  the ranks while the performance-decline condition holds" and method 2's "prune, fine-tune,
  iterate to the target".

Every finished try is checkpointed in ``work_dir`` (its model, then ``state.json``, each written
atomically), so rerunning the same command continues after the last finished try and an
interruption leaves the folder consistent. The trajectory records each try's size on disk,
parameters, FLOPs, onnxruntime latency, metrics and decision.

``time_budget_s`` is split evenly over the stages (what a stage leaves unspent goes to the later
ones) and bounds only a sweep's later tries: each stage's first try always runs, so a busy
machine shortens sweeps but never drops a stage (a skipped try is in the trajectory, with why).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxzip.errors import ConfigError
from onnxzip.core.io import load_model, save_model, write_json
from onnxzip.passes import PassContext, get_pass
from onnxzip.passes.base import PipelinePlan, Plan
from onnxzip.core.report import LAYER_DECISION_KEYS, PassReport

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_STAGE_KEYS = {"name", "steps", "sweep", "gate", "wider"}
# Decisions a later stage continues from.
CONTINUED = ("accepted", "ungated")


@dataclass
class Stage:
    """One stage: its steps (``[{pass_name: options}]``) and optional sweep values."""

    name: str
    steps: list[dict[str, dict[str, Any]]]
    sweep: list[Any] | None = None
    gate: bool = True
    wider: list[Any] | None = None  # tried in order only when the sweep's first value fails

    def steps_for(self, value: Any) -> list[tuple[str, dict[str, Any]]]:
        """The steps with ``$value`` replaced by ``value`` (in any option, nested lists too)."""

        def substitute(option: Any) -> Any:
            if option == "$value":
                return value
            if isinstance(option, list):
                return [substitute(o) for o in option]
            if isinstance(option, dict):
                return {k: substitute(v) for k, v in option.items()}
            return option

        return [(name, substitute(options)) for step in self.steps for name, options in step.items()]


@dataclass
class LoopConfig:
    """The ``loop`` section of a recipe."""

    stages: list[Stage] = field(default_factory=list)
    time_budget_s: float | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str = "the recipe") -> LoopConfig:
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise ConfigError(f"{source}: 'loop' must be a mapping with a non-empty 'stages' list.")
        unknown = set(data) - {"stages", "time_budget_s"}
        if unknown:
            raise ConfigError(f"{source}: 'loop' has unknown keys {', '.join(sorted(unknown))}; allowed: stages, time_budget_s.")
        stages = []
        for index, item in enumerate(data["stages"]):
            where = f"{source}: loop stage {index + 1}"
            if not isinstance(item, dict) or not isinstance(item.get("steps"), list) or not item["steps"]:
                raise ConfigError(f"{where} must be a mapping with a non-empty 'steps' list.")
            extra = set(item) - _STAGE_KEYS
            if extra:
                raise ConfigError(f"{where} has unknown keys {', '.join(sorted(extra))}; allowed: name, steps, sweep, wider, gate.")
            steps = []
            for step in item["steps"]:
                if isinstance(step, str):
                    step = {step: {}}
                if not isinstance(step, dict) or len(step) != 1:
                    raise ConfigError(f"{where}: each step must be a name or a mapping like {{svd: {{budget: 0.5}}}}.")
                (name, options), = step.items()
                if options is not None and not isinstance(options, dict):
                    raise ConfigError(f"{where}: options of step '{name}' must be a mapping.")
                steps.append({get_pass(str(name)).name: dict(options or {})})
            sweep = item.get("sweep")
            if sweep is not None and (not isinstance(sweep, list) or not sweep):
                raise ConfigError(f"{where}: 'sweep' must be a non-empty list of values.")
            uses_value = "$value" in json.dumps(steps)
            if sweep is not None and not uses_value:
                raise ConfigError(f"{where}: a sweep needs '$value' in one of its step options.")
            if sweep is None and uses_value:
                raise ConfigError(f"{where}: '$value' is used but the stage has no 'sweep'.")
            gated = item.get("gate", True)
            if not isinstance(gated, bool):
                raise ConfigError(f"{where}: 'gate' must be true or false.")
            if not gated and sweep is not None:
                raise ConfigError(f"{where}: a sweep stage is judged by the gate; 'gate: false' is for plain stages.")
            wider = item.get("wider")
            if wider is not None and (sweep is None or not isinstance(wider, list) or not wider):
                raise ConfigError(f"{where}: 'wider' is a non-empty list of values for a stage with a 'sweep'.")
            stages.append(Stage(str(item.get("name") or f"stage{index + 1}"), steps, sweep, gated, wider))
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: loop stage names must be unique.")
        budget = data.get("time_budget_s")
        return cls(stages, None if budget is None else float(budget))

    def validate_steps(self) -> None:
        """Instantiate every step with its first sweep value, so bad options fail before any work."""
        for stage in self.stages:
            for value in (stage.sweep or [None])[:1] + (stage.sweep or [])[-1:] + (stage.wider or [])[-1:]:
                for name, options in stage.steps_for(value):
                    get_pass(name)(options)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "time_budget_s": self.time_budget_s}


@dataclass
class Measurement:
    """What the gate and the trajectory need to know about one model."""

    bytes: int
    params: int
    flops: int
    latency_ms: float | None
    passed: bool
    metrics: dict[str, float]
    failures: list[str]


@dataclass
class TrajectoryPoint:
    stage: str
    iteration: int
    value: Any
    decision: str  # original | accepted | ungated | rejected | rolled back | skipped
    bytes: int
    params: int
    flops: int
    latency_ms: float | None
    metrics: dict[str, float]
    failures: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0
    layers: dict[str, Any] = field(default_factory=dict)
    gamma: list[float] | None = None
    sparsity: bool = False

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.iteration}"


@dataclass
class LoopResult:
    model: onnx.ModelProto
    trajectory: list[TrajectoryPoint]
    reports: list[PassReport]
    resumed: int = 0
    plans: list[Plan] = field(default_factory=list)  # the steps that made ``model``, from the original: --save-plan

    def to_dict(self) -> dict[str, Any]:
        return {"trajectory": [asdict(p) for p in self.trajectory], "resumed": self.resumed}


def norm_scales(model: onnx.ModelProto) -> list[float]:
    """|γ| of every BatchNormalization / LayerNormalization / InstanceNormalization in the main
    graph (4 significant digits): what sparsity training drives to zero, for the γ histograms."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    values: list[float] = []
    for node in model.graph.node:
        if node.op_type in ("BatchNormalization", "LayerNormalization", "InstanceNormalization") and len(node.input) > 1:
            tensor = inits.get(node.input[1])
            if tensor is not None:
                values += [float(f"{abs(v):.4g}") for v in numpy_helper.to_array(tensor).ravel()]
    return values


def _trains_sparsity(steps: list[tuple[str, dict[str, Any]]]) -> bool:
    return any(float(options.get("sparsity") or 0) > 0 for _, options in steps)


def fingerprint(model: onnx.ModelProto, loop: LoopConfig, extra: dict[str, Any]) -> str:
    """Identifies a run: the input model's bytes, the loop and what else the caller names (data,
    gate, metrics). A work folder only resumes the run that made it."""
    digest = hashlib.sha256(model.SerializeToString(deterministic=True))
    digest.update(json.dumps({"loop": loop.to_dict(), **extra}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def _layer_decisions(reports: list[PassReport]) -> dict[str, Any]:
    """Per-layer decisions of a try for the plots: svd ranks, pruning ratios, codebook bits."""
    decisions: dict[str, Any] = {}
    for report in reports:
        for change in report.changes:
            if change.skipped:
                continue
            details = change.details or {}
            for key in LAYER_DECISION_KEYS:
                if key in details and isinstance(details[key], (int, float)):
                    decisions.setdefault(report.pass_name, {}).setdefault(key, {})[change.layer] = details[key]
    return decisions


class CompressionLoop:
    """Runs a :class:`LoopConfig` on ``original`` with checkpoints in ``work_dir``.

    ``measure(model)`` returns a :class:`Measurement` (the gate against the original) and
    ``make_context()`` a fresh :class:`PassContext` for the steps; the loop itself knows nothing
    of how quality is measured.
    """

    def __init__(
        self,
        loop: LoopConfig,
        *,
        work_dir: str | os.PathLike[str],
        measure: Callable[[onnx.ModelProto], Measurement],
        make_context: Callable[[], PassContext],
        run_id: str,
        progress: bool = False,
    ) -> None:
        self.loop = loop
        self.work_dir = Path(work_dir)
        self.measure = measure
        self.make_context = make_context
        self.run_id = run_id
        self.progress = progress

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.work_dir / "state.json"

    def _load_state(self) -> dict[str, TrajectoryPoint]:
        if not self.state_path.exists():
            return {}
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"The work folder's {self.state_path.name} cannot be read ({exc}); remove {self.work_dir} to start again.") from exc
        if state.get("format") != STATE_FORMAT or state.get("run_id") != self.run_id:
            raise ConfigError(
                f"The work folder {self.work_dir} holds a run of a different model, recipe or data; "
                "use another --work-dir or remove it to start again."
            )
        points = {}
        for raw in state.get("trajectory", []):
            point = TrajectoryPoint(**raw)
            if point.checkpoint and not (self.work_dir / point.checkpoint).is_file():
                break  # a checkpoint that was never finished: redo from here
            points[point.key] = point
        return points

    def _save_state(self, trajectory: list[TrajectoryPoint], done: bool) -> None:
        write_json(self.state_path, {
            "format": STATE_FORMAT, "run_id": self.run_id, "done": done,
            "trajectory": [asdict(p) for p in trajectory],
        })

    def _checkpoint(self, model: onnx.ModelProto, stage: str, iteration: int, index: int) -> str:
        relative = f"steps/{index:03d}-{stage}-{iteration}.onnx"
        save_model(model, self.work_dir / relative)
        return relative

    # -- the loop ----------------------------------------------------------------------------
    def _run_steps(self, model: onnx.ModelProto, steps: list[tuple[str, dict[str, Any]]]
                   ) -> tuple[onnx.ModelProto, list[PassReport], list[Plan]]:
        context = self.make_context()
        reports, plans = [], []
        for name, options in steps:
            log.info("loop step %s %s", name, options)
            result = get_pass(name)(options).run(model, context)
            model = result.model
            reports.append(result.report)
            plans.append(result.plan)
        return model, reports, plans

    def _plans_path(self, checkpoint: str) -> Path:
        return self.work_dir / f"{checkpoint}.plan.json"

    def run(self, original: onnx.ModelProto) -> LoopResult:
        from tqdm.auto import tqdm

        self.work_dir.mkdir(parents=True, exist_ok=True)
        done = self._load_state()
        resumed = sum(1 for key in done if not key.startswith("original:"))
        if resumed:
            log.warning("resuming from %s: %d finished tries are reused", self.work_dir, resumed)
        trajectory: list[TrajectoryPoint] = []
        reports: list[PassReport] = []
        plans: list[Plan] = []  # kept alike with ``reports``: the steps that made the current model

        if "original:0" in done:
            trajectory.append(done["original:0"])
        else:
            m = self.measure(original)
            trajectory.append(TrajectoryPoint("original", 0, None, "original", m.bytes, m.params, m.flops,
                                              m.latency_ms, m.metrics, m.failures, gamma=norm_scales(original)))
            self._save_state(trajectory, done=False)
        current, current_path = original, None
        passing_path: str | None = None  # the last continued-from try that passed the gate
        passing_reports = passing_plans = 0  # how many of ``reports`` / ``plans`` made that try's model
        total = sum(len(stage.sweep or [None]) for stage in self.loop.stages)
        spent = 0.0  # seconds the stages before this one took
        bar = tqdm(total=total, desc="loop", unit="try", disable=not self.progress)
        for number, stage in enumerate(self.loop.stages):
            base = current
            stage_began = time.perf_counter()
            # Each stage gets an even share of what the earlier stages left of the budget, and its
            # first try always runs: a busy machine shortens sweeps, it never drops a stage.
            share = (None if self.loop.time_budget_s is None
                     else max(self.loop.time_budget_s - spent, 0.0) / (len(self.loop.stages) - number))
            # a sweep's tries each start from ``base``: the kept one's reports and steps replace the last
            stage_start = (len(reports), len(plans))
            queue = list(enumerate(stage.sweep or [None]))
            widening = False  # the first value failed: trying the stage's wider values
            position = 0
            while position < len(queue):
                iteration, value = queue[position]
                position += 1
                key = f"{stage.name}:{iteration}"
                bar.set_postfix_str(f"{stage.name}" + ("" if value is None else f"={value}"))
                if key in done:
                    point = done[key]
                    if point.decision in CONTINUED and point.checkpoint:  # its steps, saved with its checkpoint
                        del plans[stage_start[1]:]
                        plans.extend(PipelinePlan.load(self._plans_path(point.checkpoint)).steps)
                else:
                    over = share is not None and iteration > 0 and time.perf_counter() - stage_began > share
                    if over:
                        point = TrajectoryPoint(stage.name, iteration, value, "skipped", 0, 0, 0, None, {},
                                                [f"time budget spent (the stage's share: {share:.0f} s)"])
                        log.warning("loop: %s=%s skipped, the stage's share of the time budget (%.0f s) is spent",
                                    stage.name, value, share)
                    else:
                        point = self._try(stage, iteration, value, base, len(trajectory), reports, plans, stage_start)
                    self._save_state([*trajectory, point], done=False)
                trajectory.append(point)
                bar.update(1)
                if point.decision in CONTINUED:
                    current_path = point.checkpoint
                    current = None  # loaded lazily from the checkpoint
                    if point.decision == "accepted":
                        passing_path, passing_reports, passing_plans = point.checkpoint, len(reports), len(plans)
                    if widening:
                        break  # the first wider value that passes is the most compressed one that does
                elif widening:
                    continue  # the next, wider value
                elif iteration == 0 and stage.wider:
                    widening, position = True, 0
                    queue = [(len(stage.sweep or []) + j, v) for j, v in enumerate(stage.wider)]
                    bar.total += len(queue)
                    bar.update(len(stage.sweep or [None]) - 1)
                    log.warning("loop: %s=%s failed the gate; trying the wider values %s", stage.name, value,
                                ", ".join(map(str, stage.wider)))
                else:
                    bar.update(len(stage.sweep or [None]) - iteration - 1)
                    break
            if current is None:
                current = load_model(self.work_dir / current_path)
            spent += time.perf_counter() - stage_began
        bar.close()
        self._save_state(trajectory, done=True)
        if current_path != passing_path:  # the last stage continued from did not pass the gate
            current = original if passing_path is None else load_model(self.work_dir / passing_path)
            del reports[passing_reports:]  # the pass reports of ungated tries the output does not contain
            del plans[passing_plans:]
            if passing_path is None:
                log.warning("no try of the loop passed the gate; the output is the original model")
        return LoopResult(current, trajectory, reports, resumed, plans)

    def _try(self, stage: Stage, iteration: int, value: Any, base: onnx.ModelProto, index: int,
             reports: list[PassReport], plans: list[Plan], stage_start: tuple[int, int]) -> TrajectoryPoint:
        start = time.perf_counter()
        steps = stage.steps_for(value)
        candidate, step_reports, step_plans = self._run_steps(base, steps)
        m = self.measure(candidate)
        decision = "accepted" if m.passed else ("ungated" if not stage.gate else "rejected" if stage.sweep else "rolled back")
        kept = decision in CONTINUED
        checkpoint = self._checkpoint(candidate, stage.name, iteration, index) if kept else None
        if kept:
            del reports[stage_start[0]:]
            reports.extend(step_reports)
            del plans[stage_start[1]:]
            plans.extend(step_plans)
            PipelinePlan(step_plans).save(self._plans_path(checkpoint))
        log.info("%s try %d (%s): %s", stage.name, iteration, value, decision)
        return TrajectoryPoint(stage.name, iteration, copy.deepcopy(value), decision, m.bytes, m.params,
                               m.flops, m.latency_ms, m.metrics, m.failures, checkpoint,
                               time.perf_counter() - start, _layer_decisions(step_reports),
                               gamma=norm_scales(candidate) if kept else None, sparsity=_trains_sparsity(steps))
