"""The cluster pass: every eligible weight becomes a small codebook plus compact per-weight
indices, decoded in the graph with standard ONNX ops (CN 115456169 A step 4-5, CN 114819143 A
step 5).

Each weight tensor W is clustered by 1-D k-means (:mod:`onnxzip.cluster`): W ≈ codebook[indices]
with K centroids (``k``, ``bits`` → K = 2**bits, or ``k=auto``: K from the improved BIRCH,
bounded by ``max_bits``). The file stores the codebook (K values in W's dtype; [C, K] per
output channel with ``per_channel``, flattened row-major) and the indices in b = ⌈log₂K⌉ bits
each, any b from 1 to 8: uint8 for b = 8; b = 1, 2, 4 as 8/b indices packed per byte (layout of
:func:`onnxzip.cluster.pack_indices`: first index in the low bits); b = 3, 5, 6, 7 as bit
planes of those widths (:func:`onnxzip.cluster.pack_planes`: 7 = 4 + 2 + 1), exactly b bits
per index in total.

The decode subgraph and the reading back of decodes are in :mod:`onnxzip.passes.cluster_decode`:
onnxruntime folds it at load, so inference runs the original graph with quantized weights. A
weight shared by several nodes is clustered once, its decode placed in the innermost graph that
encloses all its uses (``If``/``Loop`` bodies included).

``k=auto`` with ``round_k_to_storage`` (default) raises the BIRCH K to the capacity of its
storage width (K = 13 → 16, K = 20 → 32): the file is the same size, the error only drops.
An explicit ``k`` is used as given. K > 256 (more than 8 bits per index) is refused: uint16
indices would save at most 2× and a fine scalar quantizer serves that better.

With calibration data (``--data``) and ``activation_aware`` (default), weights feeding
MatMul/Gemm/Conv are clustered by weighted k-means, each element weighted by the energy
E[x_j²] of the input channel it multiplies (:mod:`onnxzip.passes.cluster_calibration`).

``avg_bits=B`` chooses every weight's width itself: a sensitivity curve per weight (output
distortion on the data with that weight alone clustered at b = 1..``max_bits`` bits, measured in
onnxruntime) and :func:`onnxzip.cluster.allocate_bits` minimise the summed distortion at a mean
of B index bits per clustered weight. ``bits=search`` bisects B (steps of ``search_step``) for
the smallest model that meets the ``--metric`` conditions. Leaving a tensor raw is one more
point of every curve (no error, 32 bits per float32 value counted in the budget), so a small
sensitive tensor stays raw. With ``method=gptq`` each width's codebook is GPTQ-fitted before it
is measured (one round; apply runs three), so the curves describe what the file will store, and
apply reuses the sweep's layer statistics (``sweep_heldout``: those fits use the items the sweep
does not run, and apply gathers its own). ``sweep_state_steps`` measures a streaming model (a
state output fed back as an input) over several calls that feed back its own state. ``damp=auto``
chooses each GPTQ fit's damping by the error on held-back items. The plan records each weight's k
and bits (replayable) and its curve; weights outside the main graph get ⌈B⌉ bits.

``vector=2`` stores a weight of b ≤ 4 bits per weight as 4**b two-value codewords ([K, 2]) with one
2b-bit index per pair of neighbouring output channels' weights (elements 2p, 2p+1 of the channel
axis; :mod:`onnxzip.cluster.vq`): the same bytes of indices, codewords placed where the pairs lie.
The decode gathers [..., 2] codewords, a Transpose puts each pair along the channel axis (none when
it is the last) and a Reshape gives the weight. ``method=gptq`` assigns both rows of a pair jointly
(:func:`onnxzip.cluster.gptq.gptq_assign`); a weight with no even output-channel axis stays scalar,
and so do widths above 4 bits (256 codewords of 8-bit indices at most).

Biases and normalization parameters (``small_params``) and tensors of any size are clustered
when that shrinks the file: a tensor is kept raw unless its codebook, packed indices and decode
nodes, serialized, take fewer bytes than the raw tensor.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.cluster import (
    allocate_bits,
    cluster_per_channel,
    cluster_weights,
    estimate_k_birch,
    index_entropy_bits,
    kmeans_pairs,
    pair_merge,
    pair_split,
    pairable,
    mean_bits,
    storage_bits,
)
from onnxzip.cluster.gptq import DAMP, CodebookFit, LayerProblem, fit_codebook, layer_problem
from onnxzip.core.compat import default_opset
from onnxzip.errors import ConfigError
from onnxzip.core.inputs import as_samples, declared_shapes, first_samples, fixed_batch, generate_inputs
from onnxzip.core.graph import NameScope, export_model, import_graph, subgraphs_of, walk_nodes
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.passes.cluster_decode import (
    FLOAT_DTYPES,
    Codebook,
    DecodeShared,
    decode_bytes,
    insert_decode,
    scale_shape,
)
from onnxzip.passes.cluster_int8 import convert_int8, require_data
from onnxzip.passes.cluster_calibration import (
    ActivationProbe,
    LayerSite,
    LayerStats,
    SensitivityProbe,
    collect_stats,
    input_energies,
    layer_site,
    relative_error,
    sample_chunks,
    stat_bytes,
    stat_groups,
)
from onnxzip.core.report import LayerChange
from onnxzip.core.schema import option
from onnxzip.core.weights import WEIGHT_ROLES, Weight, constant_uses, discover_weights

log = logging.getLogger(__name__)

DEFAULT_K = 16
MAX_K = 256
LOSSLESS = 1e-7  # relative output distortion at which a sensitivity sweep stops widening
PAIR_INT8_OPS = frozenset({"MatMul", "Gemm", "Conv"})  # execute=int8 runs these on int8 kernels: scalar codebooks
PAIR_MAX_K = 16  # vector=2: scalar-equivalent K up to 16 (4 bits per weight, 256 codewords, 8-bit indices)
MEASURED_WIDTHS = 5  # widths a sweep measures per weight; wider ones are extrapolated (see _allocate)
SWEEP_MIN_SAMPLES = 8  # sweep_flops never cuts the sweep below this many data items
GPTQ_ITERATIONS = 3  # rounds of GPTQ assignment + centroid refit
SWEEP_GPTQ_ITERATIONS = 1  # the same in the sensitivity sweep of method=gptq
AUTO_DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)  # damp=auto: the GPTQ dampings compared on held-back rows
AUTO_DAMP_HOLDOUT = 0.25  # damp=auto: share of the data chunks held back to compare them
GPTQ_ROWS_PER_SAMPLE = 256  # input rows (Conv: patch positions) per sample a layer's Gram matrix sums
STATS_BYTES = 1 << 30  # Gram matrices held at once
INT8_MAX_ERROR = 1e-3  # execute=int8: default budget of the relative output distortion
INT8_MIN_SPEEDUP = 1.1  # execute=int8: the int8 form must run this much faster than float codebooks
SMALL_ROLES = frozenset({"bias", "norm_scale", "norm_bias", "norm_mean", "norm_var"})


@dataclass
class ClusterConfig:
    k: int | Literal["auto"] | None = option(
        None, "centroids per codebook (at most 256), or 'auto' (improved BIRCH)",
        shown="16 when neither bits nor avg_bits is given",
    )
    bits: int | Literal["search"] | None = option(
        None,
        "alternative to k: K = 2**bits (1 to 8); 'search': the smallest avg_bits meeting --metric",
    )
    avg_bits: float | None = option(
        None,
        "mean index bits per clustered weight; each weight's width chosen by measured sensitivity",
    )
    activation_aware: bool = option(
        True, "with data: weight each element's error by the energy of the input it multiplies"
    )
    small_params: bool = option(
        True, "also biases and BatchNorm/LayerNorm parameters, when that shrinks the file"
    )
    search_step: float = option(0.25, "bits=search: resolution of the avg_bits bisection")
    sweep_samples: int = option(32, "avg_bits/bits=search: data items the sensitivity sweep runs (at most)")
    sweep_flops: float = option(
        4e12, "avg_bits/bits=search: model FLOPs the sensitivity sweep may spend; a large model's sweep "
              "runs fewer data items (at least 8). 0: no limit",
    )
    init: Literal["kmeans||", "kmeans++", "linear", "quantile"] = option(
        "kmeans||", "initial centroids (linear: evenly spaced from w_min to w_max, as in Method 1)"
    )
    per_channel: bool = option(
        False, "one codebook per output channel ([C, K]) instead of per tensor"
    )
    channel_scale: bool = option(
        False, "one codebook per tensor for the weight divided by a scale per output channel (its RMS; "
               "stored as [C] floats, refit with method=gptq): most of per_channel's accuracy on layers "
               "whose channels differ in range (BatchNorm folded into Conv, gate rows) at the size of a "
               "per-tensor codebook"
    )
    min_size: int = option(
        1, "cluster only tensors with at least this many elements (all: decided by measured bytes)"
    )
    include: list[str] = option(
        [], "weight or node name globs, or op types, to consider (empty: all)"
    )
    exclude: list[str] = option([], "weight or node name globs, or op types, to leave alone")
    keep_zero: bool = option(True, "a tensor with exact zeros (pruned) keeps an exact 0.0 centroid")
    birch_threshold_ratio: float = option(0.1, "k=auto: BIRCH threshold T = ratio × std(weights)")
    birch_branching: int = option(16, "k=auto: BIRCH branching factor L")
    min_k: int = option(2, "k=auto: lower bound on K")
    max_bits: int = option(8, "widest index (1 to 8): k=auto keeps K <= 2**max_bits; avg_bits and bits=search "
                              "give no weight more bits")
    round_k_to_storage: bool = option(
        True,
        "k=auto: raise K to what its index width holds anyway (13 → 16): same size, lower error",
    )
    seed: int | None = option(None, "seed of the k-means initialisation (default: the run's seed)")
    method: Literal["kmeans", "gptq"] = option(
        "kmeans",
        "gptq: with data, the k-means codebook's indices are assigned column by column with error "
        "feedback through the layer's input Gram matrix (GPTQ), centroids refit in closed form",
    )
    sweep_gptq: bool = option(
        True, "method=gptq with avg_bits/bits=search: the sensitivity sweep measures each width on its "
              "GPTQ-fitted codebook, as apply stores it (false: on plain k-means codebooks; faster)",
    )
    sweep_gptq_flops: float = option(
        3e10, "sweep_gptq: arithmetic its GPTQ fits may cost, estimated per weight as 5·m·n² + n³ for an "
              "m×n layer (n inputs); weights are admitted cheapest first, the rest are measured on k-means "
              "codebooks (measured: ~1e11 is ~100 s on one core). 0: no limit",
    )
    damp: float | Literal["auto"] = option(
        DAMP, "method=gptq: ridge λ = damp·mean(diag H) pulling each fit toward the weight where the data says "
              "nothing; auto: per weight and width the one of 0.01-1 whose fit on 3/4 of the data items has the "
              "lowest output error on the other 1/4, then refit on all (5 fits more per weight)",
    )
    sweep_heldout: bool = option(
        False, "sweep_gptq: fit each width's GPTQ codebook on the data items the sweep does not run, so the "
              "curves measure how the fit generalises (a layer fed few distinct inputs, such as token "
              "embeddings, fits them exactly and moves its error to inputs the data lacks); false: fit on all",
    )
    sweep_state_steps: int = option(
        1, "avg_bits/bits=search on a streaming model (an output fed back as an input, detected on the data): "
           "the sensitivity sweep runs this many calls, feeding back each call's state, and averages the "
           "distortion over them, so recurrent weights are measured with the error their state accumulates "
           "(1: one call)",
    )
    vector: int = option(
        1, "weights per codebook entry: 2 = one index per pair of neighbouring output channels' weights into "
           "K = 4**bits two-value codewords (same bits per weight as a scalar codebook of 2**bits values, "
           "about a third less weight error on real layers; widths up to 4 bits, wider ones scalar; per tensor "
           "or with channel_scale; with execute=int8 only weights no int8 kernel reads, such as LSTM/GRU's)",
    )
    execute: Literal["float", "int8"] = option(
        "float",
        "int8: codebooks of MatMul/Gemm/Conv weights stored as int8 + scale behind DequantizeLinear, "
        "activations quantized (calibrated on --data), so onnxruntime runs int8 kernels where each "
        "layer's measured output error allows",
    )
    int8_max_error: float | None = option(
        None, "execute=int8: budget of the relative output distortion the int8 layers may add",
        shown=f"{INT8_MAX_ERROR:g}",
    )
    int8_min_speedup: float | None = option(
        None, "execute=int8: keep the int8 form only when its measured batch-1 latency is this many times "
        "lower than the float codebooks' (0: always keep it)", shown=f"{INT8_MIN_SPEEDUP:g}",
    )
    int8_reduce_range: bool = option(
        False, "execute=int8: 7-bit weights (for x86 CPUs without VNNI, where u8·s8 sums may saturate)"
    )

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.k, self.bits, self.avg_bits)) > 1:
            raise ValueError("give one of k, bits and avg_bits")
        if self.per_channel and self.channel_scale:
            raise ValueError("give one of per_channel (a codebook per channel) and channel_scale (one scaled codebook)")
        if self.vector not in (1, 2):
            raise ValueError(f"vector must be 1 (scalar codebooks) or 2 (codewords of pairs), got {self.vector}")
        if self.vector == 2 and self.per_channel:
            raise ValueError("vector=2 codebooks are per tensor (or channel-scaled): drop per_channel")
        if self.avg_bits is not None and not 1 <= self.avg_bits <= self.max_bits:
            raise ValueError(
                f"avg_bits must be from 1 to max_bits={self.max_bits}, got {self.avg_bits}"
            )
        if self.sweep_samples < 1:
            raise ValueError(f"sweep_samples must be at least 1, got {self.sweep_samples}")
        if self.sweep_flops < 0:
            raise ValueError(f"sweep_flops must be 0 (no limit) or positive, got {self.sweep_flops}")
        if self.damp != "auto" and not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"damp must be positive or 'auto', got {self.damp!r}")
        if self.sweep_state_steps < 1:
            raise ValueError(f"sweep_state_steps must be at least 1, got {self.sweep_state_steps}")
        if self.sweep_gptq_flops < 0:
            raise ValueError(f"sweep_gptq_flops must be 0 (no limit) or positive, got {self.sweep_gptq_flops}")
        if self.search_step <= 0:
            raise ValueError(f"search_step must be positive, got {self.search_step}")
        if isinstance(self.k, int) and not 1 <= self.k <= MAX_K:
            raise ValueError(
                f"k must be from 1 to {MAX_K} (at most 8 bits per index), got {self.k}"
            )
        if self.bits is not None and self.bits != "search" and not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, got {self.bits}")
        if not 1 <= self.max_bits <= 8:
            raise ValueError(f"max_bits must be from 1 to 8, got {self.max_bits}")
        if not 1 <= self.min_k <= 2**self.max_bits:
            raise ValueError(
                f"min_k must be from 1 to 2**max_bits = {2**self.max_bits}, got {self.min_k}"
            )
        if self.min_size < 1:
            raise ValueError(f"min_size must be at least 1, got {self.min_size}")
        if self.birch_threshold_ratio <= 0:
            raise ValueError(
                f"birch_threshold_ratio must be positive, got {self.birch_threshold_ratio}"
            )
        if self.birch_branching < 2:
            raise ValueError(f"birch_branching must be at least 2, got {self.birch_branching}")
        if self.execute != "int8" and (self.int8_max_error is not None or self.int8_reduce_range
                                       or self.int8_min_speedup is not None):
            raise ValueError("int8_max_error, int8_min_speedup and int8_reduce_range need execute=int8")
        if self.int8_min_speedup is not None and self.int8_min_speedup < 0:
            raise ValueError(f"int8_min_speedup must be at least 0, got {self.int8_min_speedup}")
        if self.int8_max_error is not None and not self.int8_max_error > 0:
            raise ValueError(f"int8_max_error must be positive, got {self.int8_max_error}")

    @property
    def by_channel(self) -> bool:
        """Codebooks follow the output channels (per_channel or channel_scale)."""
        return self.per_channel or self.channel_scale

    @property
    def allocated(self) -> bool:
        """Widths chosen per weight from sensitivity curves (avg_bits or bits=search)."""
        return self.avg_bits is not None or self.bits == "search"

    @property
    def requested_k(self) -> int | Literal["auto"]:
        if isinstance(self.bits, int):
            return 2**self.bits
        return DEFAULT_K if self.k is None else self.k


@register_pass
class ClusterPass(Pass):
    name = "cluster"
    config_class = ClusterConfig
    weight_only = True
    summary = (
        "Codebook quantization: weights → K centroids + indices of any width 1-8 bits decoded by Gather."
    )
    shorthand = "k"

    def needs_data(self) -> str | None:
        if self.config.execute == "int8":
            return "cluster execute=int8 measures activation scales and each layer's error on calibration inputs"
        return None

    def applies_to(self, weight: Weight) -> bool:
        return self._skip_reason(weight) is None

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        if self.config.execute == "int8":
            require_data(context.feeds, context.generated)
        graph = import_graph(model)
        table = discover_weights(graph)
        uses = constant_uses(graph)
        seed = context.seed if self.config.seed is None else self.config.seed
        layers: dict[str, dict[str, Any]] = {}
        candidates: list[tuple[str, np.ndarray, int | None]] = []
        for weight in table.weights:
            if self._skip_reason(weight) is not None or weight.name not in uses:
                continue
            constant, consumers = uses[weight.name]
            values = np.asarray(constant.values)
            if _value_problem(values) is not None:
                continue  # apply reports it
            axis = _channel_axis(constant, consumers) if self.config.by_channel else None
            if self.config.allocated:
                candidates.append((weight.name, values, axis))
                continue
            k, birch_k = self.config.requested_k, None
            if k == "auto":
                birch_k = self._birch_k(values, axis)
                k = int(np.clip(birch_k, self.config.min_k, 2**self.config.max_bits))
                if self.config.round_k_to_storage:
                    k = 2 ** storage_bits(k)
            entry = {"k": k, "bits": storage_bits(k), **self._channel_entry(axis)}
            if self._pair_axis(constant, consumers, values, k, self.config.vector == 2) is not None:
                entry["pairs"] = True
            layers[weight.name] = entry if birch_k is None else {**entry, "birch_k": birch_k}
        found: dict[str, Any] = {}
        if candidates:
            layers.update(self._allocate(model, uses, candidates, context, seed, found))
        return Plan(self.name, self.config_dict(), layers, found)

    def _energies(
        self, model: onnx.ModelProto, uses: dict[str, Any], context: PassContext
    ) -> dict[str, np.ndarray]:
        """Activation-aware element weights (see :func:`input_energies`), once per model."""
        if not (self.config.activation_aware and context.feeds):
            return {}
        names = [n for n, (c, _) in uses.items() if np.asarray(c.values).ndim >= 2]
        return self.per_model("input_energies", model,
                              lambda: input_energies(model, uses, names, context.feeds, context.device))

    def _allocate(
        self,
        model: onnx.ModelProto,
        uses: dict[str, Any],
        candidates: list[tuple[str, np.ndarray, int | None]],
        context: PassContext,
        seed: int,
        found: dict[str, Any],
    ) -> dict[str, dict[str, Any]]:
        """Per-weight widths from measured sensitivity curves: at ``avg_bits``, or the smallest
        mean width whose model ``context.accept`` takes (``bits=search``). What apply reuses goes
        into ``found`` (the plan's): the sweep's note and its layer statistics."""
        search = self.config.bits == "search"
        if search and context.accept is None:
            raise ConfigError(
                "bits=search needs metric conditions (--metric) and data with labels or "
                "references (--data)."
            )
        feeds = context.feeds or generate_inputs(model, batch=8, dims=context.dims, seed=seed)
        feeds = first_samples(feeds, self._sweep_count(model, context, len(candidates)), model)
        energies = self._energies(model, uses, context)
        probe = SensitivityProbe(model, feeds, context.device, [c[0] for c in candidates],
                                 state_steps=self.config.sweep_state_steps)
        # method=gptq: each width is measured as apply will store it (GPTQ-fitted), not as plain
        # k-means; GPTQ lowers some layers' error far more than others', which moves the widths
        second_order = None
        fitted_on = None  # sweep_heldout: the data items the sweep's fits use (those the probe does not run)
        if self.config.method == "gptq" and self.config.sweep_gptq and context.feeds:
            names = {c[0]: {} for c in candidates}
            everything = as_samples(context.feeds, declared_shapes(model))
            if self.config.sweep_heldout and everything.count - feeds.count >= SWEEP_MIN_SAMPLES:
                # fitted on the items the probe does not run: the curves measure how a fit
                # generalises (a layer fed few distinct inputs, e.g. token embeddings, is fitted
                # exactly on them and pushes its error into the inputs the data lacks)
                fit = everything.take(slice(feeds.count, everything.count))
                second_order = self._second_order(model, uses, Plan(self.name, {}, names), context, fit)
                fitted_on = fit.count
            else:
                second_order = self._second_order(model, uses, Plan(self.name, {}, names), context)
                found["second_order"] = (model, second_order)
        note = f"sensitivity sweep on {feeds.count} data item{'s' if feeds.count != 1 else ''}"
        if probe.steps > 1:
            note += (f", {probe.steps} calls each feeding back the state ("
                     + ", ".join(f"{o} → {i}" for i, o in probe.pairs.items()) + ")")
        fitted_in_sweep: set[str] = set()
        if second_order is not None:
            fitted_in_sweep, left = second_order.affordable(
                {name: values for name, values, _axis in candidates}, self.config.sweep_gptq_flops)
            note += (f", each width's codebook GPTQ-fitted ({SWEEP_GPTQ_ITERATIONS} round"
                     f"{'s' if SWEEP_GPTQ_ITERATIONS != 1 else ''}) as apply stores it")
            if fitted_on is not None:
                note += f" (fitted on the {fitted_on} data items the sweep does not run)"
            if left:
                note += (f" ({len(left)} of {len(left) + len(fitted_in_sweep)} weights, the costliest, "
                         f"on k-means codebooks: sweep_gptq_flops {self.config.sweep_gptq_flops:g})")
        found["sweep_note"] = note
        opset = default_opset(model)
        widths = range(1, self.config.max_bits + 1)
        curves: dict[str, dict[int, float]] = {}
        sizes: dict[str, int] = {}
        fixed: list[str] = []
        paired: set[str] = set()  # vector=2: weights whose narrow widths are codewords of pairs
        for name, values, axis in context.track(candidates, "sensitivity"):
            if not probe.covers(name):
                fixed.append(name)
                continue
            pairs_along = self._pair_axis(*uses[name], values, 1, self.config.vector == 2)
            if pairs_along is not None:
                paired.add(name)
            curve: dict[int, float] = {}
            for bits in widths:
                pair_axis = pairs_along if 2**bits <= PAIR_MAX_K else None
                if len(curve) >= MEASURED_WIDTHS:  # wider: extrapolated, neither clustered nor run
                    if 2**bits > values.size:
                        break
                    sized = _sized(values, bits, axis, self.config.channel_scale, pair_axis)
                    if decode_bytes(sized, values.shape, opset, name) >= _raw_bytes(name, values):
                        break
                    curve[bits] = _extrapolate(curve, bits)
                    continue
                stored = self._stored(name, values, 2**bits, axis, seed, energies.get(name), pair_axis)[0]
                if decode_bytes(stored, values.shape, opset, name) >= _raw_bytes(name, values):
                    continue  # this width would not shrink the tensor
                fitted = (second_order.refit(name, stored, values, SWEEP_GPTQ_ITERATIONS)
                          if second_order and name in fitted_in_sweep else None)
                if fitted is not None:
                    stored = fitted[0]
                width = int(stored.weight_bits)
                curve[width] = probe.distortion(name, stored.decode())
                if curve[width] <= LOSSLESS or width < bits:
                    break  # wider codebooks cannot do better (or the tensor has < 2**bits values)
            if curve:  # or left raw: no error, 8·itemsize bits per value in the budget
                curve[8 * values.dtype.itemsize] = 0.0
                curves[name], sizes[name] = curve, int(values.size)
        fixed_ifs = sum(taken is not None for taken in probe.branches.values())
        if fixed_ifs:
            found["sweep_note"] += (f"; {fixed_ifs} If with the same condition on every item measured "
                                    "through the branch it takes")
        if fixed:
            found["sweep_note"] += (f"; {len(fixed)} weights it cannot replace (in a branch the data never takes, or a "
                                    "Loop/Scan body) take the mean width rounded up")
        axes = {name: axis for name, _values, axis in candidates}
        shapes = {name: values.size for name, values, _axis in candidates}

        def layers_at(avg: float) -> dict[str, dict[str, Any]]:
            chosen = allocate_bits(curves, sizes, max(avg, _floor_bits(curves, sizes)))
            chosen.update({name: min(8, int(np.ceil(avg))) for name in fixed})
            out = {}
            for name, bits in chosen.items():
                if bits > 8:
                    continue  # left raw: clustering it costs more accuracy than its bytes
                entry = {"k": 2**bits, "bits": bits, **self._channel_entry(axes[name])}
                if name in paired and 2**bits <= PAIR_MAX_K:
                    entry["pairs"] = True
                if name in curves:
                    entry["sensitivity"] = {
                        str(b): float(f"{d:.4g}") for b, d in curves[name].items()
                    }
                out[name] = entry
            return out

        if not search:
            layers = layers_at(float(self.config.avg_bits))
        else:
            layers = self._search(model, context, layers_at, found)
        log.info("cluster widths: mean %.3f bits over %d weights",
                 mean_bits({n: e["bits"] for n, e in layers.items()}, shapes), len(layers))
        return layers

    def _sweep_count(self, model: onnx.ModelProto, context: PassContext, candidates: int) -> int:
        """Data items the sensitivity sweep runs: ``sweep_samples``, fewer (never under
        :data:`SWEEP_MIN_SAMPLES`) when a run per measured width of every candidate over them
        would cost more than ``sweep_flops`` model FLOPs. Counted in FLOPs, not seconds, so the
        widths chosen do not depend on how busy the machine is."""
        wanted = self.config.sweep_samples
        if not self.config.sweep_flops or wanted <= SWEEP_MIN_SAMPLES:
            return wanted
        try:  # the context's cost of the input model, which the pass report counts anyway
            per_item = context.cost(model).flops
        except Exception:  # noqa: BLE001 - a model FLOPs cannot be counted for runs on all its items
            log.debug("could not count the model's FLOPs for the sweep budget", exc_info=True)
            return wanted
        runs = max(candidates, 1) * min(MEASURED_WIDTHS, self.config.max_bits)
        affordable = int(self.config.sweep_flops // max(per_item * runs, 1))
        return max(SWEEP_MIN_SAMPLES, min(wanted, affordable))

    def _search(
        self, model: onnx.ModelProto, context: PassContext, layers_at: Any, found: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Bisection over avg_bits ∈ {1, 1 + step, ..., max_bits} for the smallest mean width
        whose clustered model meets the metric conditions (assumed monotone in the width)."""
        step = self.config.search_step
        grid = list(np.arange(1.0, self.config.max_bits + 1e-9, step))
        config = self.config_dict()

        def accepted(avg: float) -> bool:
            plan = Plan(self.name, config, layers_at(avg), found)  # the sweep's statistics reused
            ok = bool(context.accept(self.apply(model, plan, context).model))
            log.info("bits=search: avg_bits=%.3g %s", avg, "meets the metrics" if ok else "fails")
            return ok

        low, high = 0, len(grid) - 1
        if not accepted(grid[high]):
            log.warning("bits=search: even avg_bits=%g fails the metric conditions", grid[high])
            return layers_at(grid[high])
        while low < high:
            middle = (low + high) // 2
            if accepted(grid[middle]):
                high = middle
            else:
                low = middle + 1
        return layers_at(grid[high])

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        if self.config.execute == "int8":
            require_data(context.feeds, context.generated)
        graph = import_graph(model)
        table = discover_weights(graph)
        uses = constant_uses(graph)
        parents = _graph_parents(graph)
        names = NameScope(graph)
        shared = DecodeShared()  # unpack tables and small constants, per graph
        opset = default_opset(model)
        seed = context.seed if self.config.seed is None else self.config.seed
        energies = self._energies(model, uses, context)
        second_order = self._second_order(model, uses, plan, context) if self.config.method == "gptq" else None
        report = self.new_report()
        for weight in context.track(table.weights, "cluster"):
            ops = "/".join(sorted({use.op_type for use in weight.uses}))
            entry = plan.layers.get(weight.name)
            reason = self._skip_reason(weight, planned=entry is not None)
            if reason is None and weight.name not in uses:
                reason = "not a single initializer (run the cleanup pass first)"
            if reason is None:
                reason = _value_problem(np.asarray(uses[weight.name][0].values))
            if reason is None and entry is None:
                reason = "not in the plan"
            if reason is not None:
                report.skip(
                    weight.name, ops, reason, params_before=weight.size, params_after=weight.size
                )
                continue
            k = _planned_k(weight.name, entry)
            constant, consumers = uses[weight.name]
            values = np.asarray(constant.values)
            by_channel = entry.get("per_channel") or entry.get("channel_scale")
            axis = _channel_axis(constant, consumers) if by_channel else None
            pair_axis = self._pair_axis(constant, consumers, values, k, bool(entry.get("pairs")))
            stored, quality = self._stored(
                weight.name, values, k, axis, seed, energies.get(weight.name), pair_axis
            )
            gptq = second_order.refit(weight.name, stored, values) if second_order else None
            if gptq is not None:
                stored = gptq[0]
                quality = {**quality, **_weight_quality(values, stored), "gptq_error_before": round(gptq[1].before, 6),
                           "gptq_error_after": round(gptq[1].after, 6)}
            encoded = decode_bytes(stored, values.shape, opset, weight.name)
            raw = _raw_bytes(weight.name, values)
            if encoded >= raw:
                report.skip(
                    weight.name,
                    ops,
                    f"codebook + indices + decode ({encoded} B) are not smaller "
                    f"than the weight ({raw} B)",
                    params_before=weight.size,
                    params_after=weight.size,
                )
                continue
            owner = _innermost_common_graph([g for _node, g in consumers], parents)
            added = insert_decode(owner, constant, consumers, stored, names, shared, opset)
            details = {
                "k": stored.k,
                "bits": stored.weight_bits if stored.pair_axis is not None else stored.bits,
                **self._channel_entry(axis),
                **({"pairs": True, "pair_axis": stored.pair_axis, "index_bits": stored.bits}
                   if stored.pair_axis is not None else {}),
                "codebook_shape": list(stored.codebook.shape),
                **quality,
                "activation_aware": weight.name in energies,
                "bytes_before": int(values.nbytes),
                "bytes_after": int(sum(c.values.nbytes for c in added)),
            }
            for key in ("birch_k", "sensitivity"):
                if key in entry:
                    details[key] = entry[key]
            if (entry.get("pairs") or self.config.vector == 2) and stored.pair_axis is None and k <= PAIR_MAX_K:
                details["note"] = ("no output-channel axis of even size over its uses: a scalar codebook "
                                   "instead of codewords of pairs")
            if (by_channel or self.config.by_channel) and axis is None:
                details["note"] = (
                    "no single output-channel axis over its uses; one codebook per tensor"
                    + (" without channel scales" if self.config.channel_scale else "")
                )
            scope = "" if axis is None else " with channel scales" if stored.scale is not None else " per channel"
            decision = f"clustered K={stored.k}, {stored.bits}-bit{scope}"
            if stored.pair_axis is not None:
                decision = (f"clustered K={stored.k} codewords of pairs along axis {stored.pair_axis}, "
                            f"{stored.weight_bits:g} bits per weight")
            report.changes.append(
                LayerChange(
                    weight.name,
                    ops,
                    decision,
                    params_before=weight.size,
                    params_after=weight.size,
                    details=details,
                )
            )
            report.modified = True
        clustered = {c.layer: (c.details["bits"], c.params_before) for c in report.changes
                     if not c.skipped}
        if clustered:
            count = sum(n for _b, n in clustered.values())
            average = sum(b * n for b, n in clustered.values()) / count
            report.notes.append(
                f"mean index width {average:.3f} bits over {count} clustered values"
            )
        if shared.tables():
            sizes = sorted({f"{t.name} ({t.values.nbytes} B)" for t in shared.tables()})
            report.notes.append(f"packed indices unpack through shared tables: {', '.join(sizes)}")
        for name in sorted(set(plan.layers) - {w.name for w in table.weights}):
            report.notes.append(f"plan entry '{name}' matches no weight of the model; ignored")
        sweep = plan.found.get("sweep_note")
        if sweep and any("sensitivity" in entry for entry in plan.layers.values()):
            report.notes.append(f"{sweep}; per weight, widths 1-{MEASURED_WIDTHS} measured, wider ones "
                                "extrapolated from the last two")
        graph.toposort(recurse_subgraphs=True)
        result = export_model(graph, model)
        if self.config.execute == "int8" and report.modified:
            result = self._int8(result, context, report)
        return PassResult(result, report, plan)

    def _int8(self, model: onnx.ModelProto, context: PassContext, report: Any) -> onnx.ModelProto:
        """execute=int8: the gated int8 form (:mod:`onnxzip.passes.cluster_int8`), in the report."""
        budget = INT8_MAX_ERROR if self.config.int8_max_error is None else self.config.int8_max_error
        done = convert_int8(model, context.feeds, context.device, max_error=budget,
                            reduce_range=self.config.int8_reduce_range,
                            sweep_samples=min(self.config.sweep_samples, 16),
                            min_speedup=INT8_MIN_SPEEDUP if self.config.int8_min_speedup is None
                            else self.config.int8_min_speedup,
                            timing=context.timer())
        for change in report.changes:
            if change.skipped:
                continue
            if change.layer in done.int8:
                change.decision += ", int8"
                change.details.update(execute="int8", int8_error=float(f"{done.int8[change.layer]:.4g}"))
            elif change.layer in done.int32_biases:
                change.decision = "int32 bias"
                change.details.update(execute="int32", int8_reason=f"bias of the int8 layer of "
                                      f"{done.int32_biases[change.layer]}: int32 at input × weight scale, "
                                      "its codebook dropped")
            else:
                reason = done.kept_float.get(change.layer, "not a codebook decode of the main graph")
                change.details.update(execute="float", int8_reason=reason)
        report.notes.extend(done.notes)
        kept = len(done.kept_float)
        summary = (f"execute=int8: {len(done.int8)} weights run int8, {kept} stay float codebooks "
                   f"(budget {budget:g}")
        summary += f", combined distortion {done.combined:.3g})" if done.combined is not None else ")"
        report.notes.append(summary)
        if not done.int8:
            log.warning("cluster execute=int8: no weight runs int8 (%s)",
                        "; ".join(sorted(set(done.kept_float.values()))[:3]) or "no candidate")
        return done.model

    def _skip_reason(self, weight: Weight, *, planned: bool = False) -> str | None:
        """Why ``weight`` is left as it is (None: eligible). A weight named in a replayed plan
        bypasses the size and include/exclude filters, never the type checks."""
        if weight.quantized:
            return "integer weight of an already-quantized model"
        allowed = WEIGHT_ROLES | SMALL_ROLES if self.config.small_params else WEIGHT_ROLES
        if not weight.roles & allowed:
            roles = "/".join(sorted(weight.roles))
            return f"{roles} parameter (only weights and embeddings are clustered)"
        if weight.dtype not in FLOAT_DTYPES:
            return f"{weight.dtype} tensor (float16/32/64 weights are clustered)"
        if planned:
            return None
        if weight.size < self.config.min_size:
            return f"{weight.size} elements < min_size {self.config.min_size}"
        if not _selected(weight, self.config.include, self.config.exclude):
            return "not selected by include/exclude"
        return None

    def _pair_axis(self, constant: gs.Constant, consumers: list[tuple[gs.Node, gs.Graph]], values: np.ndarray,
                   k: int, wanted: bool) -> int | None:
        """The axis a vector codebook of scalar-equivalent ``k`` pairs ``values`` along (their
        output channels), or None: not ``wanted``, K above :data:`PAIR_MAX_K`, no single
        output-channel axis over the uses, or an odd channel count; with ``execute=int8``, weights
        only MatMul/Gemm/Conv read stay scalar, since onnxruntime's int8 kernels take one value per
        weight (pairs serve the others: LSTM/GRU, embeddings)."""
        if not wanted or k > PAIR_MAX_K:
            return None
        if self.config.execute == "int8" and consumers and all(node.op in PAIR_INT8_OPS for node, _g in consumers):
            return None
        axis = _channel_axis(constant, consumers)
        return axis if pairable(values.shape, axis) else None

    def _channel_entry(self, axis: int | None) -> dict[str, bool]:
        """The plan's per-weight flags of a weight whose channel axis is ``axis`` (None: per tensor)."""
        if self.config.channel_scale:
            return {"per_channel": False, "channel_scale": axis is not None}
        return {"per_channel": axis is not None}

    def _birch_k(self, values: np.ndarray, axis: int | None) -> int:
        """BIRCH cluster count; per channel the largest over the channels (one K for all rows)."""
        rows = [values] if axis is None else list(np.moveaxis(values, axis, 0))
        return max(
            estimate_k_birch(
                row,
                threshold_ratio=self.config.birch_threshold_ratio,
                branching=self.config.birch_branching,
            )
            for row in rows
        )

    def _stored(
        self,
        name: str,
        values: np.ndarray,
        k: int,
        axis: int | None,
        seed: int,
        energy: np.ndarray | None,
        pair_axis: int | None = None,
    ) -> tuple[Codebook, dict[str, float]]:
        """:meth:`_cluster`, memoised on the tensor's content (the sensitivity sweep, the
        ``bits=search`` probes and ``apply`` cluster the same tensors at the same K)."""
        digest = hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16)
        if energy is not None:
            digest.update(np.ascontiguousarray(energy).tobytes())
        key = (name, digest.hexdigest(), k, axis, seed, self.config.channel_scale, pair_axis)
        cache = self.__dict__.setdefault("_cluster_cache", {})
        if key not in cache:
            cache[key] = (self._cluster(values, k, axis, seed, energy) if pair_axis is None
                          else _cluster_pairs(values, k, pair_axis, seed, energy, self.config.keep_zero,
                                              self.config.channel_scale and axis == pair_axis))
        return cache[key]

    def _cluster(
        self,
        values: np.ndarray,
        k: int,
        axis: int | None,
        seed: int,
        energy: np.ndarray | None = None,
    ) -> tuple[Codebook, dict[str, float]]:
        """Cluster ``values`` into at most ``k`` centroids (fewer when the tensor has fewer
        distinct values, which may also narrow the indices), by k-means weighted by ``energy``
        when given; the codebook takes the weight's dtype."""
        options = {"init": self.config.init, "keep_zero": self.config.keep_zero, "seed": seed,
                   "sample_weight": energy}
        if axis is not None and self.config.channel_scale:
            return _cluster_scaled(values, k, axis, options)
        if axis is None:
            result = cluster_weights(values, k, **options)
            entropy = index_entropy_bits(result.indices, result.k)
        else:
            result = cluster_per_channel(values, k, axis, **options)
            entropy = result.entropy_bits()
        stored = Codebook(
            result.codebook.astype(values.dtype), result.indices, axis, storage_bits(result.k)
        )
        quality = {"mse": float(result.mse), "sqnr_db": float(result.sqnr_db)}
        if values.dtype != np.float32:  # the codebook was rounded: measure what the graph decodes
            quality = _weight_quality(values, stored)
        return stored, {**quality, "entropy_bits": round(entropy, 4)}

    def _second_order(
        self, model: onnx.ModelProto, uses: dict[str, Any], plan: Plan, context: PassContext,
        feeds: Any = None,
    ) -> SecondOrder:
        """method=gptq: the layer input statistics of the planned weights, on the data (those the
        sensitivity sweep of the same model gathered, when it covers every planned weight)."""
        cached = plan.found.get("second_order")
        if cached is not None and cached[0] is model and set(plan.layers) <= cached[1].planned:
            return cached[1]
        if not context.feeds:
            raise ConfigError("cluster method=gptq needs calibration inputs (--data).")
        sites: dict[str, list[LayerSite]] = {}
        for name in plan.layers:
            if name not in uses:
                continue
            constant, consumers = uses[name]
            shape = tuple(int(d) for d in constant.shape)
            found = [layer_site(node, slot, shape) for node, _g in consumers
                     for slot, tensor in enumerate(node.inputs) if tensor is constant]
            if found and all(isinstance(f, LayerSite) for f in found):
                if len({f.view(np.empty(shape, np.uint8)).shape for f in found}) == 1:
                    sites[name] = found
        found = SecondOrder(model, sites, context, self.config.keep_zero, feeds, self.config.damp)
        found.planned = set(plan.layers)
        return found


