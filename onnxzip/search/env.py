"""The pruning environment: one step per prunable channel group, in graph order.

A step turns the agent's action (a pruning ratio) into the number of channels the group keeps,
clipped by the budget *action wall*: with ``cost(n)`` the model's params (or FLOPs) when group
``g`` keeps ``n_g`` channels, the kept count of step ``t`` is held inside

* ``n_t ≤ hi_t``: the largest count with ``cost(n_1..n_t, later groups at their minimum) ≤ target``
  (the target stays reachable however the later groups are pruned: AMC's wall), and
* ``n_t ≥ lo_t``: the smallest count with ``cost(n_1..n_t, later groups untouched) ≥ target``
  (the target is not overshot by pruning more than it asks).

At the last group both bounds meet, so the result keeps at most the target and misses it by
less than one channel of the last group. ``cost`` is exact for what the surgery does: a node's
weight shrinks with its input and output channel counts (depthwise convolutions with the output
only), its bias and per-channel constants with its output count, and so do FLOPs; a bias-less
consumer gains a bias once its input loses a channel (the pass's compensation, exact whenever a
removed channel carries a non-zero value) (:class:`CostModel`). Counts follow :func:`onnxzip.pruning.importance.keep_count`, so the
ratios replay through the prune-channels pass to exactly these counts.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from onnxzip.measure.cost import ModelCost
from onnxzip.errors import ConfigError
from onnxzip.pruning.groups import ChannelAnalysis, ChannelGroup
from onnxzip.pruning.importance import keep_count

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
STATIC_FEATURES = ("index", "out_channels", "in_channels", "height", "width", "stride", "kernel",
                   "params", "flops_rest", "params_rest")


@dataclass
class _Linear:
    """A tensor's kept channel count as ``fixed + Σ weight_g · n_g`` (None: no channel axis)."""

    total: int
    fixed: float
    weights: dict[str, float]

    def kept(self, counts: dict[str, int]) -> float:
        return self.fixed + sum(w * counts[g] for g, w in self.weights.items())


@dataclass
class _NodeTerm:
    params_weight: int  # elements scaling with in × out
    params_out: int  # elements scaling with out only (bias, per-channel constants, depthwise weight)
    params_fixed: int
    flops: int
    flops_uses_in: bool
    inputs: _Linear | None
    outputs: _Linear | None
    compensation_bias: int = 0  # a bias of this many outputs appears once the input loses a channel


class CostModel:
    """Model params and FLOPs as a function of the kept channel count of every candidate group."""

    def __init__(self, analysis: ChannelAnalysis, cost: ModelCost, groups: list[ChannelGroup], *,
                 compensate: bool = True) -> None:
        self.params0, self.flops0 = cost.params, cost.flops
        self.sizes = {g.id: g.size for g in groups}
        by_node = cost.by_node()
        self.terms: list[_NodeTerm] = []
        for node in analysis.graph.nodes:
            node_cost = by_node.get(node.name)
            if node_cost is None or not (node_cost.params or node_cost.flops):
                continue
            inputs = self._linear(analysis, node.inputs[0].name) if node.inputs else None
            outputs = self._linear(analysis, node.outputs[0].name) if node.outputs else None
            weighted = node.op in WEIGHTED_OPS and len(node.inputs) > 1 and hasattr(node.inputs[1], "values")
            depthwise = node.op == "Conv" and int(node.attrs.get("group", 1)) > 1
            weight = int(np.prod(node.inputs[1].shape)) if weighted else 0
            if depthwise:
                term = _NodeTerm(0, node_cost.params, 0, node_cost.flops, False, inputs, outputs)
            elif weighted:
                term = _NodeTerm(weight, node_cost.params - weight, 0, node_cost.flops, True, inputs, outputs)
                if compensate and node.op != "ConvTranspose" and (node.op == "MatMul" or len(node.inputs) < 3):
                    term.compensation_bias = _output_count(node)
            elif outputs is not None:
                term = _NodeTerm(0, node_cost.params, 0, node_cost.flops, False, inputs, outputs)
            else:
                term = _NodeTerm(0, 0, node_cost.params, node_cost.flops, False, inputs, None)
            self.terms.append(term)
        self.node_params0 = sum(t.params_weight + t.params_out + t.params_fixed for t in self.terms)
        self.node_flops0 = sum(t.flops for t in self.terms)

    def _linear(self, analysis: ChannelAnalysis, tensor: str) -> _Linear | None:
        cmap = analysis.maps.get(tensor)
        if cmap is None or not cmap.positions:
            return None
        fixed, positions = 0, {}
        for position in cmap.positions:
            group = analysis.group_of_space.get(position[0]) if position is not None else None
            if group in self.sizes:
                positions[group] = positions.get(group, 0) + 1
            else:
                fixed += 1
        # count first, divide once: a group filling the tensor weighs exactly 1.0 (a sum of 1/size
        # terms can land below 1 and make an unpruned consumer look pruned)
        return _Linear(len(cmap.positions), float(fixed), {g: n / self.sizes[g] for g, n in positions.items()})

    def costs(self, counts: dict[str, int]) -> tuple[int, int]:
        """(params, FLOPs) of the whole model when group ``g`` keeps ``counts[g]`` channels."""
        params = flops = 0.0
        for term in self.terms:
            f_in = term.inputs.kept(counts) / term.inputs.total if term.inputs is not None else 1.0
            f_out = term.outputs.kept(counts) / term.outputs.total if term.outputs is not None else 1.0
            params += term.params_weight * f_in * f_out + term.params_out * f_out + term.params_fixed
            if term.compensation_bias and f_in < 1 - 1e-9:
                params += term.compensation_bias * f_out
            flops += term.flops * f_out * (f_in if term.flops_uses_in else 1.0)
        return (self.params0 - self.node_params0 + round(params), self.flops0 - self.node_flops0 + round(flops))


