"""Python API, the twin of the command line: :func:`compress`, :func:`validate`, :func:`finetune`
(``export`` lives in :mod:`onnxzip.torch_export`, ``inspect`` in :mod:`onnxzip.inspection`)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxzip.errors import ConfigError, QualityGateError
from onnxzip.evaluators import QualityGate
from onnxzip.core.compat import pop_conversion_note
from onnxzip.core.graph import dedupe_initializers, export_model, import_graph, tidy
from onnxzip.core.inputs import data_notes, parse_sample_axes
from onnxzip.core.io import load_model, save_model
from onnxzip.passes import PassContext, PipelinePlan, get_pass
from onnxzip.passes.base import PassResult, Plan, is_onnxruntime_error
from onnxzip.evaluators.quality import check_metric_data, fidelity_feeds, quality_gate
from onnxzip.recipe import PassStep, Recipe
from onnxzip.core.report import CompressionReport, ModelSummary
from onnxzip.core.runtime import onnxruntime_reason, resolve_device
from onnxzip.search import resolve_step
from onnxzip.core.sanity import declare_inputs_like, probe_batch
from onnxzip.core.shapes import UnresolvedShapesError, generated_feeds
from onnxzip.evaluators.fidelity import FidelityGate, ValidationReport
from onnxzip.evaluators.fidelity import validate as _validate
from onnxzip.core.weights import materialize_weights

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """The compressed model, what was done, and the plan that reproduces it."""

    model: onnx.ModelProto
    report: CompressionReport
    plan: PipelinePlan
    validation: ValidationReport | None = None
    quality: Any = None  # onnxzip.evaluators.GateReport when metric conditions were given

    @property
    def passed(self) -> bool:
        fidelity_ok = self.validation is None or self.validation.passed
        return fidelity_ok and (self.quality is None or self.quality.passed)

    def failures(self) -> list[str]:
        found = list(self.validation.failures) if self.validation else []
        if self.quality is not None:
            found += [
                f"{row.metric} {row.condition.kind}={row.condition.limit:g} not met (original "
                f"{row.original if row.original is None else f'{row.original:.4g}'}, candidate {row.candidate:.4g})"
                for row in self.quality.failures
            ]
        return found

    def save(self, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
        """Write the model; the report's size after becomes the size on disk (with ``.data``)."""
        target = save_model(self.model, path, external_data=external_data)
        data = target.with_name(f"{target.name}.data")
        self.report.after.bytes = target.stat().st_size + (data.stat().st_size if data.exists() else 0)
        return target