def _weight_quality(values: np.ndarray, stored: Codebook) -> dict[str, float]:
    """mse and SQNR (dB) of what the graph decodes against the raw weight."""
    error = values.astype(np.float64) - stored.decode().astype(np.float64)
    squared = float(np.sum(error * error))
    power = float(np.sum(values.astype(np.float64) ** 2))
    return {"mse": squared / values.size, "sqnr_db": float(10 * np.log10(power / squared)) if squared else np.inf}


class SecondOrder:
    """Layer input statistics for method=gptq, computed for consecutive groups of weights (one
    onnxruntime pass over the data per group, so only one group's Gram matrices are held)."""

    def __init__(self, model: onnx.ModelProto, sites: dict[str, list[LayerSite]], context: PassContext,
                 keep_zero: bool, feeds: Any = None, damp: float | str = DAMP) -> None:
        self.model, self.sites, self.device, self.keep_zero = model, sites, context.device, keep_zero
        self.damp = damp
        self.chosen: dict[tuple[str, int], float] = {}  # damp=auto: the damp picked per (weight, bits)
        batch = fixed_batch(model)
        self.chunks = sample_chunks(context.feeds if feeds is None else feeds, batch or 8)
        self.limit = GPTQ_ROWS_PER_SAMPLE * (batch or 8)
        sizes = [(name, stat_bytes(found[0])) for name, found in sites.items()]
        self.groups = stat_groups(sizes, 1, STATS_BYTES)
        self.stats: dict[str, LayerStats] = {}
        self.branches: dict[str, bool] | None = None
        self.planned: set[str] = set(sites)  # the weights asked for (those without a site too)
        self.problem: tuple[str, float, LayerProblem] | None = None  # the last layer's, reused across widths

    def affordable(self, weights: dict[str, np.ndarray], budget: float) -> tuple[set[str], list[str]]:
        """(the weights whose sweep fits fit ``budget``, cheapest first; the others that have a
        layer site). A fit's arithmetic is estimated from the layer's [G, m, n] view: the centroid
        refit's Σ_r P_rᵀ H P_r costs m·n² per block and width (MEASURED_WIDTHS of them), the
        column order's Cholesky n³ once. 0: no limit."""
        costs = {}
        for name, values in weights.items():
            if name in self.sites:
                blocks, rows, cols = self.sites[name][0].view(values).shape
                costs[name] = MEASURED_WIDTHS * blocks * rows * cols**2 + cols**3
        admitted: set[str] = set()
        spent = 0.0
        for name in sorted(costs, key=lambda n: (costs[n], n)):
            if budget and spent + costs[name] > budget:
                break
            admitted.add(name)
            spent += costs[name]
        return admitted, sorted(set(costs) - admitted)

    def refit(self, name: str, stored: Codebook, values: np.ndarray,
              iterations: int = GPTQ_ITERATIONS) -> tuple[Codebook, CodebookFit] | None:
        if name not in self.sites:
            return None
        if name not in self.stats:
            group = next(g for g in self.groups if name in g)
            found = [s for n in group for s in self.sites[n]]
            probe = ActivationProbe(self.model, found, self.device, self.chunks, self.branches)
            self.branches = probe.branches
            pairs = {n: [(s, s) for s in self.sites[n]] for n in group
                     if all(s.key in probe.available for s in self.sites[n])}
            holdout = AUTO_DAMP_HOLDOUT if self.damp == "auto" and len(self.chunks) >= 4 else 0.0
            self.stats = collect_stats(pairs, probe, None, self.chunks, limit=self.limit, holdout=holdout)
        if name not in self.stats:
            return None
        site = self.sites[name][0]
        stats = self.stats[name]
        damp = self._damp(name, stored, values, site, stats, iterations)
        if self.problem is None or self.problem[:2] != (name, damp):  # one layer's at a time: a sweep's widths
            gram = _with_held(stats)
            self.problem = (name, damp, layer_problem(site.view(values), gram, gram, damp=damp))
        return refit_codebook(stored, values, site, stats, iterations=iterations, damp=damp,
                              keep_zero=self.keep_zero, problem=self.problem[2])

    def _damp(self, name: str, stored: Codebook, values: np.ndarray, site: LayerSite, stats: LayerStats,
              iterations: int) -> float:
        """The configured damp, or (damp=auto) the one of :data:`AUTO_DAMPS` whose fit on the
        statistics without the held-back rows has the lowest relative output error on them."""
        if self.damp != "auto":
            return float(self.damp)
        held = stats.held()
        if held is None:
            return DAMP
        key = (name, stored.bits)
        if key not in self.chosen:
            view = site.view(values).astype(np.float64)
            errors = []
            for damp in AUTO_DAMPS:
                fit = refit_codebook(stored, values, site, stats, iterations=iterations, damp=damp,
                                     keep_zero=self.keep_zero)
                errors.append(np.inf if fit is None else
                              relative_error(held, site.view(fit[0].decode()).astype(np.float64), view))
            self.chosen[key] = AUTO_DAMPS[int(np.argmin(errors))]
            log.debug("cluster damp=auto: %s at %d bits: held-back errors %s", name, stored.bits,
                      dict(zip(AUTO_DAMPS, np.round(errors, 6))))
        return self.chosen[key]


