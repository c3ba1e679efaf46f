"""The svd pass: a constant weight of a MatMul, Gemm, Conv or recurrent layer becomes two low-rank
factors applied one after the other (CN 115456169 A step 2), so the file shrinks and inference
runs fewer multiply-accumulates. The maths lives in :mod:`onnxzip.svd`; this pass decides ranks
(plan) and rewrites the graph (apply).

A weight W (m×n) ≈ P·Q with P m×r, Q r×n (truncated SVD, Eckart–Young optimal) costs r·(m+n)
parameters instead of m·n, so a layer is only rewritten below the break-even rank
r < m·n/(m+n) unless ``allow_unprofitable`` (used to check that full rank is exact). The node
that produced the layer's output keeps its name, output tensor and bias; the factor applied
first is a new node named ``<node>/svd_in`` placed in the same (sub)graph, and the factors are
initializers ``<weight>_svd_in`` and ``<weight>_svd_out``:

* MatMul, X·W (X of any rank, e.g. [N, seq, m]): ``<node>/svd_in`` = X·P, then node = (X·P)·Q.
  W·X (weight on the left): ``<node>/svd_in`` = Q·X, then node = P·(Q·X).
* Gemm, Y = α·op(A)·op(B) + β·C: ``<node>/svd_in`` = Gemm(A, F₁; transA, transB, α = 1, no C),
  node = Gemm(·, F₂; transA = 0, transB, α, β, C) — the factors keep B's layout
  (:func:`onnxzip.svd.factorize_gemm`). Below opset 11, where C is required, the first Gemm
  gets a zero C with β = 0.
* Conv (2-D, group = 1): channel SVD, ``<node>/svd_in`` = Conv kh×kw (Cin → r) with the
  original strides/pads/dilations, node = Conv 1×1 (r → Cout) + bias; or spatial SVD,
  ``<node>/svd_in`` = Conv kh×1 (Cin → r), node = Conv 1×kw (r → Cout) + bias, pads and strides
  split per axis (:func:`onnxzip.svd.decompose_conv`). ``conv=auto`` picks per layer the scheme
  with the lower kernel error at the same parameter budget
  (:func:`onnxzip.svd.choose_conv_decomposition`). auto_pad VALID and SAME_* at stride 1 are
  turned into explicit pads; SAME_* at a larger stride depends on the input size and is skipped.
* LSTM / GRU / RNN input weights W (D, G·h, I) = W'·Q: ``<node>/svd_in`` = MatMul x·Qᵀ over
  the whole sequence (I → r, any ``layout``: the feature axis is last in both), and the node
  reads it with W' (D, G·h, r). R, B, sequence_lens and the initial states stay as they are.

A weight read by several nodes is factorized once and its factors shared, provided every
reader needs the same rewrite (e.g. all X·W MatMuls); otherwise it is skipped with a reason.
float16 weights are factorized in float32 and the factors written back as float16.

Ranks come from one rule: per layer an explicit ``rank`` (at most that rank), a parameter
``keep_ratio``, or ``energy`` (smallest r with Σ_{i≤r}σ² ≥ energy·Σσ²); or model-wide
``budget`` / ``flops_budget`` (the fraction of the eligible layers' parameters / FLOPs to keep),
spread over layers by :func:`onnxzip.svd.allocate_ranks` at the least added error.
``latency_budget`` plans by measured time instead (:mod:`onnxzip.measure.latency`): every layer's
dense form and factor pairs at fractions of its break-even rank (and those rounded to multiples
of 8; for a Conv under ``conv=auto`` both schemes) are timed in onnxruntime on one thread at the
layer's observed batch-1 input shape; ranks that save under ``MIN_GAIN`` of the layer's time or
run slower than a higher rank are rejected (the report lists them as ``ranks_not_faster``);
ranks are then chosen at the least relative spectral error per saved millisecond and the
factorized model timed against the original until it keeps at most that fraction of its time
(:func:`onnxzip.measure.latency.meet_budget`). A recurrent input weight is timed as the input projection
its op computes over the whole sequence.
``verify`` then checks the output cosine in onnxruntime on the context's inputs and relaxes the
rule a step at a time (budget + ``verify_step``, energy halfway to 1, rank × 2) until it meets
``min_cosine``. The plan maps each layer (its first node's name) to
``{"kind": matmul|gemm|channel|spatial|lstm_input, "rank": r or None (dense), "weight": name}``;
replaying an edited plan changes ranks. The report lists per layer the spectrum (leading
singular values, ranks for 90/99/99.9 % energy), the energy kept and relative error at the
chosen rank, and weight parameters and FLOPs (per sample) before and after — what a training
loop needs to lower ranks step by step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.core.compat import default_opset
from onnxzip.errors import ConfigError
from onnxzip.core.graph import NameScope, export_model, import_graph, walk_nodes
from onnxzip.measure.latency import (
    MIN_GAIN,
    Candidate,
    Factor,
    LayerForm,
    Timing,
    meet_budget,
    report_latency,
    useful_candidates,
)
from onnxzip.core.shapes import generated_feeds
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.core.report import LayerChange
from onnxzip.core.runtime import make_session, run_batched
from onnxzip.core.schema import option
from onnxzip.svd import (
    BudgetLayer,
    RankRule,
    Spectrum,
    allocate_ranks,
    break_even_rank,
    check_rank,
    choose_conv_decomposition,
    conv_flops_per_pixel,
    conv_matrix,
    conv_matrix_shape,
    decompose_conv,
    factorize_gemm,
    factorize_matmul,
    factorize_recurrent_input,
    is_profitable,
)
from onnxzip.measure.compare import cosine_similarity
from onnxzip.core.weights import Weight, constant_uses

log = logging.getLogger(__name__)

RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
FAMILY_KINDS = {
    "matmul": ("matmul",),
    "gemm": ("gemm",),
    "conv": ("channel", "spatial"),
    "lstm_input": ("lstm_input",),
}
FACTORIZED_DTYPES = frozenset({"float32", "float16"})
RULES = ("rank", "keep_ratio", "energy", "budget", "flops_budget", "latency_budget")
LATENCY_FRACTIONS = (0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05)  # of the break-even rank, timed per layer
DEFAULT_ENERGY = 0.95


@dataclass
class SvdConfig:
    energy: float | None = option(
        None, "per layer: smallest rank keeping this fraction of sum(sigma^2)",
        shown="0.95 when no other rank rule is given",
    )
    rank: int | None = option(None, "per layer: at most this rank")
    keep_ratio: float | None = option(
        None, "per layer: factors keep at most this fraction of the weight's parameters"
    )
    budget: float | None = option(
        None, "model-wide: keep this fraction of the eligible layers' parameters"
    )
    flops_budget: float | None = option(
        None, "model-wide: keep this fraction of the eligible layers' FLOPs"
    )
    latency_budget: float | None = option(
        None,
        "model-wide: keep at most this fraction of the model's measured batch-1 latency "
        "(onnxruntime, one thread); ranks that do not save time are rejected",
    )
    conv: Literal["auto", "channel", "spatial"] = option(
        "auto", "Conv decomposition: lower error at the same parameters (auto), or forced"
    )
    normalization: Literal["relative", "absolute"] = option(
        "relative", "budget error per layer: relative (sigma^2/sum) or absolute (sigma^2)"
    )
    include: list[str] = option(
        [], "node or weight name globs, or op types, to consider (empty: all)"
    )
    exclude: list[str] = option([], "node or weight name globs, or op types, to leave alone")
    min_size: int = option(4096, "factorize only weights with at least this many elements")
    allow_unprofitable: bool = option(
        False,
        "rewrite even at ranks >= break-even m*n/(m+n), or when the file would grow (exactness checks)",
    )
    verify: bool = option(
        False, "check the output cosine in onnxruntime and relax the rule until min_cosine holds"
    )
    min_cosine: float = option(
        0.99, "verify: the least cosine between original and factorized outputs"
    )
    verify_step: float = option(
        0.1, "verify: how much budget / flops_budget / keep_ratio rises per step"
    )
    verify_steps: int = option(5, "verify: at most this many relaxations")
    method: Literal["auto", "exact", "randomized"] = option(
        "auto", "SVD backend (auto: randomized for small ranks of large matrices)"
    )
    report_values: int = option(
        16, "leading singular values listed per layer in the report (0: all)"
    )

    def __post_init__(self) -> None:
        given = [name for name in RULES if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(RULES)}, not {' and '.join(given)}")
        if not given:
            self.energy = DEFAULT_ENERGY
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        for name in ("energy", "keep_ratio", "budget", "flops_budget", "latency_budget"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be at least 1, got {self.min_size}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie between -1 and 1, got {self.min_cosine}")
        if not 0.0 < self.verify_step <= 1.0:
            raise ValueError(f"verify_step must be in (0, 1], got {self.verify_step}")
        if self.verify_steps < 0 or self.report_values < 0:
            raise ValueError("verify_steps and report_values must not be negative")

    @property
    def rule(self) -> tuple[str, float]:
        """The rank rule in force, as (option name, value)."""
        name = next(name for name in RULES if getattr(self, name) is not None)
        return name, getattr(self, name)


@dataclass
class _Layer:
    """One weight and the nodes reading it; ``problem`` says why it cannot be factorized."""

    key: str
    weight: gs.Constant
    uses: list[tuple[gs.Node, gs.Graph]]
    family: str | None = None
    orientation: Any = None
    problem: str | None = None
    _spectra: dict[str, Spectrum] = field(default_factory=dict)

    @property
    def values(self) -> np.ndarray:
        """A writable copy (torch warns on read-only arrays; initializers load read-only)."""
        return np.array(self.weight.values)

    @property
    def ops(self) -> str:
        return "/".join(sorted({node.op for node, _ in self.uses}))

    @property
    def size(self) -> int:
        return int(np.prod(self.weight.shape, dtype=np.int64))

    def matrix(self, kind: str) -> np.ndarray:
        """The matrix ``kind`` factorizes: W, a conv rearrangement, or the stacked recurrent W."""
        values = self.values
        if kind in ("channel", "spatial"):
            return conv_matrix(values, kind)
        if kind == "lstm_input":
            return values.reshape(-1, values.shape[-1])
        return values

    def shape(self, kind: str) -> tuple[int, int]:
        if kind in ("channel", "spatial"):
            return conv_matrix_shape(tuple(self.weight.shape), kind)
        if kind == "lstm_input":
            directions, rows, inputs = self.weight.shape
            return directions * rows, inputs
        return tuple(self.weight.shape)

    def spectrum(self, kind: str) -> Spectrum:
        if kind not in self._spectra:
            self._spectra[kind] = Spectrum.of(self.matrix(kind))
        return self._spectra[kind]

    def names(self) -> list[str]:
        return [self.weight.name, *(node.name for node, _ in self.uses)]


@register_pass
class SvdPass(Pass):
    name = "svd"
    config_class = SvdConfig
    summary = "Low-rank factorization: MatMul/Gemm/Conv weights and LSTM/GRU/RNN input weights → two rank-r factors."
    shorthand = "energy"

    def applies_to(self, weight: Weight) -> bool:
        slots = {
            "MatMul": (0, 1),
            "Gemm": (1,),
            "Conv": (1,),
            **dict.fromkeys(RECURRENT_GATES, (1,)),
        }
        return (
            weight.dtype in FACTORIZED_DTYPES
            and not weight.quantized
            and weight.size >= self.config.min_size
            and bool(weight.uses)
            and all(use.input_index in slots.get(use.op_type, ()) for use in weight.uses)
        )

    # ---------------------------------------------------------------- plan

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        layers = [
            layer for layer in _find_layers(import_graph(model)) if self._skip_reason(layer) is None
        ]
        positions = self._positions(model, context, layers)
        rule, value = self.config.rule
        latency = _LatencyPlanning(model, context) if rule == "latency_budget" else None
        layers_plan = self._decide(layers, positions, rule, value, context.track, latency)
        if not self.config.verify:
            plan = Plan(self.name, self.config_dict(), layers_plan)
        else:
            plan, notes = self._verified(model, context, layers, positions, rule, value, layers_plan, latency)
            plan.found["verify_notes"] = notes
        if latency is not None:
            plan.found["latency_notes"] = latency.notes
            plan.found["latency_ms"] = latency.measured
        return plan

    def _decide(
        self,
        layers: list[_Layer],
        positions: dict[str, tuple[float, int]],
        rule: str,
        value: float,
        track: Any = lambda items, desc: items,
        latency: _LatencyPlanning | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Plan entries of ``layers`` under ``rule`` = ``value`` (``latency``: the model and
        context a ``latency_budget`` times, and what the timing found)."""
        if rule == "latency_budget":
            assert latency is not None
            return self._latency_entries(layers, value, latency, track)
        entries, conv_ranks = {}, {}
        for layer in track(layers, "svd: spectra"):
            kind, conv_ranks[layer.key] = self._kind(layer, rule, value)
            entries[layer.key] = self._entry(layer, kind)
        if rule in ("budget", "flops_budget"):
            budget_layers = {}
            for layer in layers:
                kind = entries[layer.key]["kind"]
                cost = _budget_layer(layer, kind, positions.get(layer.key, (0.0, 0))[0], rule)
                if cost is None:
                    entries[layer.key]["reason"] = (
                        "FLOPs unknown (shapes not observed); left out of the flops budget"
                    )
                else:
                    budget_layers[layer.key] = cost
            dense = sum(cost.dense_cost for cost in budget_layers.values())
            try:
                ranks = allocate_ranks(
                    budget_layers, value * dense, normalization=self.config.normalization
                )
            except ConfigError:
                floor = sum(
                    c.rank_cost for c in budget_layers.values() if c.rank_cost < c.dense_cost
                )
                floor += sum(
                    c.dense_cost for c in budget_layers.values() if c.rank_cost >= c.dense_cost
                )
                raise ConfigError(
                    f"svd {rule} {value:g} is below the smallest reachable fraction "
                    f"{floor / dense:.3g} (rank 1 everywhere)."
                ) from None
            for key, rank in ranks.items():
                entries[key]["rank"] = rank
                if rank is None:
                    entries[key]["reason"] = f"kept dense by the {rule} allocation"
            return entries
        for layer in layers:
            entry = entries[layer.key]
            m, n = layer.shape(entry["kind"])
            if conv_ranks[layer.key] is not None:
                entry["rank"] = conv_ranks[layer.key]
            elif rule == "rank":
                entry["rank"] = min(int(value), m, n)
            elif rule == "keep_ratio":
                entry["rank"] = RankRule(keep_ratio=value).resolve((m, n))
            else:
                entry["rank"] = layer.spectrum(entry["kind"]).rank_for_energy(value)
        return entries

    def _latency_entries(
        self, layers: list[_Layer], value: float, state: _LatencyPlanning,
        track: Any = lambda items, desc: items,
    ) -> dict[str, dict[str, Any]]:
        """Plan entries meeting ``latency_budget`` = ``value``: time every layer's candidate
        ranks (:mod:`onnxzip.measure.latency`), reject those that do not save time, choose ranks at the
        least added error per saved millisecond, then apply, time the model and rescale the
        saving asked by what the model showed (:func:`onnxzip.measure.latency.meet_budget`)."""
        model, context = state.model, state.context
        timing = context.timer()
        shapes = context.shapes(model)
        if state.original_ms is None:
            state.original_ms = timing.model(model)
        original = state.original_ms
        entries: dict[str, dict[str, Any]] = {}
        options: dict[str, tuple[float, list[Candidate]]] = {}
        for layer in track(layers, "svd: timing ranks"):
            entry = entries[layer.key] = self._entry(layer, FAMILY_KINDS[layer.family][0])
            timed = self._timed_candidates(layer, shapes, timing)
            if isinstance(timed, str):
                entry["reason"] = timed
                continue
            dense_ms, kept, slower = timed
            entry["latency_ms"] = [round(dense_ms, 4), round(dense_ms, 4)]
            if slower:
                entry["not_faster"] = slower
            if not kept:
                entry["reason"] = (
                    f"no rank saves {MIN_GAIN:.0%} of the layer's {dense_ms:.3g} ms; kept dense"
                )
                continue
            options[layer.key] = (dense_ms, kept)

        def build(chosen: dict[str, Candidate | None]) -> onnx.ModelProto:
            _fill_latency(entries, chosen, options)
            return self._apply(model, Plan(self.name, self.config_dict(), entries), context, trial=True).model

        outcome = meet_budget(options, value, model, original, build, timing)
        _fill_latency(entries, outcome.chosen, options)
        state.notes = list(outcome.notes)
        state.measured = (outcome.before_ms, outcome.after_ms)
        if not outcome.reached:
            message = (
                f"svd latency_budget {value:g} not reached: measured {outcome.after_ms:.3g} ms of "
                f"{outcome.before_ms:.3g} ms ({outcome.after_ms / outcome.before_ms:.2f}); "
                "no choice of the ranks that save time measured faster"
            )
            state.notes.append(message)
            log.warning("%s", message)
        return entries

    def _timed_candidates(
        self, layer: _Layer, shapes: dict[str, tuple[int, ...]], timing: Timing
    ) -> tuple[float, list[Candidate], list[int]] | str:
        """The layer's original time (all its nodes), its useful (kind, rank) candidates and
        the ranks rejected as not faster than the original; or why it cannot be timed."""
        inputs = []
        for node, _owner in layer.uses:
            activation = node.inputs[1 - _weight_slot(node)] if node.op == "MatMul" else node.inputs[0]
            shape = shapes.get(activation.name)
            if shape is None or not shape:
                return "input shape not observed at batch 1; not timed, kept dense"
            inputs.append((node, tuple(shape)))
        dense = sum(timing.layer(_layer_form(layer, node, shape)) for node, shape in inputs)
        kinds = FAMILY_KINDS[layer.family]
        if layer.family == "conv" and self.config.conv != "auto":
            kinds = (self.config.conv,)
        candidates = []
        for kind in kinds:
            m, n = layer.shape(kind)
            costs = BudgetLayer.of(layer.spectrum(kind))
            for rank in _latency_ranks(m, n, layer.spectrum(kind).full_rank, self.config.allow_unprofitable):
                ms = sum(
                    timing.layer(_layer_form(layer, node, shape, kind, rank)) for node, shape in inputs
                )
                error = costs.error(rank, self.config.normalization)
                candidates.append(Candidate((kind, rank), ms, error))
        kept, rejected = useful_candidates(dense, candidates)
        limit = dense * (1.0 - MIN_GAIN)
        slower = sorted({c.choice[1] for c in rejected if c.ms >= limit})
        return dense, kept, slower

    def _entry(self, layer: _Layer, kind: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": kind, "rank": None, "weight": layer.weight.name}
        if len(layer.uses) > 1:
            entry["nodes"] = [node.name for node, _ in layer.uses]
        return entry

    def _kind(self, layer: _Layer, rule: str, value: float) -> tuple[str, int | None]:
        """The decomposition of ``layer``: its family's, or for a Conv the forced kind or the
        scheme with the lower kernel error at the parameter budget the rule gives (the channel
        rank of a ``rank`` or ``energy`` rule sets it). A ``rank`` rule's Conv also gets the
        rank its scheme affords at that budget; otherwise the rank is None (decided later)."""
        if layer.family != "conv":
            return layer.family, None
        if self.config.conv != "auto":
            return self.config.conv, None
        values = layer.values.astype(np.float32)
        strides = _conv_geometry(layer.uses[0][0], tuple(layer.weight.shape))[0]
        if rule in ("keep_ratio", "budget", "flops_budget"):
            choice = choose_conv_decomposition(values, keep_ratio=value, strides=strides)
        else:
            m, n = layer.shape("channel")
            rank = (
                min(int(value), m, n)
                if rule == "rank"
                else layer.spectrum("channel").rank_for_energy(value)
            )
            choice = choose_conv_decomposition(values, param_budget=rank * (m + n), strides=strides)
        if choice is None:  # neither scheme pays at this budget: apply reports the break-even
            return "channel", None
        return choice.kind, choice.rank if rule == "rank" else None

    def _positions(
        self, model: onnx.ModelProto, context: PassContext, layers: list[_Layer]
    ) -> dict[str, tuple[float, int]]:
        """Per layer: the rows (tokens, output pixels, time steps) its weight multiplies per
        sample, summed over its nodes, and those nodes' dense FLOPs, from
        :meth:`PassContext.cost`; (0, 0) when a node's FLOPs are unknown."""
        flops = {cost.name: cost.flops for cost in context.cost(model).nodes}
        found = {}
        for layer in layers:
            rows, total = 0.0, 0
            for node, _owner in layer.uses:
                per_row = _dense_flops_per_row(node, tuple(layer.weight.shape))
                if not flops.get(node.name) or not per_row:
                    rows, total = 0.0, 0
                    break
                rows += flops[node.name] / per_row
                total += flops[node.name]
            found[layer.key] = (rows, total)
        return found

    def _verified(
        self,
        model: onnx.ModelProto,
        context: PassContext,
        layers: list[_Layer],
        positions: dict[str, tuple[float, int]],
        rule: str,
        value: float,
        entries: dict[str, dict[str, Any]],
        latency: _LatencyPlanning | None = None,
    ) -> tuple[Plan, list[str]]:
        """Relax the rule until the factorized model's outputs keep ``min_cosine`` on the
        context's inputs (random ones when there are none); returns the plan and the steps."""
        feeds = context.feeds or generated_feeds(
            model, batch=2, dims=context.dims, seed=context.seed
        )[0]
        reference = run_batched(make_session(model, context.device), feeds)
        notes = []
        for step in range(self.config.verify_steps + 1):
            plan = Plan(self.name, self.config_dict(), entries)
            candidate = self._apply(model, plan, context, trial=True).model
            outputs = run_batched(make_session(candidate, context.device), feeds)
            cosine = min(cosine_similarity(outputs[k], reference[k]) for k in reference)
            passed = cosine >= self.config.min_cosine
            notes.append(
                f"verify: {rule}={value:g} gives output cosine {cosine:.6f} "
                f"({'>=' if passed else '<'} {self.config.min_cosine:g})"
            )
            relaxed = _relax(rule, value, self.config.verify_step)
            if passed or relaxed == value or step == self.config.verify_steps:
                break
            value = relaxed
            entries = self._decide(layers, positions, rule, value, latency=latency)
        if not passed:
            notes.append(
                f"verify: min_cosine {self.config.min_cosine:g} not reached; kept {rule}={value:g}"
            )
        return plan, notes

    # ---------------------------------------------------------------- apply

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        return self._apply(model, plan, context)

    def _apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext, trial: bool = False) -> PassResult:
        """``apply``; a ``trial`` (a model built while planning, to be measured) skips the
        before/after latency the final report gives."""
        graph = import_graph(model)
        layers = _find_layers(graph)
        names = NameScope(graph)
        opset = default_opset(model)
        report = self.new_report()
        positions = self._positions(
            model, context, [layer for layer in layers if layer.problem is None]
        )
        for layer in context.track(layers, "svd: factorizing"):
            entry = plan.layers.get(layer.key)
            reason = self._skip_reason(layer, planned=entry is not None)
            if reason is None and entry is None:
                reason = "not in the plan"
            if reason is not None:
                report.skip(
                    layer.key, layer.ops, reason, params_before=layer.size, params_after=layer.size
                )
                continue
            kind, rank = _planned(layer, entry)
            details = self._details(layer, kind, rank, positions.get(layer.key, (0.0, 0)))
            if "latency_ms" in entry:
                before_ms, after_ms = entry["latency_ms"]
                details["latency_ms"] = {
                    "before": before_ms, "after": after_ms, "saved": round(before_ms - after_ms, 4)
                }
            if entry.get("not_faster"):
                details["ranks_not_faster"] = entry["not_faster"]
            flops_before = details.pop("flops_before")
            if rank is None or (
                not self.config.allow_unprofitable and not is_profitable(*layer.shape(kind), rank)
            ):
                reason = entry.get("reason") or (
                    f"rank {rank} ≥ break-even {details['break_even_rank']:.4g}"
                    if rank is not None
                    else "kept dense by the plan"
                )
                details.pop("flops_after")
                report.changes.append(
                    LayerChange(
                        layer.key,
                        layer.ops,
                        "skipped",
                        reason,
                        params_before=layer.size,
                        params_after=layer.size,
                        flops_before=flops_before,
                        flops_after=flops_before,
                        details=details,
                    )
                )
                continue
            _rewrite(layer, kind, rank, names, opset, self.config.method)
            report.changes.append(
                LayerChange(
                    layer.key,
                    layer.ops,
                    f"{kind} rank {rank}",
                    params_before=layer.size,
                    params_after=details["params_after"],
                    flops_before=flops_before,
                    flops_after=details.pop("flops_after"),
                    details=details,
                )
            )
            report.modified = True
        report.notes.extend(plan.found.get("verify_notes", []))
        for key in sorted(set(plan.layers) - {layer.key for layer in layers}):
            report.notes.append(
                f"plan entry '{key}' matches no factorizable layer of the model; ignored"
            )
        graph.toposort(recurse_subgraphs=True)
        result = PassResult(export_model(graph, model), report, plan)
        if self.config.latency_budget is not None and not trial:
            report.notes.extend(plan.found.get("latency_notes", []))
            report_latency(report, model, result.model, context.timer, self.config.latency_budget,
                           plan.found.get("latency_ms"))
        return result

    def _skip_reason(self, layer: _Layer, *, planned: bool = False) -> str | None:
        """Why ``layer`` stays dense (None: eligible). A layer named in a replayed plan bypasses
        the size and include/exclude filters, never the checks that make a rewrite correct."""
        if layer.problem is not None:
            return layer.problem
        dtype = str(np.asarray(layer.weight.values).dtype)
        if dtype not in FACTORIZED_DTYPES:
            return f"{dtype} weight (float32 and float16 weights are factorized)"
        if layer.size == 0:
            return "empty weight"
        if planned:
            return None
        if layer.size < self.config.min_size:
            return f"{layer.size} elements < min_size {self.config.min_size}"
        targets = [(layer.weight.name, node.op) for node, _ in layer.uses] + [
            (node.name, node.op) for node, _ in layer.uses
        ]
        included = not self.config.include or any(
            matches(name, op, self.config.include, []) for name, op in targets
        )
        if not included or any(
            not matches(name, op, [], self.config.exclude) for name, op in targets
        ):
            return "not selected by include/exclude"
        return None

    def _details(
        self, layer: _Layer, kind: str, rank: int | None, positions: tuple[float, int]
    ) -> dict[str, Any]:
        m, n = layer.shape(kind)
        spectrum = layer.spectrum(kind)
        summary = spectrum.summary(self.config.report_values or spectrum.full_rank)
        details: dict[str, Any] = {
            "weight": layer.weight.name,
            "kind": kind,
            "rank": rank,
            "matrix_shape": [m, n],
            "break_even_rank": break_even_rank(m, n),
            "spectrum": summary,
        }
        if len(layer.uses) > 1:
            details["nodes"] = [node.name for node, _ in layer.uses]
        rows, flops_before = positions
        details["flops_before"] = flops_before
        details["flops_after"] = flops_before
        if rank is None:
            details["params_after"] = layer.size
            return details
        details["energy_kept"] = spectrum.energy_kept(rank)
        details["rel_error"] = spectrum.tail(rank)
        details["params_after"] = rank * (m + n)
        if kind == "spatial":
            strides = _conv_geometry(layer.uses[0][0], tuple(layer.weight.shape))[0]
            per_position = conv_flops_per_pixel(tuple(layer.weight.shape), kind, rank, strides)
        else:
            per_position = 2 * rank * (m + n)
        if flops_before:  # the dense share of the nodes' FLOPs is 2·m·n per row
            details["flops_after"] = flops_before + round(rows * (per_position - 2 * m * n))
        return details


