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
from onnxzip.inputs import fixed_batch
from onnxzip.graph import constant_value, export_model, import_graph, walk_nodes
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.passes.cluster import Codebook, DecodedWeight, find_decodes, refit_codebook
from onnxzip.passes.cluster_int8 import find_int8_decodes
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
from onnxzip.report import LayerChange
from onnxzip.schema import option

CHUNK = 4  # samples per onnxruntime run (a model with a fixed batch runs its own)
STATS_BYTES = 1 << 30  # Gram and cross matrices held at once


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


def _consumers(graph: gs.Graph, tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    return [(node, slot) for node, _owner, _path in walk_nodes(graph)
            for slot, inp in enumerate(node.inputs) if inp is tensor]


@register_pass
class ReconstructPass(Pass):
    name = "reconstruct"
    config_class = ReconstructConfig
    summary = ("refit codebook weights layer by layer to the original's outputs on the calibration "
               "data (GPTQ assignment, closed-form centroids, bias correction); same file size")
    reduces_bytes = False  # changes values, never sizes

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
        if not jobs:
            report.notes.append("no codebook weight to reconstruct (run the cluster pass first)")
            return PassResult(model, report, plan)
        feeds = context.feeds
        if self.config.samples is not None:
            feeds = sample_chunks(feeds, self.config.samples)[0]
        batch = fixed_batch(model) or CHUNK
        chunks = sample_chunks(feeds, batch)
        if self.config.holdout and len(chunks) < 2:
            raise ConfigError(f"reconstruct holdout needs at least 2 runs of {batch} samples; "
                              "give more calibration samples or holdout=0.")
        limit = self.config.rows_per_sample * batch
        stages = self.config.stages or len(jobs)
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
                report.changes.append(self._reconstruct(name, job, stats[name], decodes))
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
        jobs: dict[str, _Job] = {}
        for name, entry in plan.layers.items():
            if not entry.get("reconstruct"):
                report.skip(name, "", entry.get("reason", "not planned"))
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

    def _reconstruct(self, name: str, job: _Job, stats: LayerStats, decodes: dict[str, DecodedWeight]) -> LayerChange:
        """Fit one weight, correct its bias, keep the result unless the held-back error grows."""
        op = "/".join(sorted({n.op for n in job.nodes}))
        stored = job.decoded.stored()
        site = job.pairs[0][0]
        fitted = refit_codebook(stored, job.weight.astype(np.float64), site, stats,
                                iterations=self.config.iterations, damp=self.config.damp)
        if fitted is None:
            return LayerChange(name, op, "skipped", "per-channel codebook along an axis that is not the layer's output",
                               params_before=stored.indices.size, params_after=stored.indices.size)
        new, fit = fitted
        weight_view = site.view(job.weight.astype(np.float64))
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
        details: dict[str, Any] = {"k": stored.k, "bits": stored.bits, "step": fit.step,
                                   "fit_error_before": round(fit.before, 6), "fit_error_after": round(fit.after, 6),
                                   "rows": stats.count}
        held = stats.held()
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
                                   params_before=stored.indices.size, params_after=stored.indices.size, details=details)
        job.decoded.store(new)
        if shift is not None and bias is not None:
            details["bias_corrected"] = bool(bias(shift))
        scored = (f"held-back output error {details['error_before']:.4g} → {details['error_after']:.4g}"
                  if held is not None else f"fit error {fit.before:.4g} → {fit.after:.4g}")
        return LayerChange(name, op, f"reconstructed K={stored.k}, {stored.bits}-bit: {scored}",
                           params_before=stored.indices.size, params_after=stored.indices.size, details=details)


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