def _output_count(node) -> int:  # noqa: ANN001 - a gs.Node with a constant weight
    """Output channels of a Conv / Gemm / MatMul weight (the length of a bias)."""
    shape = node.inputs[1].shape
    if node.op == "Conv":
        return int(shape[0])
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return int(shape[0])
    return int(shape[-1])


def allowed_counts(size: int, max_ratio: float, min_channels: int, round_to: int) -> list[int]:
    """Every kept count a ratio in ``[0, max_ratio]`` can give, ascending."""
    most = math.floor(max_ratio * size)
    return sorted({keep_count(size, remove, min_channels, round_to) for remove in range(most + 1)})


def ratio_for(size: int, kept: int) -> float:
    """A ratio whose ``⌊ratio · size⌋`` removes exactly ``size − kept`` channels."""
    ratio = (size - kept) / size
    while math.floor(ratio * size) < size - kept:
        ratio = math.nextafter(ratio, 1.0)
    return ratio


@dataclass
class Budget:
    """Share of the original model's params and/or FLOPs the result keeps."""

    params: float | None = None
    flops: float | None = None

    def targets(self, cost: CostModel) -> tuple[float, float]:
        return (math.inf if self.params is None else self.params * cost.params0,
                math.inf if self.flops is None else self.flops * cost.flops0)


@dataclass
class Episode:
    """One rollout: states, the actions as clipped by the wall, and what they give."""

    states: list[np.ndarray] = field(default_factory=list)
    actions: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    params: int = 0
    flops: int = 0