def _with_held(stats: LayerStats) -> np.ndarray:
    """H over every row: the fitted rows' Gram matrix plus the held-back rows' (x = x̃)."""
    held = stats.held()
    if held is None:
        return stats.gram
    rows = np.swapaxes(held[0].astype(np.float64), 0, 1)  # [G, R, n]
    return stats.gram + np.swapaxes(rows, 1, 2) @ rows


def _planned_k(name: str, entry: dict[str, Any]) -> int:
    """K of a plan entry. ``bits`` follows ``k`` (the smallest width holding it) and, when
    present, may only restate it: edit ``k`` to change a weight's codebook."""
    k = entry.get("k")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= MAX_K:
        raise ConfigError(
            f"Plan entry '{name}': k must be an integer from 1 to {MAX_K}, got {k!r}."
        )
    bits = entry.get("bits", storage_bits(int(k)))
    if isinstance(bits, bool) or not isinstance(bits, int) or 2**bits < k:
        raise ConfigError(
            f"Plan entry '{name}': bits={bits!r} cannot index k={int(k)} centroids; "
            "edit k (bits follow it)."
        )
    return int(k)


def _extrapolate(curve: dict[int, float], bits: int) -> float:
    """The distortion at ``bits`` continued from the two widest measured widths: a codebook's
    error falls by a steady factor per added bit (about 4 for smooth weight distributions), taken
    from the last measured step and held within [1/16, 1/2] so that noise in two small numbers
    cannot make a wider width look worse or free."""
    (b0, d0), (b1, d1) = sorted(curve.items())[-2:]
    step = min(max(d1 / d0 if d0 > 0 else 0.25, 1 / 16), 1 / 2) ** (1 / (b1 - b0))
    return float(d1 * step ** (bits - b1))


