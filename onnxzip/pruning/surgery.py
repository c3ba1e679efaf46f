"""Physical channel removal: one "prune" function per op type, driven by keep masks.

:func:`prune_channels` gives every node the keep masks of its inputs' and outputs' channel axes
(from :class:`onnxzip.pruning.groups.ChannelAnalysis`) and calls the function registered for
its op in :data:`PRUNE_FUNCTIONS`: Conv/Gemm/MatMul slice the output axis of their weight (and
bias) and the input axis, BatchNormalization and per-channel constants are sliced, Split/Slice/
Reshape get new sizes. Ops without channel parameters need no function.

Compensation. A removed channel is not simply dropped from a consumer layer: the value it still
carries is folded into that layer's bias. That value is measured, not guessed: the group's
channels are made constant (``γ_k = 0`` in the BatchNormalization right after a source, which
leaves ``β_k``; else the source filter ``W_k = 0``, which leaves its bias) and one onnxruntime
run reads each removed channel at every consumer's input (median over the other axes, so the
interior value). For a consumer Conv, ``b_o += Σ_k m_k · Σ_{kh,kw} W[o,k,kh,kw]``; for
Gemm/MatMul, ``b_n += Σ_k m_k · W[k,n]``. It is exact for Gemm/MatMul after global pooling and
for a Conv wherever its window does not touch the zero padding (at the border a padded Conv saw
zeros, not ``m_k``); ConvTranspose consumers are not compensated (strided taps differ per
output pixel).

Recurrent layers (LSTM/GRU/RNN). Keeping hidden units ``J`` of a node with ``G`` gates keeps
rows ``g·H + j`` (every gate ``g``, ``j ∈ J``) of ``W``, ``R`` and both halves of ``B`` (and
of the peepholes ``P``), columns ``J`` of ``R``, and sets ``hidden_size``; an initial state is
read at the kept units (``Gather`` on its unit axis), so a state input keeps its shape. Pruned
units are zero: they carry nothing into a consumer (no compensation). Wherever the analysis
widens a tensor (a graph output, a consumer it does not follow) it is restored to full width:

* ``restore="zeros"``: a ``Pad`` with one zero and a ``Gather`` (zeros in the pruned units);
* ``restore="linear"``: the pruned units are predicted from the kept ones,
  ``x_P ≈ x_K·M + b`` (one ``MatMul`` named ``<tensor>/restore`` and an ``Add``, on the kept
  units moved to the last axis), then ``Concat`` [kept, predicted] and a ``Gather`` put every
  unit back in place. ``M, b`` are the ridge least-squares fit (with intercept, λ chosen by
  cross-validation) from the kept to the pruned units of the *original* tensor on calibration
  rows when the caller gives them (``restore_rows``), else zeros; the reconstruct step refits them to the original tensor from
  the pruned model's own kept units (:mod:`onnxzip.train.reconstruct`). A recurrent state that
  the caller feeds back (``Y_h``/``Y_c`` of a node with an initial-state input) stays zeros: the
  next call reads it only at the kept units.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxzip.core.graph import NameScope, constant_value
from onnxzip.core.inputs import first_samples
from onnxzip.core.shapes import generated_feeds
from onnxzip.pruning.groups import RECURRENT, ChannelAnalysis, slice_window
from onnxzip.core.runtime import make_session, run_session
from onnxzip.svd.whiten import centered, ridge, solve_psd

log = logging.getLogger(__name__)

COMPENSATED = frozenset({"Conv", "Gemm", "MatMul"})
RESTORES = ("zeros", "linear")
RESTORE_SUFFIX = "/restore"  # name of the MatMul predicting pruned units (found by the reconstruct step)
RESTORE_ROWS = 65536  # calibration rows a linear restore is fitted on
RESTORE_DAMPS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0)  # ridge λ / mean(diag H), chosen by validation
RESTORE_FOLDS = 4


@dataclass
class NodeMasks:
    """Keep masks of one node's inputs/outputs (None: untouched) and, for its data input, the
    value each removed channel carries (``carried``, for compensation)."""

    inputs: list[np.ndarray | None]
    outputs: list[np.ndarray | None]
    carried: np.ndarray | None = None


@dataclass
class NodeEdit:
    """Channels of one pruned node's data input and first output, before → after."""

    node: str
    op_type: str
    in_channels: tuple[int, int] | None
    out_channels: tuple[int, int] | None