class PruningEnv:
    """Groups in graph order, their normalised state features, and the budget wall."""

    def __init__(self, analysis: ChannelAnalysis, cost: ModelCost, groups: list[ChannelGroup], budget: Budget, *,
                 max_ratio: float = 0.8, min_channels: int = 1, round_to: int = 1, compensate: bool = True) -> None:
        if not groups:
            raise ConfigError("The DDPG search found no prunable channel group in this model.")
        self.groups = groups
        self.cost = CostModel(analysis, cost, groups, compensate=compensate)
        self.budget = budget
        self.targets = budget.targets(self.cost)
        self.options = {g.id: allowed_counts(g.size, max_ratio, min_channels, round_to) for g in groups}
        self.full = {g.id: g.size for g in groups}
        self.least = {g.id: self.options[g.id][0] for g in groups}
        least_params, least_flops = self.cost.costs(self.least)
        if least_params > self.targets[0] or least_flops > self.targets[1]:
            raise ConfigError(
                f"The budget cannot be met with max_ratio={max_ratio:g}: pruning every group that far keeps "
                f"{least_params / self.cost.params0:.3f} of the params and {least_flops / max(self.cost.flops0, 1):.3f} of the FLOPs."
            )
        self.features = self._static_features(analysis, cost)

    def _static_features(self, analysis: ChannelAnalysis, cost: ModelCost) -> np.ndarray:
        by_node = cost.by_node()
        rows = []
        group_params = [sum(by_node[n].params for n in g.source_names if n in by_node) for g in self.groups]
        group_flops = [sum(by_node[n].flops for n in g.source_names if n in by_node) for g in self.groups]
        for index, group in enumerate(self.groups):
            node = group.sources[0].node
            weight = group.sources[0].weight
            in_shape = analysis.shapes.get(node.inputs[0].name, ())
            spatial = list(in_shape[2:4]) + [1, 1]
            kernel = int(np.prod(weight.shape[2:])) if node.op in ("Conv", "ConvTranspose") else 1
            stride = int(max(node.attrs.get("strides", [1]))) if node.op in ("Conv", "ConvTranspose") else 1
            in_channels = int(in_shape[1]) if len(in_shape) > 1 else int(weight.shape[-1])
            rows.append([index, group.size, in_channels, spatial[0], spatial[1], stride, kernel, group_params[index],
                         sum(group_flops[index + 1:]), sum(group_params[index + 1:])])
        table = np.asarray(rows, dtype=np.float64)
        low, high = table.min(axis=0), table.max(axis=0)
        return ((table - low) / np.where(high > low, high - low, 1.0)).astype(np.float32)

    @property
    def state_dim(self) -> int:
        return self.features.shape[1] + 2

    def _within(self, counts: dict[str, int]) -> bool:
        params, flops = self.cost.costs(counts)
        return params <= self.targets[0] and flops <= self.targets[1]

    def _reaches(self, counts: dict[str, int]) -> bool:
        params, flops = self.cost.costs(counts)
        return params >= self.targets[0] or flops >= self.targets[1]

    def wall(self, index: int, chosen: dict[str, int]) -> tuple[int, int]:
        """``(lo, hi)`` kept counts allowed at step ``index`` given the earlier groups' counts."""
        gid = self.groups[index].id
        options = self.options[gid]
        low_rest = {**self.least, **chosen}
        high_rest = {**self.full, **chosen}
        # cost grows with n, so both bounds are found by bisection over the allowed counts
        within = bisect.bisect_left(options, True, key=lambda n: not self._within({**low_rest, gid: n}))
        hi = options[max(within - 1, 0)]
        reaches = bisect.bisect_left(options, True, key=lambda n: self._reaches({**high_rest, gid: n}))
        lo = options[min(reaches, len(options) - 1)]
        return min(lo, hi), hi

    def rollout(self, policy) -> Episode:  # noqa: ANN001 - policy(state, step) -> ratio in [0, 1]
        """Run one episode; ``policy`` maps a state and the step index to a pruning ratio."""
        episode = Episode()
        chosen: dict[str, int] = {}
        removed, previous = 0.0, 0.0
        for index, group in enumerate(self.groups):
            state = np.concatenate([self.features[index], np.float32([removed, previous])]).astype(np.float32)
            ratio = float(np.clip(policy(state, index), 0.0, 1.0))
            wanted = keep_count(group.size, math.floor(ratio * group.size), 1, 1)
            lo, hi = self.wall(index, chosen)
            options = self.options[group.id]
            allowed = [n for n in options if lo <= n <= hi] or [hi]
            kept = min(allowed, key=lambda n: (abs(n - wanted), n))
            chosen[group.id] = kept
            taken = (group.size - kept) / group.size
            episode.states.append(state)
            episode.actions.append(taken)
            removed = 1.0 - self.cost.costs({**self.full, **chosen})[0] / self.cost.params0
            previous = taken
        episode.counts = chosen
        episode.ratios = {gid: ratio_for(self.full[gid], n) for gid, n in chosen.items()}
        episode.params, episode.flops = self.cost.costs(chosen)
        return episode

    def next_states(self, episode: Episode) -> list[np.ndarray]:
        """The state after each step (the last one repeats: it is terminal)."""
        return [*episode.states[1:], episode.states[-1]]

    def one_channel(self, counts: dict[str, int], gid: str) -> tuple[int, int]:
        """What one more kept channel of group ``gid`` costs, params and FLOPs."""
        params, flops = self.cost.costs(counts)
        more = self.cost.costs({**counts, gid: min(counts[gid] + 1, self.full[gid])})
        return more[0] - params, more[1] - flops


def prunable_groups(analysis: ChannelAnalysis, selected) -> list[ChannelGroup]:  # noqa: ANN001
    """The groups the search acts on, in graph order (of their first source layer)."""
    order = {node.name: index for index, node in enumerate(analysis.graph.nodes)}
    chosen = [g for g in analysis.groups if g.prunable and selected(g)]
    return sorted(chosen, key=lambda g: min(order[n] for n in g.source_names))
