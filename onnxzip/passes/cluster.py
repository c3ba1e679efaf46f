"""The cluster pass: every eligible weight becomes a small codebook plus compact per-weight
indices, decoded in the graph with standard ONNX ops (CN 115456169 A step 4-5, CN 114819143 A
step 5).

Each weight tensor W is clustered by 1-D k-means (:mod:`onnxzip.cluster`): W ≈ codebook[indices]
with K centroids (``k``, ``bits`` → K = 2**bits, or ``k=auto``: K from the improved BIRCH,
bounded by ``max_bits``). The file stores the codebook (K values in W's dtype; [C, K] per
output channel with ``per_channel``, flattened row-major) and the indices in b ∈ {1, 2, 4, 8}
bits each (the smallest b with 2**b ≥ K): uint8 for b = 8, else 8/b indices packed per byte
(layout of :func:`onnxzip.cluster.pack_indices`: first index in the low bits).

Decode subgraph (Cast, Gather, Reshape, Slice, Add: all exist since opset 7, so the model's
opset is never raised; uint4 tensors are avoided because onnxruntime 1.19 has no CPU Cast from
uint4, and BitShift/BitwiseAnd because BitwiseAnd needs opset 18)::

    indices (uint8) ─Cast(int32)─┬──────────────────────────────────────── idx   (b = 8)
                                 └Gather(unpack table)─Reshape(W.shape)─ idx   (b < 8)
    per_channel:  idx += c·K   (Add of an int32 [1,..,C,..,1] offset: the flattened [C, K] row)
    codebook ─Gather(idx)─ W_decoded (W's dtype and shape) → every consumer of W

The unpack table (int32 [256, 8/b], row v = the 8/b indices packed in byte value v; 8, 4 or
2 KB) is shared by all weights of a bit width in a graph. When the last byte is padded, a Reshape[-1] and
a Slice keep the first N indices (Slice-1 attributes below opset 10, Slice-10 inputs above).

Only lookups and integer adds: the decode equals ``codebook[indices]`` bit for bit. Every input
is constant, so onnxruntime folds the whole subgraph into one initializer when the session
loads: inference runs exactly the original graph, with quantized weights. A weight shared by several nodes is clustered once, its decode
placed in the innermost graph that encloses all its uses (``If``/``Loop`` bodies included).

``k=auto`` with ``round_k_to_storage`` (default) raises the BIRCH K to the capacity of its
storage width (K = 13 → 16, K = 20 → 256): the file is the same size, the error only drops.
An explicit ``k`` is used as given. K > 256 (more than 8 bits per index) is refused: uint16
indices would save at most 2× and a fine scalar quantizer serves that better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.cluster import (
    cluster_per_channel,
    cluster_weights,
    estimate_k_birch,
    index_entropy_bits,
    pack_indices,
    storage_bits,
    unpack_indices,
)
from onnxzip.compat import default_opset
from onnxzip.errors import ConfigError
from onnxzip.graph import NameScope, export_model, import_graph, subgraphs_of, walk_nodes
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, matches, register_pass
from onnxzip.report import LayerChange
from onnxzip.schema import option
from onnxzip.weights import WEIGHT_ROLES, Weight, constant_uses, discover_weights

DEFAULT_K = 16
MAX_K = 256
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


@dataclass
class ClusterConfig:
    k: int | Literal["auto"] | None = option(
        None, "centroids per codebook (at most 256), or 'auto' (improved BIRCH); default 16"
    )
    bits: int | None = option(None, "alternative to k: K = 2**bits (1 to 8)")
    init: Literal["kmeans||", "kmeans++", "linear", "quantile"] = option(
        "kmeans||", "initial centroids (linear: evenly spaced from w_min to w_max, as in Method 1)"
    )
    per_channel: bool = option(
        False, "one codebook per output channel ([C, K]) instead of per tensor"
    )
    min_size: int = option(1024, "cluster only weights with at least this many elements")
    include: list[str] = option(
        [], "weight or node name globs, or op types, to consider (empty: all)"
    )
    exclude: list[str] = option([], "weight or node name globs, or op types, to leave alone")
    keep_zero: bool = option(True, "a tensor with exact zeros (pruned) keeps an exact 0.0 centroid")
    birch_threshold_ratio: float = option(0.1, "k=auto: BIRCH threshold T = ratio × std(weights)")
    birch_branching: int = option(16, "k=auto: BIRCH branching factor L")
    min_k: int = option(2, "k=auto: lower bound on K")
    max_bits: int = option(8, "k=auto: upper bound on K = 2**max_bits (1 to 8)")
    round_k_to_storage: bool = option(
        True,
        "k=auto: raise K to what its index width holds anyway (13 → 16): same size, lower error",
    )
    seed: int | None = option(None, "seed of the k-means initialisation (default: the run's seed)")

    def __post_init__(self) -> None:
        if self.k is not None and self.bits is not None:
            raise ValueError("give k or bits, not both")
        if isinstance(self.k, int) and not 1 <= self.k <= MAX_K:
            raise ValueError(
                f"k must be from 1 to {MAX_K} (at most 8 bits per index), got {self.k}"
            )
        if self.bits is not None and not 1 <= self.bits <= 8:
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

    @property
    def requested_k(self) -> int | Literal["auto"]:
        if self.bits is not None:
            return 2**self.bits
        return DEFAULT_K if self.k is None else self.k


@dataclass
class Codebook:
    """One clustered weight as stored: ``decode()`` is the exact value the graph computes."""

    codebook: np.ndarray  # [K], or [C, K] per channel; the weight's dtype
    indices: np.ndarray  # uint8, the weight's shape
    axis: int | None  # channel axis of per-channel codebooks
    bits: int

    @property
    def k(self) -> int:
        return int(self.codebook.shape[-1])

    def decode(self) -> np.ndarray:
        return decode_numpy(self.codebook, self.indices, self.axis)

    def stored_indices(self) -> np.ndarray:
        return self.indices if self.bits == 8 else pack_indices(self.indices, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the codebook and the stored indices (the decode's small constants aside)."""
        return int(self.codebook.nbytes + -(-self.indices.size * self.bits // 8))


def decode_numpy(codebook: np.ndarray, indices: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Numpy reference of the decode subgraph: ``codebook[indices]``, or per channel
    ``codebook[c, indices[..., c, ...]]`` with ``c`` on ``axis``."""
    if axis is None:
        return codebook[indices.astype(np.intp)]
    shape = [1] * indices.ndim
    shape[axis] = codebook.shape[0]
    offsets = (np.arange(codebook.shape[0]) * codebook.shape[1]).reshape(shape)
    return codebook.reshape(-1)[indices.astype(np.intp) + offsets]


@register_pass
class ClusterPass(Pass):
    name = "cluster"
    config_class = ClusterConfig
    weight_only = True
    summary = (
        "Codebook quantization: weights → K centroids + 1/2/4/8-bit indices decoded by Gather."
    )
    shorthand = "k"

    def applies_to(self, weight: Weight) -> bool:
        return self._skip_reason(weight) is None

    def plan(self, model: onnx.ModelProto, context: PassContext) -> Plan:
        graph = import_graph(model)
        table = discover_weights(graph)
        uses = constant_uses(graph)
        layers: dict[str, dict[str, Any]] = {}
        for weight in table.weights:
            if self._skip_reason(weight) is not None or weight.name not in uses:
                continue
            constant, consumers = uses[weight.name]
            values = np.asarray(constant.values)
            if _value_problem(values) is not None:
                continue  # apply reports it
            axis = _channel_axis(constant, consumers) if self.config.per_channel else None
            k, birch_k = self.config.requested_k, None
            if k == "auto":
                birch_k = self._birch_k(values, axis)
                k = int(np.clip(birch_k, self.config.min_k, 2**self.config.max_bits))
                if self.config.round_k_to_storage:
                    k = 2 ** storage_bits(k)
            entry = {"k": k, "bits": storage_bits(k), "per_channel": axis is not None}
            layers[weight.name] = entry if birch_k is None else {**entry, "birch_k": birch_k}
        return Plan(self.name, self.config_dict(), layers)

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        graph = import_graph(model)
        table = discover_weights(graph)
        uses = constant_uses(graph)
        parents = _graph_parents(graph)
        names = NameScope(graph)
        tables: dict[tuple[int, int], gs.Constant] = {}  # (id(graph), bits) → unpack table
        opset = default_opset(model)
        seed = context.seed if self.config.seed is None else self.config.seed
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
            axis = _channel_axis(constant, consumers) if entry.get("per_channel") else None
            stored, quality = self._cluster(values, k, axis, seed)
            if stored.nbytes >= values.nbytes:
                report.skip(
                    weight.name,
                    ops,
                    f"codebook + indices ({stored.nbytes} B) are not smaller "
                    f"than the weight ({values.nbytes} B)",
                    params_before=weight.size,
                    params_after=weight.size,
                )
                continue
            owner = _innermost_common_graph([g for _node, g in consumers], parents)
            added = _insert_decode(owner, constant, consumers, stored, names, tables, opset)
            details = {
                "k": stored.k,
                "bits": stored.bits,
                "per_channel": axis is not None,
                "codebook_shape": list(stored.codebook.shape),
                **quality,
                "bytes_before": int(values.nbytes),
                "bytes_after": int(sum(c.values.nbytes for c in added)),
            }
            if "birch_k" in entry:
                details["birch_k"] = entry["birch_k"]
            if (entry.get("per_channel") or self.config.per_channel) and axis is None:
                details["note"] = (
                    "no single output-channel axis over its uses; one codebook per tensor"
                )
            scope = " per channel" if axis is not None else ""
            report.changes.append(
                LayerChange(
                    weight.name,
                    ops,
                    f"clustered K={stored.k}, {stored.bits}-bit{scope}",
                    params_before=weight.size,
                    params_after=weight.size,
                    details=details,
                )
            )
            report.modified = True
        if tables:
            sizes = sorted({f"{t.name} ({t.values.nbytes} B)" for t in tables.values()})
            report.notes.append(f"packed indices unpack through shared tables: {', '.join(sizes)}")
        for name in sorted(set(plan.layers) - {w.name for w in table.weights}):
            report.notes.append(f"plan entry '{name}' matches no weight of the model; ignored")
        graph.toposort(recurse_subgraphs=True)
        return PassResult(export_model(graph, model), report, plan)

    def _skip_reason(self, weight: Weight, *, planned: bool = False) -> str | None:
        """Why ``weight`` is left as it is (None: eligible). A weight named in a replayed plan
        bypasses the size and include/exclude filters, never the type checks."""
        if weight.quantized:
            return "integer weight of an already-quantized model"
        if not weight.roles & WEIGHT_ROLES:
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

    def _cluster(
        self, values: np.ndarray, k: int, axis: int | None, seed: int
    ) -> tuple[Codebook, dict[str, float]]:
        """Cluster ``values`` into at most ``k`` centroids (fewer when the tensor has fewer
        distinct values, which may also narrow the indices); the codebook takes the weight's
        dtype."""
        options = {"init": self.config.init, "keep_zero": self.config.keep_zero, "seed": seed}
        if axis is None:
            result = cluster_weights(values, k, **options)
            entropy = index_entropy_bits(result.indices, result.k)
        else:
            result = cluster_per_channel(values, k, axis, **options)
            entropy = result.entropy_bits()
        stored = Codebook(
            result.codebook.astype(values.dtype), result.indices, axis, storage_bits(result.k)
        )
        mse, sqnr_db = result.mse, result.sqnr_db
        if values.dtype != np.float32:  # the codebook was rounded: measure what the graph decodes
            error = values.astype(np.float64) - stored.decode().astype(np.float64)
            squared = float(np.sum(error * error))
            mse = squared / values.size
            sqnr_db = (
                float(10 * np.log10(np.sum(values.astype(np.float64) ** 2) / squared))
                if squared
                else np.inf
            )
        return stored, {
            "mse": float(mse),
            "sqnr_db": float(sqnr_db),
            "entropy_bits": round(entropy, 4),
        }


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


def unpack_table(bits: int) -> np.ndarray:
    """int32 [256, 8/bits]: row v holds the indices packed in a byte of value v, in the layout of
    :func:`onnxzip.cluster.pack_indices` (``table[packed]`` = the unpacked indices)."""
    return (
        unpack_indices(np.arange(256, dtype=np.uint8), bits, 256 * (8 // bits))
        .reshape(256, -1)
        .astype(np.int32)
    )


class _DecodeBuilder:
    """Adds the constants and nodes of one weight's decode to one graph. ``constants`` lists the
    weight's own constants (to count its bytes); an unpack table is shared by every weight of its
    bit width decoded in the same graph."""

    def __init__(
        self,
        graph: gs.Graph,
        names: NameScope,
        prefix: str,
        tables: dict[tuple[int, int], gs.Constant],
    ) -> None:
        self.graph, self.names, self.prefix, self.tables = graph, names, prefix, tables
        self.constants: list[gs.Constant] = []

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        name = self.names.fresh(f"{self.prefix}_{suffix}")
        self.constants.append(gs.Constant(name, np.ascontiguousarray(value)))
        return self.constants[-1]

    def table(self, bits: int) -> gs.Constant:
        key = (id(self.graph), bits)
        if key not in self.tables:
            name = self.names.fresh(f"cluster_unpack_{bits}bit")
            self.tables[key] = gs.Constant(name, unpack_table(bits))
        return self.tables[key]

    def op(self, op_type: str, inputs: list[gs.Tensor], **attrs: Any) -> gs.Variable:
        """One node with an untyped output (so no value_info is stored for it)."""
        output = gs.Variable(self.names.fresh(f"{self.prefix}_{op_type.lower()}"))
        name = self.names.fresh(f"{self.prefix}/cluster/{op_type}")
        self.graph.nodes.append(gs.Node(op_type, name, attrs, inputs, [output]))
        return output


def _insert_decode(
    graph: gs.Graph,
    weight: gs.Constant,
    consumers: list[tuple[gs.Node, gs.Graph]],
    stored: Codebook,
    names: NameScope,
    tables: dict[tuple[int, int], gs.Constant],
    opset: int,
) -> list[gs.Constant]:
    """Add the decode subgraph of ``stored`` (see the module docstring) to ``graph`` and point
    every consumer of ``weight`` at its output. Returns the weight's own constants."""
    shape = tuple(int(d) for d in weight.shape)
    count = int(np.prod(shape, dtype=np.int64))
    build = _DecodeBuilder(graph, names, weight.name, tables)
    codebook = build.const("codebook", stored.codebook.reshape(-1))
    packed = build.const(f"indices_u{stored.bits}", stored.stored_indices())
    index = build.op("Cast", [packed], to=int(onnx.TensorProto.INT32))
    if stored.bits < 8:
        index = build.op("Gather", [build.table(stored.bits), index], axis=0)  # [bytes, 8/bits]
        if packed.values.size * (8 // stored.bits) != count:  # padded last byte: keep count
            index = build.op(
                "Reshape", [index, build.const("flat_shape", np.array([-1], np.int64))]
            )
            if opset < 10:
                index = build.op("Slice", [index], starts=[0], ends=[count], axes=[0])
            else:
                bounds = [
                    build.const("slice_start", np.array([0], np.int64)),
                    build.const("slice_end", np.array([count], np.int64)),
                ]
                index = build.op("Slice", [index, *bounds])
        index = build.op("Reshape", [index, build.const("shape", np.array(shape, np.int64))])
    if stored.axis is not None:
        offset_shape = [1] * len(shape)
        offset_shape[stored.axis] = shape[stored.axis]
        offsets = np.arange(shape[stored.axis], dtype=np.int32).reshape(offset_shape) * stored.k
        index = build.op("Add", [index, build.const("row_offsets", offsets)])
    decoded = build.op("Gather", [codebook, index], axis=0)
    decoded.name = names.fresh(f"{weight.name}_decoded")
    decoded.dtype, decoded.shape = stored.codebook.dtype, list(shape)
    for node, _owner in consumers:
        for slot, tensor in enumerate(node.inputs):
            if tensor is weight:
                node.inputs[slot] = decoded
    return build.constants
