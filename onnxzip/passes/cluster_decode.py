"""The codebook decode subgraph the cluster pass writes, and the reading back of decodes in a graph
(:func:`find_decodes`, :class:`DecodedWeight`: what reconstruct, fine-tuning and ``execute=int8``
work on).

Decode subgraph (Cast, Gather, Reshape, Slice, Mul, Add: all exist since opset 7, so the
model's opset is never raised; uint4 tensors are avoided because onnxruntime 1.19 has no CPU
Cast from uint4, and BitShift/BitwiseAnd because BitwiseAnd needs opset 18). onnxruntime folds
it at load and holds every tensor it computes until folding ends (measured in 1.19 and 1.32), so
the form is the one that computes the fewest bytes (:func:`load_bytes`, from the shapes):

* value-table form (b < 8, where it computes fewer bytes than the index form): one int32 *key*
  per byte of the widest plane (the u = 8/w₀ indices it packs), the weight's value table
  ``Gather(codebook, index_table)`` [2**key_bits, u] and ``Gather(values, key)``: one int32 key
  per u values and one float copy (the Reshape) instead of several int32 copies of the weight::

    plane₀ (uint8, lead + 2s) ─Cast(int32)─┐
    plane_j ─Cast─Gather(key table_j)──────Add─ key ─┐       (lower planes, multi-plane widths)
    codebook ─Gather(index table)─ values ───────────Gather─[Reshape[-1], Slice]─Reshape(W.shape)

  A key of a multi-plane width (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1) holds the byte of the
  widest plane and the matching chunk of each lower plane (key bits 8 + Σ u·w_j, ≤ 14): the
  planes are stored in shapes (``lead`` + 2s) whose broadcasts line up, per group of indices
  (8/w_min indices: a byte of the narrowest plane); the key tables (a byte → its chunks, shifted)
  and the index table (a key → its u codebook indices) are computed in the graph from the shared
  unpack tables, once per graph and width. Per channel (a leading channel axis whose rows hold
  whole groups) the value table is [C·2**key_bits, u] and the keys add c·2**key_bits. Padding
  (single plane only) is cut by a Slice of the flat values.
* index form (elsewhere): the int32 index of every value, then ``Gather(codebook, index)``::

    plane (uint8) ─Cast(int32)─┬────────────────────────────────────────────────── idx_j  (width 8)
                               └Gather(uint8 unpack table)─Cast(int32)─[Reshape, Slice]─ idx_j
    idx = Σ_j idx_j · 2**shift_j   (Mul by an int32 scalar, Add; one plane: idx = idx_0)
    per_channel:  idx += c·K   (Add of an int32 [1,..,C,..,1] offset: the flattened [C, K] row)
    codebook ─Gather(Reshape(idx, W.shape))─ W_decoded (W's dtype and shape) → consumers of W

  8-bit indices are stored in W's shape (no Reshape). The unpack table (uint8 [256, 8/w], row v
  = the 8/w indices packed in byte value v; 2 KB, 1 KB or 512 B) is shared by all planes of a
  width w in a graph. When the last byte is padded, a Reshape[-1] and a Slice keep the first N
  indices (Slice-1 attributes below opset 10, Slice-10 inputs above).

:func:`find_decodes` reads both forms (files written before the value-table form included).

Channel-scaled codebooks (``channel_scale``: one codebook [K] for the weight divided by a scale
per output channel) end in ``Mul(decoded, s)`` with s a [1,..,C,..,1] constant named
``…_channel_scale``; :func:`find_decodes` reads it as part of the decode (``DecodedWeight.scale``).

Only lookups and integer adds: the decode equals ``codebook[indices]`` bit for bit (times s, one
float32 product per value, with a channel scale). Every input
is constant, so onnxruntime folds the whole subgraph into one initializer when the session
loads: inference runs exactly the original graph, with quantized weights. A weight shared by several nodes is clustered once, its decode
placed in the innermost graph that encloses all its uses (``If``/``Loop`` bodies included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.cluster import pack_planes, packed_bytes, pair_merge, plane_widths, unpack_indices, unpack_planes
from onnxzip.core.graph import NameScope, walk_nodes


FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


@dataclass
class Codebook:
    """One clustered weight as stored: ``decode()`` is the exact value the graph computes."""

    codebook: np.ndarray  # [K], or [C, K] per channel, or [K, 2] codewords of pairs; the weight's dtype
    indices: np.ndarray  # uint8, the weight's shape (pairs: with pair_axis halved)
    axis: int | None  # channel axis of per-channel codebooks
    bits: int  # index width
    scale: np.ndarray | None = None  # channel-scaled codebooks: [C] along scale_axis (codebook [K])
    scale_axis: int | None = None
    pair_axis: int | None = None  # vector codebooks: the axis whose elements 2p, 2p+1 share an index

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0 if self.pair_axis is not None else -1])

    @property
    def weight_bits(self) -> float:
        """Index bits per weight (half the index width for pairs)."""
        if self.pair_axis is None:
            return self.bits
        return self.bits // 2 if self.bits % 2 == 0 else self.bits / 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded weight's shape."""
        shape = list(self.indices.shape)
        if self.pair_axis is not None:
            shape[self.pair_axis] *= 2
        return tuple(shape)

    def decode(self) -> np.ndarray:
        if self.pair_axis is not None:
            decoded = pair_merge(self.codebook[self.indices.astype(np.intp)], self.pair_axis)
        else:
            decoded = decode_numpy(self.codebook, self.indices, self.axis)
        if self.scale is None:
            return decoded
        return decoded * self.scale.reshape(scale_shape(self.shape, self.scale_axis))

    def stored_planes(self) -> list[tuple[int, int, np.ndarray]]:
        """(width, shift, bytes) of each stored index plane (width 8: the uint8 indices)."""
        return pack_planes(self.indices, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the codebook and the stored indices (the decode's small constants aside)."""
        scale = 0 if self.scale is None else self.scale.nbytes
        return int(self.codebook.nbytes + scale + packed_bytes(self.indices.size, self.bits))


def scale_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """The broadcast shape of a per-channel vector along ``axis`` of a weight of ``shape``."""
    dims = [1] * len(shape)
    dims[axis] = shape[axis]
    return tuple(dims)


def decode_numpy(codebook: np.ndarray, indices: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Numpy reference of the decode subgraph: ``codebook[indices]``, or per channel
    ``codebook[c, indices[..., c, ...]]`` with ``c`` on ``axis``."""
    if axis is None:
        return codebook[indices.astype(np.intp)]
    shape = [1] * indices.ndim
    shape[axis] = codebook.shape[0]
    offsets = (np.arange(codebook.shape[0]) * codebook.shape[1]).reshape(shape)
    return codebook.reshape(-1)[indices.astype(np.intp) + offsets]


def decode_bytes(stored: Codebook, shape: tuple[int, ...], opset: int, prefix: str) -> int:
    """Serialized bytes of ``stored``'s decode: its constants and nodes built in an empty graph
    (the shared unpack tables and constants not counted: one serves every weight)."""
    scratch = gs.Graph(opset=opset)
    weight = gs.Constant("w", np.broadcast_to(np.float32(0), shape))  # only its shape is read
    shared = DecodeShared()
    insert_decode(scratch, weight, [], stored, NameScope(scratch), shared, opset, prefix=prefix)
    exported = gs.export_onnx(scratch, do_type_check=False)
    common = {c.name for c in shared.constants.values()}
    own = [t for t in exported.graph.initializer if t.name not in common]
    nodes = [n for n in exported.graph.node if n.name not in shared.node_names]
    # +3: the field tag and length prefix each repeated entry costs in the graph
    return int(sum(m.ByteSize() + 3 for m in [*nodes, *own]))


def unpack_table(bits: int) -> np.ndarray:
    """uint8 [256, 8/bits]: row v holds the indices packed in a byte of value v, in the layout of
    :func:`onnxzip.cluster.pack_indices` (``table[packed]`` = the unpacked indices). uint8 keeps
    the three tables at 3.5 KB; the looked-up indices are cast to int32 after the Gather."""
    return unpack_indices(np.arange(256, dtype=np.uint8), bits, 256 * (8 // bits)).reshape(256, -1)


INT32 = int(onnx.TensorProto.INT32)


def _twos(count: int) -> tuple[int, ...]:
    """``count`` (a power of two) as a shape of 2s: 1 → (), 2 → (2,), 4 → (2, 2)."""
    return (2,) * (count.bit_length() - 1)


@dataclass(frozen=True)
class TableLayout:
    """How a weight is decoded through a value table (see the module docstring): ``unit``
    indices per key (the indices in a byte of the widest plane), ``group`` indices per byte of
    the narrowest plane, keys of ``key_bits`` bits laid out as ``lead`` + 2s (one key per unit of
    a group), ``channels`` rows of a per-channel codebook (on a leading axis) or None."""

    planes: tuple[tuple[int, int], ...]
    unit: int
    group: int
    key_bits: int
    lead: tuple[int, ...]
    channels: int | None
    padded: bool

    @property
    def split(self) -> tuple[int, ...]:
        return _twos(self.group // self.unit)

    @property
    def table_values(self) -> int:
        """Values of the weight's value table ([C·]2**key_bits × unit)."""
        return (1 << self.key_bits) * self.unit * (self.channels or 1)


def table_layout(bits: int, shape: tuple[int, ...], axis: int | None) -> TableLayout | None:
    """The value-table layout of a ``bits``-wide weight of ``shape`` (per-channel codebook on
    ``axis``), or None where there is none: 8-bit indices (one key per index already), a
    per-channel axis with a non-unit axis before it or rows that split a group, several planes
    whose groups do not divide the weight."""
    planes = tuple(plane_widths(bits))
    if planes[0][0] == 8:
        return None
    count = int(np.prod(shape, dtype=np.int64))
    unit, group = 8 // planes[0][0], 8 // planes[-1][0]
    key_bits = 8 + sum(unit * width for width, _shift in planes[1:])
    channels = None
    if axis is not None:
        if any(d != 1 for d in shape[:axis]) or (count // shape[axis]) % group:
            return None
        channels = int(shape[axis])
    padded = count % group != 0
    if padded and len(planes) > 1:
        return None
    groups = -(-count // group)
    lead = (groups,) if channels is None else (channels, groups // channels)
    return TableLayout(planes, unit, group, key_bits, lead, channels, padded)


def load_bytes(bits: int, shape: tuple[int, ...], axis: int | None, itemsize: int,
               layout: TableLayout | None) -> int:
    """Bytes of the tensors a decode computes besides the weight (what onnxruntime's constant
    folding materialises at load), in the value-table form of ``layout`` or, None, the index
    form; from the shapes (tests/passes/test_cluster_decode.py checks it against onnx's shape
    inference)."""
    count = int(np.prod(shape, dtype=np.int64))
    planes = plane_widths(bits)
    if layout is None:
        if bits == 8:
            return 4 * count * (1 if axis is None else 2)
        total = 0
        for width, shift in planes:
            stored = -(-count * width // 8)
            unpacked = stored * (8 // width)
            padded = unpacked != count
            total += 4 * stored + 5 * unpacked + 4 * unpacked * (padded or len(planes) > 1)
            total += 4 * count * (padded + (shift > 0))
        return total + 4 * count * (len(planes) + (axis is not None))
    keys = -(-count // layout.unit)
    total = 4 * keys * (1 + 2 * (len(planes) - 1) + (layout.channels is not None))
    total += sum(4 * -(-count * width // 8) for width, _shift in planes[1:])
    index_table = 4 * (1 << layout.key_bits) * layout.unit
    total += index_table * (1 if len(planes) == 1 else 3)
    total += itemsize * layout.table_values * (1 if layout.channels is None else 2)
    return total + itemsize * keys * layout.unit * (1 + 2 * layout.padded)


def decode_layout(bits: int, shape: tuple[int, ...], axis: int | None, itemsize: int) -> TableLayout | None:
    """The value-table layout where it computes fewer bytes at load than the index form, else
    None (the index form)."""
    layout = table_layout(bits, shape, axis)
    if layout is None or load_bytes(bits, shape, axis, itemsize, layout) >= load_bytes(bits, shape, axis, itemsize, None):
        return None
    return layout


class DecodeShared:
    """What the decodes of one graph share: the unpack tables, small int constants (the [-1]
    shape, plane scales), the nodes computing index tables from them, and a counter for short
    intermediate names (a decode adds up to 13 nodes, whose names would otherwise cost more
    bytes than a small tensor's indices)."""

    def __init__(self) -> None:
        self.constants: dict[tuple[int, str], gs.Constant] = {}
        self.values: dict[tuple[int, str], gs.Variable] = {}
        self.node_names: set[str] = set()
        self.count = 0

    def constant(self, graph: gs.Graph, names: NameScope, key: str, make: Any) -> gs.Constant:
        slot = (id(graph), key)
        if slot not in self.constants:
            self.constants[slot] = gs.Constant(names.fresh(f"cluster_{key}"), make())
        return self.constants[slot]

    def value(self, graph: gs.Graph, key: str, make: Any) -> gs.Variable:
        """The output of shared nodes ``make()`` appends to ``graph`` (once per graph and key)."""
        slot = (id(graph), key)
        if slot not in self.values:
            start = len(graph.nodes)
            self.values[slot] = make()
            self.node_names.update(node.name for node in graph.nodes[start:])
        return self.values[slot]

    def tables(self) -> list[gs.Constant]:
        return [c for (_g, key), c in self.constants.items() if key.startswith("unpack")]

    def short_name(self, names: NameScope) -> str:
        self.count += 1
        return names.fresh(f"cq{self.count}")


class _DecodeBuilder:
    """Adds the constants and nodes of one weight's decode to one graph. ``constants`` lists the
    weight's own constants (to count its bytes); the shared constants live in ``shared``."""

    def __init__(
        self, graph: gs.Graph, names: NameScope, prefix: str, shared: DecodeShared
    ) -> None:
        self.graph, self.names, self.prefix, self.shared = graph, names, prefix, shared
        self.constants: list[gs.Constant] = []

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        name = self.names.fresh(f"{self.prefix}_{suffix}")
        self.constants.append(gs.Constant(name, np.ascontiguousarray(value)))
        return self.constants[-1]

    def shared_const(self, key: str, make: Any) -> gs.Constant:
        return self.shared.constant(self.graph, self.names, key, make)

    def flat_shape(self) -> gs.Constant:
        return self.shared_const("flat_shape", lambda: np.array([-1], np.int64))

    def scale(self, shift: int) -> gs.Constant:
        return self.shared_const(f"scale_{1 << shift}", lambda: np.array(1 << shift, np.int32))

    def table(self, bits: int) -> gs.Constant:
        return self.shared_const(f"unpack_{bits}bit", lambda: unpack_table(bits))

    def op(self, op_type: str, inputs: list[gs.Tensor], **attrs: Any) -> gs.Variable:
        """One node with a short name and an untyped output (so no value_info is stored)."""
        output = gs.Variable(self.shared.short_name(self.names))
        self.graph.nodes.append(gs.Node(op_type, output.name, attrs, inputs, [output]))
        return output

    def index_table(self, planes: tuple[tuple[int, int], ...], unit: int) -> gs.Variable:
        """int32 [2**key_bits, unit] (shared): row k holds the codebook indices of the ``unit``
        indices a key k encodes (key = byte of the widest plane + 256·chunk of the next + …)."""

        def make() -> gs.Variable:
            width, shift = planes[0]
            table = self.op("Cast", [self.table(width)], to=INT32)  # [256, unit]
            if len(planes) == 1:
                return table
            if shift:
                table = self.op("Mul", [table, self.scale(shift)])
            for j, (width, shift) in enumerate(planes[1:], 1):
                chunk = unit * width  # bits of this plane a key holds
                values = (unpack_table(width)[: 1 << chunk, :unit] << np.uint8(shift)).reshape(
                    [1 << chunk] + [1] * j + [unit])
                part = self.shared_const(f"values_{width}bit_x{unit}_s{shift}_d{j}", lambda v=values: v)
                table = self.op("Add", [table, self.op("Cast", [part], to=INT32)])
            shape = self.shared_const(f"rows_of_{unit}", lambda: np.array([-1, unit], np.int64))
            return self.op("Reshape", [table, shape])

        key = "index_table_" + "_".join(f"{w}s{s}" for w, s in planes)
        return self.shared.value(self.graph, key, make)

    def key_table(self, width: int, unit: int, shift: int) -> gs.Variable:
        """int32 [256, 2, …] (shared): the key bits (``shift`` up) of each ``unit``-index chunk
        of a ``width``-bit plane's byte value."""
        chunk = unit * width

        def make() -> gs.Variable:
            table = self.op("Mul", [self.op("Cast", [self.table(chunk)], to=INT32), self.scale(shift)])
            dims = _twos(8 // chunk)
            if len(dims) > 1:
                shape = self.shared_const(f"key_shape_{8 // chunk}", lambda: np.array([256, *dims], np.int64))
                table = self.op("Reshape", [table, shape])
            return table

        return self.shared.value(self.graph, f"key_{width}bit_x{unit}_s{shift}", make)


def insert_decode(
    graph: gs.Graph,
    weight: gs.Constant,
    consumers: list[tuple[gs.Node, gs.Graph]],
    stored: Codebook,
    names: NameScope,
    shared: DecodeShared,
    opset: int,
    prefix: str | None = None,
) -> list[gs.Constant]:
    """Add the decode subgraph of ``stored`` (see the module docstring) to ``graph`` and point
    every consumer of ``weight`` at its output. Returns the weight's own constants."""
    shape = tuple(int(d) for d in weight.shape)
    prefix = weight.name if prefix is None else prefix
    build = _DecodeBuilder(graph, names, prefix, shared)
    if stored.pair_axis is not None:
        decoded = _pair_decode(build, stored, shape, opset)
    else:
        codebook = build.const("codebook", stored.codebook.reshape(-1))
        layout = decode_layout(stored.bits, shape, stored.axis, stored.codebook.dtype.itemsize)
        if layout is not None:
            decoded = _table_decode(build, codebook, stored, shape, layout, opset)
        else:
            decoded = _index_decode(build, codebook, stored, shape, opset)
    if stored.scale is not None:  # channel-scaled: W = codebook[indices] · s (one Mul, folded at load)
        scale = build.const("channel_scale", stored.scale.reshape(scale_shape(shape, stored.scale_axis)))
        decoded.dtype, decoded.shape = stored.codebook.dtype, list(shape)
        decoded = build.op("Mul", [decoded, scale])
    decoded.name = names.fresh(f"{prefix}_decoded")
    decoded.dtype, decoded.shape = stored.codebook.dtype, list(shape)
    for node, _owner in consumers:
        for slot, tensor in enumerate(node.inputs):
            if tensor is weight:
                node.inputs[slot] = decoded
    return build.constants


def _pair_decode(build: _DecodeBuilder, stored: Codebook, shape: tuple[int, ...], opset: int) -> gs.Variable:
    """A vector codebook's decode: the index or value-table form over the pair indices (the
    weight's shape with ``pair_axis`` halved) gathers [K, 2] codewords, giving [..., 2]; a
    Transpose puts each pair's two values next to each other along ``pair_axis`` (none when it is
    the last axis) and a Reshape gives the weight."""
    index_shape = tuple(int(d) for d in stored.indices.shape)
    codebook = build.const("codebook", stored.codebook)
    layout = decode_layout(stored.bits, index_shape, None, 2 * stored.codebook.dtype.itemsize)
    if layout is not None and not layout.padded:
        pairs = _table_decode(build, codebook, stored, index_shape, layout, opset, (*index_shape, 2))
    else:
        pairs = _index_decode(build, codebook, stored, index_shape, opset)  # [*index_shape, 2]
    axis = stored.pair_axis
    if axis != len(shape) - 1:
        perm = [*range(axis + 1), len(shape), *range(axis + 1, len(shape))]
        pairs = build.op("Transpose", [pairs], perm=perm)
    return build.op("Reshape", [pairs, build.const("shape", np.array(shape, np.int64))])


def _slice_first(build: _DecodeBuilder, tensor: gs.Variable, count: int, opset: int) -> gs.Variable:
    """The first ``count`` values of a flat tensor (Slice-1 attributes below opset 10)."""
    if opset < 10:
        return build.op("Slice", [tensor], starts=[0], ends=[count], axes=[0])
    bounds = [build.const("slice_start", np.array([0], np.int64)),
              build.const("slice_end", np.array([count], np.int64))]
    return build.op("Slice", [tensor, *bounds])


def _index_decode(build: _DecodeBuilder, codebook: gs.Constant, stored: Codebook,
                  shape: tuple[int, ...], opset: int) -> gs.Variable:
    """The index form: the int32 index of every value, then ``Gather(codebook, index)``."""
    count = int(np.prod(shape, dtype=np.int64))
    planes = stored.stored_planes()
    index = None
    for width, shift, data in planes:
        suffix = f"indices_u{stored.bits}" + ("" if len(planes) == 1 else f"_p{shift}")
        if width == 8:  # stored in the weight's shape: no Reshape
            index = build.op("Cast", [build.const(suffix, data.reshape(shape))], to=INT32)
            break
        plane = build.op("Cast", [build.const(suffix, data)], to=INT32)
        plane = build.op("Gather", [build.table(width), plane])  # [bytes, 8/width]
        plane = build.op("Cast", [plane], to=INT32)
        padded = data.size * (8 // width) != count
        if padded or len(planes) > 1:
            plane = build.op("Reshape", [plane, build.flat_shape()])
        if padded:  # keep the first count indices
            plane = _slice_first(build, plane, count, opset)
        if shift:
            plane = build.op("Mul", [plane, build.scale(shift)])
        index = plane if index is None else build.op("Add", [index, plane])
    if planes[0][0] < 8:
        index = build.op("Reshape", [index, build.const("shape", np.array(shape, np.int64))])
    if stored.axis is not None:
        offset_shape = [1] * len(shape)
        offset_shape[stored.axis] = shape[stored.axis]
        offsets = np.arange(shape[stored.axis], dtype=np.int32).reshape(offset_shape) * stored.k
        index = build.op("Add", [index, build.const("row_offsets", offsets)])
    return build.op("Gather", [codebook, index])  # axis 0


def _table_decode(build: _DecodeBuilder, codebook: gs.Constant, stored: Codebook,
                  shape: tuple[int, ...], layout: TableLayout, opset: int,
                  out_shape: tuple[int, ...] | None = None) -> gs.Variable:
    """The value-table form: ``Gather(values, key)`` with one key per ``unit`` indices, reshaped
    to ``out_shape`` (default: ``shape``, the indices')."""
    count = int(np.prod(shape, dtype=np.int64))
    planes = stored.stored_planes()
    key, shift = None, 8
    for j, (width, _shift, data) in enumerate(planes):
        suffix = f"indices_u{stored.bits}" + ("" if len(planes) == 1 else f"_p{_shift}")
        dims = (data.size,) if layout.padded else layout.lead + _twos(width * layout.group // 8)
        term = build.op("Cast", [build.const(suffix, data.reshape(dims))], to=INT32)
        if j:
            term = build.op("Gather", [build.key_table(width, layout.unit, shift), term])
            shift += layout.unit * width
        key = term if key is None else build.op("Add", [key, term])
    table = build.index_table(layout.planes, layout.unit)
    if layout.channels is None:
        values = build.op("Gather", [codebook, table])  # [2**key_bits, unit]
    else:
        rows = build.const("rows", np.array([layout.channels, stored.k], np.int64))
        values = build.op("Gather", [build.op("Reshape", [codebook, rows]), table], axis=1)
        unit_rows = build.shared_const(f"rows_of_{layout.unit}", lambda: np.array([-1, layout.unit], np.int64))
        values = build.op("Reshape", [values, unit_rows])  # [C·2**key_bits, unit]
        offsets = np.arange(layout.channels, dtype=np.int32) << np.int32(layout.key_bits)
        offsets = offsets.reshape((layout.channels,) + (1,) * (len(layout.lead) - 1 + len(layout.split)))
        key = build.op("Add", [key, build.const("row_offsets", offsets)])
    decoded = build.op("Gather", [values, key])  # lead + 2s + [unit]
    if layout.padded:
        decoded = _slice_first(build, build.op("Reshape", [decoded, build.flat_shape()]), count, opset)
        if len(shape) == 1:
            return decoded
    return build.op("Reshape", [decoded, build.const("shape", np.array(out_shape or shape, np.int64))])


@dataclass
class DecodedWeight:
    """A weight the cluster pass replaced by its decode subgraph, read back from a graph:
    ``node`` is the decode's last node (its output replaced the weight), ``planes`` the stored
    index planes (constant, width, shift). :meth:`stored` reads the :class:`Codebook`;
    :meth:`store` writes new centroids and indices of the same K and width into the same
    constants (same file size)."""

    name: str
    node: gs.Node
    graph: gs.Graph
    codebook: gs.Constant
    planes: list[tuple[gs.Constant, int, int]]
    axis: int | None
    shape: tuple[int, ...]
    scale: gs.Constant | None = None  # channel-scaled codebooks: the Mul's [1,..,C,..,1] constant
    scale_axis: int | None = None
    pair_axis: int | None = None  # vector codebooks ([K, 2] codewords): the axis pairs run along

    @property
    def index_shape(self) -> tuple[int, ...]:
        """The stored indices' shape (the weight's; with ``pair_axis`` halved for pairs)."""
        shape = list(self.shape)
        if self.pair_axis is not None:
            shape[self.pair_axis] //= 2
        return tuple(shape)

    @property
    def unscaled(self) -> gs.Tensor:
        """The decode's output before the channel scale (its output when there is none)."""
        return self.node.inputs[0] if self.scale is not None else self.output

    @property
    def bits(self) -> int:
        return sum(width for _c, width, _s in self.planes)

    @property
    def output(self) -> gs.Variable:
        return self.node.outputs[0]

    def value_tensors(self) -> list[gs.Variable]:
        """The decode's tensors that carry codebook values (the value table, the gathered values,
        their reshapes, the output before any channel scale): their dtype is the codebook's."""
        found: list[gs.Variable] = []
        frontier = [tensor for node in self.codebook.outputs for tensor in node.outputs]
        while frontier:
            tensor = frontier.pop()
            if any(tensor is seen for seen in found):
                continue
            found.append(tensor)
            if tensor is not self.output and tensor is not self.unscaled:
                frontier += [out for node in tensor.outputs for out in node.outputs]
        return found

    def stored(self) -> Codebook:
        count = int(np.prod(self.index_shape, dtype=np.int64))
        indices = unpack_planes([(w, s, np.asarray(c.values)) for c, w, s in self.planes], count)
        values = np.asarray(self.codebook.values)
        scale = None if self.scale is None else np.asarray(self.scale.values).reshape(-1)
        if self.pair_axis is not None:
            return Codebook(values.reshape(-1, 2), indices.reshape(self.index_shape), None, self.bits, scale,
                            self.scale_axis, pair_axis=self.pair_axis)
        rows = 1 if self.axis is None else self.shape[self.axis]
        codebook = values if self.axis is None else values.reshape(rows, -1)
        return Codebook(codebook, indices.reshape(self.shape), self.axis, self.bits, scale, self.scale_axis)

    def store(self, stored: Codebook) -> None:
        old = np.asarray(self.codebook.values)
        if (stored.codebook.size != old.size or stored.indices.shape != self.index_shape or stored.bits != self.bits
                or stored.pair_axis != self.pair_axis):
            raise ValueError(f"{self.name}: a stored codebook keeps its K, width and shape")
        if (stored.scale is None) != (self.scale is None) or (
                self.scale is not None and (stored.scale.size != np.asarray(self.scale.values).size
                                            or stored.scale_axis != self.scale_axis)):
            raise ValueError(f"{self.name}: a stored codebook keeps its channel scale's shape")
        self.codebook.values = np.ascontiguousarray(stored.codebook.reshape(old.shape).astype(old.dtype))
        if self.scale is not None:
            current = np.asarray(self.scale.values)
            self.scale.values = np.ascontiguousarray(stored.scale.astype(current.dtype).reshape(current.shape))
        planes = {(w, s): data for w, s, data in stored.stored_planes()}
        for constant, width, shift in self.planes:
            constant.values = planes[(width, shift)].reshape(np.asarray(constant.values).shape)


def find_decodes(graph: gs.Graph, dtypes: frozenset[str] = FLOAT_DTYPES) -> list[DecodedWeight]:
    """Every decode subgraph the cluster pass wrote, index or value-table form (see the module
    docstring), in any graph, of a codebook of one of ``dtypes`` (``int8``: the codebooks
    :mod:`~onnxzip.passes.cluster_int8` converted). ``name`` is the clustered weight's name (its
    codebook constant's, less ``_codebook``)."""
    found = []
    for node, owner, _path in walk_nodes(graph):
        if node.op != "Gather" or len(node.inputs) != 2 or int(node.attrs.get("axis", 0)) != 0:
            continue
        if isinstance(node.inputs[0], gs.Constant):
            decoded = _index_form(node, owner, dtypes)
        else:
            decoded = _table_form(node, owner, dtypes)
        if decoded is not None:
            found.append(_with_scale(decoded))
    return found


def _with_scale(decoded: DecodedWeight) -> DecodedWeight:
    """``decoded`` extended by the channel scale that follows it (a Mul by a constant named
    ``…_channel_scale`` of shape [1,..,C,..,1]), when there is one."""
    mul = _only_user(decoded.output, "Mul")
    if mul is None or not isinstance(mul.inputs[1], gs.Constant) or not mul.inputs[1].name.endswith("channel_scale"):
        return decoded
    dims = np.asarray(mul.inputs[1].values).shape
    axes = [i for i, d in enumerate(dims) if d != 1]
    if len(dims) != len(decoded.shape) or len(axes) > 1:
        return decoded
    axis = axes[0] if axes else next((i for i, d in enumerate(decoded.shape) if d == 1), None)
    if axis is None or dims[axis] != decoded.shape[axis]:
        return decoded
    decoded.node, decoded.scale, decoded.scale_axis = mul, mul.inputs[1], axis
    return decoded


def _codebook_name(codebook: gs.Constant) -> str:
    return codebook.name[: -len("_codebook")] if codebook.name.endswith("_codebook") else codebook.name


def _is_codebook(tensor: gs.Tensor, dtypes: frozenset[str]) -> bool:
    """A codebook constant: [K] values (or [C·K]) or [K, 2] codewords of pairs."""
    if not isinstance(tensor, gs.Constant):
        return False
    values = np.asarray(tensor.values)
    return (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 2)) and str(values.dtype) in dtypes


def _pair_tail(output: gs.Tensor, index_shape: tuple[int, ...]) -> tuple[gs.Node, tuple[int, ...], int] | None:
    """(last node, weight shape, pair axis) of a vector codebook's decode after the [*index_shape, 2]
    codewords ``output``: an optional Transpose putting the pair axis after axis a, then a Reshape."""
    transpose, axis = _only_user(output, "Transpose"), len(index_shape) - 1
    if transpose is not None:
        perm = [int(p) for p in transpose.attrs.get("perm", [])]
        rank = len(index_shape)
        if len(perm) != rank + 1 or rank not in perm:
            return None
        axis = perm.index(rank) - 1
        if axis < 0 or perm != [*range(axis + 1), rank, *range(axis + 1, rank)]:
            return None
        output = transpose.outputs[0]
    reshape = _only_user(output, "Reshape")
    if reshape is None or not isinstance(reshape.inputs[1], gs.Constant):
        return None
    shape = tuple(int(d) for d in np.asarray(reshape.inputs[1].values).reshape(-1))
    expected = list(index_shape)
    expected[axis] *= 2
    return (reshape, shape, axis) if shape == tuple(expected) else None


def _index_form(node: gs.Node, owner: gs.Graph, dtypes: frozenset[str]) -> DecodedWeight | None:
    """The index form ending in ``node`` = ``Gather(codebook, index)``, or None."""
    codebook, index = node.inputs
    if not _is_codebook(codebook, dtypes):
        return None
    if any(user.op == "Gather" and user.inputs[0] is node.outputs[0] for user in node.outputs[0].outputs):
        return None  # a value table (its index is the shared index table)
    parsed = _parse_index(index)
    if parsed is None:
        return None
    planes, offsets, shape = parsed
    pairs = np.asarray(codebook.values).ndim == 2
    if pairs and offsets is not None:
        return None
    bits = sum(w for _c, w, _s in planes)
    if not 1 <= bits <= 8 or sorted((w, s) for _c, w, s in planes) != sorted(plane_widths(bits)):
        return None
    shape = shape or tuple(np.asarray(planes[0][0].values).shape)
    count = int(np.prod(shape, dtype=np.int64))
    if any(np.asarray(c.values).size != -(-count * w // 8) for c, w, _s in planes):
        return None
    axis = None
    if offsets is not None:
        dims = [i for i, d in enumerate(offsets.shape) if len(offsets.shape) == len(shape)
                and d == offsets.size == shape[i]]
        if not dims:
            return None
        axis = dims[0]
    if pairs:
        tail = _pair_tail(node.outputs[0], tuple(shape))
        if tail is None:
            return None
        return DecodedWeight(_codebook_name(codebook), tail[0], owner, codebook, planes, None, tail[1], pair_axis=tail[2])
    return DecodedWeight(_codebook_name(codebook), node, owner, codebook, planes, axis, tuple(shape))


def _parse_index(index: gs.Tensor) -> tuple[list[tuple[gs.Constant, int, int]], np.ndarray | None,
                                            tuple[int, ...] | None] | None:
    """(planes, per-channel row offsets, weight shape) of an index-form decode's index tensor, or
    None when it is not one."""
    offsets, shape = None, None
    producer = _producer(index)
    if producer is not None and producer.op == "Add" and isinstance(producer.inputs[1], gs.Constant):
        offsets = np.asarray(producer.inputs[1].values)
        index, producer = producer.inputs[0], _producer(producer.inputs[0])
    if producer is not None and producer.op == "Reshape" and isinstance(producer.inputs[1], gs.Constant):
        candidate = tuple(int(d) for d in np.asarray(producer.inputs[1].values).reshape(-1))
        if all(d > 0 for d in candidate):
            shape, index = candidate, producer.inputs[0]
    planes = _index_terms(index, 0)
    return None if not planes else (planes, offsets, shape)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None


def _index_terms(tensor: gs.Tensor, shift: int) -> list[tuple[gs.Constant, int, int]] | None:
    """The planes summed into ``tensor``: Add of terms, Mul by 2**shift, Reshape/Slice of an
    unpacked plane, Cast(Gather(table, Cast(plane))) or Cast(plane) for width 8."""
    node = _producer(tensor)
    if node is None:
        return None
    if node.op == "Add" and not any(isinstance(t, gs.Constant) for t in node.inputs):
        left, right = _index_terms(node.inputs[0], shift), _index_terms(node.inputs[1], shift)
        return None if left is None or right is None else left + right
    if node.op == "Mul" and isinstance(node.inputs[1], gs.Constant):
        scale = int(np.asarray(node.inputs[1].values))
        return _index_terms(node.inputs[0], shift + scale.bit_length() - 1) if scale > 0 and not scale & (scale - 1) else None
    if node.op in ("Reshape", "Slice"):
        return _index_terms(node.inputs[0], shift)
    if node.op != "Cast":
        return None
    source = node.inputs[0]
    if isinstance(source, gs.Constant) and np.asarray(source.values).dtype == np.uint8:
        return [(source, 8, shift)]
    table = _producer(source)
    if table is None or table.op != "Gather" or not isinstance(table.inputs[0], gs.Constant):
        return None
    lookup = np.asarray(table.inputs[0].values)
    cast = _producer(table.inputs[1])
    if lookup.shape[:1] != (256,) or lookup.ndim != 2 or cast is None or cast.op != "Cast":
        return None
    plane = cast.inputs[0]
    if not isinstance(plane, gs.Constant) or np.asarray(plane.values).dtype != np.uint8:
        return None
    return [(plane, 8 // lookup.shape[1], shift)]


def _table_form(node: gs.Node, owner: gs.Graph, dtypes: frozenset[str]) -> DecodedWeight | None:
    """The value-table form whose ``Gather(values, key)`` is ``node``, or None."""
    values, key = node.inputs
    source, channels = _producer(values), None
    if source is not None and source.op == "Reshape":  # per channel: [C, 2**key_bits, unit] rows
        source = _producer(source.inputs[0])
        if source is None or source.op != "Gather" or int(source.attrs.get("axis", 0)) != 1:
            return None
        rows = _producer(source.inputs[0])
        if rows is None or rows.op != "Reshape" or not isinstance(rows.inputs[1], gs.Constant):
            return None
        codebook, channels = rows.inputs[0], int(np.asarray(rows.inputs[1].values).reshape(-1)[0])
        adder = _producer(key)
        if adder is None or adder.op != "Add" or not isinstance(adder.inputs[1], gs.Constant):
            return None
        key = adder.inputs[0]
    elif source is not None and source.op == "Gather" and int(source.attrs.get("axis", 0)) == 0:
        codebook = source.inputs[0]
    else:
        return None
    if not _is_codebook(codebook, dtypes):
        return None
    tail = _table_tail(node)
    constants = _key_planes(key)
    if tail is None or not constants:
        return None
    last, shape = tail
    paired = None
    if np.asarray(codebook.values).ndim == 2:  # codewords of pairs: [*index_shape, 2], then the pair tail
        if channels is not None or len(shape) < 2 or shape[-1] != 2:
            return None
        paired = _pair_tail(last.outputs[0], shape[:-1])
        if paired is None:
            return None
        shape = shape[:-1]
    count = int(np.prod(shape, dtype=np.int64))
    widths = []
    for constant in constants:
        size = np.asarray(constant.values).size
        fits = [w for w in (1, 2, 4) if -(-count * w // 8) == size]
        if len(fits) != 1:
            return None
        widths.append(fits[0])
    bits = sum(widths)
    if bits > 8 or widths[0] != max(widths) or sorted(widths) != sorted(w for w, _s in plane_widths(bits)):
        return None
    shifts = dict(plane_widths(bits))
    planes = [(c, w, shifts[w]) for c, w in zip(constants, widths)]
    axis = None
    if channels is not None:
        axes = [i for i, d in enumerate(shape) if d == channels and all(e == 1 for e in shape[:i])]
        if not axes:
            return None
        axis = axes[0]
    if paired is not None:
        return DecodedWeight(_codebook_name(codebook), paired[0], owner, codebook, planes, None, paired[1],
                             pair_axis=paired[2])
    return DecodedWeight(_codebook_name(codebook), last, owner, codebook, planes, axis, shape)


def _only_user(tensor: gs.Tensor, op: str) -> gs.Node | None:
    users = tensor.outputs
    if len(users) == 1 and users[0].op == op and users[0].inputs[0] is tensor:
        return users[0]
    return None


def _table_tail(gather: gs.Node) -> tuple[gs.Node, tuple[int, ...]] | None:
    """(last node, weight shape) after a value-table ``Gather``: Reshape(shape), or Reshape[-1],
    Slice (the first N values) and Reshape(shape) unless the weight is 1-D."""
    reshape = _only_user(gather.outputs[0], "Reshape")
    if reshape is None or not isinstance(reshape.inputs[1], gs.Constant):
        return None
    dims = tuple(int(d) for d in np.asarray(reshape.inputs[1].values).reshape(-1))
    if dims != (-1,):
        return (reshape, dims) if all(d > 0 for d in dims) else None
    cut = _only_user(reshape.outputs[0], "Slice")
    if cut is None:
        return None
    if len(cut.inputs) >= 3 and isinstance(cut.inputs[2], gs.Constant):
        count = int(np.asarray(cut.inputs[2].values).reshape(-1)[0])
    elif "ends" in cut.attrs:
        count = int(cut.attrs["ends"][0])
    else:
        return None
    final = _only_user(cut.outputs[0], "Reshape")
    if final is not None and isinstance(final.inputs[1], gs.Constant):
        dims = tuple(int(d) for d in np.asarray(final.inputs[1].values).reshape(-1))
        if all(d > 0 for d in dims) and int(np.prod(dims)) == count:
            return final, dims
    return cut, (count,)


def _key_planes(key: gs.Tensor) -> list[gs.Constant] | None:
    """The stored planes a value-table key is computed from, the widest (cast directly) first:
    Add of Cast(plane) and Gather(key table, Cast(plane)) terms."""
    node = _producer(key)
    if node is None:
        return None
    if node.op == "Add":
        left, right = _key_planes(node.inputs[0]), _key_planes(node.inputs[1])
        return None if left is None or right is None else left + right
    if node.op == "Gather" and not isinstance(node.inputs[0], gs.Constant):
        planes = _key_planes(node.inputs[1])
        return planes if planes is not None and len(planes) == 1 else None
    if node.op == "Cast" and isinstance(node.inputs[0], gs.Constant) \
            and np.asarray(node.inputs[0].values).dtype == np.uint8:
        return [node.inputs[0]]
    return None