@dataclass
class _LatencyPlanning:
    """One ``latency_budget`` planning: the model and context it times, and what it found
    (the notes and the measured model times before/after) for the plan's ``found``."""

    model: onnx.ModelProto
    context: PassContext
    original_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    measured: tuple[float, float] | None = None


def _fill_latency(
    entries: dict[str, dict[str, Any]],
    chosen: dict[str, Candidate | None],
    options: dict[str, tuple[float, list[Candidate]]],
) -> None:
    """Write the chosen (kind, rank) of every timed layer into its plan entry."""
    for key, candidate in chosen.items():
        entry = entries[key]
        dense_ms = options[key][0]
        if candidate is None:
            entry["rank"] = None
            entry["latency_ms"] = [round(dense_ms, 4), round(dense_ms, 4)]
            entry["reason"] = "kept dense by the latency allocation"
        else:
            entry["kind"], entry["rank"] = candidate.choice
            entry["latency_ms"] = [round(dense_ms, 4), round(candidate.ms, 4)]
            entry.pop("reason", None)


def _latency_ranks(m: int, n: int, full_rank: int, allow_unprofitable: bool) -> list[int]:
    """Ranks timed per layer: fractions of the largest profitable rank, each also rounded to a
    multiple of 8 (sizes the GEMM kernels often run faster at)."""
    largest = full_rank if allow_unprofitable else min(full_rank, math.ceil(break_even_rank(m, n)) - 1)
    ranks = set()
    for fraction in LATENCY_FRACTIONS:
        rank = max(1, round(largest * fraction))
        ranks.add(rank)
        if rank >= 16:
            ranks.add(min(largest, 8 * round(rank / 8)))
    return sorted(r for r in ranks if 1 <= r <= largest)


