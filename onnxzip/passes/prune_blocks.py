"""The ``prune-blocks`` pass: remove whole residual blocks by BatchNorm scale (method 2, step 4).

Plan: find identity-skip residual blocks and score each by the ``|γ|`` of the BatchNorms after
its k×k convolutions (:mod:`onnxzip.pruning.blocks`); mark the ``count`` lowest, or those scoring
below ``threshold``, for removal. The plan's ``layers`` map each block (its Add node) to
``{"remove": bool, "score": float}``; flip ``remove`` and replay with ``--plan``. Apply: the Add
becomes its skip input plus the constant the branch still contributes; the branch is deleted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.errors import ConfigError
from onnxzip.core.graph import NameScope, export_model, import_graph, tidy
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, register_pass
from onnxzip.pruning.blocks import ResidualBlock, find_blocks, remove_block
from onnxzip.pruning.surgery import channel_medians
from onnxzip.core.report import LayerChange
from onnxzip.core.schema import option

log = logging.getLogger(__name__)

SCORES = {"mean": np.mean, "min": np.min, "max": np.max}


@dataclass
class PruneBlocksConfig:
    count: int | None = option(None, "remove this many residual blocks (lowest scores first)")
    threshold: float | None = option(None, "remove blocks scoring below this (with count: at most count of them)")
    score: Literal["mean", "min", "max"] = option("mean", "how a block's BatchNorm |gamma| values become its score")


@register_pass
class PruneBlocksPass(Pass):
    name = "prune-blocks"
    config_class = PruneBlocksConfig
    summary = "Remove whole identity-skip residual blocks whose BatchNorm scales are small."
    shorthand = "count"

    def _analyse(
        self, model: onnx.ModelProto, context: PassContext
    ) -> tuple[gs.Graph, dict[str, tuple[int, ...]], list[ResidualBlock], list[tuple[gs.Node, str]]]:
        graph = import_graph(model)
        shapes = context.shapes(model)
        blocks, skipped = find_blocks(graph, shapes)
        return graph, shapes, blocks, skipped

    def _score(self, block: ResidualBlock) -> float:
        return float(SCORES[self.config.score](block.gammas()))

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        config = self.config
        if config.count is None and config.threshold is None:
            raise ConfigError("Pass 'prune-blocks' needs count or threshold.")
        if (config.count is not None and config.count < 0) or (config.threshold is not None and config.threshold < 0):
            raise ConfigError("Pass 'prune-blocks': count and threshold must not be negative.")
        _graph, _shapes, blocks, _skipped = self._analyse(model, context)
        scores = {b.id: self._score(b) for b in blocks}
        ranked = sorted(scores, key=lambda bid: (scores[bid], bid))
        if config.threshold is not None:
            ranked = [bid for bid in ranked if scores[bid] < config.threshold]
        chosen = set(ranked if config.count is None else ranked[: config.count])
        layers = {bid: {"remove": bid in chosen, "score": scores[bid]} for bid in scores}
        return Plan(self.name, self.config_dict(), layers)

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        graph, shapes, blocks, skipped = self._analyse(model, context)
        by_id = {b.id: b for b in blocks}
        unknown = sorted(set(plan.layers) - set(by_id))
        if unknown:
            raise ConfigError(f"Plan for 'prune-blocks' names '{unknown[0]}', which is not a removable residual block of this model.")
        chosen = [by_id[bid] for bid, decision in plan.layers.items() if decision.get("remove")]
        scores = {b.id: (self._score(b), [bn.name for bn in b.scorers], [n.name for n in b.nodes]) for b in blocks}
        constants = _branch_constants(model, chosen, context)
        names = NameScope(graph)
        kept_adds = {
            block.id: remove_block(graph, block, constants[block.branch_output.name].astype(np.float32),
                                   len(shapes[block.add.outputs[0].name]), names.fresh(f"{block.id}_branch_constant"))
            for block in chosen
        }
        new_model = model
        if chosen:
            tidy(graph)
            new_model = export_model(graph, model)
        report = self.new_report()
        report.modified = bool(chosen)
        before = context.cost(model).by_node()
        for add, reason in skipped:
            report.skip(add.name, "Add", reason)
        for block in blocks:
            score, scorers, branch = scores[block.id]
            params = sum(before[n].params for n in branch if n in before)
            flops = sum(before[n].flops for n in branch if n in before)
            removed = block.id in kept_adds
            details: dict[str, Any] = {"score": score, "scorers": scorers, "branch_nodes": len(branch)}
            if removed:
                details["constant_added"] = kept_adds[block.id]
            report.changes.append(LayerChange(
                block.id, "residual block", "removed" if removed else "kept",
                params_before=params, params_after=0 if removed else params,
                flops_before=flops, flops_after=0 if removed else flops, details=details,
            ))
        return PassResult(new_model, report, plan)


def _branch_constants(model: onnx.ModelProto, blocks: list[ResidualBlock], context: PassContext) -> dict[str, np.ndarray]:
    """Per-channel value of each block's branch output once its scored BatchNorms have γ = 0."""
    overrides = {
        bn.inputs[1].name: np.zeros_like(np.asarray(bn.inputs[1].values)) for block in blocks for bn in block.scorers
    }
    return channel_medians(model, overrides, {b.branch_output.name: 1 for b in blocks}, context.feeds)