def _sized(values: np.ndarray, bits: int, axis: int | None, scaled: bool = False,
           pair_axis: int | None = None) -> Codebook:
    """A codebook of ``values``' shape and 2**bits entries whose values do not matter: what a
    width costs in bytes does not depend on them (``scaled``: with a channel scale along ``axis``;
    ``pair_axis``: 4**bits codewords of pairs)."""
    if pair_axis is not None:
        scale = np.ones(values.shape[axis], values.dtype) if scaled and axis == pair_axis else None
        return Codebook(np.zeros((4**bits, 2), values.dtype), np.zeros(pair_split(values, pair_axis).shape[:-1], np.uint8),
                        None, 2 * bits, scale, pair_axis if scale is not None else None, pair_axis=pair_axis)
    if scaled and axis is not None:
        return Codebook(np.zeros(2**bits, values.dtype), np.zeros(values.shape, np.uint8), None, bits,
                        np.ones(values.shape[axis], values.dtype), axis)
    rows = () if axis is None else (values.shape[axis],)
    return Codebook(np.zeros((*rows, 2**bits), values.dtype), np.zeros(values.shape, np.uint8), axis, bits)


def _cluster_pairs(values: np.ndarray, k: int, axis: int, seed: int, energy: np.ndarray | None,
                   keep_zero: bool, scaled: bool = False) -> tuple[Codebook, dict[str, float]]:
    """A vector codebook of k² codewords for the pairs of ``values`` along ``axis``
    (:func:`onnxzip.cluster.kmeans_pairs`, each coordinate weighted by its activation energy when
    given); ``keep_zero`` keeps an exact (0, 0) codeword for all-zero pairs. ``scaled``: of the
    values divided by their channel RMS along ``axis`` (the scales stored, each coordinate weighted
    by its scale², as :func:`_cluster_scaled`)."""
    scale, normalized = None, values.astype(np.float64)
    weight = np.ones(values.shape) if energy is None else np.broadcast_to(np.asarray(energy, np.float64), values.shape)
    if scaled:
        scale = channel_rms(values, axis)
        broadcast = scale.astype(np.float64).reshape(scale_shape(values.shape, axis))
        normalized, weight = normalized / broadcast, weight * broadcast * broadcast
    paired = pair_split(normalized, axis)
    points = paired.reshape(-1, 2)
    weights = None if energy is None and not scaled else pair_split(np.asarray(weight), axis).reshape(-1, 2)
    codewords, labels = kmeans_pairs(points, k * k, weights, seed=seed)
    zero = np.all(points == 0, axis=1)
    if keep_zero and zero.any():
        slot = int(np.argmin(np.sum(codewords * codewords, axis=1)))
        codewords[slot] = 0.0
        labels[zero] = slot
    stored = Codebook(codewords.astype(values.dtype), labels.reshape(paired.shape[:-1]).astype(np.uint8),
                      None, storage_bits(k * k), scale, axis if scaled else None, pair_axis=axis)
    entropy = index_entropy_bits(labels, k * k) / 2
    return stored, {**_weight_quality(values, stored), "entropy_bits": round(entropy, 4)}