def prepare_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Put every weight into an initializer (from Constant nodes/constant chains) so passes see
    one form; returns the prepared model and notes."""
    graph = import_graph(model)
    notes = materialize_weights(graph)
    if not notes:
        return model, []
    tidy(graph)
    prepared = export_model(graph, model)
    notes.extend(dedupe_initializers(prepared))
    return prepared, notes


def _feeds(
    model: onnx.ModelProto, data: Any, recipe: Recipe, passes: list[Any]
) -> tuple[dict[str, np.ndarray] | None, str | None, str | None]:
    """(feeds, how generated inputs were sized, why there are none). Generated inputs get sizes
    onnxruntime accepts; when none are found a weight-only pipeline (cluster, cleanup) still
    runs, without the fidelity check, since its plan needs no run."""
    if data is not None:
        feeds = fidelity_feeds(model, data, batch=recipe.batch, dims=recipe.dims, seed=recipe.seed,
                               sample_axes=recipe.sample_axes)
        return feeds, None, None
    try:
        feeds, resolution = generated_feeds(model, batch=recipe.batch, dims=recipe.dims,
                                            input_shapes=recipe.input_shapes, seed=recipe.seed)
    except UnresolvedShapesError as exc:
        # Guessed sizes may be wrong where the model itself is fine; a model that runs at no
        # batch size is broken, and nothing is written for it.
        if not exc.guessed or not all(p.weight_only for p in passes):
            raise
        log.warning("fidelity not checked: %s", exc)
        return None, None, str(exc)
    return feeds, resolution.describe(), None


def _recipe_from(recipe: Recipe | dict[str, Any] | str | os.PathLike[str] | None) -> Recipe:
    if recipe is None:
        return Recipe.default()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_file(recipe)
    raise ConfigError("recipe must be a Recipe, a mapping or a path to a YAML/JSON file.")


def _conditions(metrics: Any) -> list[Any]:
    return list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]


def _require_pass_data(passes: list[Any], data: Any) -> None:
    """Stop before any work when a step cannot run on generated inputs and no data was given."""
    if data is not None:
        return
    for step in passes:
        reason = step.needs_data()
        if reason:
            raise ConfigError(f"{reason}: pass --data calib.npz (data= in Python); "
                              "inputs generated from the signature are not data.")


def _require_data(metrics: list[Any], data: Any) -> None:
    if metrics and data is None and QualityGate(metrics).needs_data:
        raise ConfigError("Metric conditions need data with labels or references (--data); "
                          "only task metrics (task:FILE.py:function) score without it.")


def compress(
    model: onnx.ModelProto | str | os.PathLike[str],
    recipe: Recipe | dict[str, Any] | str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    plan: PipelinePlan | str | os.PathLike[str] | None = None,
    gate: FidelityGate | dict[str, Any] | None = None,
    metrics: Any = None,
    device: str | None = None,
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Any] | None = None,
    sample_axes: dict[str, int | None] | str | None = None,
    check: bool = True,
    allow_gate_failure: bool = False,
    progress: bool = False,
    val: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    batch: int | None = None,
    **pass_options: dict[str, Any] | bool,
) -> CompressResult:
    """Run a compression pipeline and validate the result against the original in onnxruntime
    (``onnxzip compress``); returns a :class:`CompressResult` (``.model``, ``.report``,
    ``.plan``, ``.save(path)``). The input is never modified.

    Parameters (the command line's flag in brackets):

    - ``model``: an ONNX path or ``ModelProto``.
    - ``recipe`` [``--recipe``]: a :class:`~onnxzip.recipe.Recipe`, a mapping, a YAML/JSON path
      or a built-in loop recipe name (``"method1"``, ``"method2"``).
    - ``**pass_options`` [``--svd energy=0.95`` ...]: passes by name, in order
      (``compress(m, svd={"energy": 0.95}, cluster=True)``; ``True`` means default options;
      ``prune_channels`` for ``prune-channels``); they follow a given recipe's passes and replace
      the default recipe. ``cleanup`` always runs last.
    - ``plan`` [``--plan``]: a saved :class:`PipelinePlan` (or its JSON path), replayed as is.
    - ``data`` [``--data``]: an ``.npz`` path, a dict of arrays, a folder of WAVs/images or an
      evaluator dataset (default: inputs generated from the signature).
    - ``val`` [``--val``]: held-out data a loop's gate is measured on (default ``data``).
    - ``metrics`` [``--metric``]: quality conditions such as ``["accuracy:max_drop=0.01",
      {"metric": "snr", "min": 30}, "task:scorer.py:score_model:max_drop=0.5"]``, measured for
      the original and the result.
    - ``gate`` [``--min-cosine`` ...]: a :class:`FidelityGate` or its fields as a mapping.
    - ``device`` [``--device``], ``dims`` [``--dim``], ``input_shapes`` [``--input-shape``],
      ``batch`` [``--batch``]: how the models run and how generated inputs are sized.
    - ``check``: run the gates at all; ``allow_gate_failure`` [``--force``]: return a result
      that failed them instead of raising :class:`QualityGateError`.
    - ``work_dir`` [``--work-dir``]: a loop checkpoints every finished try here and resumes
      from it (a temporary folder when not given: no resume); ``progress``: progress bars.

    A recipe with a ``loop`` compresses until the quality limit: each stage is gated against
    the original on ``val`` (or ``data``) and failed tries are rolled back.
    """
    start = time.perf_counter()
    given_recipe = recipe is not None
    recipe = _recipe_from(recipe)
    if pass_options:
        steps = [
            PassStep(get_pass(key).name, {} if options is True else dict(options or {}))
            for key, options in pass_options.items()
        ]
        # Keyword passes follow a given recipe's passes, and replace the default recipe.
        recipe.passes = [*recipe.passes, *steps] if given_recipe else steps
    if gate is not None:
        recipe.gate = gate if isinstance(gate, FidelityGate) else FidelityGate(**gate)
    if device is not None:
        recipe.device = device
    if dims:
        recipe.dims = {**recipe.dims, **dims}
    if input_shapes:
        recipe.input_shapes = {**recipe.input_shapes, **input_shapes}
    if sample_axes:
        recipe.sample_axes = {**recipe.sample_axes, **parse_sample_axes(sample_axes)}
    if data is None and recipe.data:
        data = recipe.data
    if val is None and recipe.val:
        val = recipe.val
    if batch is not None:
        recipe.batch = batch
    if metrics is not None:
        recipe.metrics = _conditions(metrics)
    replay = PipelinePlan.load(plan) if isinstance(plan, (str, os.PathLike)) else plan
    if replay is not None:
        recipe.passes = [PassStep(get_pass(p.pass_name).name, p.config) for p in replay.steps]
    passes = recipe.build_passes()
    original = load_model(model)
    converted = pop_conversion_note(original)
    _require_data(recipe.metrics, data)
    _require_pass_data(passes, data)
    feeds, generated, unchecked = _feeds(original, data, recipe, passes)
    declared, pinned = original, None
    if feeds is not None:  # first onnxruntime run of the input
        original, pinned = probe_batch(original, feeds)
    if recipe.metrics:
        check_metric_data(original, val if val is not None else data, recipe.metrics, device=recipe.device,
                          sample_axes=recipe.sample_axes)
    context = PassContext(feeds=feeds, device=resolve_device(recipe.device), seed=recipe.seed,
                          progress=progress, dims=recipe.dims, original=original, data=data, val=val,
                          sample_axes=recipe.sample_axes, generated=generated is not None)
    if recipe.metrics:  # passes that search for the smallest acceptable model ask this
        context.metrics = list(recipe.metrics)
        judged_on = val if val is not None else data
        context.accept = lambda candidate: quality_gate(
            original, candidate, judged_on, recipe.metrics, device=recipe.device,
            sample_axes=recipe.sample_axes).passed
    working, notes = prepare_model(original)
    notes[:0] = [note for note in (converted, pinned) if note]
    if generated:
        notes.append(f"inputs generated from the signature: {generated}")
    notes.extend(data_notes(original, feeds))
    if unchecked:
        notes.append(f"fidelity not checked: no inputs could be generated ({unchecked})")
    if recipe.loop is not None:
        if recipe.passes and recipe.passes != Recipe.default().passes:
            raise ConfigError("A loop recipe runs its own stages; give pass flags or a loop recipe, not both.")
        if replay is not None:
            raise ConfigError("A loop recipe searches; replay its result's plan without the loop recipe.")
        looped = _compress_loop(original, working, notes, recipe, context, feeds, generated, data, val, work_dir,
                                start=start, allow_gate_failure=allow_gate_failure)
        declare_inputs_like(looped.model, declared)
        return looped
    before_cost = context.cost(original)
    executed = PipelinePlan()
    reports = []
    steps = list(zip(passes, replay.steps if replay else [None] * len(passes)))
    if replay is None and (not passes or passes[-1].name != "cleanup"):
        steps.append((get_pass("cleanup")(), None))  # a replayed plan holds every step it ran
    for step, step_plan in tqdm(steps, desc="passes", unit="pass", disable=not progress):
        search = None
        if step_plan is None:  # a replayed plan never searches again
            step, search = resolve_step(step, working, context, data)
        log.info("running pass %s", step.name)
        result = _run_step(step, working, context, step_plan)
        if search is not None:
            result.report.details["search"] = search.to_dict()
        working = result.model
        reports.append(result.report)
        executed.steps.append(result.plan)
    after_cost = context.cost(working)
    report = CompressionReport(
        before=ModelSummary(original.ByteSize(), before_cost.params, before_cost.flops, context.latency(original)),
        after=ModelSummary(working.ByteSize(), after_cost.params, after_cost.flops, context.latency(working)),
        passes=reports,
        notes=notes,
    )
    if working.ByteSize() >= original.ByteSize():
        message = (f"the output ({working.ByteSize()} B) is not smaller than the input "
                   f"({original.ByteSize()} B)")
        log.warning("%s", message)
        notes.append(f"warning: {message}")
    validation, quality = _gate(original, working, recipe, feeds, generated, data, progress) if check else (None, None)
    report.validation = validation.to_dict() if validation is not None else None
    report.quality = quality.to_dict() if quality is not None else None
    report.seconds = time.perf_counter() - start
    declare_inputs_like(working, declared)
    result = CompressResult(working, report, executed, validation, quality)
    if not result.passed and not allow_gate_failure:
        raise QualityGateError(
            "The compressed model failed the quality gate: " + "; ".join(result.failures()) + ".",
            report=result,
        )
    return result


def _run_step(step: Any, model: onnx.ModelProto, context: PassContext, plan: Any) -> Any:
    """``step.run``, checked: when onnxruntime cannot run the model the step made (or fails
    inside the step), the step is reported as failed, on stderr and in its report, and its input
    goes on unchanged, instead of the whole run ending in an internal error."""
    try:
        result = step.run(model, context, plan=plan)
        reason = context.run_error(result.model) if result.model is not model else None
    except Exception as exc:  # noqa: BLE001 - only onnxruntime's errors are turned into a failed step
        if not is_onnxruntime_error(exc):
            raise
        reason = onnxruntime_reason(exc)
    if reason is None:
        return result
    message = (f"step '{step.name}' failed: onnxruntime cannot run the model it made ({reason}); the step was "
               "skipped and its input kept. This is a bug in onnxzip: please report it with the model")
    log.warning("%s", message)
    report = step.new_report()
    report.notes.append(message)
    cost = context.cost(model)
    report.params_before = report.params_after = cost.params
    report.flops_before = report.flops_after = cost.flops
    report.bytes_before = report.bytes_after = model.ByteSize()
    return PassResult(model, report, Plan(step.name, step.config_dict(), {}, found={"failed": message}))


def _gate(original: onnx.ModelProto, model: onnx.ModelProto, recipe: Recipe, feeds: dict[str, np.ndarray] | None,
          generated: Any, judged_on: Any, progress: bool = False) -> tuple[ValidationReport | None, Any]:
    """The gate of ``model`` against ``original``, the same for a pipeline's output and a loop's
    tries: fidelity on ``feeds`` (none when no inputs could be made) and the recipe's metric
    conditions on ``judged_on``."""
    validation = (_validate(original, model, feeds, device=recipe.device, gate=recipe.gate, generated=generated)
                  if feeds is not None else None)
    quality = (quality_gate(original, model, judged_on, recipe.metrics, device=recipe.device, progress=progress,
                            sample_axes=recipe.sample_axes)
               if recipe.metrics else None)
    return validation, quality


def _compress_loop(original: onnx.ModelProto, working: onnx.ModelProto, notes: list[str], recipe: Recipe,
                   context: PassContext, feeds: dict[str, np.ndarray] | None, generated: Any, data: Any, val: Any,
                   work_dir: str | os.PathLike[str] | None, *, start: float,
                   allow_gate_failure: bool) -> CompressResult:
    """Run the recipe's loop (see :mod:`onnxzip.search.loops`) and wrap its best model."""
    import tempfile

    from onnxzip.search.loops import CompressionLoop, Measurement, fingerprint

    gate_data = val if val is not None else data
    if not recipe.metrics:
        raise ConfigError("A loop recipe needs a quality condition to compress until: give --metric "
                          "(e.g. accuracy:max_drop=0.01 with labels, or argmax_agreement:min=0.98, cosine:min=0.99).")

    def make_context() -> PassContext:
        return dataclasses.replace(context, _cache={})

    gated: dict[str, tuple[ValidationReport | None, Any]] = {}  # by model digest: the output is not gated twice

    def digest(model: onnx.ModelProto) -> str:
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()

    def measure(model: onnx.ModelProto) -> Measurement:
        scratch = make_context()
        cost = scratch.cost(model)
        validation, quality = gated[digest(model)] = _gate(original, model, recipe, feeds, generated, gate_data)
        values: dict[str, float] = {}
        failures: list[str] = []
        if validation is not None:
            values["min_cosine"] = min((o.cosine for o in validation.outputs), default=1.0)
            failures += validation.failures
        if quality is not None:
            values.update({row.metric: float(row.candidate) for row in quality.rows})
            failures += [f"{row.metric} {row.condition.kind}={row.condition.limit:g}" for row in quality.failures]
        return Measurement(model.ByteSize(), cost.params, cost.flops, scratch.latency(model),
                           not failures, values, failures)

    def identity(source: Any) -> Any:
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            info = os.stat(source)
            return [os.path.abspath(source), info.st_size, int(info.st_mtime)]
        if isinstance(source, dict):
            return {k: [list(np.shape(v)), float(np.asarray(v, dtype=np.float64).sum())] for k, v in source.items()}
        return repr(source)

    run_id = fingerprint(original, recipe.loop, {
        "gate": dataclasses.asdict(recipe.gate), "metrics": recipe.metrics, "seed": recipe.seed,
        "data": identity(data), "val": identity(val),
    })
    with tempfile.TemporaryDirectory(prefix="onnxzip-loop-") as scratch_dir:
        loop = CompressionLoop(recipe.loop, work_dir=work_dir or scratch_dir, measure=measure,
                               make_context=make_context, run_id=run_id, progress=context.progress)
        outcome = loop.run(working)
    best = outcome.model
    first, last = outcome.trajectory[0], next(p for p in reversed(outcome.trajectory) if p.decision in ("accepted", "original"))
    if last.decision != "original":  # the loop's steps end without the cleanup a pipeline ends with
        cleaned = _run_step(get_pass("cleanup")(), best, make_context(), None)
        if cleaned.model.ByteSize() < best.ByteSize():
            best = cleaned.model
            outcome.reports.append(cleaned.report)
            outcome.plans.append(cleaned.plan)
    report = CompressionReport(
        before=ModelSummary(original.ByteSize(), first.params, first.flops, first.latency_ms),
        after=ModelSummary(best.ByteSize(), last.params, last.flops, last.latency_ms),
        passes=outcome.reports,
        notes=notes + ([f"resumed: {outcome.resumed} finished tries reused from {work_dir}"] if outcome.resumed else []),
        trajectory=outcome.to_dict()["trajectory"],
    )
    if last.decision == "original":
        report.notes.append("no stage of the loop passed the gate; the output is the original model")
    validation, quality = gated.get(digest(best)) or _gate(original, best, recipe, feeds, generated, gate_data)
    report.validation = validation.to_dict() if validation is not None else None
    report.quality = quality.to_dict() if quality is not None else None
    report.seconds = time.perf_counter() - start
    result = CompressResult(best, report, PipelinePlan(list(outcome.plans)), validation, quality)
    if not result.passed and not allow_gate_failure:
        raise QualityGateError(
            "The compressed model failed the quality gate: " + "; ".join(result.failures()) + ".", report=result)
    return result


def validate(
    original: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    data: str | os.PathLike[str] | dict[str, np.ndarray] | Any | None = None,
    *,
    metrics: Any = None,
    gate: FidelityGate | dict[str, Any] | None = None,
    device: str = "auto",
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Any] | None = None,
    batch: int = 2,
    seed: int = 0,
    progress: bool = False,
    sample_axes: dict[str, int | None] | str | None = None,
) -> ValidationReport:
    """Compare ``candidate`` with ``original`` in onnxruntime on the same inputs
    (``onnxzip validate``): per-output fidelity judged by ``gate`` [``--min-cosine`` ...; a
    :class:`FidelityGate` or its fields], and the quality conditions ``metrics`` [``--metric``]
    measured on ``data`` [``--data``] for both models (``report.quality``). ``.passed`` is true
    when both pass; ``.table()`` and ``.to_dict()`` show both. Without ``data`` the inputs are
    generated at sizes onnxruntime accepts (``dims`` [``--dim``], ``input_shapes``
    [``--input-shape``], ``batch`` [``--batch``], ``seed``). ``sample_axes`` [``--sample-axis``]
    settles which axis of an input's data holds the samples (see the README's data layout rule)."""
    conditions = _conditions(metrics) if metrics is not None else []
    _require_data(conditions, data)
    axes = parse_sample_axes(sample_axes)
    original, candidate = load_model(original), load_model(candidate)
    if data is not None:  # the first run of the user's files, in a child; a batch-1 trace is fed one at a time
        feeds = fidelity_feeds(original, data, batch=batch, dims=dims or {}, seed=seed, sample_axes=axes)
        original, pinned = probe_batch(original, feeds)
        if pinned:
            log.warning("%s", pinned)
            declare_inputs_like(candidate, original)
    report = _validate(original, candidate, data, dims=dims, input_shapes=input_shapes, batch=batch, seed=seed,
                       device=device, gate=FidelityGate(**gate) if isinstance(gate, dict) else gate,
                       sample_axes=axes)
    if conditions:
        report.quality = quality_gate(original, candidate, data, conditions, device=device, progress=progress,
                                      sample_axes=axes)
    return report


