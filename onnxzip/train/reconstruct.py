"""The ``reconstruct`` pipeline step: layer-wise reconstruction of codebook weights from
calibration activations, without gradients (``--reconstruct``, recipe ``- reconstruct: {...}``,
``compress(..., reconstruct={...})``). It runs on every graph onnxruntime runs: weights inside
``If`` branches the data always takes, LSTM/GRU/RNN weights, Constant-node files.

For every weight the cluster pass stored as codebook + indices, in graph order: the original
model and the current compressed model run on the calibration data in onnxruntime, and each
use's input rows are summed into H = Σ x̃x̃ᵀ and C = Σ x̃xᵀ (x̃: the compressed model's own input
to the layer, x: the original's; MatMul/Gemm rows, Conv im2col patches at random positions,
LSTM/GRU/RNN inputs for W and the states h_{t−1} for R). The layer problem

    min  Σ ‖Q x̃ − W x‖² + λ‖Q − W‖²,   Q = codebook[indices], W the original weight,

is solved by :func:`onnxzip.cluster.gptq.fit_codebook` (maths there): closed-form centroids for
fixed indices (normal equations of size K), alternating with GPTQ assignment under the full H
with error feedback through H⁻¹. Because x̃ comes from the compressed model, the error the earlier
layers left is compensated: weights are fitted in graph order, both models re-run before each
(``stages`` groups them: fewer runs, but a group's later layers then compensate errors its earlier
layers no longer have, which measured far worse on nsnet2: 3.4 dB drop at 2 stages vs 0.02 at one
per weight). Each run's probe outputs only the tensors that stage needs. The mean output
shift Q μ̃ − W μ is then subtracted from the layer's bias where it has one of its own (a raw
bias, or a bias codebook refit to the shifted values).

Float layers the other passes leave are refit the same way, one stage each, in the same graph
order (maths in :mod:`onnxzip.svd.whiten`):

* an SVD factor pair (the svd pass's first factor ``<node>/svd_in`` feeding the node that keeps
  the layer's name and output; MatMul, Gemm, channel-SVD Conv, LSTM/GRU/RNN input factors):
  the original layer is the node with the same output tensor; H and C come from the pair's
  input, and A, B are replaced at the same rank by the truncation of the least-squares target
  W* = (W Cᵀ + λW) H_λ⁻¹ whitened by a Cholesky factor of H_λ (SVD-LLM / ASVD style), then B is
  refit by least squares on its own input A x̃. A spatial Conv pair (kh×1 → 1×kw) has no single
  matrix product; only its second factor is refit, on its own input rows.
* a MatMul/Gemm/Conv whose input is narrower than its original's (a consumer of pruned
  channels; the original found by output tensor, else by node name, since the pruned MatMul's
  compensation Add takes over its output): W' = (W Cᵀ + λW'₀) H_λ⁻¹ with C = Σ x̃xᵀ of the pruned
  input x̃ and the original input x (Conv: im2col patches); output channels that were pruned too
  are matched to the original's rows by their values.

With a bias of its own the layer is also fitted with an intercept (centred H and C) that goes
into that bias, which also replaces the prune pass's compensation. The candidate (with or
without intercept, truncation with or without the second-factor refit) of lowest held-back
error is kept if it is lower than the layer's as it was.

K, the index width and the shapes do not change: the file size stays the same. A share
``holdout`` of the runs of samples is held back from the statistics, and each layer's relative
output error ‖Q x̃ − W x‖² / ‖W x‖² is scored before and after on up to 4096 of their rows; a
layer whose held-back error would grow is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.cluster.gptq import DAMP
from onnxzip.errors import ConfigError
from onnxzip.core.inputs import fixed_batch
from onnxzip.core.graph import constant_value, export_model, import_graph, walk_nodes
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.passes.cluster import refit_codebook
from onnxzip.passes.cluster_decode import Codebook, DecodedWeight, find_decodes
from onnxzip.passes.cluster_int8 import find_int8_decodes
from onnxzip.pruning.surgery import RESTORE_DAMPS, RESTORE_SUFFIX, ridge_intercept
from onnxzip.passes.cluster_calibration import (
    ActivationProbe,
    LayerSite,
    LayerStats,
    collect_stats,
    layer_key,
    layer_site,
    relative_error,
    sample_chunks,
    stat_bytes,
    stat_groups,
)
from onnxzip.core.report import LayerChange
from onnxzip.core.schema import option
from onnxzip.svd.whiten import centered, refit_second_factor, ridge_target, whitened_truncation

CHUNK = 4  # samples per onnxruntime run (a model with a fixed batch runs its own)
STATS_BYTES = 1 << 30  # Gram and cross matrices held at once
HELD_DAMPS = (0.1, 1.0)  # codebook refits: dampings tried besides the configured one (held-back rows pick)


@dataclass
class ReconstructConfig:
    iterations: int = option(3, "rounds of GPTQ assignment + closed-form centroid refit per layer "
                             "(0: centroids only)")
    damp: float = option(DAMP, "ridge λ = damp·mean(diag H) toward the original weight")
    samples: int | None = option(None, "calibration samples used (default: all of --data)")
    stages: int | None = option(None, "groups of weights in graph order, the models re-run before each "
                                "(default: one per weight; fewer is faster but compensates stale errors)")
    holdout: float = option(0.25, "share of the calibration runs held back to score each layer; a layer "
                            "whose held-back error would grow is kept as it was (0: fit on all)")
    bias: bool = option(True, "subtract the mean output shift from the layer's own bias")
    rows_per_sample: int = option(256, "input rows per sample summed per layer (Conv: random patch "
                                  "positions)")
    include: list[str] = option([], "weight or node name globs, or op types (empty: all)")
    exclude: list[str] = option([], "weight or node name globs, or op types, to leave alone")

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be at least 0, got {self.iterations}")
        if self.damp <= 0:
            raise ValueError(f"damp must be positive, got {self.damp}")
        if self.samples is not None and self.samples < 2:
            raise ValueError(f"samples must be at least 2, got {self.samples}")
        if (self.stages is not None and self.stages < 1) or self.rows_per_sample < 1:
            raise ValueError("stages and rows_per_sample must be at least 1")
        if not 0 <= self.holdout <= 0.5:
            raise ValueError(f"holdout must be from 0 to 0.5, got {self.holdout}")


@dataclass
class _Job:
    """One codebook weight to reconstruct: its decode, its (compressed, original) layer sites with
    the compressed layer nodes, and the original weight."""

    decoded: DecodedWeight
    pairs: list[tuple[LayerSite, LayerSite]]
    nodes: list[gs.Node]
    weight: np.ndarray


@dataclass
class _FloatJob:
    """A float layer to refit to the original layer's output: an SVD factor pair (``first`` is
    the node of the first factor, whose input rows the statistics hold), or one weight whose
    input changed (``kind`` "second factor": the second factor alone; "pruned input": a consumer
    of pruned channels), fitted on its own input rows."""

    kind: str
    node: gs.Node  # the node computing the original layer's output (second factor, consumer)
    site: LayerSite  # its weight's site in the compressed model
    source: LayerSite  # the original layer's site
    weight: np.ndarray  # the original weight as a matrix [rows kept, n] of the source's view
    delta: np.ndarray  # the node's own bias minus the original's (a pruning compensation), [rows]
    first: gs.Node | None = None
    first_site: LayerSite | None = None

    @property
    def pairs(self) -> list[tuple[LayerSite, LayerSite]]:
        return [(self.first_site or self.site, self.source)]

    @property
    def nodes(self) -> list[gs.Node]:
        return [self.first, self.node] if self.first is not None else [self.node]

    @property
    def scale(self) -> float:
        """α of a second-factor Gemm: its rows carry α, the first factor's do not."""
        return float(self.node.attrs.get("alpha", 1.0)) if self.first is not None and self.node.op == "Gemm" else 1.0


