"""The ``prune-channels`` pass: structured channel pruning by BatchNorm scale (method 2, step 2).

Plan: analyse the graph into groups of coupled channels (:mod:`onnxzip.pruning.groups`), score
every channel (``|γ|`` of the BatchNorms, or filter L1/L2 norms when BatchNorm is folded;
:mod:`onnxzip.pruning.importance`) and choose the channels each group keeps. The plan's
``layers`` map a group id (its first source layer) to ``{"channels": n, "keep": [indices]}``;
edit the indices and replay with ``--plan``. Apply: remove every other channel everywhere it
appears and fold what removed channels still carried into the next layer's bias
(:mod:`onnxzip.pruning.surgery`). The model becomes smaller and faster, not masked.

``policy=ddpg`` is resolved above this layer (:mod:`onnxzip.search.policy`, run by
``compress``): a DDPG search fills ``layer_ratios``, then this pass plans as usual.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import onnx

from onnxzip.errors import ConfigError
from onnxzip.graph import export_model
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.pruning.groups import ChannelAnalysis, ChannelGroup, analyze_channels
from onnxzip.pruning.importance import group_importance, select_channels
from onnxzip.pruning.surgery import NodeEdit, prune_channels
from onnxzip.report import LayerChange, PassReport
from onnxzip.schema import option

log = logging.getLogger(__name__)


@dataclass
class PruneChannelsConfig:
    ratio: float | None = option(None, "fraction of the candidate channels to remove (lowest importance first)")
    threshold: float | None = option(None, "remove channels whose group importance is below this (|gamma| for bn)")
    scope: Literal["global", "layer"] = option("global", "rank channels across all groups or apply ratio per group")
    layer_ratios: dict[str, float] = option({}, "group id glob -> fraction removed in that group (wins over ratio/threshold)")
    importance: Literal["auto", "bn", "l1", "l2"] = option("auto", "bn: BatchNorm |gamma|; l1/l2: filter norm; auto: bn when present")
    aggregate: Literal["mean", "sum", "max"] = option("mean", "how a group combines its members' scores")
    min_channels: int = option(1, "channels every group keeps at least")
    round_to: int = option(1, "kept channel counts are rounded up to a multiple of this")
    compensate: bool = option(True, "fold what removed channels still carry into the next layer's bias")
    include: list[str] = option([], "source layer globs or op types whose groups may be pruned (empty: all)")
    exclude: list[str] = option([], "source layer globs or op types whose groups are left alone")
    policy: Literal["importance", "ddpg"] = option("importance", "ddpg: search per-group ratios with DDPG first (compress/CLI/recipes; needs a budget)")
    params_budget: float | None = option(None, "ddpg: share of the original model's params the result keeps")
    flops_budget: float | None = option(None, "ddpg: share of the original model's FLOPs the result keeps")
    episodes: int = option(300, "ddpg: episodes (reward evaluations) of the search")
    warmup: int = option(100, "ddpg: first episodes with random actions")
    proposals: int = option(4, "ddpg: episodes proposed and measured together per round")
    max_ratio: float = option(0.8, "ddpg: largest fraction of a group the search may remove")
    reward: Literal["exp", "linear"] = option("exp", "ddpg: accuracy term exp(-dacc/b) or 1 - dacc/b")
    reward_b: float = option(0.05, "ddpg: b, the accuracy drop the reward term scales by")
    reward_samples: int = option(1000, "ddpg: items of --data measured per reward")
    workers: int = option(0, "ddpg: Ray workers of a local instance (0: evaluate in this process)")
    ray_address: str | None = option(None, "ddpg: join this Ray cluster (auto or ray://host:port)")
    seed: int = option(0, "ddpg: seed of the agent and its exploration")


@register_pass
class PruneChannelsPass(Pass):
    name = "prune-channels"
    config_class = PruneChannelsConfig
    summary = "Remove low-importance channels (BatchNorm |gamma| or filter norm), dependency-aware."
    shorthand = "ratio"

    def _check_config(self) -> None:
        config = self.config
        if config.policy == "ddpg" and not config.layer_ratios:
            raise ConfigError("Pass 'prune-channels' with policy=ddpg runs its search through onnxzip.compress or the CLI.")
        if config.ratio is None and config.threshold is None and not config.layer_ratios:
            raise ConfigError("Pass 'prune-channels' needs ratio, threshold or layer_ratios.")
        if config.ratio is not None and config.threshold is not None:
            raise ConfigError("Pass 'prune-channels' takes ratio or threshold, not both.")
        fractions = [config.ratio] if config.ratio is not None else []
        fractions += list(config.layer_ratios.values())
        if any(not isinstance(f, (int, float)) or not 0 <= f < 1 for f in fractions):
            raise ConfigError("Pass 'prune-channels': ratios must be numbers in [0, 1).")
        if config.min_channels < 1 or config.round_to < 1:
            raise ConfigError("Pass 'prune-channels': min_channels and round_to must be at least 1.")

    def selects(self, group: ChannelGroup) -> bool:
        """Whether include/exclude let this pass prune ``group``."""
        config = self.config
        sources = [(s.node.name, s.node.op) for s in group.sources]
        return any(matches(n, op, config.include, []) for n, op in sources) and all(
            matches(n, op, [], config.exclude) for n, op in sources
        )

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        self._check_config()
        analysis = analyze_channels(model, shapes=context.shapes(model))
        candidates = [g for g in analysis.groups if g.prunable and self.selects(g)]
        importances = {
            g.id: group_importance(g, self.config.importance, self.config.aggregate).values for g in candidates
        }
        ratios = {}
        for pattern, fraction in self.config.layer_ratios.items():
            ratios.update({g.id: float(fraction) for g in candidates if matches(g.id, "", [pattern], [])})
        keep = select_channels(
            importances,
            threshold=self.config.threshold,
            ratio=self.config.ratio,
            scope=self.config.scope,
            layer_ratios=ratios,
            min_channels=self.config.min_channels,
            round_to=self.config.round_to,
        )
        layers = {g.id: {"channels": g.size, "keep": keep[g.id]} for g in candidates}
        return Plan(self.name, self.config_dict(), layers)

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        analysis = analyze_channels(model, shapes=context.shapes(model))
        keep = _plan_keep(plan, analysis)
        report = self.new_report()
        edits = prune_channels(model, analysis, keep, context.feeds, compensate=self.config.compensate) if keep else []
        new_model = export_model(analysis.graph, model) if keep else model
        report.modified = bool(keep)
        _report(report, analysis, plan, keep, edits, context.cost(model), context.cost(new_model), self.config)
        return PassResult(new_model, report, plan)

    def applies_to(self, weight: Any) -> bool:
        return any(use.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and use.role == "weight" for use in weight.uses)


def _plan_keep(plan: Plan, analysis: ChannelAnalysis) -> dict[str, list[int]]:
    """The plan's kept indices per group that loses channels, checked against this model."""
    groups = analysis.by_id()
    keep = {}
    for gid, decision in plan.layers.items():
        group = groups.get(gid)
        if group is None or not group.prunable:
            raise ConfigError(f"Plan for 'prune-channels' names '{gid}', which is not a prunable channel group of this model.")
        if decision.get("channels", group.size) != group.size:
            raise ConfigError(f"Plan for 'prune-channels' gives group '{gid}' {decision['channels']} channels; the model has {group.size}.")
        indices = decision.get("keep")
        if (not isinstance(indices, list) or not indices or len(set(indices)) != len(indices)
                or not all(isinstance(k, int) and 0 <= k < group.size for k in indices)):
            raise ConfigError(f"Plan for 'prune-channels': 'keep' of group '{gid}' must list distinct channel indices in [0, {group.size}).")
        if len(indices) < group.size:
            keep[gid] = sorted(indices)
    return keep


