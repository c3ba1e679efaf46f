"""Channel dependency analysis: which channels of an ONNX graph must be pruned together.

Every layer that creates channels (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
opens a *space*: its output channels ``0..n-1``. The analysis walks the graph in topological
order and gives every tensor a :class:`ChannelMap`: its channel axis and, for each position along
that axis, the ``(space, index)`` it carries (``None``: a channel nobody may remove, e.g. one
of the graph input). The ops' rules are the whole analysis:

* elementwise ops keep the map; BatchNormalization, PRelu, Mul/Add by a per-channel constant
  also keep it (their per-channel constants are sliced when pruning);
* Add/Sub/Mul/... of two channel tensors *couple* them: position ``i`` of one side and of the
  other must be removed together, so their spaces are merged (union-find, index ``i`` ≡ index
  ``i``); a residual connection thus puts the block input and every branch output in one group;
* Concat on the channel axis concatenates maps (offsets for free), Split/Slice cut them,
  Flatten/Reshape repeat each position over the merged trailing dims (``C×H×W`` features),
  Transpose and Reduce* move the axis, pooling/Resize/Pad keep it;
* a depthwise Conv (``group = C_in``) maps output ``j`` to input ``j // multiplier``;
* Conv/Gemm/MatMul consume the map (their weight's input axis is sliced) and open a new space;
* LSTM/GRU/RNN consume the map on their input-size axis (columns of ``W``) and open a
  *recurrent* space: their hidden units (both directions of a bidirectional node together),
  carried on the hidden axis of ``Y``, ``Y_h`` and ``Y_c``; Reshape may merge that axis with the
  dims before it (``[T, B, 2, H] → [T, B, 2H]``: the units repeat per direction).

A recurrent space's pruned units are zero by definition (its importance measures what a unit's
absence costs: :mod:`onnxzip.pruning.recurrent`). So where its channels meet something the
rules do not follow (an op, a concatenation of different layers' states along another axis,
an initial state carrying pruned units) or a graph output, they are *widened* instead of
blocked: the tensor is restored to full width with zeros in the pruned units before that
consumer (``widen``); the interface keeps its shapes.

A *group* is a set of merged spaces; removing channel ``k`` of a group removes position
``(s, k)`` for every space ``s`` of the group, in every tensor. Whatever an op's rule does not
cover (a channel-mixing op, a grouped convolution, a graph output, a subgraph use, misaligned
coupling) *blocks* the spaces it touches, with the reason kept for the report, so the graph is
never broken. Shapes come from one onnxruntime run (:func:`onnxzip.measure.cost.observed_shapes`).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.measure.cost import observed_shapes
from onnxzip.core.graph import NameScope, constant_value, import_graph, subgraphs_of, walk_nodes

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (space id, channel index in that space)

RECURRENT = {"LSTM": 4, "GRU": 3, "RNN": 1}  # gates per hidden unit

# Ops that keep every channel where it is (checked against the observed shapes).
ELEMENTWISE_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu",
})
SPATIAL = frozenset({
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "Resize", "Upsample",
})
ELEMENTWISE_NARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
REDUCE = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceSumSquare",
})
# Ops that read a tensor without depending on its channel count staying the same.
CHANNEL_AGNOSTIC = frozenset({"Shape", "Size"})


class Unsupported(Exception):
    """An op rule cannot follow the channels; the message says why (one clause)."""


@dataclass(frozen=True)
class ChannelMap:
    """A tensor's channel axis and the ``(space, index)`` carried at each position on it."""

    axis: int
    positions: tuple[Position | None, ...]


@dataclass
class Source:
    """A layer that opens a space: its node and the weight axis holding output channels."""

    node: gs.Node
    weight: np.ndarray
    out_axis: int
    recurrent: bool = False  # LSTM/GRU/RNN hidden units: ``weight`` is their rows per unit