def _layer_form(
    layer: _Layer, node: gs.Node, shape: tuple[int, ...], kind: str | None = None, rank: int | None = None
) -> LayerForm:
    """``node`` of ``layer`` as a timed :class:`LayerForm`: dense (``rank`` None) or its factor
    pair. A recurrent input weight is timed as the input projection the op computes for the
    whole sequence (a MatMul to D·G·h, or through rank r)."""
    weight = tuple(int(d) for d in layer.weight.shape)
    if layer.family == "conv":
        strides, pads, dilations = _conv_geometry(node, weight)
        if rank is None:
            return LayerForm("Conv", shape, (Factor(weight, strides, pads, dilations),))
        cout, cin, kh, kw = weight
        (sh, sw), (top, left, bottom, right), (dh, dw) = strides, pads, dilations
        if kind == "channel":
            factors = (
                Factor((rank, cin, kh, kw), strides, pads, dilations),
                Factor((cout, rank, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
            )
        else:
            factors = (
                Factor((rank, cin, kh, 1), (sh, 1), (top, 0, bottom, 0), (dh, 1)),
                Factor((cout, rank, 1, kw), (1, sw), (0, left, 0, right), (1, dw)),
            )
        return LayerForm("Conv", shape, factors)
    if layer.family == "gemm":
        rows, inner = shape[::-1] if int(node.attrs.get("transA", 0)) else shape
        k, n = weight[::-1] if layer.orientation else weight
        chain = ((k, n),) if rank is None else ((k, rank), (rank, n))
        return LayerForm("Gemm", (rows, inner), tuple(Factor(s) for s in chain))
    if layer.family == "lstm_input":
        directions, rows, inputs = weight
        k, n = inputs, directions * rows
        chain = ((k, n),) if rank is None else ((k, rank), (rank, n))
        return LayerForm("MatMul", shape, tuple(Factor(s) for s in chain))
    m, n = weight
    if layer.orientation == "left":  # W·X: Q (r×n) first, then P (m×r)
        chain = ((m, n),) if rank is None else ((rank, n), (m, rank))
        return LayerForm("MatMul", shape, tuple(Factor(s) for s in chain), weight_on_left=True)
    chain = ((m, n),) if rank is None else ((m, rank), (rank, n))
    return LayerForm("MatMul", shape, tuple(Factor(s) for s in chain))


def _relax(rule: str, value: float, step: float) -> float:
    """One verify step toward the dense model."""
    if rule == "energy":
        return 1.0 - (1.0 - value) / 2 if value < 1.0 - 1e-6 else value
    if rule == "rank":
        return value * 2
    return min(1.0, value + step)


def _planned(layer: _Layer, entry: dict[str, Any]) -> tuple[str, int | None]:
    """Kind and rank of a plan entry (rank None: stay dense), checked against the layer."""
    kinds = FAMILY_KINDS[layer.family]
    kind = entry.get("kind", kinds[0])
    if kind not in kinds:
        raise ConfigError(
            f"Plan entry '{layer.key}': kind {kind!r} does not fit a {layer.ops} layer; use {' or '.join(kinds)}."
        )
    rank = entry.get("rank")
    if rank is None:
        return kind, None
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    try:
        return kind, check_rank(*layer.shape(kind), rank)
    except ConfigError as exc:
        raise ConfigError(f"Plan entry '{layer.key}': {exc}") from None


def _budget_layer(layer: _Layer, kind: str, positions: float, rule: str) -> BudgetLayer | None:
    """The allocator's view of ``layer``: parameters, or multiply-accumulates per sample."""
    spectrum = layer.spectrum(kind)
    if rule == "budget":
        return BudgetLayer.of(spectrum)
    if not positions:
        return None
    if kind != "spatial":
        return BudgetLayer.of(spectrum, positions)
    shape = tuple(layer.weight.shape)
    strides = _conv_geometry(layer.uses[0][0], shape)[0]
    return BudgetLayer(
        spectrum=spectrum,
        rank_cost=positions * conv_flops_per_pixel(shape, "spatial", 1, strides) / 2,
        dense_cost=positions * conv_flops_per_pixel(shape, None) / 2,
    )


def _dense_flops_per_row(node: gs.Node, shape: tuple[int, ...]) -> int:
    """The node's FLOPs per row its weight multiplies (a token, an output pixel, a time step)."""
    if node.op in RECURRENT_GATES:
        directions, rows, inputs = shape
        hidden = int(node.attrs.get("hidden_size", rows // RECURRENT_GATES[node.op]))
        return 2 * directions * rows * (inputs + hidden)
    return 2 * int(np.prod(shape, dtype=np.int64))


# -------------------------------------------------------------------- discovery


def _weight_slot(node: gs.Node) -> int | None:
    """The input holding the constant weight this pass would factorize, if any."""
    if (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    constant = [i for i in (0, 1) if isinstance(node.inputs[i], gs.Constant)]
    if node.op == "MatMul":
        return constant[0] if len(constant) == 1 else None
    if node.op == "Gemm":
        return {(1,): 1, (0,): 0}.get(tuple(constant))
    if node.op == "Conv" or node.op in RECURRENT_GATES:
        return 1 if 1 in constant else None
    return None


def _find_layers(graph: gs.Graph) -> list[_Layer]:
    """Every weight in a factorizable position, with all its readers and what keeps it dense."""
    uses = constant_uses(graph)
    layers: dict[str, _Layer] = {}
    keys: set[str] = set()
    for node, owner, _path in walk_nodes(graph):
        slot = _weight_slot(node)
        if slot is None or node.inputs[slot].name in layers:
            continue
        weight = node.inputs[slot]
        key = node.name if node.name and node.name not in keys else weight.name
        keys.add(key)
        if weight.name not in uses or uses[weight.name][0] is not weight:
            layers[weight.name] = _Layer(
                key,
                weight,
                [(node, owner)],
                problem="initializer name shadowed in a subgraph, or also a graph output",
            )
            continue
        layer = _Layer(key, weight, uses[weight.name][1])
        _classify(layer)
        layers[weight.name] = layer
    return list(layers.values())


def _classify(layer: _Layer) -> None:
    """Set the layer's family and orientation from its readers, or the problem that blocks it."""
    signatures = []
    for node, _owner in layer.uses:
        use = _use_of(node, layer.weight)
        if isinstance(use, str):
            layer.problem = use
            return
        signatures.append(use)
    if len(set(signatures)) > 1:
        described = sorted({f"{family} ({orientation})" for family, orientation in signatures})
        layer.problem = f"shared by nodes needing different rewrites: {', '.join(described)}"
        return
    layer.family, layer.orientation = signatures[0]


def _use_of(node: gs.Node, weight: gs.Constant) -> tuple[str, Any] | str:
    """How ``node`` reads ``weight``: (family, orientation), or why it cannot be factorized."""
    slots = [i for i, tensor in enumerate(node.inputs) if tensor is weight]
    op, ndim = node.op, len(weight.shape)
    if slots != [_weight_slot(node)]:
        return f"also read by {op} '{node.name}' as input {', '.join(map(str, slots))}"
    if op == "MatMul":
        if ndim != 2:
            return f"{ndim}-D MatMul weight (only 2-D weights are factorized)"
        return "matmul", "left" if slots == [0] else "right"
    if op == "Gemm":
        if slots == [0]:
            return "constant A operand of Gemm (only a constant B is factorized)"
        return "gemm", int(node.attrs.get("transB", 0))
    if op == "Conv":
        if ndim != 4:
            return f"{ndim - 2}-D convolution (only 2-D convolutions are factorized)"
        if int(node.attrs.get("group", 1)) != 1:
            return f"grouped convolution (group={int(node.attrs['group'])})"
        geometry = _conv_geometry(node, tuple(weight.shape))
        return geometry if isinstance(geometry, str) else ("conv", None)
    if ndim != 3:
        return f"{op} input weight of shape {list(weight.shape)} (expected 3-D)"
    return "lstm_input", None


def _conv_geometry(
    node: gs.Node, shape: tuple[int, ...]
) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]] | str:
    """(strides, pads, dilations) of a 2-D Conv with explicit pads, or why there are none."""
    strides = tuple(int(s) for s in node.attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in node.attrs.get("dilations", (1, 1)))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", ""):
        pads = tuple(int(p) for p in node.attrs.get("pads", (0, 0, 0, 0)))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif strides != (1, 1):
        return f"auto_pad {auto_pad} with strides {list(strides)} depends on the input size; export with explicit pads"
    else:  # stride 1: total padding d·(k−1) per axis, the odd one at the end (UPPER) or start
        totals = [d * (k - 1) for d, k in zip(dilations, shape[2:])]
        first = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = (*first, *(t - f for t, f in zip(totals, first)))
    return strides, pads, dilations


# -------------------------------------------------------------------- rewrite


def _rewrite(
    layer: _Layer, kind: str, rank: int, names: NameScope, opset: int, method: str
) -> None:
    """Replace ``layer``'s weight by rank-``rank`` factors in every node reading it."""
    values = layer.values
    weight_name = layer.weight.name

    def constant(suffix: str, array: np.ndarray) -> gs.Constant:
        return gs.Constant(
            names.fresh(f"{weight_name}_{suffix}"), np.ascontiguousarray(array.astype(values.dtype))
        )

    if kind in ("channel", "spatial"):
        decompositions: dict[Any, tuple[Any, Any]] = {}
        shared: list[gs.Constant] = []
        for node, owner in layer.uses:
            geometry = _conv_geometry(node, tuple(layer.weight.shape))
            if geometry not in decompositions:
                strides, pads, dilations = geometry
                decompositions[geometry] = decompose_conv(
                    values,
                    kind,
                    rank,
                    strides=strides,
                    pads=pads,
                    dilations=dilations,
                    method=method,
                )
            first, second = decompositions[geometry]
            if not shared:
                shared = [constant("svd_in", first.weight), constant("svd_out", second.weight)]
            hidden = _insert_before(
                owner, node, names, "Conv", [node.inputs[0], shared[0]], _conv_attrs(first)
            )
            node.inputs[0], node.inputs[1] = hidden, shared[1]
            node.attrs = {
                **{k: v for k, v in node.attrs.items() if k != "auto_pad"},
                **_conv_attrs(second),
            }
        return
    if kind == "matmul":
        first, second = factorize_matmul(
            values, rank, weight_on_left=layer.orientation == "left", method=method
        )
    elif kind == "gemm":
        first, second = factorize_gemm(values, rank, trans_b=bool(layer.orientation), method=method)
    else:
        projection, new_weight = factorize_recurrent_input(values, rank, method=method)
        first, second = projection.T, new_weight  # x·Qᵀ: the MatMul constant is Qᵀ (I×r)
    first_constant, second_constant = constant("svd_in", first), constant("svd_out", second)
    for node, owner in layer.uses:
        slot = _weight_slot(node)
        if kind == "matmul":
            activation = node.inputs[1 - slot]
            inputs = [first_constant, activation] if slot == 0 else [activation, first_constant]
            hidden = _insert_before(owner, node, names, "MatMul", inputs, {})
            node.inputs[1 - slot], node.inputs[slot] = hidden, second_constant
        elif kind == "gemm":
            attrs = {
                "transA": int(node.attrs.get("transA", 0)),
                "transB": int(node.attrs.get("transB", 0)),
                "alpha": 1.0,
            }
            inputs = [node.inputs[0], first_constant]
            if opset < 11:  # Gemm-7..10 requires C
                attrs["beta"] = 0.0
                inputs.append(
                    gs.Constant(names.fresh(f"{weight_name}_svd_zero"), np.zeros(1, values.dtype))
                )
            hidden = _insert_before(owner, node, names, "Gemm", inputs, attrs)
            node.inputs[0], node.inputs[1] = hidden, second_constant
            node.attrs["transA"] = 0
        else:
            hidden = _insert_before(
                owner, node, names, "MatMul", [node.inputs[0], first_constant], {}
            )
            node.inputs[0], node.inputs[1] = hidden, second_constant


def _conv_attrs(factor: Any) -> dict[str, Any]:
    return {
        "group": 1,
        "kernel_shape": [int(k) for k in factor.weight.shape[2:]],
        "strides": list(factor.strides),
        "pads": list(factor.pads),
        "dilations": list(factor.dilations),
    }


def _insert_before(
    graph: gs.Graph,
    node: gs.Node,
    names: NameScope,
    op: str,
    inputs: list[gs.Tensor],
    attrs: dict[str, Any],
) -> gs.Variable:
    """Add ``<node>/svd_in`` (``op`` on ``inputs``) to ``graph`` right before ``node``; returns
    its untyped output."""
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    output = gs.Variable(names.fresh(f"{base}/svd_in_output"))
    new = gs.Node(op, names.fresh(f"{base}/svd_in"), attrs, inputs, [output])
    index = next(i for i, candidate in enumerate(graph.nodes) if candidate is node)
    graph.nodes.insert(index, new)
    return output