class _Editor:
    """What a prune function may touch: the graph, fresh names, observed shapes."""

    def __init__(self, analysis: ChannelAnalysis, keep: dict[str, set[int]] | None = None) -> None:
        self.graph = analysis.graph
        self.names = NameScope(analysis.graph)
        self.analysis = analysis
        self.keep = keep or {}

    def add_node(self, op: str, inputs: list[gs.Tensor], base: str, dtype: object = None, **attrs: object) -> gs.Variable:
        """Append one ``op`` node reading ``inputs``; returns its (fresh) output."""
        output = gs.Variable(self.names.fresh(base), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.names.fresh(f"{base}_{op}"), attrs=attrs, inputs=inputs, outputs=[output]))
        return output

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(base), np.ascontiguousarray(value))

    def value(self, node: gs.Node, index: int) -> np.ndarray | None:
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        return constant_value(node.inputs[index])

    def set_input(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        """Give ``node`` a new constant input; a constant no other node uses is edited in place."""
        value = np.ascontiguousarray(value)
        old = node.inputs[index] if index < len(node.inputs) else None
        if isinstance(old, gs.Constant) and len(old.outputs) == 1:
            old.values = value
            return
        base = old.name if old is not None and old.name else f"{node.name}_in{index}"
        fresh = gs.Constant(self.names.fresh(base), value)
        if old is None:
            while len(node.inputs) < index:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(fresh)
        else:
            node.inputs[index] = fresh


def _compensation(weight_in_first: np.ndarray, mask: np.ndarray, carried: np.ndarray | None) -> np.ndarray | None:
    """``Σ_k m_k · Σ_rest W[k, o, rest]`` over removed ``k`` (weight with the input axis first,
    the output axis second), or None when nothing is carried."""
    if carried is None:
        return None
    removed = ~mask
    values = carried[removed]
    if not np.any(values):
        return None
    summed = weight_in_first[removed].reshape(int(removed.sum()), weight_in_first.shape[1], -1).sum(axis=2)
    return (values[:, None] * summed).sum(axis=0)


def _add_bias(bias: np.ndarray | None, delta: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """``bias + delta`` (a missing bias is zero; a scalar or ``[1, N]`` bias broadcasts)."""
    if delta is None:
        return bias
    return (delta if bias is None else np.asarray(bias) + delta).astype(dtype)


def prune_conv(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Conv: ``W[out, in/group, k…]``; a depthwise Conv follows its input (``group`` = kept)."""
    weight, bias = editor.value(node, 1), editor.value(node, 2)
    in_mask, out_mask = masks.inputs[0], masks.outputs[0]
    group = int(node.attrs.get("group", 1))
    if group == 1 and in_mask is not None:
        bias = _add_bias(bias, _compensation(np.swapaxes(weight, 0, 1), in_mask, masks.carried), weight.dtype)
        weight = weight[:, in_mask]
    elif group > 1 and in_mask is not None:
        node.attrs["group"] = int(in_mask.sum())
    if out_mask is not None:
        weight = weight[out_mask]
        bias = None if bias is None else bias[out_mask]
    editor.set_input(node, 1, weight)
    if bias is not None:
        editor.set_input(node, 2, bias)


def prune_conv_transpose(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """ConvTranspose: ``W[in, out, k…]`` (group 1), bias on ``out``; no compensation."""
    weight, bias = editor.value(node, 1), editor.value(node, 2)
    if masks.inputs[0] is not None:
        weight = weight[masks.inputs[0]]
    if masks.outputs[0] is not None:
        weight = weight[:, masks.outputs[0]]
        bias = None if bias is None else bias[masks.outputs[0]]
    editor.set_input(node, 1, weight)
    if bias is not None:
        editor.set_input(node, 2, bias)


def prune_gemm(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Gemm ``Y = α·A·B + β·C`` (B is ``[K, N]``, or ``[N, K]`` with transB)."""
    trans_b = bool(node.attrs.get("transB", 0))
    weight = editor.value(node, 1)
    matrix = weight.T if trans_b else weight  # [K, N]
    bias = editor.value(node, 2)
    in_mask, out_mask = masks.inputs[0], masks.outputs[0]
    if in_mask is not None:
        delta = _compensation(matrix, in_mask, masks.carried)
        beta = float(node.attrs.get("beta", 1.0))
        if delta is not None and beta:  # Y = α·A·B + β·C, so C absorbs α/β · Σ m_k B[k]
            bias = _add_bias(bias, delta * float(node.attrs.get("alpha", 1.0)) / beta, matrix.dtype)
        matrix = matrix[in_mask]
    if out_mask is not None:
        matrix = matrix[:, out_mask]
        if bias is not None and np.ndim(bias) and np.shape(bias)[-1] == len(out_mask):
            bias = bias[..., out_mask]
    editor.set_input(node, 1, matrix.T if trans_b else matrix)
    if bias is not None:
        editor.set_input(node, 2, bias)


def prune_matmul(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """MatMul ``Y = X·W`` (W ``[K, N]``); a compensation bias becomes an Add after it."""
    weight = editor.value(node, 1)
    in_mask, out_mask = masks.inputs[0], masks.outputs[0]
    delta = None
    if in_mask is not None:
        delta = _compensation(weight, in_mask, masks.carried)
        weight = weight[in_mask]
    if out_mask is not None:
        weight = weight[:, out_mask]
        delta = None if delta is None else delta[out_mask]
    editor.set_input(node, 1, weight)
    if delta is not None:
        output = node.outputs[0]
        product = gs.Variable(editor.names.fresh(f"{output.name}_pruned"), dtype=output.dtype)
        node.outputs[0] = product
        bias = gs.Constant(editor.names.fresh(f"{node.name}_compensation"), delta.astype(weight.dtype))
        editor.graph.nodes.append(gs.Node("Add", editor.names.fresh(f"{node.name}_compensation"), inputs=[product, bias], outputs=[output]))


def prune_per_channel_inputs(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """BatchNormalization/InstanceNormalization: every parameter input is per channel."""
    for index in range(1, len(node.inputs)):
        editor.set_input(node, index, editor.value(node, index)[masks.inputs[0]])


def prune_broadcast_constants(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Elementwise ops: constants spanning the channel axis (right-aligned) are sliced."""
    out_map = editor.analysis.maps[node.outputs[0].name]
    out_rank = len(editor.analysis.shapes[node.outputs[0].name])
    for index, tensor in enumerate(node.inputs):
        if not isinstance(tensor, gs.Constant):
            continue
        value = np.asarray(tensor.values)
        local = out_map.axis - (out_rank - value.ndim)
        if local >= 0 and value.shape[local] == len(masks.outputs[0]) > 1:
            editor.set_input(node, index, np.compress(masks.outputs[0], value, axis=local))


def prune_split(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Split on the channel axis: sizes become the kept counts of each output."""
    in_map = editor.analysis.maps[node.inputs[0].name]
    rank = len(editor.analysis.shapes[node.inputs[0].name])
    if int(node.attrs.get("axis", 0)) % rank != in_map.axis:
        return
    sizes = np.array([
        int(mask.sum()) if mask is not None else len(editor.analysis.maps[out.name].positions)
        for mask, out in zip(masks.outputs, node.outputs)
    ], dtype=np.int64)
    node.attrs.pop("num_outputs", None)
    if int(editor.graph.opset) >= 13:
        editor.set_input(node, 1, sizes)
    else:
        node.attrs["split"] = [int(s) for s in sizes]


def prune_slice(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Slice on the channel axis: the window moves to the kept channels it covered."""
    in_map = editor.analysis.maps[node.inputs[0].name]
    rank = len(editor.analysis.shapes[node.inputs[0].name])
    window = slice_window(node, rank, in_map.axis, len(in_map.positions))
    if window is None or masks.inputs[0] is None:
        return
    kept = masks.inputs[0]
    start = int(kept[: window[0]].sum())
    end = start + int(kept[window[0] : window[1]].sum())
    if len(node.inputs) == 1:
        axes = list(node.attrs.get("axes", range(len(node.attrs["starts"]))))
        where = [int(a) % rank for a in axes].index(in_map.axis)
        node.attrs["starts"] = [start if i == where else v for i, v in enumerate(node.attrs["starts"])]
        node.attrs["ends"] = [end if i == where else v for i, v in enumerate(node.attrs["ends"])]
        return
    axes_value = editor.value(node, 3)
    count = len(np.ravel(editor.value(node, 1)))
    axes = list(range(count)) if axes_value is None else [int(a) % rank for a in np.ravel(axes_value)]
    where = axes.index(in_map.axis)
    for index, new in ((1, start), (2, end)):
        value = np.array(np.ravel(editor.value(node, index)), copy=True)
        value[where] = new
        editor.set_input(node, index, value)


def prune_reshape(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """Reshape: a literal size on the channel axis becomes the kept size; a computed target
    (the analysis follows it only where the channel axis stays whole) gets the kept size on
    that axis by a ``Where``."""
    out_map = editor.analysis.maps[node.outputs[0].name]
    value = editor.value(node, 1)
    if value is None:
        if masks.outputs[0] is not None:
            rank = len(editor.analysis.shapes[node.outputs[0].name])
            where = np.arange(rank) == out_map.axis
            kept = np.where(where, int(masks.outputs[0].sum()), 0).astype(np.int64)
            node.inputs[1] = editor.add_node("Where", [editor.constant(f"{node.name}_channel_axis", where),
                                                       editor.constant(f"{node.name}_kept_shape", kept),
                                                       node.inputs[1]], f"{node.name}_target", node.inputs[1].dtype)
        return
    shape = np.array(value, dtype=np.int64, copy=True)
    if shape[out_map.axis] > 0 and masks.outputs[0] is not None:
        shape[out_map.axis] = int(masks.outputs[0].sum())
        editor.set_input(node, 1, shape)


def prune_recurrent(node: gs.Node, masks: NodeMasks, editor: _Editor) -> None:
    """LSTM/GRU/RNN: kept hidden units (every gate's rows, ``R``'s columns, ``hidden_size``),
    kept input columns of ``W``; initial states are gathered at the kept units."""
    units = editor.analysis.units.get(node.name)
    hidden = None if units is None else editor.analysis.position_mask(units, editor.keep)
    in_mask = masks.inputs[0] if masks.inputs else None
    gates = RECURRENT[node.op]
    w, r = editor.value(node, 1), editor.value(node, 2)
    if in_mask is not None:
        w = w[:, :, in_mask]
    if hidden is not None:
        rows = np.tile(hidden, gates)
        w, r = w[:, rows], r[:, rows][:, :, hidden]
        bias = editor.value(node, 3)
        if bias is not None:
            editor.set_input(node, 3, bias[:, np.tile(hidden, 2 * gates)])
        peephole = editor.value(node, 7) if node.op == "LSTM" else None
        if peephole is not None:
            editor.set_input(node, 7, peephole[:, np.tile(hidden, 3)])
        kept = editor.constant(f"{node.name}_kept_units", np.flatnonzero(hidden).astype(np.int64))
        for index in (5, 6) if node.op == "LSTM" else (5,):
            state = node.inputs[index] if len(node.inputs) > index else None
            if state is not None and state.name:
                node.inputs[index] = editor.add_node("Gather", [state, kept], f"{state.name}_kept", state.dtype, axis=2)
        node.attrs["hidden_size"] = int(hidden.sum())
    editor.set_input(node, 1, w)
    editor.set_input(node, 2, r)


def widen(editor: _Editor, tensor: gs.Variable, mask: np.ndarray, axis: int, rank: int,
          linear: tuple[np.ndarray, np.ndarray, str] | None = None) -> gs.Variable:
    """``tensor`` (kept channels ``mask`` on ``axis``) at full width: zeros where removed (one
    zero padded at the end of the axis, then a Gather placing each kept channel), or with
    ``linear`` = (M [K, P], b [P], name) the removed channels predicted as ``x_K·M + b``
    (concatenated after the kept ones, then a Gather placing every channel)."""
    kept = int(mask.sum())
    if linear is None:
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[rank + axis] = 1
        if int(editor.graph.opset) >= 11:
            padded = editor.add_node("Pad", [tensor, editor.constant(f"{tensor.name}_pads", pads)], f"{tensor.name}_padded", tensor.dtype)
        else:
            padded = editor.add_node("Pad", [tensor], f"{tensor.name}_padded", tensor.dtype, pads=[int(p) for p in pads])
        index = np.where(mask, np.cumsum(mask) - 1, kept).astype(np.int64)
        return editor.add_node("Gather", [padded, editor.constant(f"{tensor.name}_full_index", index)], f"{tensor.name}_full", tensor.dtype, axis=axis)
    weight, bias, name = linear
    last = axis == rank - 1
    perm = [d for d in range(rank) if d != axis] + [axis]
    rows = tensor if last else editor.add_node("Transpose", [tensor], f"{name}_units_last", tensor.dtype, perm=perm)
    product = gs.Variable(editor.names.fresh(f"{name}_predicted"), dtype=tensor.dtype)
    editor.graph.nodes.append(gs.Node("MatMul", editor.names.fresh(f"{name}{RESTORE_SUFFIX}"),
                                      inputs=[rows, editor.constant(f"{name}_restore_weight", weight)], outputs=[product]))
    predicted = editor.add_node("Add", [product, editor.constant(f"{name}_restore_bias", bias)], f"{name}_predicted_b", tensor.dtype)
    if not last:
        predicted = editor.add_node("Transpose", [predicted], f"{name}_predicted_t", tensor.dtype, perm=list(np.argsort(perm)))
    both = editor.add_node("Concat", [tensor, predicted], f"{name}_kept_predicted", tensor.dtype, axis=axis)
    index = np.where(mask, np.cumsum(mask) - 1, kept + np.cumsum(~mask) - 1).astype(np.int64)
    return editor.add_node("Gather", [both, editor.constant(f"{tensor.name}_full_index", index)], f"{tensor.name}_full", tensor.dtype, axis=axis)


def linear_restore(rows: np.ndarray | None, mask: np.ndarray, folds: int = RESTORE_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(M [K, P], b [P]) minimising ``Σ‖x_K M + b − x_P‖² + λ‖M‖²`` over ``rows`` [N, C] of the
    full-width tensor (channel last), K the kept channels ``mask``, P the others; λ chosen among
    :data:`RESTORE_DAMPS` by ``folds``-fold cross-validation over contiguous blocks of rows (rows
    of one sample stay together), then fitted on every row. Zeros without rows."""
    kept, pruned = np.flatnonzero(mask), np.flatnonzero(~mask)
    if rows is None or len(rows) < 2:
        return np.zeros((len(kept), len(pruned))), np.zeros(len(pruned))
    rows = np.asarray(rows, np.float64)
    x, y = rows[:, kept], rows[:, pruned]
    blocks = [b for b in np.array_split(np.arange(len(rows)), min(folds, len(rows) // 2)) if len(b)]
    parts = [_sums(x[b], y[b]) for b in blocks]
    total = tuple(sum(p[i] for p in parts) for i in range(5))
    damp = RESTORE_DAMPS[0]
    if len(blocks) > 1:
        errors = np.zeros(len(RESTORE_DAMPS))
        for block, part in zip(blocks, parts):
            train = tuple(t - p for t, p in zip(total, part))
            for i, candidate in enumerate(RESTORE_DAMPS):
                weight, bias = ridge_intercept(*train, candidate)
                errors[i] += float(np.sum((x[block] @ weight + bias - y[block]) ** 2))
        damp = RESTORE_DAMPS[int(np.argmin(errors))]
    return ridge_intercept(*total, damp)


def _sums(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Σxxᵀ, Σxyᵀ, Σx, Σy and the row count of ``x`` [N, K], ``y`` [N, P]."""
    return x.T @ x, x.T @ y, x.sum(axis=0), y.sum(axis=0), len(x)


def ridge_intercept(xx: np.ndarray, xy: np.ndarray, x_sum: np.ndarray, y_sum: np.ndarray, count: int,
                    damp: float, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M, b) of the ridge fit with intercept ``y ≈ x M + b`` from the sums Σxxᵀ, Σxyᵀ, Σx, Σy
    over ``count`` rows, damped toward ``prior`` (default zero) by λ = ``damp`` · mean diagonal
    of the centred Σxxᵀ (:func:`onnxzip.svd.whiten.ridge`); the intercept is not damped."""
    gram, cross = centered(xx, xy, x_sum, y_sum, count)
    gram, lam = ridge(gram, damp)
    weight = solve_psd(gram, cross if prior is None else cross + lam * prior)
    return weight, (y_sum - x_sum @ weight) / count


def _replace(tensors: list[gs.Tensor], old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(tensors):
        if tensor is old:
            tensors[index] = new


def fed_back_state(analysis: ChannelAnalysis, tensor_name: str) -> bool:
    """Whether ``tensor_name`` carries only recurrent states a caller feeds back: walking up
    through the ops that carry its channels, every recurrent node reached is reached at its
    ``Y_h``/``Y_c`` output and has that initial-state input (which reads the kept units only)."""
    tensors = analysis.graph.tensors()
    seen: set[str] = set()
    todo, found = [tensor_name], False
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tensor = tensors.get(name)
        if tensor is None or not tensor.inputs:
            return False
        node = tensor.inputs[0]
        if node.op in RECURRENT:
            index = next(i for i, out in enumerate(node.outputs) if out is tensor)
            state = 4 + index  # Y_h → initial_h (5), Y_c → initial_c (6)
            if index == 0 or len(node.inputs) <= state or not node.inputs[state].name:
                return False
            found = True
            continue
        todo.extend(t.name for t in node.inputs if t.name in analysis.maps)
    return found


def restore_kinds(analysis: ChannelAnalysis, restore: str) -> dict[str, str]:
    """Per widened tensor: "linear" (predicted) or "zeros" (``restore`` zeros, or a fed-back
    state)."""
    return {tensor: "zeros" if restore == "zeros" or fed_back_state(analysis, tensor) else "linear"
            for tensor, _consumer, _reason in analysis.widen}


def _weight_dtype(analysis: ChannelAnalysis, tensor_name: str) -> np.dtype:
    """The float type of the recurrent weights whose units ``tensor_name`` carries."""
    spaces = {p[0] for p in analysis.maps[tensor_name].positions if p is not None}
    for group in analysis.groups:
        for space, source in zip(group.spaces, group.sources):
            if space in spaces and isinstance(source.node.inputs[1], gs.Constant):
                return np.asarray(source.node.inputs[1].values).dtype
    return np.dtype(np.float32)


def _widen_all(editor: _Editor, keep: dict[str, set[int]], outputs: bool, restore: str = "zeros",
               restore_rows: dict[str, np.ndarray] | None = None) -> list[str]:
    """Insert the full-width restores the analysis asked for: for consumers (before the prune
    functions, which then see the consumer's full-width input), or for graph outputs (after
    them: the producer's output is renamed, the restore writes the output's name). Returns one
    line per restore."""
    analysis = editor.analysis
    tensors = analysis.graph.tensors()
    nodes = {node.name: node for node in analysis.graph.nodes}
    kinds = restore_kinds(analysis, restore)
    done = []
    for tensor_name, consumer, reason in analysis.widen:
        mask = analysis.keep_mask(tensor_name, keep)
        if mask is None or (consumer is None) != outputs:
            continue
        tensor = tensors[tensor_name]
        axis, rank = analysis.maps[tensor_name].axis, len(analysis.shapes[tensor_name])
        linear, how = None, "pruned units zero"
        if kinds[tensor_name] == "linear":
            rows = (restore_rows or {}).get(tensor_name)
            weight, bias = linear_restore(rows, mask)
            dtype = _weight_dtype(analysis, tensor_name)
            linear = (weight.astype(dtype), bias.astype(dtype), tensor_name)
            how = ("pruned units predicted linearly from the kept ones, "
                   + (f"fitted on {len(rows)} calibration rows" if rows is not None and len(rows) >= 2
                      else "zero until the reconstruct step fits them"))
        elif restore == "linear":
            how = "pruned units zero: a state fed back, read at the kept units"
        if consumer is not None:
            _replace(nodes[consumer].inputs, tensor, widen(editor, tensor, mask, axis, rank, linear))
        else:
            pruned = gs.Variable(editor.names.fresh(f"{tensor.name}_pruned"), dtype=tensor.dtype)
            for node in list(tensor.outputs):
                _replace(node.inputs, tensor, pruned)
            _replace(tensor.inputs[0].outputs, tensor, pruned)
            full = widen(editor, pruned, mask, axis, rank, linear)
            full.inputs[0].outputs[0] = tensor
        done.append(f"'{tensor_name}' restored to full width ({int(mask.sum())} of {len(mask)} kept, {how}) "
                    f"for {reason if consumer is None else repr(consumer)}")
    return done


def _full_shapes(editor: _Editor, keep: dict[str, set[int]]) -> None:
    """``Shape`` / ``Size`` of a tensor that loses channels keep reporting its original size.

    Shapes computed from a pruned tensor feed only what the analysis does not follow (a
    ``Reshape`` with a computed target, ``ConstantOfShape``, ``Expand``...): those consumers read
    the tensor restored to full width, or make tensors of the original's sizes, so the computed
    shape must be the original's. The kept count on the channel axis is replaced by the full count
    (a ``Where`` over the shape vector; ``Size`` is divided by the kept count and multiplied by
    the full one)."""
    analysis = editor.analysis
    for node in list(analysis.graph.nodes):
        if node.op not in ("Shape", "Size") or not node.inputs or not node.outputs:
            continue
        name = node.inputs[0].name
        mask = analysis.keep_mask(name, keep)
        if mask is None or name not in analysis.shapes:
            continue
        axis, rank = analysis.maps[name].axis, len(analysis.shapes[name])
        full, kept = len(mask), int(mask.sum())
        output = node.outputs[0]
        if node.op == "Shape":
            start, end = (int(node.attrs.get(key, default)) for key, default in (("start", 0), ("end", rank)))
            start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
            if not start <= axis < end:
                continue
        partial = gs.Variable(editor.names.fresh(f"{output.name}_pruned"), dtype=output.dtype)
        node.outputs[0] = partial
        if node.op == "Size":  # size / kept · full
            per_channel = editor.add_node("Div", [partial, editor.constant(f"{name}_kept_count", np.array(kept, np.int64))],
                                          f"{output.name}_per_channel", output.dtype)
            op, inputs = "Mul", [per_channel, editor.constant(f"{name}_full_count", np.array(full, np.int64))]
        else:
            channel_axis = np.arange(start, end) == axis
            op, inputs = "Where", [editor.constant(f"{name}_channel_axis", channel_axis),
                                   editor.constant(f"{name}_full_shape", np.where(channel_axis, full, 0).astype(np.int64)),
                                   partial]
        editor.graph.nodes.append(gs.Node(op, editor.names.fresh(f"{node.name}_full_{op}"), inputs=inputs,
                                          outputs=[output]))


PruneFunction = Callable[[gs.Node, NodeMasks, _Editor], None]
PRUNE_FUNCTIONS: dict[str, PruneFunction] = {
    "Conv": prune_conv,
    "ConvTranspose": prune_conv_transpose,
    "Gemm": prune_gemm,
    "MatMul": prune_matmul,
    "BatchNormalization": prune_per_channel_inputs,
    "InstanceNormalization": prune_per_channel_inputs,
    "Split": prune_split,
    "Slice": prune_slice,
    "Reshape": prune_reshape,
    **{op: prune_recurrent for op in RECURRENT},
    **{op: prune_broadcast_constants for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu")},
}


def channel_medians(
    model: onnx.ModelProto,
    overrides: dict[str, np.ndarray],
    tensors: dict[str, int],
    feeds: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Run ``model`` with initializers replaced by ``overrides`` on one sample and return, for
    each tensor name → channel axis in ``tensors``, the median of every channel over the other
    axes."""
    if not tensors:
        return {}
    probe = copy.deepcopy(model)
    for initializer in probe.graph.initializer:
        if initializer.name in overrides:
            initializer.CopyFrom(numpy_helper.from_array(overrides[initializer.name], initializer.name))
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in known)
    # one sample, along each input's sample axis (a state [layers, batch, hidden] is cut on axis 1)
    feeds = generated_feeds(model, batch=1, seed=0)[0] if not feeds else dict(first_samples(feeds, 1, model))
    results = run_session(make_session(probe, "cpu", optimization="disabled"), feeds)
    medians = {}
    for name, axis in tensors.items():
        value = np.moveaxis(np.asarray(results[name], dtype=np.float64), axis, 0)
        medians[name] = np.median(value.reshape(value.shape[0], -1), axis=1)
    return medians


def _carried_values(
    model: onnx.ModelProto, analysis: ChannelAnalysis, keep: dict[str, set[int]], consumers: list[gs.Node],
    feeds: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Value of every removed channel at each consumer's data input (see the module docstring)."""
    overrides: dict[str, np.ndarray] = {}
    for group in analysis.groups:
        if group.id not in keep:
            continue
        removed = np.array(sorted(set(range(group.size)) - keep[group.id]), dtype=np.int64)
        for space, source in zip(group.spaces, group.sources):
            if source.recurrent:  # pruned hidden units are zero: nothing carried
                continue
            bn = analysis.bn_after_source.get(space)
            target, axis = (bn.inputs[1], 0) if bn is not None else (source.node.inputs[1], source.out_axis)
            value = np.array(overrides.get(target.name, target.values), copy=True)
            index = [slice(None)] * value.ndim
            index[axis] = removed
            value[tuple(index)] = 0
            overrides[target.name] = value
    tensors = {node.inputs[0].name: analysis.maps[node.inputs[0].name].axis for node in consumers}
    recurrent = {space for group in analysis.groups for space, source in zip(group.spaces, group.sources) if source.recurrent}
    if not any(p is not None and p[0] not in recurrent for name in tensors for p in analysis.maps[name].positions):
        return {}
    medians = channel_medians(model, overrides, tensors, feeds)
    for name, values in medians.items():
        values[[p is not None and p[0] in recurrent for p in analysis.maps[name].positions]] = 0.0
    return medians


def prune_channels(
    model: onnx.ModelProto,
    analysis: ChannelAnalysis,
    keep: dict[str, list[int]],
    feeds: dict[str, np.ndarray] | None = None,
    *,
    compensate: bool = True,
    restore: str = "zeros",
    restore_rows: dict[str, np.ndarray] | None = None,
) -> list[NodeEdit]:
    """Remove from ``analysis.graph`` every channel not kept (``keep``: group id → kept indices);
    ``model`` is the model the analysis was made from. ``restore`` says how widened tensors get
    their pruned units back ("zeros" or "linear", see the module docstring); ``restore_rows``:
    per widened tensor, rows [N, C] of the original's values (channel last) a linear restore is
    fitted on. Returns one edit per changed node."""
    keep_sets = {gid: set(indices) for gid, indices in keep.items()}
    editor = _Editor(analysis, keep_sets)
    widened = analysis.widened()
    plans = []
    for node in list(analysis.graph.nodes):
        masks = NodeMasks(
            [analysis.keep_mask(t.name, keep_sets) if t.name and (t.name, node.name) not in widened else None
             for t in node.inputs],
            [analysis.keep_mask(t.name, keep_sets) for t in node.outputs],
        )
        if any(m is not None for m in masks.inputs + masks.outputs) or (
                node.op in RECURRENT and node.name in analysis.units
                and analysis.position_mask(analysis.units[node.name], keep_sets) is not None):
            plans.append((node, masks))
    consumers = [
        node for node, masks in plans
        if node.op in COMPENSATED and masks.inputs[0] is not None and int(node.attrs.get("group", 1)) == 1
    ]
    carried = _carried_values(model, analysis, keep_sets, consumers, feeds) if compensate else {}
    _full_shapes(editor, keep_sets)
    analysis.restored = _widen_all(editor, keep_sets, False, restore, restore_rows)
    edits = []
    for node, masks in plans:
        masks.carried = carried.get(node.inputs[0].name) if node.inputs else None
        function = PRUNE_FUNCTIONS.get(node.op)
        if function is not None:
            function(node, masks, editor)
        edits.append(NodeEdit(node.name, node.op, _counts(masks.inputs[0] if masks.inputs else None, analysis, node.inputs[0].name if node.inputs else ""),
                              _counts(masks.outputs[0], analysis, node.outputs[0].name)))
    analysis.restored += _widen_all(editor, keep_sets, True, restore, restore_rows)
    outputs = {t.name for t in analysis.graph.outputs} | {t.name for t in analysis.graph.inputs}
    for tensor in analysis.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in outputs:
            tensor.shape = None
    analysis.graph.toposort()
    log.debug("pruned channels of %d nodes", len(edits))
    return edits


def _counts(mask: np.ndarray | None, analysis: ChannelAnalysis, tensor: str) -> tuple[int, int] | None:
    cmap = analysis.maps.get(tensor)
    if cmap is None:
        return None
    total = len(cmap.positions)
    return total, total if mask is None else int(mask.sum())
