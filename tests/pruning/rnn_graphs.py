"""Hand-built recurrent graphs for the pruning tests, with hidden units made exactly dead.

A *dead* unit ``j`` stays zero whatever the input, when its initial state is zero: for an LSTM
the input and cell gates read nothing (rows of ``W``, ``R`` and bias zero), so ``c_j = f·0 +
i·tanh(0) = 0`` and ``h_j = o·tanh(0) = 0``; for a GRU the update gate is saturated
(``z_j = σ(100) = 1``), so ``h_j = h_{j, t-1} = 0``; for a plain RNN ``h_j = tanh(0) = 0``.
Pruning dead units must then leave every output unchanged (state outputs included, whose
pruned units are restored as zeros).
"""
from __future__ import annotations

import numpy as np
import onnx
from helpers import init, make_model, tensor
from onnx import helper

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_weights(op: str, inputs: int, hidden: int, directions: int, dead: list[int],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [D, G·H, I], R [D, G·H, H], B [D, 2·G·H] with ``dead`` units as in the module docstring."""
    gates = GATES[op]
    w = rng.standard_normal((directions, gates * hidden, inputs)).astype(np.float32) * 0.4
    r = rng.standard_normal((directions, gates * hidden, hidden)).astype(np.float32) * 0.4
    b = rng.standard_normal((directions, 2 * gates * hidden)).astype(np.float32) * 0.2
    zeroed = {"LSTM": (0, 3), "GRU": (0,), "RNN": (0,)}[op]  # LSTM gates i, o, f, c: i and c; GRU z
    for gate in zeroed:
        for j in dead:
            row = gate * hidden + j
            w[:, row] = 0
            r[:, row] = 0
            b[:, row] = 0
            b[:, gates * hidden + row] = 0
    if op == "GRU":
        for j in dead:
            b[:, j] = 100.0  # z = σ(100) = 1: the unit keeps its (zero) state
    return w, r, b


def stacked_lstm(dead: tuple[list[int], list[int]] = ([1, 5], [2, 6]), hidden: int = 8, inputs: int = 6,
                 seed: int = 0) -> onnx.ModelProto:
    """dtln-like: x [1, T, I] and a state [1, 2, H, 2] (layer, unit, h/c) sliced into two
    forward LSTMs' initial states; y = MatMul of the second's sequence; the state output
    stacks both layers' Y_h / Y_c back into [1, 2, H, 2] (Concat along non-unit axes)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(init(name, np.asarray(value)))
        return name

    nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time"))
    current = "xt"
    states_out = []
    for layer in range(2):
        parts = {}
        for kind, index in (("h", 0), ("c", 1)):
            sliced = f"state_{layer}{kind}"
            nodes.append(helper.make_node(
                "Slice", ["state", const(f"s{layer}{kind}_start", np.array([0, layer, 0, index], np.int64)),
                          const(f"s{layer}{kind}_end", np.array([1, layer + 1, hidden, index + 1], np.int64))],
                [sliced], name=f"slice_{layer}{kind}"))
            nodes.append(helper.make_node("Squeeze", [sliced, const(f"sq{layer}{kind}", np.array([1, 3], np.int64))],
                                          [f"{sliced}_2d"], name=f"squeeze_{layer}{kind}"))
            nodes.append(helper.make_node("Unsqueeze", [f"{sliced}_2d", const(f"un{layer}{kind}", np.array([0], np.int64))],
                                          [f"{sliced}_init"], name=f"unsqueeze_{layer}{kind}"))
            parts[kind] = f"{sliced}_init"
        w, r, b = recurrent_weights("LSTM", inputs if layer == 0 else hidden, hidden, 1, dead[layer], rng)
        name = f"lstm{layer}"
        nodes.append(helper.make_node(
            "LSTM", [current, const(f"{name}_W", w), const(f"{name}_R", r), const(f"{name}_B", b), "",
                     parts["h"], parts["c"]], [f"{name}_Y", f"{name}_Yh", f"{name}_Yc"], name=name, hidden_size=hidden))
        nodes.append(helper.make_node("Squeeze", [f"{name}_Y", const(f"{name}_sq", np.array([1], np.int64))],
                                      [f"{name}_seq"], name=f"{name}_squeeze"))
        current = f"{name}_seq"
        for kind in ("h", "c"):
            out = f"{name}_Y{kind}"
            nodes.append(helper.make_node("Unsqueeze", [out, const(f"{out}_ax", np.array([3], np.int64))],
                                          [f"{out}_4d"], name=f"{out}_unsqueeze"))
        nodes.append(helper.make_node("Concat", [f"{name}_Yh_4d", f"{name}_Yc_4d"], [f"{name}_state"], axis=3,
                                      name=f"{name}_stack"))
        states_out.append(f"{name}_state")
    nodes.append(helper.make_node("Concat", states_out, ["state_full"], axis=0, name="stack_layers"))
    nodes.append(helper.make_node("Transpose", ["state_full"], ["state_out"], perm=[1, 0, 2, 3], name="state_layout"))
    nodes.append(helper.make_node("Transpose", [current], ["seq_bt"], perm=[1, 0, 2], name="to_batch"))
    nodes.append(helper.make_node("MatMul", ["seq_bt", const("dense", rng.standard_normal((hidden, 3)).astype(np.float32))],
                                  ["y"], name="dense"))
    return make_model(nodes, [tensor("x", [1, "T", inputs]), tensor("state", [1, 2, hidden, 2])],
                      [tensor("y", [1, "T", 3]), tensor("state_out", [1, 2, hidden, 2])], inits, opset=13)


def bidirectional(op: str = "GRU", dead: list[int] = (0, 3), hidden: int = 8, inputs: int = 5, layout: int = 0,
                  seed: int = 0) -> onnx.ModelProto:
    """romanizer-like: x [N, T, I] → (Transpose for layout 0) → bidirectional ``op`` with an
    initial state input h0 → Y [T, 2, N, H] → Transpose → Reshape [T, N, 2H] → MatMul → y, plus
    the hidden sequence itself (``seq`` [T, N, 2H]) and Y_h (``h_out``) as graph outputs."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(init(name, np.asarray(value)))
        return name

    w, r, b = recurrent_weights(op, inputs, hidden, 2, list(dead), rng)
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time"))
        nodes.append(helper.make_node("Transpose", ["h0"], ["h0t"], perm=[1, 0, 2], name="state_to_dir"))
        state_in, data = "h0t", "xt"
    else:
        state_in, data = "h0", "x"
    state_inputs = [state_in] if op != "LSTM" else [state_in, state_in]
    outputs = ["Y", "Yh"] + (["Yc"] if op == "LSTM" else [])
    nodes.append(helper.make_node(op, [data, const("W", w), const("R", r), const("B", b), "", *state_inputs], outputs,
                                  name="rnn", hidden_size=hidden, direction="bidirectional", layout=layout, **extra))
    # Y: layout 0 [T, 2, N, H] → [T, N, 2, H]; layout 1 [N, T, 2, H] stays
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3], name="dir_last"))
    else:
        nodes.append(helper.make_node("Identity", ["Y"], ["Yt"], name="dir_last"))
    nodes.append(helper.make_node("Reshape", ["Yt", const("merge", np.array([0, 0, -1], np.int64))], ["seq"], name="merge"))
    nodes.append(helper.make_node("MatMul", ["seq", const("dense", rng.standard_normal((2 * hidden, 4)).astype(np.float32))],
                                  ["y"], name="dense"))
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["Yh"], ["h_out"], perm=[1, 0, 2], name="state_out"))
    else:
        nodes.append(helper.make_node("Identity", ["Yh"], ["h_out"], name="state_out"))
    seq_shape = ["T", "N", 2 * hidden] if layout == 0 else ["N", "T", 2 * hidden]
    y_shape = seq_shape[:2] + [4]
    return make_model(nodes, [tensor("x", ["N", "T", inputs]), tensor("h0", ["N", 2, hidden])],
                      [tensor("y", y_shape), tensor("seq", seq_shape), tensor("h_out", ["N", 2, hidden])], inits, opset=14)


def dead_state(shape: tuple[int, ...], axis: int, dead: list[int], rng: np.random.Generator) -> np.ndarray:
    """A random state with zeros at the ``dead`` units (on ``axis``)."""
    state = rng.standard_normal(shape).astype(np.float32)
    index = [slice(None)] * len(shape)
    index[axis] = list(dead)
    state[tuple(index)] = 0
    return state


def linear_units(hidden: int = 64, inputs: int = 32, initial_state: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A forward RNN whose units ``hidden/2 + j`` are exactly ``±`` unit ``j`` (rows of ``W``,
    ``R`` and ``B`` copied with the sign; ``R`` reads only the first half, so dropping the
    second half changes nothing else): x [N, T, I] → Y → ``seq`` [N, H, T] (units on axis 1,
    not last) and Y_h → ``h_last`` [1, N, H]; with ``initial_state`` an input ``h0`` [N, 1, H]
    (transposed) is its initial state (so ``h_last`` is a state fed back)."""
    rng = np.random.default_rng(seed)
    half = hidden // 2
    signs = np.where(np.arange(half) % 2 == 0, 1.0, -1.0).astype(np.float32)
    w_half = rng.standard_normal((half, inputs)).astype(np.float32) * 0.2
    r_half = np.concatenate([rng.standard_normal((half, half)).astype(np.float32) * 0.1,
                             np.zeros((half, hidden - half), np.float32)], axis=1)
    b_half = rng.standard_normal((2, half)).astype(np.float32) * 0.2
    w = np.concatenate([w_half, signs[:, None] * w_half])[None]
    r = np.concatenate([r_half, signs[:, None] * r_half])[None]
    b = np.concatenate([np.concatenate([b_half[k], signs * b_half[k]]) for k in range(2)])[None]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time"),
             helper.make_node("Transpose", ["h0" if initial_state else "x"], ["h0t"], perm=[1, 0, 2], name="state_t"),
             helper.make_node("RNN", ["xt", "W", "R", "B", "", "h0t" if initial_state else ""], ["Y", "h_last"],
                              name="rnn", hidden_size=hidden),
             helper.make_node("Squeeze", ["Y", "one"], ["Ys"], name="squeeze"),
             helper.make_node("Transpose", ["Ys"], ["seq"], perm=[1, 2, 0], name="units_middle")]
    inits = [init("W", w), init("R", r), init("B", b), init("one", np.array([1], np.int64))]
    inputs_ = [tensor("x", ["N", "T", inputs])] + ([tensor("h0", ["N", 1, hidden])] if initial_state else [])
    if not initial_state:
        nodes.pop(1)
    return make_model(nodes, inputs_, [tensor("seq", ["N", hidden, "T"]), tensor("h_last", [1, "N", hidden])], inits, opset=14)