def _consumers(graph: gs.Graph, tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    return [(node, slot) for node, _owner, _path in walk_nodes(graph)
            for slot, inp in enumerate(node.inputs) if inp is tensor]


@register_pass
class ReconstructPass(Pass):
    name = "reconstruct"
    config_class = ReconstructConfig
    summary = ("refit codebook weights, SVD factor pairs and consumers of pruned channels layer by layer "
               "to the original's outputs on the calibration data (GPTQ assignment and closed-form "
               "centroids; whitened truncation; least squares; bias correction); same file size")
    reduces_bytes = False  # changes values, never sizes

    def needs_data(self) -> str | None:
        return "the reconstruct step fits each layer to the original's outputs on calibration inputs"

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        graph = import_graph(model)
        layers: dict[str, dict[str, Any]] = {}
        for decoded in find_decodes(graph):
            uses = _consumers(graph, decoded.output)
            ops = {node.op for node, _slot in uses}
            if not all(matches(decoded.name, op, self.config.include, self.config.exclude) for op in ops or {""}):
                layers[decoded.name] = {"reconstruct": False, "reason": "not selected by include/exclude"}
                continue
            sites = [layer_site(node, slot, decoded.shape) for node, slot in uses]
            reasons = sorted({s for s in sites if isinstance(s, str)})
            layers[decoded.name] = ({"reconstruct": True, "layers": [s.key for s in sites]} if sites and not reasons
                                    else {"reconstruct": False, "reason": "; ".join(reasons) or "unused"})
        if context.original is not None:
            for entry in pruned_recurrent(graph, import_graph(context.original)):
                node = entry[0]
                selected = matches(node.name, node.op, self.config.include, self.config.exclude)
                layers[node.name] = ({"reconstruct": False, "refit": RECURRENT_REFIT, "reason": entry[1]} if len(entry) == 2
                                     else {"reconstruct": selected, "refit": RECURRENT_REFIT}
                                     if selected else {"reconstruct": False, "refit": RECURRENT_REFIT,
                                                       "reason": "not selected by include/exclude"})
            for entry in find_restores(graph):
                node = entry[0] if isinstance(entry, tuple) else entry.node
                if isinstance(entry, tuple):
                    layers[node.name] = {"reconstruct": False, "refit": RESTORE_REFIT, "reason": entry[1]}
                elif matches(node.name, node.op, self.config.include, self.config.exclude):
                    layers[node.name] = {"reconstruct": True, "refit": RESTORE_REFIT, "target": entry.target}
                else:
                    layers[node.name] = {"reconstruct": False, "refit": RESTORE_REFIT, "reason": "not selected by include/exclude"}
            for name, job in float_candidates(graph, import_graph(context.original)).items():
                if isinstance(job, tuple):
                    layers[name] = {"reconstruct": False, "refit": "float", "reason": job[1]}
                    continue
                weights = [n.inputs[1].name for n in job.nodes]
                selected = all(matches(n, job.node.op, self.config.include, self.config.exclude) for n in [name, *weights])
                layers[name] = ({"reconstruct": True, "refit": job.kind, "weights": weights} if selected
                                else {"reconstruct": False, "refit": job.kind, "reason": "not selected by include/exclude"})
        for name in find_int8_decodes(graph):
            layers[name] = {"reconstruct": False, "reason": "int8 codebook (cluster execute=int8) runs on the int8 "
                            "grid; reconstruct refits float codebooks only"}
        return Plan(self.name, self.config_dict(), layers)

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        if not context.feeds:
            raise ConfigError("The reconstruct step needs calibration data: pass --data calib.npz (data= in Python).")
        if context.original is None:
            raise ConfigError("The reconstruct step needs the original model (it runs inside compress()).")
        report = self.new_report()
        graph = import_graph(model)
        decodes = {d.name: d for d in find_decodes(graph)}
        jobs = self._jobs(graph, decodes, plan, context.original, report)
        recurrent = {name for name, entry in plan.layers.items()
                     if entry.get("refit") == RECURRENT_REFIT and entry.get("reconstruct")}
        restores = {name for name, entry in plan.layers.items()
                    if entry.get("refit") == RESTORE_REFIT and entry.get("reconstruct")}
        if not jobs and not recurrent and not restores:
            report.notes.append("no codebook weight, SVD factor pair or pruned layer to reconstruct "
                                "(run the cluster, svd or prune-channels pass first)")
            return PassResult(model, report, plan)
        feeds = context.feeds
        if self.config.samples is not None:
            feeds = sample_chunks(feeds, self.config.samples)[0]
        batch = fixed_batch(model) or CHUNK
        chunks = sample_chunks(feeds, batch)
        if self.config.holdout and len(chunks) < 2:
            raise ConfigError(f"reconstruct holdout needs at least 2 runs of {batch} samples; "
                              "give more calibration samples or holdout=0.")
        if recurrent:
            changes = refit_recurrent(graph, model, context.original, chunks, self.config.damp, self.config.holdout,
                                      context.device, recurrent)
            report.changes.extend(changes)
        limit = self.config.rows_per_sample * batch
        stages = self.config.stages or max(len(jobs), 1)
        groups = stat_groups([(n, stat_bytes(j.pairs[0][0])) for n, j in jobs.items()], stages, STATS_BYTES)
        branches: dict[str, dict[str, bool] | None] = {"current": None, "teacher": None}
        progress = iter(context.track(range(len(jobs)), "reconstruct", total=len(jobs)))
        for group in groups:
            current = ActivationProbe(export_model(graph, model), [s for n in group for s, _ in jobs[n].pairs],
                                      context.device, chunks, branches["current"])
            teacher = ActivationProbe(context.original, [o for n in group for _, o in jobs[n].pairs],
                                      context.device, chunks, branches["teacher"])
            branches = {"current": current.branches, "teacher": teacher.branches}
            usable = {n: jobs[n].pairs for n in group
                      if all(s.key in current.available and o.key in teacher.available for s, o in jobs[n].pairs)}
            stats = collect_stats(usable, current, teacher, chunks, limit=limit, holdout=self.config.holdout)
            for name in group:
                next(progress, None)
                job = jobs[name]
                if name not in stats:
                    report.skip(name, job.nodes[0].op, "its layer input is not a main-graph tensor of a run "
                                "(Loop/Scan body, or an If branch the data does not always take)")
                    continue
                if isinstance(job, _FloatJob):
                    report.changes.append(self._refit_float(name, job, stats[name], decodes))
                else:
                    report.changes.append(self._reconstruct(name, job, stats[name], decodes))
        if restores:
            report.changes.extend(refit_restores(graph, model, context.original, chunks, self.config.holdout,
                                                 context.device, restores))
        report.modified = any(not c.skipped for c in report.changes)
        fitted = [c.details for c in report.changes if not c.skipped and "error_after" in c.details]
        if fitted:
            before = np.median([d["error_before"] for d in fitted])
            after = np.median([d["error_after"] for d in fitted])
            report.notes.append(f"median relative output error on held-back rows {before:.4g} → {after:.4g} "
                                f"over {len(fitted)} weights")
        return PassResult(export_model(graph, model), report, plan)

    def _jobs(self, graph: gs.Graph, decodes: dict[str, DecodedWeight], plan: Plan,
              original: onnx.ModelProto, report: Any) -> dict[str, _Job]:
        """The planned weights in graph order, each with its layers matched in the original."""
        teacher_graph = import_graph(original)
        teachers = {layer_key(n): n for n, _g, _p in walk_nodes(teacher_graph)}
        order = {id(node): i for i, (node, _g, _p) in enumerate(walk_nodes(graph))}
        jobs: dict[str, _Job | _FloatJob] = {}
        floats = float_candidates(graph, teacher_graph)
        for name, entry in plan.layers.items():
            if entry.get("refit") in (RECURRENT_REFIT, RESTORE_REFIT) and entry.get("reconstruct"):
                continue  # refit by refit_recurrent before the other jobs, refit_restores after them
            if not entry.get("reconstruct"):
                report.skip(name, "", entry.get("reason", "not planned"))
                continue
            if "refit" in entry:
                job = floats.get(name)
                if isinstance(job, _FloatJob):
                    jobs[name] = job
                else:
                    report.skip(name, job[0] if job else "", job[1] if job else "not a float layer to refit in this model")
                continue
            decoded = decodes.get(name)
            if decoded is None:
                report.skip(name, "", "not a codebook weight of this model")
                continue
            pairs, nodes, weights, reason = [], [], [], None
            for node, slot in _consumers(graph, decoded.output):
                site = layer_site(node, slot, decoded.shape)
                twin = teachers.get(layer_key(node))
                value = constant_value(twin.inputs[slot]) if twin is not None and len(twin.inputs) > slot else None
                if isinstance(site, str):
                    reason = site
                elif twin is None or twin.op != node.op or value is None or value.shape != decoded.shape:
                    reason = f"layer {site.key} has no {node.op} with a constant weight of shape {decoded.shape} in the original"
                else:
                    source = layer_site(twin, slot, decoded.shape)
                    if isinstance(source, str):
                        reason = source
                    else:
                        pairs.append((site, source))
                        nodes.append(node)
                        weights.append(value)
            if reason is not None or not pairs or any(not np.array_equal(w, weights[0]) for w in weights):
                report.skip(name, nodes[0].op if nodes else "", reason or "its uses have different original weights")
                continue
            jobs[name] = _Job(decoded, pairs, nodes, np.asarray(weights[0]))
        return dict(sorted(jobs.items(), key=lambda item: min(order[id(n)] for n in item[1].nodes)))

    def _refit_float(self, name: str, job: _FloatJob, stats: LayerStats, decodes: dict[str, DecodedWeight]) -> LayerChange:
        """Refit one float layer (maths in :mod:`onnxzip.svd.whiten`): an SVD pair by the whitened
        truncation at its rank, then the least-squares refit of its second factor; a single
        weight by least squares on its own input. With a bias of its own the fit also takes an
        intercept (centred statistics), which goes into that bias. The candidate of lowest
        held-back error is kept if it beats the layer as it was."""
        damp = self.config.damp
        weight, delta = job.weight, job.delta
        count = stats.count
        mean_current = stats.sum_current[0] / max(count, 1)
        mean_original = stats.sum_original[0] / max(count, 1)
        bias = _bias_of(job.node, job.site, decodes) if self.config.bias and count else None
        statistics = [("raw", stats.gram[0], stats.cross_term[0])]
        if bias is not None:
            statistics.append(("centred", *centered(stats.gram[0], stats.cross_term[0], stats.sum_current[0],
                                                    stats.sum_original[0], count)))
        out_values = np.asarray(job.node.inputs[1].values)
        candidates: list[tuple[str, str, tuple[np.ndarray, ...], np.ndarray]] = []  # step, stats, factors, product
        if job.first is not None:
            in_values = np.asarray(job.first.inputs[1].values)
            first = job.first_site.view(in_values)[0].astype(np.float64)
            rank = first.shape[0]
            current = job.scale * job.site.view(out_values).reshape(-1, rank).astype(np.float64) @ first
            for label, gram, cross in statistics:
                target, gram_d = ridge_target(weight, gram, cross, damp, prior=job.scale * weight)
                second, new_first = whitened_truncation(target, gram_d, rank)
                candidates.append(("whitened truncation", label, (second, new_first), second @ new_first))
                second = refit_second_factor(new_first, weight, gram, cross, damp, prior=second)
                candidates.append(("whitened truncation + second-factor refit", label, (second, new_first),
                                   second @ new_first))
            params = in_values.size + out_values.size
            details: dict[str, Any] = {"refit": job.kind, "rank": rank, "rows": count}
        else:
            current = job.site.view(out_values)[0].astype(np.float64)
            for label, gram, cross in statistics:
                target = ridge_target(weight, gram, cross, damp, prior=current)[0]
                candidates.append(("least squares", label, (target,), target))
            params = out_values.size
            details = {"refit": job.kind, "inputs": [int(current.shape[1]), int(weight.shape[1])], "rows": count}

        def shift(product: np.ndarray, label: str) -> np.ndarray:
            """relative_error's shift: b_O − b_new (centred: the bias takes W μ − M μ̃)."""
            return product @ mean_current - weight @ mean_original if label == "centred" else -delta

        held = stats.held()
        if held is not None:
            before = relative_error(held, current[None], weight[None], -delta[None])
            scored = sorted((_finite(relative_error(held, c[3][None], weight[None], shift(c[3], c[1])[None])), i)
                            for i, c in enumerate(candidates))
            details.update(error_before=round(before, 6), error_after=round(scored[0][0], 6),
                           held_rows=int(held[0].shape[0]))
            if scored[0][0] >= before:
                return LayerChange(name, job.node.op, "skipped", "the refit did not lower the held-back output error "
                                   f"({before:.4g} → {scored[0][0]:.4g}); kept as it was",
                                   params_before=params, params_after=params, details=details)
            ranking = [(error, candidates[i]) for error, i in scored if error < before]
        else:
            ranking = [(None, c) for c in reversed(candidates)]  # the last: refit, with the intercept when there is one
        for error, (step, label, factors, product) in ranking:
            if label == "centred":
                offset = delta + product @ mean_current - weight @ mean_original
                if not bias(offset.reshape(job.site.view(out_values).shape[:2])):
                    continue
                details["bias_corrected"] = True
            self._store(job, factors)
            details["step"] = f"{step} ({label})"
            if error is not None:
                details["error_after"] = round(error, 6)
                scored_text = f"held-back output error {details['error_before']:.4g} → {error:.4g}"
            else:
                scored_text = f"{step}, no held-back rows"
            return LayerChange(name, job.node.op, f"refit {job.kind}: {scored_text}",
                               params_before=params, params_after=params, details=details)
        return LayerChange(name, job.node.op, "skipped", "its bias could not take the refit's mean shift; kept as it was",
                           params_before=params, params_after=params, details=details)

    @staticmethod
    def _store(job: _FloatJob, factors: tuple[np.ndarray, ...]) -> None:
        """Write the refit matrices back into the layer's constants (same shapes and dtypes)."""
        out = job.node.inputs[1]
        view_shape = job.site.view(np.asarray(out.values)).shape
        if job.first is not None:
            second, first = factors
            constant = job.first.inputs[1]
            constant.values = np.ascontiguousarray(
                job.first_site.unview(first[None]).astype(np.asarray(constant.values).dtype))
            matrix = (second / job.scale).reshape(view_shape)
        else:
            matrix = factors[0].reshape(view_shape)
        out.values = np.ascontiguousarray(job.site.unview(matrix).astype(np.asarray(out.values).dtype))

    def _tries(self, held: bool) -> list[tuple[int, float]]:
        """(GPTQ rounds, damp) of the codebook fits compared on the held-back rows: the configured
        fit, the centroids alone for the stored indices (K unknowns per codebook row: it cannot
        overfit the way a reassignment of every index can when the layer sees few rows), and
        the configured rounds under more damping. Without held-back rows, the configured fit."""
        tries = [(self.config.iterations, self.config.damp)]
        if held:
            tries += [(0, self.config.damp)] + [(self.config.iterations, d) for d in HELD_DAMPS if d > self.config.damp]
        return tries

    def _reconstruct(self, name: str, job: _Job, stats: LayerStats, decodes: dict[str, DecodedWeight]) -> LayerChange:
        """Fit one weight, correct its bias, keep the result unless the held-back error grows."""
        op = "/".join(sorted({n.op for n in job.nodes}))
        stored = job.decoded.stored()
        site = job.pairs[0][0]
        weight = job.weight.astype(np.float64)
        size = int(weight.size)  # the weight's parameters (a codebook of pairs stores half as many indices)
        weight_view = site.view(weight)
        held = stats.held()
        fitted = None
        for iterations, damp in self._tries(held is not None):
            candidate = refit_codebook(stored, weight, site, stats, iterations=iterations, damp=damp)
            if candidate is None:
                break
            error = 0.0
            if held is not None:  # the try that generalises, not the one that fits the fit rows best
                error = _finite(relative_error(held, site.view(candidate[0].decode().astype(np.float64)), weight_view))
            candidate = (*candidate, error, damp)
            if fitted is None or (held is not None and candidate[2] < fitted[2]):
                fitted = candidate
        if fitted is None:
            return LayerChange(name, op, "skipped", "per-channel codebook (or pairs) along an axis that is not the layer's output",
                               params_before=size, params_after=size)
        new, fit, _error, damp = fitted
        before_view = site.view(stored.decode().astype(np.float64))
        after_view = site.view(new.decode().astype(np.float64))
        shift, bias = None, None
        if self.config.bias and len(job.nodes) == 1 and stats.count:
            bias = _bias_of(job.nodes[0], site, decodes)
            if bias is not None:
                mean_current = stats.sum_current / stats.count
                mean_original = stats.sum_original / stats.count
                shift = (np.einsum("gmn,gn->gm", after_view, np.broadcast_to(mean_current, after_view.shape[::2]))
                         - np.einsum("gmn,gn->gm", weight_view, np.broadcast_to(mean_original, weight_view.shape[::2])))
        details: dict[str, Any] = {"k": stored.k, "bits": stored.bits, "step": fit.step, "damp": damp,
                                   "fit_error_before": round(fit.before, 6), "fit_error_after": round(fit.after, 6),
                                   "rows": stats.count}
        if held is not None:
            details["error_before"] = round(relative_error(held, before_view, weight_view), 6)
            details["error_after"] = round(relative_error(held, after_view, weight_view, shift), 6)
            details["held_rows"] = int(held[0].shape[0])
            if details["error_after"] >= details["error_before"] and shift is not None:
                shift = None  # the shift alone may be what does not generalise
                details["error_after"] = round(relative_error(held, after_view, weight_view), 6)
            if details["error_after"] >= details["error_before"]:
                return LayerChange(name, op, "skipped", "reconstruction did not lower the held-back output error "
                                   f"({details['error_before']:.4g} → {details['error_after']:.4g}); kept as it was",
                                   params_before=size, params_after=size, details=details)
        job.decoded.store(new)
        if shift is not None and bias is not None:
            details["bias_corrected"] = bool(bias(shift))
        scored = (f"held-back output error {details['error_before']:.4g} → {details['error_after']:.4g}"
                  if held is not None else f"fit error {fit.before:.4g} → {fit.after:.4g}")
        return LayerChange(name, op, f"reconstructed K={stored.k}, {stored.bits}-bit: {scored}",
                           params_before=size, params_after=size, details=details)


def _finite(error: float) -> float:
    return error if np.isfinite(error) else float("inf")


def _bias_of(node: gs.Node, site: LayerSite, decodes: dict[str, DecodedWeight]) -> Any:
    """A function subtracting a shift [G, m] from ``node``'s own bias, or None when the layer has
    no bias of its own (or one the shift does not map onto)."""
    if node.op in ("Conv", "Gemm"):
        tensor = node.inputs[2] if len(node.inputs) > 2 else None
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        return _subtract(tensor, lambda s: s.reshape(-1) / scale, decodes, node)
    if node.op == "MatMul":
        users = node.outputs[0].outputs
        if len(users) != 1 or users[0].op != "Add":
            return None
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        return _subtract(other, lambda s: s.reshape(-1), decodes, add)
    if node.op in ("LSTM", "GRU", "RNN") and len(node.inputs) > 3 and node.inputs[3].name:
        if node.op == "GRU" and site.slot == 2 and not int(node.attrs.get("linear_before_reset", 0)):
            return None  # the h gate's recurrent input is r ⊙ h, not the h the statistics hold
        width = site.shape[1]
        half = slice(0, width) if site.slot == 1 else slice(width, 2 * width)

        def place(shift: np.ndarray) -> np.ndarray:
            full = np.zeros((shift.shape[0], 2 * width))
            full[:, half] = shift
            return full

        return _subtract(node.inputs[3], place, decodes, node)
    return None


def _subtract(tensor: gs.Tensor | None, arrange: Any, decodes: dict[str, DecodedWeight], user: gs.Node) -> Any:
    """A function subtracting ``arrange(shift)`` from ``tensor`` (True when it did), or None when
    ``user`` is not its only consumer: a raw constant is shifted directly, a codebook-decoded bias
    by refitting each centroid to the mean of its shifted values (same indices)."""
    if tensor is None or not tensor.name or len(tensor.outputs) != 1 or tensor.outputs[0] is not user:
        return None
    if isinstance(tensor, gs.Constant):
        def raw(shift: np.ndarray) -> bool:
            values, delta = np.asarray(tensor.values), arrange(shift)
            if delta.size != values.size:
                return False
            tensor.values = (values - delta.reshape(values.shape)).astype(values.dtype)
            return True

        return raw
    decoded = next((d for d in decodes.values() if d.output is tensor and d.axis is None), None)
    if decoded is None:
        return None

    def refit(shift: np.ndarray) -> bool:
        stored, delta = decoded.stored(), arrange(shift)
        if delta.size != stored.indices.size:
            return False
        target = stored.decode().astype(np.float64) - delta.reshape(stored.indices.shape)
        flat = stored.indices.reshape(-1)
        sums = np.bincount(flat, target.reshape(-1), minlength=stored.k)
        counts = np.bincount(flat, minlength=stored.k)
        codebook = np.where(counts > 0, sums / np.maximum(counts, 1), stored.codebook)
        decoded.store(Codebook(codebook.astype(stored.codebook.dtype), stored.indices, None, stored.bits))
        return True

    return refit


# ----------------------------------------------------------------------------------------------
# Float layers: SVD factor pairs and consumers of pruned channels

FLOAT_OPS = ("MatMul", "Gemm", "Conv")


def _float_weight(node: gs.Node, slot: int = 1) -> gs.Constant | None:
    tensor = node.inputs[slot] if len(node.inputs) > slot else None
    if isinstance(tensor, gs.Constant) and np.issubdtype(np.asarray(tensor.values).dtype, np.floating):
        return tensor
    return None


def _svd_second(first: gs.Node) -> gs.Node | None:
    """The node fed by ``first`` when ``first`` is the svd pass's first factor ``<node>/svd_in``
    (the pass names it after the node that keeps the layer's name and output)."""
    if "/svd_in" not in first.name or len(first.outputs) != 1 or len(first.outputs[0].outputs) != 1:
        return None
    second = first.outputs[0].outputs[0]
    base = second.name or (f"{second.op}_{second.outputs[0].name}" if second.outputs else "")
    return second if base and first.name.startswith(f"{base}/svd_in") else None


def float_candidates(graph: gs.Graph, teacher_graph: gs.Graph) -> dict[str, _FloatJob | tuple[str, str]]:
    """The float layers of ``graph`` the reconstruct step refits, keyed by node name: SVD factor
    pairs (found by the svd pass's ``<node>/svd_in`` first factor) and MatMul/Gemm/Conv weights
    whose input is narrower than the original layer's (pruned channels). The original layer is
    the node with the same output tensor, else the same node name (a pruned MatMul whose
    compensation Add took over its output). A value is a job, or (op type, why it is not one)."""
    teacher_nodes = [n for n, _g, _p in walk_nodes(teacher_graph)]
    by_output = {layer_key(n): n for n in teacher_nodes}
    by_name = {n.name: n for n in teacher_nodes if n.name}
    found: dict[str, _FloatJob | tuple[str, str]] = {}
    paired: set[int] = set()
    for first, _owner, _path in walk_nodes(graph):
        second = _svd_second(first)
        if second is None:
            continue
        paired.update((id(first), id(second)))
        found[second.name or layer_key(second)] = _pair_job(first, second, by_output.get(layer_key(second)))
    for node, _owner, _path in walk_nodes(graph):
        if id(node) in paired or node.op not in FLOAT_OPS or _float_weight(node) is None:
            continue
        twin = by_output.get(layer_key(node))
        if twin is None or twin.op != node.op:
            twin = by_name.get(node.name) if node.name else None
        job = _pruned_job(node, twin)
        if job is not None:
            found[node.name or layer_key(node)] = job
    return found


def _sites(*uses: tuple[gs.Node, gs.Tensor | np.ndarray]) -> list[LayerSite] | str:
    sites = []
    for node, weight in uses:
        site = layer_site(node, 1, tuple(int(d) for d in np.shape(weight.values if isinstance(weight, gs.Constant) else weight)))
        if isinstance(site, str):
            return site
        sites.append(site)
    return sites


def _pair_job(first: gs.Node, second: gs.Node, twin: gs.Node | None) -> _FloatJob | tuple[str, str]:
    """The job of an SVD factor pair first → second, or why it has none."""
    op = second.op
    factor_in, factor_out = _float_weight(first), _float_weight(second)
    if factor_in is None or factor_out is None or second.inputs[0] is not first.outputs[0]:
        return op, "svd factors that are not float constants (e.g. clustered), or a MatMul weight on the left"
    if len(factor_in.outputs) != 1 or len(factor_out.outputs) != 1:
        return op, "svd factors shared with other layers"
    if twin is None or twin.op != op:
        return op, f"no {op} with the output {layer_key(second)!r} in the original"
    weight = constant_value(twin.inputs[1]) if len(twin.inputs) > 1 else None
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return op, "the original layer has no constant float weight"
    sites = _sites((first, factor_in), (second, factor_out), (twin, weight))
    if isinstance(sites, str):
        return op, sites
    first_site, site, source = sites
    a = first_site.view(np.asarray(factor_in.values))
    b = site.view(np.asarray(factor_out.values))
    w = source.view(weight)
    if op == "Conv" and any(k != 1 for k in factor_out.shape[2:]):  # spatial kh×1 → 1×kw: refit the second alone
        if site.blocks != 1 or source.blocks != 1 or b.shape[1] != w.shape[1]:
            return op, "factor shapes do not match the original weight"
        return _FloatJob("second factor", second, site, source, w[0].astype(np.float64), np.zeros(w.shape[1]))
    rank = a.shape[1]
    if a.shape[0] != 1 or b.shape[-1] != rank or a.shape[2] != w.shape[2] or b.shape[:2] != w.shape[:2]:
        return op, "factor shapes do not compose to the original weight"
    stacked = w.reshape(-1, w.shape[2]).astype(np.float64)
    return _FloatJob("svd factors", second, site, source, stacked, np.zeros(stacked.shape[0]), first, first_site)


def _pruned_job(node: gs.Node, twin: gs.Node | None) -> _FloatJob | tuple[str, str] | None:
    """The job of a float layer whose input is narrower than its original's, (op, why not), or
    None when it is not such a layer."""
    op, constant = node.op, _float_weight(node)
    if twin is None or twin.op != op or len(twin.inputs) < 2:
        return None
    weight = constant_value(twin.inputs[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating) or weight.ndim != constant.values.ndim:
        return None
    sites = _sites((node, constant), (twin, weight))
    if isinstance(sites, str):
        return None
    site, source = sites
    if op == "Conv" and tuple(constant.shape[2:]) != tuple(weight.shape[2:]):
        return None
    current, original = site.view(np.asarray(constant.values)), source.view(weight)
    if current.shape[2] >= original.shape[2]:
        return None
    if site.blocks != 1 or source.blocks != 1:
        return op, "grouped convolution whose input was pruned"
    if len(constant.outputs) != 1:
        return op, "its weight is shared with other layers"
    rows = _kept_rows(current[0], original[0])
    if rows is None:
        return op, "its output channels could not be matched to rows of the original weight"
    delta = _bias_delta(node, twin, rows, original.shape[1])
    if delta is None:
        return op, "its bias could not be matched to the original's"
    return _FloatJob("pruned input", node, site, source, original[0][rows].astype(np.float64), delta)


def _kept_rows(current: np.ndarray, original: np.ndarray) -> np.ndarray | None:
    """Indices of the rows of ``original`` [m, n] that the rows of ``current`` [m', n'] were cut
    from (pruning keeps rows and columns in order, values exactly), or None."""
    if current.shape[0] == original.shape[0]:
        return np.arange(original.shape[0])
    flat = original.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    rows: list[int] = []
    start = 0
    for row in current:
        probe = row[int(np.argmax(np.abs(row)))]
        low, high = np.searchsorted(ordered, probe, "left"), np.searchsorted(ordered, probe, "right")
        candidates = sorted({int(i) // original.shape[1] for i in order[low:high]})
        match = next((c for c in candidates if c >= start and np.isin(row, original[c]).all()), None)
        if match is None:
            return None
        rows.append(match)
        start = match + 1
    return np.asarray(rows)


def _vector(value: Any, size: int) -> np.ndarray | None:
    value = np.asarray(value, np.float64).reshape(-1)
    if value.size == 1:
        return np.full(size, float(value[0]))
    return value if value.size == size else None


def _bias_delta(node: gs.Node, twin: gs.Node, rows: np.ndarray, width: int) -> np.ndarray | None:
    """The node's own bias minus the original layer's, on the kept rows (what the prune pass's
    compensation added), or None when the biases do not line up."""
    kept = len(rows)
    if node.op in ("Conv", "Gemm"):
        def bias(layer: gs.Node, size: int) -> np.ndarray | None:
            if len(layer.inputs) < 3 or not layer.inputs[2].name:
                return np.zeros(size)
            value = constant_value(layer.inputs[2])
            scale = float(layer.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
            return None if value is None else _vector(value * scale, size)

        mine, theirs = bias(node, kept), bias(twin, width)
        return None if mine is None or theirs is None else mine - theirs[rows]
    if layer_key(node) == layer_key(twin):
        return np.zeros(kept)
    users = node.outputs[0].outputs
    if len(users) == 1 and users[0].op == "Add" and layer_key(users[0]) == layer_key(twin):
        other = users[0].inputs[1] if users[0].inputs[0] is node.outputs[0] else users[0].inputs[0]
        value = constant_value(other)
        return None if value is None else _vector(value, kept)
    return None


# ----------------------------------------------------------------------------------------------
# Pruned recurrent layers: the kept units' W and R rows refit to the teacher's gate inputs

RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_REFIT = "pruned recurrent units"
HELD_ROWS = 4096


def pruned_recurrent(graph: gs.Graph, teacher_graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, np.ndarray] | tuple[gs.Node, str]]:
    """(node, original node, kept unit indices) per LSTM/GRU/RNN whose hidden units or inputs
    were pruned (the original is the node of the same name), or (node, why it is not refit)."""
    twins = {n.name: n for n in teacher_graph.nodes if n.name}
    found: list[tuple[gs.Node, gs.Node, np.ndarray] | tuple[gs.Node, str]] = []
    for node in graph.nodes:
        twin = twins.get(node.name)
        if node.op not in RECURRENT_GATES or twin is None or twin.op != node.op:
            continue
        w, r = _float_weight(node, 1), _float_weight(node, 2)
        w0, r0 = constant_value(twin.inputs[1]), constant_value(twin.inputs[2])
        if w is None or r is None or w0 is None or r0 is None:
            found.append((node, "weights that are not float constants (clustered?)"))
            continue
        if w.shape == w0.shape and r.shape == r0.shape:
            continue
        if not node.outputs or not node.outputs[0].name or not twin.outputs[0].name:
            found.append((node, "its hidden sequence Y is not an output of the node"))
            continue
        hidden = r.shape[-1]
        rows = _kept_rows(np.concatenate([w.values[0, :hidden], r.values[0, :hidden]], axis=1),
                          np.concatenate([w0[0, : r0.shape[-1]], r0[0, : r0.shape[-1]]], axis=1))
        if rows is None or len(rows) != hidden:
            found.append((node, "its units could not be matched to the original's"))
            continue
        found.append((node, twin, rows))
    return found


def _recurrent_rows(x: np.ndarray, y: np.ndarray, h0: np.ndarray | None, node: gs.Node) -> list[np.ndarray]:
    """Per direction, the rows [x_t; h_{t-1}] a recurrent node multiplies by [W; R]ᵀ:
    x [T, B, I], y [T, D, B, H] (layout 0; layout 1 is moved), h0 [D, B, H] or None (zeros)."""
    if int(node.attrs.get("layout", 0)) == 1:
        x, y = np.swapaxes(x, 0, 1), np.moveaxis(y, (0, 1, 2), (2, 0, 1))
        h0 = None if h0 is None else np.swapaxes(h0, 0, 1)
    steps, directions, batch, hidden = y.shape
    direction = node.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    out = []
    for d in range(directions):
        start = np.zeros((batch, hidden), np.float32) if h0 is None else h0[d]
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        states = y[:, d]
        previous = (np.concatenate([states[1:], start[None]]) if reverse else np.concatenate([start[None], states[:-1]]))
        out.append(np.concatenate([x, previous], axis=2).reshape(steps * batch, -1).astype(np.float64))
    return out


def refit_recurrent(graph: gs.Graph, model: onnx.ModelProto, original: onnx.ModelProto, chunks: list[dict[str, np.ndarray]],
                    damp: float, holdout: float, device: str, selected: set[str]) -> list[LayerChange]:
    """Refit each pruned LSTM/GRU/RNN (graph order, the compressed model re-run before each): per
    direction and gate, the kept units' rows [W'_g R'_g] by ridge least squares from the pruned
    layer's own rows [x̃_t; h̃_{t-1}] to the original's gate inputs W_g x_t + R_g h_{t-1} (its
    inputs and states). A GRU's candidate gate multiplies R_n h by the reset gate: with
    ``linear_before_reset`` W_n and R_n are fitted apart (x̃ → W_n x, h̃ → R_n h), without it only
    W_n. Kept when the held-back relative error of the gate inputs goes down."""
    from onnxzip.core.runtime import make_session, run_session, with_outputs

    changes: list[LayerChange] = []
    teacher_graph = import_graph(original)
    every = int(1 / holdout) if holdout > 0 else 0
    for entry in pruned_recurrent(graph, teacher_graph):
        if len(entry) == 2 or entry[0].name not in selected:
            continue  # the plan reports why
        node, twin, kept = entry
        names = [node.inputs[0].name, node.outputs[0].name]
        twin_names = [twin.inputs[0].name, twin.outputs[0].name]
        state = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else None
        twin_state = twin.inputs[5] if len(twin.inputs) > 5 and twin.inputs[5].name else None
        names += [state.name] if state is not None else []
        twin_names += [twin_state.name] if twin_state is not None else []
        sessions = []
        for source, wanted in ((export_model(graph, model), names), (original, twin_names)):
            sessions.append(make_session(with_outputs(source, wanted), device, optimization="disabled"))
        gates = RECURRENT_GATES[node.op]
        w, r = node.inputs[1], node.inputs[2]
        w_now, r_now = np.asarray(w.values, np.float64), np.asarray(r.values, np.float64)
        w0, r0 = constant_value(twin.inputs[1]).astype(np.float64), constant_value(twin.inputs[2]).astype(np.float64)
        hidden, full = r_now.shape[-1], r0.shape[-1]
        inputs, full_inputs = w_now.shape[2], w0.shape[2]
        directions = w_now.shape[0]
        size, size0 = inputs + hidden, full_inputs + full
        gram = np.zeros((directions, size, size))
        cross = np.zeros((directions, size, size0))
        held: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(directions)]
        held_count = 0
        for index, chunk in enumerate(chunks):
            values = [run_session(session, {k: v for k, v in chunk.items() if k in {i.name for i in session.get_inputs()}})
                      for session in sessions]
            ours = _recurrent_rows(values[0][names[0]] if names[0] in values[0] else chunk[names[0]], values[0][names[1]],
                                   (values[0].get(names[2], chunk.get(names[2])) if state is not None else None), node)
            theirs = _recurrent_rows(values[1][twin_names[0]] if twin_names[0] in values[1] else chunk[twin_names[0]],
                                     values[1][twin_names[1]],
                                     (values[1].get(twin_names[2], chunk.get(twin_names[2])) if twin_state is not None else None),
                                     twin)
            hold = every and index % every == min(1, every - 1)
            for d in range(directions):
                if hold:
                    if held_count < HELD_ROWS:
                        held[d].append((ours[d], theirs[d]))
                else:
                    gram[d] += ours[d].T @ ours[d]
                    cross[d] += ours[d].T @ theirs[d]
            if hold:
                held_count += ours[0].shape[0]
        new_w, new_r = w_now.copy(), r_now.copy()
        lbr = int(node.attrs.get("linear_before_reset", 0))
        x_part, h_part = slice(0, inputs), slice(inputs, size)
        x0_part, h0_part = slice(0, full_inputs), slice(full_inputs, size0)
        for d in range(directions):
            for g in range(gates):
                rows = slice(g * hidden, (g + 1) * hidden)
                target_rows = g * full + kept
                target = np.concatenate([w0[d, target_rows], r0[d, target_rows]], axis=1)  # [H', I + H]
                if node.op == "GRU" and g == 2:  # the candidate gate: r ⊙ (R_n h) or R_n (r ⊙ h)
                    new_w[d, rows] = ridge_target(w0[d, target_rows], gram[d][x_part, x_part], cross[d][x_part, x0_part],
                                                  damp, prior=w_now[d, rows])[0]
                    if lbr:
                        new_r[d, rows] = ridge_target(r0[d, target_rows], gram[d][h_part, h_part],
                                                      cross[d][h_part, h0_part], damp, prior=r_now[d, rows])[0]
                    continue
                prior = np.concatenate([w_now[d, rows], r_now[d, rows]], axis=1)
                fitted = ridge_target(target, gram[d], cross[d], damp, prior=prior)[0]
                new_w[d, rows], new_r[d, rows] = fitted[:, x_part], fitted[:, h_part]

        def error(wm: np.ndarray, rm: np.ndarray) -> float:
            num = den = 0.0
            for d in range(directions):
                for ours, theirs in held[d]:
                    for g in range(gates):
                        rows = slice(g * hidden, (g + 1) * hidden)
                        target_rows = g * full + kept
                        mine = ours @ np.concatenate([wm[d, rows], rm[d, rows]], axis=1).T
                        want = theirs @ np.concatenate([w0[d, target_rows], r0[d, target_rows]], axis=1).T
                        num += float(np.sum((mine - want) ** 2))
                        den += float(np.sum(want ** 2))
            return num / den if den else float("nan")

        params = w_now.size + r_now.size
        details: dict[str, Any] = {"refit": "pruned recurrent units", "hidden": [hidden, full], "inputs": [inputs, full_inputs]}
        if any(held):
            before, after = error(w_now, r_now), error(new_w, new_r)
            details.update(error_before=round(before, 6), error_after=round(after, 6))
            if not after < before:
                changes.append(LayerChange(node.name, node.op, "skipped", "the refit did not lower the held-back gate-input "
                                           f"error ({before:.4g} → {after:.4g}); kept as it was",
                                           params_before=params, params_after=params, details=details))
                continue
            text = f"held-back gate-input error {before:.4g} → {after:.4g}"
        else:
            text = "no held-back rows"
        w.values = np.ascontiguousarray(new_w.astype(np.asarray(w.values).dtype))
        r.values = np.ascontiguousarray(new_r.astype(np.asarray(r.values).dtype))
        changes.append(LayerChange(node.name, node.op, f"refit pruned recurrent units: {text}",
                                   params_before=params, params_after=params, details=details))
    return changes


# ----------------------------------------------------------------------------------------------
# Linear restores of pruned units (prune-channels restore=linear): M, b refit to the original tensor

RESTORE_REFIT = "linear restore"
PRIOR_DAMPS = (3.0, 10.0, 30.0)  # also damped this strongly toward the restore as it was


@dataclass
class _Restore:
    """One linear restore: ``MatMul`` (kept units, channel last) → ``Add`` bias → [Transpose] →
    ``Concat`` [kept, predicted] → ``Gather`` to full width."""

    node: gs.Node
    weight: gs.Constant
    bias: gs.Constant
    axis: int
    pruned: np.ndarray  # positions on the full-width axis of the predicted columns, in order
    target: str  # the original model's full-width tensor


def find_restores(graph: gs.Graph) -> list[_Restore | tuple[gs.Node, str]]:
    """Every linear restore the prune-channels surgery wrote, or (node, why it cannot be refit)."""
    outputs = {t.name for t in graph.outputs}
    found: list[_Restore | tuple[gs.Node, str]] = []
    for node in graph.nodes:
        if node.op != "MatMul" or RESTORE_SUFFIX not in (node.name or ""):
            continue
        weight = _float_weight(node)
        users = node.outputs[0].outputs
        add = users[0] if len(users) == 1 and users[0].op == "Add" else None
        bias = _float_weight(add, 1) if add is not None and len(add.inputs) > 1 else None
        if weight is None or bias is None:
            found.append((node, "its weight or bias is not a float constant (clustered?)"))
            continue
        after = add.outputs[0].outputs
        if len(after) == 1 and after[0].op == "Transpose":
            after = after[0].outputs[0].outputs
        concat = after[0] if len(after) == 1 and after[0].op == "Concat" else None
        gather = concat.outputs[0].outputs if concat is not None else []
        gather = gather[0] if len(gather) == 1 and gather[0].op == "Gather" else None
        index = constant_value(gather.inputs[1]) if gather is not None else None
        if index is None:
            found.append((node, "not followed by the Concat and Gather of a restore"))
            continue
        kept = weight.shape[0]
        order = np.argsort(np.asarray(index).reshape(-1), kind="stable")
        full = gather.outputs[0]
        target = full.name if full.name in outputs else concat.inputs[0].name
        found.append(_Restore(node, weight, bias, int(gather.attrs.get("axis", 0)), order[kept:], target))
    return found


def refit_restores(graph: gs.Graph, model: onnx.ModelProto, original: onnx.ModelProto,
                   chunks: list[dict[str, np.ndarray]], holdout: float, device: str,
                   selected: set[str]) -> list[LayerChange]:
    """Refit each selected linear restore (``x_P ≈ x̃_K M + b``) by ridge least squares with
    intercept, damped toward the restore as it was (M₀, the pass's fit or zeros): inputs the
    current model's kept units x̃_K, targets the original model's tensor at the pruned units x_P,
    on the calibration runs (one run of both models for all restores). λ is the one of lowest
    held-back relative error ‖x̃_K M + b − x_P‖² / ‖x_P‖²; kept when that error goes down, then
    fitted on every run."""
    from onnxzip.core.runtime import make_session, run_session, with_outputs

    restores = [r for r in find_restores(graph) if isinstance(r, _Restore) and r.node.name in selected]
    if not restores:
        return []
    sessions = []
    for source, wanted in ((export_model(graph, model), [r.node.inputs[0].name for r in restores]),
                           (original, [r.target for r in restores])):
        sessions.append(make_session(with_outputs(source, wanted), device, optimization="disabled"))
    every = int(1 / holdout) if holdout > 0 else 0
    sums: list[Any] = [None] * len(restores)
    held_sums: list[Any] = [None] * len(restores)
    held: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in restores]
    mismatch: dict[int, str] = {}
    inputs = [{i.name for i in session.get_inputs()} for session in sessions]
    for index, chunk in enumerate(chunks):
        values = [run_session(s, {k: v for k, v in chunk.items() if k in names}) for s, names in zip(sessions, inputs)]
        hold = every and index % every == min(1, every - 1)
        for i, restore in enumerate(restores):
            kept = restore.weight.shape[0]
            x = np.asarray(values[0][restore.node.inputs[0].name], np.float64).reshape(-1, kept)
            target = np.moveaxis(np.asarray(values[1][restore.target], np.float64), restore.axis, -1)
            y = target.reshape(-1, target.shape[-1])[:, restore.pruned]
            if len(x) != len(y):
                mismatch[i] = f"{len(x)} rows of kept units against {len(y)} of the original"
                continue
            part = (x.T @ x, x.T @ y, x.sum(axis=0), y.sum(axis=0), len(x))
            if hold:
                if sum(len(h[0]) for h in held[i]) < HELD_ROWS:
                    held[i].append((x, y))
                held_sums[i] = part if held_sums[i] is None else tuple(a + b for a, b in zip(held_sums[i], part))
            else:
                sums[i] = part if sums[i] is None else tuple(a + b for a, b in zip(sums[i], part))
    changes = []
    for i, restore in enumerate(restores):
        weight, bias = restore.weight, restore.bias
        params = int(np.size(weight.values) + np.size(bias.values))
        details: dict[str, Any] = {"refit": RESTORE_REFIT, "target": restore.target,
                                   "units": [int(weight.shape[0]), int(weight.shape[1])]}
        if i in mismatch or sums[i] is None:
            changes.append(LayerChange(restore.node.name, "MatMul", "skipped", mismatch.get(i, "no calibration rows"),
                                       params_before=params, params_after=params, details=details))
            continue
        old_w, old_b = np.asarray(weight.values, np.float64), np.asarray(bias.values, np.float64)

        def error(m: np.ndarray, b: np.ndarray) -> float:
            num = sum(float(np.sum((x @ m + b - y) ** 2)) for x, y in held[i])
            den = sum(float(np.sum(y ** 2)) for _, y in held[i])
            return num / den if den else float("nan")

        if held[i]:
            fits = [(error(*fit), damp, fit) for damp in RESTORE_DAMPS + PRIOR_DAMPS
                    for fit in [ridge_intercept(*sums[i], damp, old_w)]]
            after, damp, _fit = min(fits, key=lambda item: item[0])
            before = error(old_w, old_b)
            details.update(error_before=round(before, 6), error_after=round(after, 6), damp=damp)
            if not after < before:
                changes.append(LayerChange(restore.node.name, "MatMul", "skipped", "the refit did not lower the held-back "
                                           f"error of the pruned units ({before:.4g} → {after:.4g}); kept as it was",
                                           params_before=params, params_after=params, details=details))
                continue
            new_w, new_b = ridge_intercept(*(tuple(a + b for a, b in zip(sums[i], held_sums[i]))), damp, old_w)  # all rows
            text = f"held-back relative error of the pruned units {before:.4g} → {after:.4g} (λ {damp:g}·mean H)"
        else:
            new_w, new_b = ridge_intercept(*sums[i], RESTORE_DAMPS[len(RESTORE_DAMPS) // 2], old_w)
            text = "no held-back rows"
        weight.values = np.ascontiguousarray(new_w.astype(np.asarray(weight.values).dtype))
        bias.values = np.ascontiguousarray(new_b.astype(np.asarray(bias.values).dtype))
        changes.append(LayerChange(restore.node.name, "MatMul", f"refit linear restore of '{restore.target}': {text}",
                                   params_before=params, params_after=params, details=details))
    return changes