def channel_rms(values: np.ndarray, axis: int) -> np.ndarray:
    """The RMS of each slice of ``values`` along ``axis`` (1 for an all-zero slice): the scale of a
    channel-scaled codebook, [C] in ``values``' dtype."""
    moved = np.moveaxis(values.astype(np.float64), axis, 0).reshape(values.shape[axis], -1)
    rms = np.sqrt(np.mean(moved * moved, axis=1))
    return np.where(rms > 0, rms, 1.0).astype(values.dtype)


def _cluster_scaled(values: np.ndarray, k: int, axis: int, options: dict[str, Any]) -> tuple[Codebook, dict[str, float]]:
    """One codebook for ``values`` divided by their channel RMS along ``axis``: k-means on the
    normalized values, each weighted by its scale² (times the activation energy, when given), as
    the error of a weight is its scale times the error of its normalized value."""
    scale = channel_rms(values, axis)
    shape = scale_shape(values.shape, axis)
    broadcast = scale.astype(np.float64).reshape(shape)
    energy = options.get("sample_weight")
    weight = np.broadcast_to(broadcast * broadcast, values.shape)
    if energy is not None:
        weight = weight * np.broadcast_to(np.asarray(energy, np.float64), values.shape)
    normalized = (values.astype(np.float64) / broadcast).astype(values.dtype)
    result = cluster_weights(normalized, k, **{**options, "sample_weight": weight})
    stored = Codebook(result.codebook.astype(values.dtype), result.indices, None, storage_bits(result.k), scale, axis)
    entropy = index_entropy_bits(result.indices, result.k)
    return stored, {**_weight_quality(values, stored), "entropy_bits": round(entropy, 4)}