def crnn_views(dead: list[int] = (1, 4), hidden: int = 8, inputs: int = 5, classes: int = 6,
               seed: int = 0) -> onnx.ModelProto:
    """The CRNN ``BidirectionalLSTM`` block as PyTorch exports it: x [T, N, I] → bidirectional
    LSTM → ``seq`` [T, N, 2H] → ``view(T * N, 2H)`` with the target computed from ``Shape(seq)``
    → Gemm → ``view(T, N, -1)`` → y [T, N, classes]. A second view of ``seq``, ``[T, N * 2H]``
    (also computed from the same ``Shape``), is summed per step into ``energy`` [T]."""
    rng = np.random.default_rng(seed)
    w, r, b = recurrent_weights("LSTM", inputs, hidden, 2, list(dead), rng)
    inits = [init("W", w), init("R", r), init("B", b), init("merge", np.array([0, 0, -1], np.int64)),
             init("i0", np.array(0, np.int64)), init("i1", np.array(1, np.int64)), init("i2", np.array(2, np.int64)),
             init("ax0", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64)),
             init("fc", (rng.standard_normal((classes, 2 * hidden)) * 0.3).astype(np.float32)),
             init("fcb", rng.standard_normal(classes).astype(np.float32))]
    node = helper.make_node
    nodes = [
        node("LSTM", ["x", "W", "R", "B"], ["Y", "", ""], name="lstm", hidden_size=hidden, direction="bidirectional"),
        node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3], name="dir_last"),
        node("Reshape", ["Yt", "merge"], ["seq"], name="merge"),
        node("Shape", ["seq"], ["shape"], name="shape"),
        *[node("Gather", ["shape", f"i{k}"], [f"d{k}"], axis=0, name=f"dim{k}") for k in range(3)],
        *[node("Unsqueeze", [f"d{k}", "ax0"], [f"d{k}_1"], name=f"dim{k}_1") for k in range(3)],
        node("Mul", ["d0", "d1"], ["rows"], name="rows"),
        node("Unsqueeze", ["rows", "ax0"], ["rows_1"], name="rows_1"),
        node("Concat", ["rows_1", "d2_1"], ["view_shape"], axis=0, name="view_shape"),
        node("Reshape", ["seq", "view_shape"], ["rows_seq"], name="view"),
        node("Gemm", ["rows_seq", "fc", "fcb"], ["logits"], transB=1, name="fc"),
        node("Concat", ["d0_1", "d1_1", "minus1"], ["back_shape"], axis=0, name="back_shape"),
        node("Reshape", ["logits", "back_shape"], ["y"], name="back"),
        node("Mul", ["d1", "d2"], ["width"], name="width"),
        node("Unsqueeze", ["width", "ax0"], ["width_1"], name="width_1"),
        node("Concat", ["d0_1", "width_1"], ["flat_shape"], axis=0, name="flat_shape"),
        node("Reshape", ["seq", "flat_shape"], ["flat"], name="flat"),
        node("ReduceSum", ["flat", "ax0_last"], ["energy"], keepdims=0, name="energy"),
    ]
    inits.append(init("ax0_last", np.array([1], np.int64)))
    return make_model(nodes, [tensor("x", ["T", "N", inputs])],
                      [tensor("y", ["T", "N", classes]), tensor("energy", ["T"])], inits, opset=14)