def _report(report: PassReport, analysis: ChannelAnalysis, plan: Plan, keep: dict[str, list[int]],
            edits: list[NodeEdit], before, after, config: PruneChannelsConfig) -> None:
    """One row per group (its source layers' costs), then one per changed layer."""
    before_nodes, after_nodes = before.by_node(), after.by_node()

    def costs(names: list[str]) -> dict[str, int]:
        return {
            "params_before": sum(before_nodes[n].params for n in names if n in before_nodes),
            "params_after": sum(after_nodes[n].params for n in names if n in after_nodes),
            "flops_before": sum(before_nodes[n].flops for n in names if n in before_nodes),
            "flops_after": sum(after_nodes[n].flops for n in names if n in after_nodes),
        }

    for group in analysis.groups:
        sources = group.source_names
        if group.reasons:
            report.skip(group.id, "channel group", "; ".join(group.reasons), **costs(sources))
            continue
        if group.size < 2:
            report.skip(group.id, "channel group", "a single channel cannot be pruned", **costs(sources))
            continue
        if group.id not in plan.layers:
            report.skip(group.id, "channel group", "not selected by include/exclude", **costs(sources))
            continue
        kept = len(keep.get(group.id, range(group.size)))
        importance = group_importance(group, config.importance, config.aggregate)
        details: dict[str, Any] = {
            "channels_before": group.size,
            "channels_after": kept,
            "sources": sources,
            "importance": importance.summary(),
        }
        report.changes.append(LayerChange(group.id, "channel group", f"channels {group.size} → {kept}", details=details, **costs(sources)))
    for edit in edits:
        if edit.node not in before_nodes or not (before_nodes[edit.node].params or before_nodes[edit.node].flops):
            continue
        details = {"in_channels": edit.in_channels, "out_channels": edit.out_channels}
        decision = ", ".join(
            f"{label} {pair[0]} → {pair[1]}" for label, pair in (("in", edit.in_channels), ("out", edit.out_channels))
            if pair is not None and pair[0] != pair[1]
        )
        report.changes.append(LayerChange(edit.node, edit.op_type, decision or "unchanged", details=details, **costs([edit.node])))