def _floor_bits(curves: dict[str, dict[int, float]], sizes: dict[str, int]) -> float:
    """The smallest mean width the curves allow (every weight at its narrowest width)."""
    total = sum(sizes.values())
    return sum(sizes[n] * min(c) for n, c in curves.items()) / total if total else 1.0


def _raw_bytes(name: str, values: np.ndarray) -> int:
    """Serialized bytes of the tensor as an initializer."""
    return int(onnx.numpy_helper.from_array(np.asarray(values), name).ByteSize())


def _value_problem(values: np.ndarray) -> str | None:
    """Why a tensor cannot be clustered at all (None: it can)."""
    if values.size == 0:
        return "empty tensor"
    if not (np.isfinite(values.min()) and np.isfinite(values.max())):
        return "NaN or infinite values"
    return None


def _selected(weight: Weight, include: list[str], exclude: list[str]) -> bool:
    """Include/exclude by weight name, consumer node name or consumer op type."""
    targets = [(weight.name, use.op_type) for use in weight.uses] + [
        (use.node, use.op_type) for use in weight.uses
    ]
    included = not include or any(matches(name, op, include, []) for name, op in targets)
    excluded = any(not matches(name, op, [], exclude) for name, op in targets)
    return included and not excluded


def _graph_parents(graph: gs.Graph) -> dict[int, gs.Graph]:
    """id(subgraph) → the graph holding the node that owns it."""
    parents: dict[int, gs.Graph] = {}
    for node, owner, _path in walk_nodes(graph):
        for sub in subgraphs_of(node):
            parents[id(sub)] = owner
    return parents


