"""The ``finetune`` pipeline step: fine-tuning registered like a pass, so recipes, ``compress()``
and ``onnxzip compress --finetune epochs=3,lr=1e-4`` can run e.g. prune → finetune → cluster →
finetune. It lives here, not in ``onnxzip/passes``, because passes never import training.

The plan lists every weight as trained or frozen (with the reason); ``apply`` trains exactly the
weights the plan marks as trained. The teacher defaults to the pipeline's original input model,
the training data to the pipeline's ``data`` (an ``.npz`` with the model's inputs and optional
``labels`` / ``references``).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import onnx

from onnxzip.errors import ConfigError
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, register_pass
from onnxzip.core.report import LayerChange
from onnxzip.core.schema import option
from onnxzip.evaluators.gate import parse_conditions
from onnxzip.train.engine import FinetuneConfig, finetune, is_array_data, task_metric_of
from onnxzip.train.trainable import prepare


@dataclass
class FinetuneStepConfig(FinetuneConfig):
    teacher: str | None = option(None, "teacher ONNX file for distillation (default: the pipeline's input model)")
    val: str | None = option(None, "validation .npz evaluated each epoch (best epoch kept, early stop; "
                             "default: the pipeline's --val)")


def _op_of(model: onnx.ModelProto, name: str) -> str:
    for node in model.graph.node:
        if name in node.input:
            return node.op_type
    return "initializer"


@register_pass
class FinetunePass(Pass):
    name = "finetune"
    config_class = FinetuneStepConfig
    summary = "fine-tune the weights in onnxruntime-training (labels, references or distillation from the original)"
    reduces_bytes = False  # changes values, never sizes: the never-bigger guard does not apply

    def needs_data(self) -> str | None:
        return "the finetune step trains on data"

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        copy = prepare(model, context.shapes(model), self.config.include, self.config.exclude, data=context.feeds)
        layers: dict[str, dict[str, Any]] = {name: {"train": True} for name in copy.trainable}
        layers.update({name: {"train": False, "reason": reason} for name, reason in copy.frozen.items()})
        return Plan(self.name, self.config_dict(), layers)

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        data = context.data
        if data is None:
            raise ConfigError("The finetune step needs training data: pass --data train.npz (data= in Python).")
        options = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("teacher", "val")}
        selected = [name for name, layer in plan.layers.items() if layer.get("train")]
        options["include"] = selected or ["\0none"]
        options["exclude"] = []
        teacher = self.config.teacher or context.original
        from_run = None
        if options.get("metric") is None:  # the run's own task score (--metric task:...) picks the epoch
            from_run = next((c.metric for c in parse_conditions(context.metrics) if task_metric_of(c.metric)), None)
            options["metric"] = from_run
        val, skipped_val = self.config.val or context.val, None
        if val is not None and not is_array_data(val):
            # e.g. a folder of WAVs that the loop's gate scores: epochs are not evaluated on it
            val, skipped_val = None, f"validation data {val} is not arrays (.npz); every epoch trains, the last is kept"
        result = finetune(model, data, val=val, teacher=teacher, config=options,
                          device=context.device, progress=context.progress, sample_axes=context.sample_axes,
                          probed=self.config.teacher is None)  # the pipeline's input already ran
        report = self.new_report()
        if not result.trained:  # never only a log line: on stderr and first in the step's notes
            print(f"onnxzip: finetune step: {result.why_nothing_trains()} The model goes on unchanged.",
                  file=sys.stderr)
        if skipped_val:
            report.notes.append(skipped_val)
        if from_run:
            report.notes.append(f"epochs selected on the run's task metric {from_run} (--metric)")
        report.modified = bool(result.trained)
        report.details.update(trained_fraction=round(result.trained_fraction, 6), best_epoch=result.best_epoch,
                              history=result.history)  # row epoch 0: the input, scored on the held-out data
        if result.matched:
            report.details["matched"] = result.matched  # match=auto: the compressed layers' outputs
        for name in result.trained:
            report.changes.append(LayerChange(name, _op_of(model, name), "trained"))
        for name, reason in result.frozen.items():
            report.skip(name, _op_of(model, name), reason)
        report.notes += [*result.notes, f"loss: {' + '.join(result.losses)} on {result.device}"]
        if result.trained:
            report.notes.append(f"trained {len(result.trained)} weights, {result.trained_fraction:.0%} of the "
                                "float parameters")
        report.notes += [f"epoch {row['epoch']:g}" + (" (the input)" if row["epoch"] == 0 else "") + ": "
                         + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch") for row in result.history]
        if result.gammas:
            report.notes.append(f"{result.gammas_below_threshold} of {result.gammas} normalization γ below "
                                f"{self.config.gamma_threshold:g} (prunable)")
        if result.rewrites:
            report.notes.append("trainable rewrites (undone on export): "
                                + ", ".join(f"{k} ×{v}" for k, v in result.rewrites.items()))
        return PassResult(result.model, report, plan)