def finetune(
    model: onnx.ModelProto | str | os.PathLike[str],
    data: str | os.PathLike[str] | dict[str, np.ndarray],
    *,
    val: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    teacher: onnx.ModelProto | str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = False,
    sample_axes: dict[str, int | None] | str | None = None,
    **options: Any,
) -> Any:
    """Fine-tune ``model``'s weights in onnxruntime-training on ``data`` (``onnxzip finetune``):
    an ``.npz`` path or arrays by input name with optional ``labels`` / ``references``;
    ``val`` [``--val``] is evaluated each epoch, ``teacher`` [``--teacher``] is distilled from
    when the data has neither; ``sample_axes`` [``--sample-axis``] settles the data layout. ``**options`` are the step's options (``epochs=3, lr=1e-4``),
    listed below. Returns a :class:`~onnxzip.train.FinetuneResult` (``.model``, ``.history``,
    ``.frozen``, ``.to_dict()``); the input is never modified.

    Options:
    """
    from onnxzip.train import finetune as _finetune

    return _finetune(model, data, val=val, teacher=teacher, config=options, device=device, progress=progress,
                     sample_axes=parse_sample_axes(sample_axes))


def _document_finetune_options() -> None:
    from onnxzip.core.schema import describe_config
    from onnxzip.train import FinetuneConfig

    finetune.__doc__ += "\n" + "\n".join(f"    {line}" for line in describe_config(FinetuneConfig).splitlines()) + "\n"


_document_finetune_options()
