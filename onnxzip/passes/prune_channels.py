"""The ``prune-channels`` pass: structured channel pruning by BatchNorm scale (method 2, step 2).

Plan: analyse the graph into groups of coupled channels (:mod:`onnxzip.pruning.groups`), score
every channel (``|γ|`` of the BatchNorms, or filter L1/L2 norms when BatchNorm is folded;
:mod:`onnxzip.pruning.importance`) and choose the channels each group keeps. The plan's
``layers`` map a group id (its first source layer) to ``{"channels": n, "keep": [indices]}``;
edit the indices and replay with ``--plan``. Apply: remove every other channel everywhere it
appears and fold what removed channels still carried into the next layer's bias
(:mod:`onnxzip.pruning.surgery`). The model becomes smaller and faster, not masked.

``latency_budget`` (instead of ``ratio`` / ``threshold``): keep at most that fraction of the
model's measured batch-1 latency (onnxruntime, one intra-op thread; :mod:`onnxzip.measure.latency`).
Per group, kept counts at fractions of its size (and rounded up to multiples of 8) are timed
on every Conv / Gemm / MatMul whose input or output channels the group sets (and every
LSTM / GRU / RNN whose hidden units or inputs it sets, over the whole observed sequence), at the real input
shapes; counts that do not save time, or are slower than a larger count, are rejected. Groups
then give up channels greedily by importance lost per saved millisecond (the removed channels'
share of the group's importance), the pruned model is timed and the saving asked of the groups rescaled
by what the model showed (:func:`onnxzip.measure.latency.meet_budget`). Layers are timed one group at a time, the other
groups at full width; the model measurement corrects what that misses (and the elementwise
ops, which are not timed per layer).

``policy=ddpg`` is resolved above this layer (:mod:`onnxzip.search.policy`, run by
``compress``): a DDPG search fills ``layer_ratios``, then this pass plans as usual.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.errors import ConfigError
from onnxzip.core.graph import export_model
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.pruning.groups import RECURRENT, ChannelAnalysis, ChannelGroup, analyze_channels
from onnxzip.measure.latency import (
    MIN_GAIN,
    Candidate,
    Factor,
    LayerForm,
    meet_budget,
    report_latency,
    useful_candidates,
)
from onnxzip.pruning.importance import group_importance, keep_count, select_channels, top_channels
from onnxzip.pruning.recurrent import recurrent_groups, tensor_rows, unit_importance
from onnxzip.pruning.surgery import RESTORE_ROWS, NodeEdit, prune_channels, restore_kinds
from onnxzip.core.report import LayerChange, PassReport
from onnxzip.core.schema import option

log = logging.getLogger(__name__)

LATENCY_KEEP = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)  # kept fractions timed per group


@dataclass
class PruneChannelsConfig:
    ratio: float | None = option(None, "fraction of the candidate channels to remove (lowest importance first)")
    threshold: float | None = option(None, "remove channels whose group importance is below this (|gamma| for bn)")
    latency_budget: float | None = option(
        None, "keep at most this fraction of the model's measured batch-1 latency (onnxruntime, one thread); "
              "channel counts that do not save time are rejected")
    scope: Literal["global", "layer"] = option("global", "rank channels across all groups or apply ratio per group")
    layer_ratios: dict[str, float] = option({}, "group id glob -> fraction removed in that group (wins over ratio/threshold)")
    importance: Literal["auto", "bn", "l1", "l2", "energy"] = option(
        "auto", "bn: BatchNorm |gamma|; l1/l2: filter norm; energy: LSTM/GRU/RNN hidden units by consumer-weighted "
                "activation energy on --data; auto: energy for recurrent units, else bn when present, else l1")
    aggregate: Literal["mean", "sum", "max"] = option("mean", "how a group combines its members' scores")
    min_channels: int = option(1, "channels every group keeps at least")
    round_to: int = option(1, "kept channel counts are rounded up to a multiple of this")
    compensate: bool = option(True, "fold what removed channels still carry into the next layer's bias")
    restore: Literal["linear", "zeros"] = option(
        "linear", "where pruned recurrent units must come back at full width (a graph output, an op the rules do not "
                  "follow): linear: predicted from the kept units by a least-squares MatMul (fitted on --data, refit "
                  "by --reconstruct); zeros: left zero. States fed back stay zero")
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
    reward_cost: Literal["params", "latency"] = option(
        "params", "ddpg: the cost term of the reward, -log of the share kept: params, or latency (each "
        "episode's pruned model timed at batch 1 on one onnxruntime thread, taking turns with the original)")
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
        if config.latency_budget is not None:
            if not 0 < config.latency_budget <= 1:
                raise ConfigError(f"Pass 'prune-channels': latency_budget must be in (0, 1], got {config.latency_budget:g}.")
            if config.ratio is not None or config.threshold is not None or config.layer_ratios:
                raise ConfigError("Pass 'prune-channels' takes latency_budget alone, not with ratio, threshold or layer_ratios.")
        elif config.ratio is None and config.threshold is None and not config.layer_ratios:
            raise ConfigError("Pass 'prune-channels' needs ratio, threshold, layer_ratios or latency_budget.")
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
        energies = self._energies(model, context, analysis)
        importances = {
            g.id: group_importance(g, self.config.importance, self.config.aggregate, energies.get(g.id)).values
            for g in candidates
        }
        if self.config.latency_budget is not None:
            found: dict[str, Any] = {}
            keep = self._latency_keep(model, context, analysis, candidates, importances, found)
            layers = {g.id: {"channels": g.size, "keep": keep[g.id]} for g in candidates}
            entries = found.pop("entries", {})
            for gid, entry in layers.items():
                entry.update(entries.get(gid, {}))
            return Plan(self.name, self.config_dict(), layers, found=found)
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
        return self._apply(model, plan, context)

    def _apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext, trial: bool = False) -> PassResult:
        """``apply``; a ``trial`` (a model built while planning, to be measured) skips the
        before/after latency the final report gives."""
        analysis = analyze_channels(model, shapes=context.shapes(model))
        keep = _plan_keep(plan, analysis)
        report = self.new_report()
        energies = self._energies(model, context, analysis)  # before the surgery edits the analysed graph
        rows = self._restore_rows(model, context, analysis) if keep else {}
        edits = prune_channels(model, analysis, keep, context.feeds, compensate=self.config.compensate,
                               restore=self.config.restore, restore_rows=rows) if keep else []
        new_model = export_model(analysis.graph, model) if keep else model
        report.modified = bool(keep)
        _report(report, analysis, plan, keep, edits, context.cost(model), context.cost(new_model), self.config,
                energies)
        if self.config.latency_budget is not None and not trial:
            report.notes.extend(plan.found.get("latency_notes", []))
            report_latency(report, model, new_model, context.timer, self.config.latency_budget,
                           plan.found.get("latency_ms"))
        return PassResult(new_model, report, plan)

    def _restore_rows(self, model: onnx.ModelProto, context: PassContext, analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
        """Calibration rows of the original's widened tensors a linear restore is fitted on (once
        per model; {} without --data)."""
        def compute() -> dict[str, np.ndarray]:
            tensors = [name for name, kind in restore_kinds(analysis, self.config.restore).items() if kind == "linear"]
            feeds = None if context.generated else context.feeds  # generated inputs say nothing about real activations
            rows = tensor_rows(model, analysis, tensors, feeds, RESTORE_ROWS)
            if tensors and not rows:
                log.warning("prune-channels restore=linear: no calibration data, so the pruned units of %s start at "
                            "zero until the reconstruct step fits their restore", ", ".join(repr(t) for t in tensors))
            return rows

        return self.per_model("restore_rows", model, compute)

    def _energies(self, model: onnx.ModelProto, context: PassContext, analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
        """Measured importance of recurrent hidden units per group (once per model)."""
        if self.config.importance not in ("auto", "energy"):
            return {}
        groups = [g for g in analysis.groups if not g.reasons and g.size > 1]
        return self.per_model("unit_energies", model, lambda: unit_importance(model, analysis, groups, context.feeds)
                              if recurrent_groups(groups) else {})

    def _latency_keep(self, model: onnx.ModelProto, context: PassContext, analysis: ChannelAnalysis,
                      groups: list[ChannelGroup], importances: dict[str, np.ndarray],
                      findings: dict[str, Any]) -> dict[str, list[int]]:
        """Kept channels per group meeting ``latency_budget`` (see the module docstring); what
        the timing found goes into ``findings`` (the plan's ``found``): latency_notes,
        latency_ms, entries."""
        timing = context.timer()
        budget = self.config.latency_budget
        original = timing.model(model)
        layers = _timed_layers(analysis)
        options: dict[str, tuple[float, list[Candidate]]] = {}
        entries: dict[str, dict[str, Any]] = {}
        for group in context.track(groups, "prune-channels: timing channel counts"):
            values = importances[group.id]
            ascending = np.sort(values)
            total = float(values.sum()) or 1.0
            members = [(node, share, source) for node, shares in layers
                       for gid, share, source in shares if gid == group.id]
            if not members:
                entries[group.id] = {"reason": "no Conv/Gemm/MatMul/LSTM/GRU/RNN to time; kept whole"}
                continue
            dense = sum(timing.layer(form) for form in _member_forms(members, analysis, group.size, group.size))
            found = []
            for kept in _latency_counts(group.size, self.config.min_channels, self.config.round_to):
                ms = sum(timing.layer(form) for form in _member_forms(members, analysis, group.size, kept))
                # the removed share of the group's importance, once per layer whose filters go
                error = len(group.sources) * float(ascending[: group.size - kept].sum()) / total
                found.append(Candidate(kept, ms, error))
            useful, rejected = useful_candidates(dense, found)
            entry = entries[group.id] = {"latency_ms": [round(dense, 4), round(dense, 4)]}
            slower = sorted(c.choice for c in rejected if c.ms >= dense * (1 - MIN_GAIN))
            if slower:
                entry["not_faster"] = slower
            if useful:
                options[group.id] = (dense, useful)
            else:
                entry["reason"] = f"no channel count saves {MIN_GAIN:.0%} of its layers' {dense:.3g} ms"

        def keep_of(chosen: dict[str, Candidate | None]) -> dict[str, list[int]]:
            return {g.id: top_channels(importances[g.id], chosen[g.id].choice if chosen.get(g.id) else g.size)
                    for g in groups}

        def build(chosen: dict[str, Candidate | None]) -> onnx.ModelProto:
            keep = keep_of(chosen)
            trial = Plan(self.name, self.config_dict(), {g.id: {"channels": g.size, "keep": keep[g.id]} for g in groups})
            return self._apply(model, trial, context, trial=True).model

        outcome = meet_budget(options, budget, model, original, build, timing)
        keep = keep_of(outcome.chosen)
        for gid, candidate in outcome.chosen.items():
            dense = options[gid][0]
            entries[gid]["latency_ms"] = [round(dense, 4), round(candidate.ms if candidate else dense, 4)]
            if candidate is None:
                entries[gid]["reason"] = "kept whole by the latency allocation"
        notes = findings["latency_notes"] = list(outcome.notes)
        findings["latency_ms"] = (outcome.before_ms, outcome.after_ms)
        if not outcome.reached:
            message = (f"prune-channels latency_budget {budget:g} not reached: measured {outcome.after_ms:.3g} ms of "
                       f"{outcome.before_ms:.3g} ms ({outcome.after_ms / outcome.before_ms:.2f}); no choice of the "
                       "channel counts that save time measured faster")
            notes.append(message)
            log.warning("%s", message)
        findings["entries"] = entries
        return keep

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
            edits: list[NodeEdit], before, after, config: PruneChannelsConfig,
            energies: dict[str, np.ndarray]) -> None:
    """One row per group (its source layers' costs), then one per changed layer."""
    before_nodes, after_nodes = before.by_node(), after.by_node()

    def costs(names: list[str]) -> dict[str, int]:
        return {
            "params_before": sum(before_nodes[n].params for n in names if n in before_nodes),
            "params_after": sum(after_nodes[n].params for n in names if n in after_nodes),
            "flops_before": sum(before_nodes[n].flops for n in names if n in before_nodes),
            "flops_after": sum(after_nodes[n].flops for n in names if n in after_nodes),
        }

    kinds: dict[str, int] = {}
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
        importance = group_importance(group, config.importance, config.aggregate, energies.get(group.id))
        details: dict[str, Any] = {
            "channels_before": group.size,
            "channels_after": kept,
            "sources": sources,
            "importance": importance.summary(),
        }
        kinds[importance.kind] = kinds.get(importance.kind, 0) + 1
        decision = plan.layers[group.id]
        if "latency_ms" in decision:
            before_ms, after_ms = decision["latency_ms"]
            details["latency_ms"] = {"before": before_ms, "after": after_ms, "saved": round(before_ms - after_ms, 4)}
        if decision.get("not_faster"):
            details["counts_not_faster"] = decision["not_faster"]
        report.changes.append(LayerChange(group.id, "channel group", f"channels {group.size} → {kept}", details=details, **costs(sources)))
    if kinds:
        names = {"bn": "BatchNorm |gamma|", "l1": "filter L1 norm", "l2": "filter L2 norm",
                 "energy": "recurrent unit activation energy × reading weights"}
        report.notes.append("channel importance: " + ", ".join(
            f"{names[kind]} in {count} group{'s' if count > 1 else ''}" for kind, count in sorted(kinds.items())))
    if analysis.restored:
        report.notes.append("pruned recurrent units come back where a tensor is restored to full width (state "
                            "inputs are read at the kept units; state and sequence outputs keep their shapes): "
                            + "; ".join(analysis.restored))
    for edit in edits:
        if edit.node not in before_nodes or not (before_nodes[edit.node].params or before_nodes[edit.node].flops):
            continue
        details = {"in_channels": edit.in_channels, "out_channels": edit.out_channels}
        decision = ", ".join(
            f"{label} {pair[0]} → {pair[1]}" for label, pair in (("in", edit.in_channels), ("out", edit.out_channels))
            if pair is not None and pair[0] != pair[1]
        )
        report.changes.append(LayerChange(edit.node, edit.op_type, decision or "unchanged", details=details, **costs([edit.node])))


def _latency_counts(size: int, min_channels: int, round_to: int) -> list[int]:
    """Kept channel counts timed for a group of ``size``: fractions of it, each also rounded up
    to a multiple of 8, all obeying ``min_channels`` and ``round_to``."""
    counts = set()
    for fraction in LATENCY_KEEP:
        kept = math.ceil(size * fraction)
        for count in (kept, 8 * math.ceil(kept / 8)):
            counts.add(keep_count(size, size - count, min_channels, round_to))
    return sorted(c for c in counts if 1 <= c < size)


def _timed_layers(analysis: ChannelAnalysis) -> list[tuple[gs.Node, list[tuple[str, float, bool]]]]:
    """Per Conv / Gemm / MatMul / LSTM / GRU / RNN with a constant weight: the groups it reads (group id, input
    positions per group channel, False) or opens (group id, 0, True)."""
    source_of = {id(s.node): g.id for g in analysis.groups for s in g.sources}
    sizes = {g.id: g.size for g in analysis.groups}
    found: list[tuple[gs.Node, list[tuple[str, float, bool]]]] = []
    for node in analysis.graph.nodes:
        if (node.op not in ("Conv", "Gemm", "MatMul", *RECURRENT) or len(node.inputs) < 2
                or not isinstance(node.inputs[1], gs.Constant)):
            continue
        shares: dict[str, int] = {}
        cmap = analysis.maps.get(node.inputs[0].name)
        for position in cmap.positions if cmap else ():
            if position is not None:
                gid = analysis.group_of_space[position[0]]
                shares[gid] = shares.get(gid, 0) + 1
        uses = [(gid, count / sizes[gid], False) for gid, count in shares.items()]
        if id(node) in source_of:
            uses.append((source_of[id(node)], 0.0, True))
        found.append((node, uses))
    return found


def _recurrent_form(node: gs.Node, shape: tuple[int, ...], weight: tuple[int, ...], drop_in: int,
                    drop_out: int) -> LayerForm:
    """An LSTM/GRU/RNN over its whole observed sequence (as layout 0) with ``drop_in`` fewer
    inputs and ``drop_out`` fewer hidden units."""
    directions, rows, inputs = weight
    gates = RECURRENT[node.op]
    hidden = rows // gates - drop_out
    steps, batch = (shape[1], shape[0]) if int(node.attrs.get("layout", 0)) == 1 else (shape[0], shape[1])
    direction = node.attrs.get("direction", "forward")
    attrs: dict[str, Any] = {"hidden_size": hidden, "direction": direction.decode() if isinstance(direction, bytes) else str(direction)}
    if node.op == "GRU":
        attrs["linear_before_reset"] = int(node.attrs.get("linear_before_reset", 0))
    return LayerForm(node.op, (steps, batch, inputs - drop_in), (Factor((directions, gates * hidden, inputs - drop_in)),),
                     attrs=tuple(sorted(attrs.items())))


def _member_forms(members: list[tuple[gs.Node, float, bool]], analysis: ChannelAnalysis, size: int,
                  kept: int) -> list[LayerForm]:
    """The group's layers as timed forms when it keeps ``kept`` of ``size`` channels (the other
    groups at full width)."""
    forms = []
    removed = size - kept
    for node, share, source in members:
        shape = analysis.shapes.get(node.inputs[0].name)
        if not shape:
            continue
        weight = tuple(int(d) for d in node.inputs[1].shape)
        drop_in = 0 if source else round(share * removed)
        drop_out = removed if source else 0
        if node.op in RECURRENT:
            forms.append(_recurrent_form(node, shape, weight, drop_in, drop_out))
            continue
        if node.op == "Conv":
            group = int(node.attrs.get("group", 1))
            cin = shape[1] - drop_in
            depthwise = group > 1 and group == shape[1]
            if depthwise:
                cout = weight[0] * cin // shape[1] - (drop_out if not drop_in else 0)
                new_weight, group = (cout, 1, *weight[2:]), cin
            else:
                new_weight = (weight[0] - drop_out, cin // group, *weight[2:])
            strides = tuple(int(v) for v in node.attrs.get("strides", (1,) * (len(weight) - 2)))
            dilations = tuple(int(v) for v in node.attrs.get("dilations", (1,) * (len(weight) - 2)))
            pads = tuple(int(v) for v in node.attrs.get("pads", (0,) * 2 * (len(weight) - 2)))
            auto_pad = node.attrs.get("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
            if auto_pad not in ("NOTSET", "", "VALID"):  # SAME_*: the padding keeps the output size
                pads = tuple(d * (k - 1) // 2 for d, k in zip(dilations, weight[2:])) * 2
            forms.append(LayerForm("Conv", (shape[0], cin, *shape[2:]),
                                   (Factor(new_weight, strides, pads, dilations, group),)))
            continue
        if node.op == "Gemm":
            trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
            rows, inner = shape[::-1] if trans_a else shape
            k, n = weight[::-1] if trans_b else weight
            forms.append(LayerForm("Gemm", (rows, inner - drop_in), (Factor((k - drop_in, n - drop_out)),)))
            continue
        if len(weight) != 2:
            continue
        k, n = weight
        forms.append(LayerForm("MatMul", (*shape[:-1], shape[-1] - drop_in), (Factor((k - drop_in, n - drop_out)),)))
    return forms