@dataclass
class ChannelGroup:
    """Channels removed together. ``id`` is the first source layer's name (topological order)."""

    id: str
    size: int
    spaces: list[int]
    sources: list[Source]
    bn_scales: list[tuple[str, np.ndarray]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size > 1

    @property
    def source_names(self) -> list[str]:
        return [s.node.name for s in self.sources]


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels` on one imported graph (the nodes are that graph's)."""

    graph: gs.Graph
    maps: dict[str, ChannelMap]
    groups: list[ChannelGroup]
    group_of_space: dict[int, str]
    bn_after_source: dict[int, gs.Node]
    shapes: dict[str, tuple[int, ...]]
    units: dict[str, tuple[Position, ...]] = field(default_factory=dict)  # recurrent node → its hidden units
    widen: list[tuple[str, str | None, str]] = field(default_factory=list)  # (tensor, consumer or None: output, why)
    restored: list[str] = field(default_factory=list)  # what the surgery restored to full width (report lines)

    def by_id(self) -> dict[str, ChannelGroup]:
        return {g.id: g for g in self.groups}

    def position_mask(self, positions: tuple[Position | None, ...], keep: dict[str, set[int]]) -> np.ndarray | None:
        """Boolean keep mask over ``positions`` (None when nothing of them is removed)."""
        mask = np.array([
            p is None or (self.group_of_space[p[0]] not in keep) or p[1] in keep[self.group_of_space[p[0]]]
            for p in positions
        ], dtype=bool)
        return None if mask.all() else mask

    def keep_mask(self, tensor: str, keep: dict[str, set[int]]) -> np.ndarray | None:
        """Boolean mask over ``tensor``'s channel axis (None when nothing of it is removed)."""
        cmap = self.maps.get(tensor)
        return None if cmap is None else self.position_mask(cmap.positions, keep)

    def widened(self) -> set[tuple[str, str | None]]:
        """(tensor, consumer) pairs read at full width (consumer None: the graph output)."""
        return {(tensor, consumer) for tensor, consumer, _ in self.widen}


class _Spaces:
    """Union-find over spaces; merged spaces share index correspondence ``i ≡ i``."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.sources: list[Source] = []
        self.blocked: dict[int, list[str]] = {}

    def new(self, source: Source, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.sources.append(source)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def block(self, positions: tuple[Position | None, ...], reason: str) -> None:
        for space in {p[0] for p in positions if p is not None}:
            reasons = self.blocked.setdefault(space, [])
            if reason not in reasons:
                reasons.append(reason)

    def couple(self, first: tuple[Position | None, ...], second: tuple[Position | None, ...]) -> tuple[Position | None, ...]:
        """Merge the spaces met position by position; raises :class:`Unsupported` when the
        pairing is not index-preserving or pairs a removable channel with a fixed one."""
        pairs = set()
        for a, b in zip(first, second):
            if (a is None) != (b is None):
                raise Unsupported("couples prunable channels with channels that cannot be pruned")
            if a is None or a == b:
                continue
            if a[1] != b[1] or self.size[a[0]] != self.size[b[0]]:
                raise Unsupported("couples channels at different indices")
            pairs.add((a[0], b[0]))
        for a, b in pairs:
            root_a, root_b = self.find(a), self.find(b)
            if root_a != root_b:
                self.parent[max(root_a, root_b)] = min(root_a, root_b)
        return first


class _Analyzer:
    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.maps: dict[str, ChannelMap] = {}
        self.spaces = _Spaces()
        self.bn_scales: dict[int, list[tuple[str, np.ndarray]]] = {}
        self.bn_after_source: dict[int, gs.Node] = {}
        self.units: dict[str, tuple[Position, ...]] = {}
        self.widen: list[tuple[str, str | None, str]] = []
        self.hidden: set[str] = set()  # maps ignored while a node is transferred again after widening

    # ---- helpers -------------------------------------------------------------------------
    def shape(self, tensor: gs.Tensor) -> tuple[int, ...]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        if tensor.name not in self.shapes:
            raise Unsupported(f"the shape of '{tensor.name}' is unknown")
        return self.shapes[tensor.name]

    def cmap(self, tensor: gs.Tensor) -> ChannelMap | None:
        return self.maps.get(tensor.name) if tensor.name and tensor.name not in self.hidden else None

    def open_space(self, node: gs.Node, weight: np.ndarray, out_axis: int, recurrent: bool = False) -> tuple[Position, ...]:
        size = int(weight.shape[out_axis])
        space = self.spaces.new(Source(node, weight, out_axis, recurrent), size)
        return tuple((space, i) for i in range(size))

    def widenable(self, positions: tuple[Position | None, ...]) -> bool:
        """Whether every space met is a recurrent one (its pruned units may read as zeros)."""
        return all(p is None or self.spaces.sources[p[0]].recurrent for p in positions)

    def passthrough(self, node: gs.Node, cmap: ChannelMap) -> list[ChannelMap | None]:
        """Same map on output 0, after checking the observed shape keeps the channel axis."""
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if len(in_shape) != len(out_shape) or in_shape[cmap.axis] != out_shape[cmap.axis]:
            raise Unsupported("changes the channel axis")
        if any(o.outputs for o in node.outputs[1:]):
            raise Unsupported("its secondary output is used")
        return [cmap] + [None] * (len(node.outputs) - 1)

    # ---- the walk ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            mapped = [m for t in node.inputs if (m := self.cmap(t)) is not None]
            try:
                outputs = self.transfer(node)
            except Unsupported as exc:
                reason = f"{node.op} '{node.name}' {exc}"
                outputs = self.widen_inputs(node, reason) if mapped and all(self.widenable(m.positions) for m in mapped) else None
                if outputs is None:
                    for m in mapped:
                        self.spaces.block(m.positions, reason)
                    outputs = [None] * len(node.outputs)
            for tensor, cmap in zip(node.outputs, outputs):
                if cmap is not None:
                    self.maps[tensor.name] = cmap
            for sub in subgraphs_of(node):
                for name in _outer_names(sub):
                    if name in self.maps:
                        self.spaces.block(self.maps[name].positions, f"'{name}' is used inside a subgraph of {node.op} '{node.name}'")
        for output in self.graph.outputs:
            if output.name in self.maps:
                if self.widenable(self.maps[output.name].positions):
                    self.widen.append((output.name, None, f"graph output '{output.name}'"))
                else:
                    self.spaces.block(self.maps[output.name].positions, f"reaches the graph output '{output.name}'")

    def widen_inputs(self, node: gs.Node, reason: str) -> list[ChannelMap | None] | None:
        """``node`` reads its recurrent-channel inputs at full width (zeros in pruned units):
        transfer it again without their maps; None when that fails too."""
        mapped = [t.name for t in node.inputs if self.cmap(t) is not None]
        secondary = [t.name for t in node.inputs[1:] if self.cmap(t) is not None and t.name != node.inputs[0].name]
        for names in ([secondary] if secondary and len(secondary) < len(mapped) else []) + [mapped]:
            self.hidden = set(names)
            try:
                outputs = self.transfer(node)
            except Unsupported:
                continue
            finally:
                self.hidden = set()
            for name in dict.fromkeys(names):
                self.widen.append((name, node.name, reason))
            return outputs
        return None

    def transfer(self, node: gs.Node) -> list[ChannelMap | None]:
        op = node.op
        if (node.domain or "") not in ("", "ai.onnx"):
            raise Unsupported("is a custom-domain op")
        inputs = [self.cmap(t) for t in node.inputs]
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return [self.linear(node, inputs)]
        if op in RECURRENT:
            return self.recurrent(node, inputs)
        if op in ELEMENTWISE_NARY or op == "PRelu":
            return [self.elementwise(node)]
        if op == "Concat":
            return [self.concat(node, inputs)]
        if any(m is not None for m in inputs[1:]):
            raise Unsupported("takes channels on an input it does not support")
        first = inputs[0] if inputs else None
        if first is None or op in CHANNEL_AGNOSTIC:
            return [None] * len(node.outputs)
        if op in ELEMENTWISE_UNARY:
            return self.passthrough(node, first)
        if op in SPATIAL or op == "Pad":
            if first.axis != 1:
                raise Unsupported("works on spatial axes but the channels are not on axis 1")
            if op == "Pad":
                self.check_pads(node, first.axis)
            return self.passthrough(node, first)
        if op in ("BatchNormalization", "InstanceNormalization"):
            if first.axis != 1:
                raise Unsupported("normalizes axis 1 but the channels are elsewhere")
            out = self.passthrough(node, first)
            if op == "BatchNormalization":
                self.record_bn(node, first)
            return out
        if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"):
            rank = len(self.shape(node.inputs[0]))
            default = -1 if (op == "LayerNormalization" or _opset(self.graph) >= 13) else 1
            axis = int(node.attrs.get("axis", default)) % rank
            covered = range(axis, rank) if (op == "LayerNormalization" or _opset(self.graph) < 13) else (axis,)
            if first.axis in covered:
                raise Unsupported("normalizes over the channel axis")
            return self.passthrough(node, first)
        if op == "Transpose":
            rank = len(self.shape(node.inputs[0]))
            perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
            return [ChannelMap(perm.index(first.axis), first.positions)]
        if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            out = self.reshape_like(node, first)
            if op == "Reshape" and constant_value(node.inputs[1]) is None and (
                    self.shape(node.outputs[0])[out.axis] != len(first.positions)):
                raise Unsupported("has a computed target shape that merges the channel axis")
            return [out]
        if op in REDUCE:
            return [self.reduce(node, first)]
        if op == "Split":
            return self.split(node, first)
        if op == "Slice":
            return [self.slice(node, first)]
        raise Unsupported("is not supported by the channel analysis")

    # ---- op rules ------------------------------------------------------------------------
    def linear(self, node: gs.Node, inputs: list[ChannelMap | None]) -> ChannelMap | None:
        """Conv/ConvTranspose/Gemm/MatMul: consume the input map, open the output space."""
        op, data = node.op, inputs[0]
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            raise Unsupported("has no constant weight (activation × activation)")
        if any(m is not None for m in inputs[1:]):
            raise Unsupported("takes channels on its weight or bias input")
        weight = np.asarray(node.inputs[1].values)
        out_rank = len(self.shape(node.outputs[0]))
        if op in ("Conv", "ConvTranspose"):
            if data is not None and data.axis != 1:
                raise Unsupported("takes channels that are not on axis 1")
            group = int(node.attrs.get("group", 1))
            in_channels = weight.shape[1] * group if op == "Conv" else weight.shape[0]
            if group == 1:
                return ChannelMap(1, self.open_space(node, weight, 0 if op == "Conv" else 1))
            multiplier = weight.shape[0] // group
            if op == "Conv" and group == in_channels and weight.shape[0] % group == 0:
                if data is None:
                    return None
                return ChannelMap(1, tuple(data.positions[j // multiplier] for j in range(weight.shape[0])))
            out = self.open_space(node, weight, 0 if op == "Conv" else 1)
            reason = f"{op} '{node.name}' is a grouped convolution (group={group})"
            self.spaces.block(out, reason)
            if data is not None:
                self.spaces.block(data.positions, reason)
            return ChannelMap(1, out)
        if weight.ndim != 2:
            raise Unsupported("has a weight that is not a matrix")
        if op == "Gemm":
            if data is not None and (node.attrs.get("transA", 0) or data.axis != 1):
                raise Unsupported("takes channels that are not its input columns")
            return ChannelMap(1, self.open_space(node, weight, 0 if node.attrs.get("transB", 0) else 1))
        if data is not None and data.axis != len(self.shape(node.inputs[0])) - 1:
            raise Unsupported("takes channels that are not on its last axis")
        return ChannelMap(out_rank - 1, self.open_space(node, weight, 1))

    def recurrent(self, node: gs.Node, inputs: list[ChannelMap | None]) -> list[ChannelMap | None]:
        """LSTM/GRU/RNN: consume the input map (columns of ``W``), open a space of hidden units
        (unit ``j``: rows ``j`` of every gate of ``W``, ``R``, ``B``, ``P``, column ``j`` of ``R``)."""
        weights = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2, 3, 7)]
        if any(t is not None and t.name and not isinstance(t, gs.Constant) for t in weights):
            raise Unsupported("has a computed weight, bias or peephole")
        if int(node.attrs.get("layout", 0)) not in (0, 1):
            raise Unsupported("has an unknown layout")
        data = inputs[0]
        if data is not None and data.axis != 2:
            raise Unsupported("takes channels that are not on its input-size axis")
        if any(m is not None for m in inputs[1:]):
            raise Unsupported("takes channels on a weight or state input")
        gates = RECURRENT[node.op]
        w = np.asarray(node.inputs[1].values)
        r = np.asarray(node.inputs[2].values)
        hidden = int(node.attrs.get("hidden_size", r.shape[-1]))
        if r.shape[1:] != (gates * hidden, hidden) or w.shape[1] != gates * hidden:
            raise Unsupported("has weights that do not match hidden_size")
        rows = np.concatenate([w.reshape(w.shape[0], gates, hidden, -1), r.reshape(r.shape[0], gates, hidden, -1)], axis=3)
        per_unit = np.moveaxis(rows, 2, 0).reshape(hidden, -1)  # every weight of unit j, for l1/l2 norms
        units = self.open_space(node, per_unit, 0, recurrent=True)
        self.units[node.name] = units
        axes = (3, 2, 2)  # Y: [T, D, B, H] or [B, T, D, H]; Y_h, Y_c: [D, B, H] or [B, D, H]
        return [ChannelMap(axes[i], units) if i < 3 else None for i in range(len(node.outputs))]

    def elementwise(self, node: gs.Node) -> ChannelMap | None:
        """Broadcasting n-ary op: inputs carrying channels must agree on the (right-aligned)
        axis and are coupled; constants along that axis are per-channel parameters."""
        out_shape = self.shape(node.outputs[0])
        rank = len(out_shape)
        axes = {m.axis + rank - len(self.shape(t)) for t in node.inputs if (m := self.cmap(t)) is not None}
        if not axes:
            return None
        if len(axes) > 1:
            raise Unsupported("combines channels lying on different axes")
        axis = axes.pop()
        positions: tuple[Position | None, ...] | None = None
        for tensor in node.inputs:
            shape = self.shape(tensor)
            local = axis - (rank - len(shape))
            size = shape[local] if local >= 0 else 1
            cmap = self.cmap(tensor)
            if cmap is None:
                if size != 1 and not isinstance(tensor, gs.Constant):
                    raise Unsupported("couples prunable channels with channels that cannot be pruned")
                continue
            if size != out_shape[axis]:
                raise Unsupported("broadcasts a tensor along its channel axis")
            positions = cmap.positions if positions is None else self.spaces.couple(positions, cmap.positions)
        return ChannelMap(axis, positions)

    def concat(self, node: gs.Node, inputs: list[ChannelMap | None]) -> ChannelMap | None:
        rank = len(self.shape(node.outputs[0]))
        axis = int(node.attrs["axis"]) % rank
        present = [m for m in inputs if m is not None]
        if not present:
            return None
        if any(m.axis != present[0].axis for m in present):
            raise Unsupported("concatenates channels lying on different axes")
        if present[0].axis != axis:
            return self._couple_all(node, present)
        positions: list[Position | None] = []
        for tensor, cmap in zip(node.inputs, inputs):
            positions.extend(cmap.positions if cmap is not None else (None,) * self.shape(tensor)[axis])
        return ChannelMap(axis, tuple(positions))

    def _couple_all(self, node: gs.Node, present: list[ChannelMap]) -> ChannelMap:
        if len(present) != len(node.inputs):
            raise Unsupported("concatenates prunable channels with fixed ones along another axis")
        positions = present[0].positions
        if any(m.positions != positions for m in present[1:]) and all(self.widenable(m.positions) for m in present):
            raise Unsupported("stacks different recurrent layers' units along another axis")
        for cmap in present[1:]:
            positions = self.spaces.couple(positions, cmap.positions)
        return ChannelMap(present[0].axis, positions)

    def record_bn(self, node: gs.Node, cmap: ChannelMap) -> None:
        """A BatchNormalization covering exactly one whole space scores it by ``|γ|``."""
        spaces = {p[0] for p in cmap.positions if p is not None}
        if len(spaces) != 1 or not isinstance(node.inputs[1], gs.Constant):
            return
        space = spaces.pop()
        if cmap.positions != tuple((space, i) for i in range(self.spaces.size[space])):
            return
        gamma = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        self.bn_scales.setdefault(space, []).append((node.name, gamma))
        producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if producer is self.spaces.sources[space].node and len(node.inputs[0].outputs) == 1:
            self.bn_after_source[space] = node

    def check_pads(self, node: gs.Node, axis: int) -> None:
        rank = len(self.shape(node.inputs[0]))
        if len(node.inputs) > 1 and node.inputs[1].name:
            pads = constant_value(node.inputs[1])
            axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        else:
            pads, axes = node.attrs.get("pads"), None
        if pads is None:
            raise Unsupported("has computed pads")
        pads = [int(p) for p in np.ravel(pads)]
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.ravel(axes)]
        if axis in axes and (pads[axes.index(axis)] or pads[len(axes) + axes.index(axis)]):
            raise Unsupported("pads the channel axis")

    def reshape_like(self, node: gs.Node, cmap: ChannelMap) -> ChannelMap:
        """Flatten/Reshape/Squeeze/Unsqueeze: the channel dim must survive, alone or merged with
        the dims after it (each position then repeats ``inner`` times)."""
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        outer = int(np.prod(in_shape[: cmap.axis], dtype=np.int64))
        channels = in_shape[cmap.axis]
        trailing = {int(np.prod(in_shape[cmap.axis + 1 : j], dtype=np.int64)) for j in range(cmap.axis + 1, len(in_shape) + 1)}
        for k in range(len(out_shape)):
            if int(np.prod(out_shape[:k], dtype=np.int64)) != outer:
                continue
            if out_shape[k] % channels == 0 and out_shape[k] // channels in trailing:
                inner = out_shape[k] // channels
                return ChannelMap(k, tuple(p for p in cmap.positions for _ in range(inner)))
        if cmap.axis == len(in_shape) - 1:  # the last axis merged with dims before it: blocks repeat
            for j in range(cmap.axis - 1, -1, -1):
                before, merged = (int(np.prod(in_shape[:j], dtype=np.int64)),
                                  int(np.prod(in_shape[j : cmap.axis], dtype=np.int64)))
                for k in range(len(out_shape)):
                    if (k == len(out_shape) - 1 and int(np.prod(out_shape[:k], dtype=np.int64)) == before
                            and out_shape[k] == merged * channels):
                        return ChannelMap(k, cmap.positions * merged)
        raise Unsupported("splits or mixes the channel axis")

    def reduce(self, node: gs.Node, cmap: ChannelMap) -> ChannelMap:
        rank = len(self.shape(node.inputs[0]))
        axes = _int_list(node, "axes", 1)
        if axes is None:
            if node.attrs.get("noop_with_empty_axes", 0):
                return cmap
            raise Unsupported("reduces over every axis")
        axes = [a % rank for a in axes]
        if cmap.axis in axes:
            raise Unsupported("reduces over the channel axis")
        keep_dims = node.attrs.get("keepdims", 1)
        return ChannelMap(cmap.axis if keep_dims else cmap.axis - sum(a < cmap.axis for a in axes), cmap.positions)

    def split(self, node: gs.Node, cmap: ChannelMap) -> list[ChannelMap | None]:
        rank = len(self.shape(node.inputs[0]))
        if int(node.attrs.get("axis", 0)) % rank != cmap.axis:
            return [cmap] * len(node.outputs)
        maps, start = [], 0
        for output in node.outputs:
            size = self.shape(output)[cmap.axis]
            maps.append(ChannelMap(cmap.axis, cmap.positions[start : start + size]))
            start += size
        return maps

    def slice(self, node: gs.Node, cmap: ChannelMap) -> ChannelMap:
        window = slice_window(node, len(self.shape(node.inputs[0])), cmap.axis, len(cmap.positions))
        if window is None:
            return self.passthrough(node, cmap)[0]
        start, end = window
        return ChannelMap(cmap.axis, cmap.positions[start:end])


def slice_window(node: gs.Node, rank: int, axis: int, channels: int) -> tuple[int, int] | None:
    """``(start, end)`` a Slice node takes on ``axis`` (step 1, clamped), None when it does not
    slice that axis; raises :class:`Unsupported` for computed or strided slices of it."""
    if len(node.inputs) == 1:
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None
    else:
        values = [constant_value(t) if t.name else None for t in node.inputs[1:5]]
        if values[0] is None or values[1] is None:
            raise Unsupported("has computed starts or ends")
        starts, ends = values[0], values[1]
        axes = values[2] if len(values) > 2 else None
        steps = values[3] if len(values) > 3 else None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in np.ravel(axes)]
    if axis not in axes:
        return None
    where = axes.index(axis)
    if steps is not None and int(np.ravel(steps)[where]) != 1:
        raise Unsupported("slices the channel axis with a step")
    window = range(channels)[int(np.ravel(starts)[where]) : int(np.ravel(ends)[where])]
    return window.start, max(window.stop, window.start)


def _int_list(node: gs.Node, attr: str, index: int) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index].name:
        value = constant_value(node.inputs[index])
        if value is None:
            raise Unsupported(f"has computed {attr}")
        return [int(v) for v in np.ravel(value)] or None
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in value] or None


def _outer_names(graph: gs.Graph) -> set[str]:
    """Tensors a subgraph reads from enclosing scopes."""
    produced = {t.name for t in graph.inputs}
    used = set()
    for node, _owner, _path in walk_nodes(graph):
        produced.update(t.name for t in node.outputs)
        used.update(t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant))
    return used - produced


def _opset(graph: gs.Graph) -> int:
    return int(graph.opset or 0)


def analyze_channels(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> ChannelAnalysis:
    """Import ``model`` and find its channel groups (see the module docstring). ``shapes``
    (from :meth:`PassContext.shapes`) saves the onnxruntime run that observes them."""
    graph = import_graph(model)
    graph.toposort()
    names = NameScope(graph)
    for node in graph.nodes:
        node.name = node.name or names.fresh(node.op)
    analyzer = _Analyzer(graph, shapes if shapes is not None else observed_shapes(model, feeds))
    analyzer.run()
    spaces = analyzer.spaces
    members: dict[int, list[int]] = {}
    for space in range(len(spaces.parent)):
        members.setdefault(spaces.find(space), []).append(space)
    widened_spaces = {p[0] for tensor, _, _ in analyzer.widen for p in analyzer.maps[tensor].positions if p is not None}
    groups, group_of_space = [], {}
    for root in sorted(members):
        ids = members[root]
        if widened_spaces & set(ids) and not all(spaces.sources[s].recurrent for s in ids):
            spaces.block(tuple((s, 0) for s in ids), "restores recurrent units at full width but is coupled to other channels")
        group = ChannelGroup(
            id=spaces.sources[ids[0]].node.name,
            size=spaces.size[root],
            spaces=ids,
            sources=[spaces.sources[s] for s in ids],
            bn_scales=list(itertools.chain.from_iterable(analyzer.bn_scales.get(s, []) for s in ids)),
            reasons=list(dict.fromkeys(itertools.chain.from_iterable(spaces.blocked.get(s, []) for s in ids))),
        )
        groups.append(group)
        group_of_space.update({s: group.id for s in ids})
    log.debug("channel analysis: %d groups, %d prunable", len(groups), sum(g.prunable for g in groups))
    return ChannelAnalysis(graph, analyzer.maps, groups, group_of_space, analyzer.bn_after_source, analyzer.shapes,
                           analyzer.units, analyzer.widen)