def _innermost_common_graph(graphs: list[gs.Graph], parents: dict[int, gs.Graph]) -> gs.Graph:
    """The deepest graph enclosing all ``graphs`` (each graph encloses itself)."""

    def chain(graph: gs.Graph) -> list[gs.Graph]:
        path = [graph]
        while id(path[-1]) in parents:
            path.append(parents[id(path[-1])])
        return path[::-1]  # outermost first

    chains = [chain(g) for g in graphs]
    common = chains[0][0]
    for level in zip(*chains):
        if any(g is not level[0] for g in level):
            break
        common = level[0]
    return common


def _channel_axis(weight: gs.Constant, consumers: list[tuple[gs.Node, gs.Graph]]) -> int | None:
    """The output-channel axis of ``weight``: the axis whose slices each make one output channel
    (Conv: 0, ConvTranspose: 1, MatMul B: last, Gemm B: 0 with transB else 1, LSTM/GRU/RNN W/R:
    1 (gate rows), embedding: the feature axis). None when the uses disagree or are unknown."""
    axes = {
        _axis_of_use(node, index, len(weight.shape))
        for node, _graph in consumers
        for index, tensor in enumerate(node.inputs)
        if tensor is weight
    }
    return axes.pop() if len(axes) == 1 else None


def _axis_of_use(node: gs.Node, index: int, ndim: int) -> int | None:
    op = node.op
    if ndim < 2:
        return None
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "MatMul":
        return ndim - 1 if index == 1 else ndim - 2
    if op == "Gemm" and index in (0, 1):
        transposed = int(node.attrs.get("transB" if index == 1 else "transA", 0))
        return (0 if transposed else 1) if index == 1 else (1 if transposed else 0)
    if op in ("LSTM", "GRU", "RNN") and index in (1, 2):
        return 1
    if op == "Gather" and index == 0:
        gather_axis = int(node.attrs.get("axis", 0)) % ndim
        return ndim - 1 if gather_axis != ndim - 1 else 0
    return None


def codebook_channels(stored: Codebook, site: LayerSite) -> np.ndarray | None:
    """Codebook row of every row of ``site``'s view [G, m] (zeros per tensor), or None when a
    per-channel codebook's rows are not output rows of the view."""
    count = stored.indices.shape
    if stored.axis is None:
        return np.zeros(site.view(np.empty(count, np.uint8)).shape[:2], dtype=np.int64)
    return _view_rows(count, stored.axis, site)


def _view_rows(shape: tuple[int, ...], axis: int, site: LayerSite) -> np.ndarray | None:
    """The index along ``axis`` of every row of ``site``'s view [G, m], or None when a row spans
    several."""
    ids = site.view(np.indices(shape)[axis])
    if np.any(ids.min(axis=2) != ids.max(axis=2)):
        return None
    return ids[:, :, 0].astype(np.int64)


def refit_codebook(
    stored: Codebook, weight: np.ndarray, site: LayerSite, stats: LayerStats, *,
    iterations: int, damp: float = DAMP, keep_zero: bool = True, act_order: bool = True,
    problem: LayerProblem | None = None,
) -> tuple[Codebook, CodebookFit] | None:
    """``stored`` refit to reproduce ``weight`` on the layer inputs of ``stats``
    (:func:`onnxzip.cluster.gptq.fit_codebook`: GPTQ assignment and closed-form centroids; same
    K, width and shape). None when the codebook's channels do not follow the layer's rows.
    ``problem``: the layer's :func:`~onnxzip.cluster.gptq.layer_problem` from an earlier call."""
    if stored.pair_axis is not None:
        return _refit_pairs(stored, weight, site, stats, iterations=iterations, damp=damp, keep_zero=keep_zero,
                            act_order=act_order, problem=problem)
    channels = codebook_channels(stored, site)
    if channels is None:
        return None
    scale_ids = None
    if stored.scale is not None:
        scale_ids = _view_rows(stored.indices.shape, stored.scale_axis, site)
        if scale_ids is None:
            return None
    codebook = stored.codebook.reshape(1, -1) if stored.axis is None else stored.codebook
    pinned = (codebook == 0) if keep_zero and not np.all(weight) else None
    fit = fit_codebook(site.view(weight), codebook, site.view(stored.indices).astype(np.int64), channels,
                       stats.gram, stats.cross_term, iterations=iterations, damp=damp,
                       act_order=act_order, pinned=pinned, problem=problem, scale=stored.scale,
                       scale_ids=scale_ids)
    values = fit.codebook.reshape(stored.codebook.shape).astype(stored.codebook.dtype)
    indices = site.unview(fit.indices).astype(np.uint8)
    scale = None if stored.scale is None else fit.scale.astype(stored.scale.dtype)
    return Codebook(values, np.ascontiguousarray(indices), stored.axis, stored.bits, scale, stored.scale_axis), fit


def pair_rows(stored: Codebook, site: LayerSite) -> np.ndarray | None:
    """[G, m/2, 2]: the two rows of ``site``'s view that hold each pair of a vector codebook
    (first and second element), or None when the pairs are not rows of the view (pairs along an
    axis that is not the layer's output rows)."""
    axis = stored.pair_axis
    ids = np.arange(stored.indices.size).reshape(stored.indices.shape)
    pair_ids = site.view(pair_merge(np.stack([ids, ids], axis=-1), axis))
    parity = site.view(pair_merge(np.broadcast_to(np.array([0, 1]), (*ids.shape, 2)), axis))
    if np.any(parity.min(axis=2) != parity.max(axis=2)):
        return None
    blocks, rows = pair_ids.shape[:2]
    found = np.empty((blocks, rows // 2, 2), dtype=np.int64)
    for g in range(blocks):
        for d in (0, 1):
            members = np.flatnonzero(parity[g, :, 0] == d)
            if len(members) != rows // 2:
                return None
            found[g, :, d] = members[np.argsort(pair_ids[g, members, 0], kind="stable")]
        if not np.array_equal(pair_ids[g, found[g, :, 0]], pair_ids[g, found[g, :, 1]]):
            return None
    return found


def _refit_pairs(
    stored: Codebook, weight: np.ndarray, site: LayerSite, stats: LayerStats, *,
    iterations: int, damp: float, keep_zero: bool, act_order: bool, problem: LayerProblem | None,
) -> tuple[Codebook, CodebookFit] | None:
    """:func:`refit_codebook` of a vector codebook: the [K, 2] codewords as a flat codebook of 2K
    entries, each element indexed 2·idx + (its place in the pair), the pairs assigned jointly
    (:func:`onnxzip.cluster.gptq.gptq_assign` with ``pair_rows``)."""
    rows = pair_rows(stored, site)
    if rows is None:
        return None
    axis = stored.pair_axis
    index = stored.indices.astype(np.int64)
    entries = pair_merge(np.stack([2 * index, 2 * index + 1], axis=-1), axis)
    view = site.view(entries)
    flat = stored.codebook.reshape(1, -1)
    channels = np.zeros(view.shape[:2], dtype=np.int64)
    pinned = (flat == 0) if keep_zero and not np.all(weight) else None
    scale_ids = None
    if stored.scale is not None:
        scale_ids = _view_rows(stored.shape, stored.scale_axis, site)
        if scale_ids is None:
            return None
    fit = fit_codebook(site.view(weight), flat, view, channels, stats.gram, stats.cross_term,
                       iterations=iterations, damp=damp, act_order=act_order, pinned=pinned,
                       problem=problem, pair_rows=rows, scale=stored.scale, scale_ids=scale_ids)
    chosen = pair_split(site.unview(fit.indices), axis)[..., 0] // 2
    codewords = fit.codebook.reshape(stored.codebook.shape).astype(stored.codebook.dtype)
    scale = None if stored.scale is None else fit.scale.astype(stored.scale.dtype)
    return Codebook(codewords, np.ascontiguousarray(chosen.astype(np.uint8)), None, stored.bits, scale,
                    stored.scale_axis, pair_axis=axis), fit
