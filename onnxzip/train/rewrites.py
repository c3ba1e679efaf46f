"""Exact rewrites of ops onnxruntime-training 1.19 cannot differentiate on the CPU.

Each rewrite replaces one node of the *training copy* by nodes that compute the same values (up
to float rounding) from ops that have CPU gradient kernels. The exported model never sees them:
trained values are written back into the original graph by initializer name. A rewrite returns
the reason it cannot apply (a computed axis list, an unknown shape, ...) and the node stays; the
weights whose gradient would pass through it are then frozen with that reason.

* ``HardSigmoid(x) = Min(Relu(αx + β), 1)``, ``HardSwish(x) = x · HardSigmoid(x; 1/6, 1/2)``.
* ``PRelu(x, a) = Relu(x) − a · Relu(−x)``; ``Softplus(x) = Relu(x) + log(1 + exp(−|x|))``.
* ``ReduceMax`` / ``ReduceMin`` / ``GlobalMaxPool``: ``Σ x · w`` over the axes with
  ``w = 1[x = m] / Σ 1[x = m]`` and ``m`` the extremum: the value is ``m``, and the gradient goes to
  the extremal entries (split evenly between ties).
* ``AveragePool`` = depthwise Conv with a constant 1/k kernel (onnxruntime's CPU AveragePoolGrad
  dies of a division by zero, taking the process with it, on e.g. a 7×7 pool without pads).
* ``InstanceNormalization``: ``(x − μ) / √(σ² + ε) · γ + β`` with per-sample, per-channel moments.
* ``Resize``: nearest with integer factors as Unsqueeze/Expand/Reshape; any other separable
  resize (nearest, linear, cubic) of a known input size as ``M_h · x · M_wᵀ`` with the
  interpolation matrices read off onnxruntime's own Resize applied to unit vectors.
* ``ConvTranspose`` = Conv of the zero-stuffed input (``s − 1`` zeros between samples) with the
  spatially flipped kernel whose in/out channel axes are swapped per group, padded by
  ``d·(k − 1) − pad_begin`` in front and up to the observed output size behind.
* ``LSTM`` / ``GRU``: every optional input slot present, default activations implicit, and a
  reverse or bidirectional node as forward-direction nodes (onnxruntime's training kernels run
  forward only) on the input reversed in time.
* ``Pad`` in reflect / edge / wrap mode = Gather with the padded index map along each axis.
* ``DepthToSpace`` / ``SpaceToDepth`` as Reshape → Transpose → Reshape; ``CumSum`` as a MatMul
  with a triangular 0/1 matrix; float ``Mod`` (fmod) as ``a − b · trunc(a / b)``.

Sign, Floor, Ceil and Round get a registered zero gradient instead (:mod:`onnxzip.train.gradients`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "onnxzip_train"
Shapes = dict[str, tuple[int, ...]]


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name`` (bytes decoded), or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


class Nodes:
    """The nodes and constants that replace one node, named under that node."""

    def __init__(self, node: onnx.NodeProto, index: int, opset: int, initializers: list[onnx.TensorProto]) -> None:
        self.prefix = f"{PREFIX}/{node.name or node.op_type + str(index)}"
        self.opset, self.initializers = opset, initializers
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}{self._count}"

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype)), name))
        return name

    def ints(self, values: Any) -> str:
        return self.const(values, np.int64)

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int] | None, keepdims: int, output: str | None = None) -> str:
        """A Reduce* node in this opset's form (axes an input from 13 for ReduceSum, 18 for the rest)."""
        if axes is None:
            return self.op(op_type, [x], output, keepdims=keepdims)
        if self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13):
            return self.op(op_type, [x, self.ints(axes)], output, keepdims=keepdims)
        return self.op(op_type, [x], output, axes=list(axes), keepdims=keepdims)

    def gather(self, x: str, indices: Any, axis: int, output: str | None = None) -> str:
        return self.op("Gather", [x, self.ints(indices)], output, axis=axis)


class Context:
    """What a rewrite may read: observed shapes, initializers, the training copy's opset."""

    def __init__(self, shapes: Shapes, initializers: dict[str, onnx.TensorProto], opset: int) -> None:
        self.shapes, self.initializers, self.opset = shapes, initializers, opset

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return self.shapes.get(name)

    def constant(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.initializers[name]) if name in self.initializers else None


Rewrite = Callable[[onnx.NodeProto, Nodes, Context], str | None]


def _hard_sigmoid(nodes: Nodes, x: str, alpha: float, beta: float, output: str | None = None) -> str:
    linear = nodes.op("Add", [nodes.op("Mul", [x, nodes.const(alpha)]), nodes.const(beta)])
    return nodes.op("Min", [nodes.op("Relu", [linear]), nodes.const(1.0)], output)


def _hardsigmoid(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    _hard_sigmoid(nodes, node.input[0], attr(node, "alpha", 0.2), attr(node, "beta", 0.5), node.output[0])
    return None


def _hardswish(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    nodes.op("Mul", [node.input[0], _hard_sigmoid(nodes, node.input[0], 1.0 / 6.0, 0.5)], node.output[0])
    return None


def _prelu(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    x, slope = node.input[:2]
    negative = nodes.op("Mul", [slope, nodes.op("Relu", [nodes.op("Neg", [x])])])
    nodes.op("Sub", [nodes.op("Relu", [x]), negative], node.output[0])
    return None


def _softplus(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    x = node.input[0]
    tail = nodes.op("Exp", [nodes.op("Neg", [nodes.op("Abs", [x])])])
    log = nodes.op("Log", [nodes.op("Add", [tail, nodes.const(1.0)])])
    nodes.op("Add", [nodes.op("Relu", [x]), log], node.output[0])
    return None


def _selecting_reduce(nodes: Nodes, op_type: str, x: str, axes: list[int] | None, keepdims: int, output: str) -> None:
    extreme = nodes.reduce(op_type, x, axes, 1)
    mask = nodes.op("Cast", [nodes.op("Equal", [x, extreme])], to=TensorProto.FLOAT)
    weights = nodes.op("Div", [mask, nodes.reduce("ReduceSum", mask, axes, 1)])
    nodes.reduce("ReduceSum", nodes.op("Mul", [x, weights]), axes, keepdims, output)


def _reduce_extreme(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    axes = attr(node, "axes", None)
    if len(node.input) > 1 and node.input[1]:
        axes = ctx.constant(node.input[1])
        if axes is None:
            return "its axes are computed in the graph"
        axes = [int(a) for a in np.ravel(axes)]
        if not axes and attr(node, "noop_with_empty_axes", 0):
            nodes.op("Identity", [node.input[0]], node.output[0])
            return None
    _selecting_reduce(nodes, node.op_type, node.input[0], list(axes) if axes else None,
                      int(attr(node, "keepdims", 1)), node.output[0])
    return None


def _global_max_pool(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    shape = ctx.shape(node.input[0])
    if shape is None:
        return "the rank of its input is unknown"
    _selecting_reduce(nodes, "ReduceMax", node.input[0], list(range(2, len(shape))), 1, node.output[0])
    return None


def _instance_norm(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    x, scale, bias = node.input[:3]
    shape = ctx.shape(x)
    if shape is None:
        return "the rank of its input is unknown"
    axes, per_channel = list(range(2, len(shape))), nodes.ints([-1] + [1] * (len(shape) - 2))
    centred = nodes.op("Sub", [x, nodes.reduce("ReduceMean", x, axes, 1)])
    variance = nodes.reduce("ReduceMean", nodes.op("Mul", [centred, centred]), axes, 1)
    deviation = nodes.op("Sqrt", [nodes.op("Add", [variance, nodes.const(attr(node, "epsilon", 1e-5))])])
    normalized = nodes.op("Div", [centred, deviation])
    scaled = nodes.op("Mul", [normalized, nodes.op("Reshape", [scale, per_channel])])
    nodes.op("Add", [scaled, nodes.op("Reshape", [bias, per_channel])], node.output[0])
    return None


def _average_pool(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    shape = ctx.shape(node.input[0])
    if shape is None:
        return "its input size is unknown"
    kernel = list(attr(node, "kernel_shape", []))
    spatial = len(kernel)
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    if attr(node, "auto_pad", "NOTSET") != "NOTSET" or attr(node, "ceil_mode", 0):
        return "auto_pad or ceil_mode"
    if any(pads) and not attr(node, "count_include_pad", 0):
        return "padding left out of the average"
    channels = shape[1]
    weight = np.full((channels, 1, *kernel), 1.0 / np.prod(kernel), np.float32)
    nodes.op("Conv", [node.input[0], nodes.const(weight)], node.output[0], group=channels, kernel_shape=kernel,
             pads=pads, strides=list(attr(node, "strides", [1] * spatial)),
             dilations=list(attr(node, "dilations", [1] * spatial)))
    return None


def _integer_nearest(node: onnx.NodeProto, ctx: Context, rank: int) -> list[int] | None:
    """Integer upsampling factors of a nearest Resize on [N, C, spatial...], or None."""
    if attr(node, "mode", "nearest") != "nearest" or len(node.input) < 3 or not node.input[2]:
        return None
    mode = attr(node, "coordinate_transformation_mode", "half_pixel")
    rounding = attr(node, "nearest_mode", "round_prefer_floor")
    # out[i] = in[i // s] for integer s: asymmetric needs floor; half_pixel works for both rounds.
    if not ((mode == "asymmetric" and rounding == "floor")
            or (mode in ("half_pixel", "pytorch_half_pixel") and rounding.startswith("round"))):
        return None
    scales = ctx.constant(node.input[2])
    if scales is None or scales.size != rank or np.any(scales[:2] != 1) or np.any(scales < 1):
        return None
    if np.any(scales != np.round(scales)):
        return None
    return [int(v) for v in scales[2:]]


def _interpolation_matrices(node: onnx.NodeProto, ctx: Context, shape: tuple[int, ...],
                            out_shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per spatial axis, the matrix M (out × in) with resize(x) = x ×_axis M, read off onnxruntime's
    Resize with the node's attributes: a batch of unit vectors along the axis (constant along the
    others, whose interpolation weights sum to one) gives M's columns."""
    from onnxzip.core.runtime import make_session, run_session

    matrices = []
    spatial = len(shape) - 2
    for axis in range(spatial):
        length = shape[2 + axis]
        probe_shape = (length, 1, *shape[2:])
        units = np.zeros(probe_shape, np.float32)
        units[(np.arange(length), 0, *([slice(None)] * axis), np.arange(length))] = 1.0
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(probe_shape))]
        initializers = []
        sizes_given = len(node.input) > 3 and node.input[3]
        names = ["x"]
        for slot, name in enumerate(node.input[1:], start=1):
            if not name:
                names.append("")
                continue
            value = ctx.constant(name)
            if slot == 3:
                value = np.asarray([length, 1, *out_shape[2:]], np.int64)
            names.append(f"in{slot}")
            initializers.append(numpy_helper.from_array(value, f"in{slot}"))
        if sizes_given and len(names) > 2 and names[2]:
            names[2] = ""
        resize = helper.make_node("Resize", names, ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        graph = helper.make_graph([resize], "probe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ctx.opset)])
        model.ir_version = 8
        y = run_session(make_session(model, "cpu"), {"x": units})["y"]
        index = (slice(None), 0, *([0] * axis), slice(None), *([0] * (spatial - axis - 1)))
        matrices.append(np.ascontiguousarray(y[index].T))  # y[b, ..., o, ...] = M[o, b]
    return matrices


def _resize(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    x = node.input[0]
    shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    if shape is None or out_shape is None:
        return "its input size is unknown"
    factors = _integer_nearest(node, ctx, len(shape))
    if factors is not None:  # cheap: x[N,C,d1,..] -> [N,C,d1,1,..] -> expand -> [N,C,d1*s1,..]
        spatial = len(factors)
        expanded = nodes.op("Expand", [nodes.op("Unsqueeze", [x, nodes.ints([3 + 2 * i for i in range(spatial)])]),
                                       nodes.ints([1, 1, *[v for s in factors for v in (1, s)]])])
        size = nodes.op("Mul", [nodes.op("Shape", [x]), nodes.ints([1, 1, *factors])])
        nodes.op("Reshape", [expanded, size], node.output[0])
        return None
    if len(shape) not in (3, 4) or shape[:2] != out_shape[:2]:
        return "it resizes other than the last one or two axes of [N, C, ...]"
    if attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize" or attr(node, "axes", None):
        return "tf_crop_and_resize or an axes attribute"
    if any(name and ctx.constant(name) is None for name in node.input[1:3]):
        return "its roi or scales are computed in the graph"
    # Computed sizes (F.interpolate(size=x.shape[-2:]) in PyTorch) are the observed output size:
    # the training copy declares the data's spatial sizes, so they are the same for every sample.
    matrices = _interpolation_matrices(node, ctx, shape, out_shape)
    current = x
    if len(shape) == 4:  # the height axis: M_h · x
        current = nodes.op("MatMul", [nodes.const(matrices[0]), current])
    nodes.op("MatMul", [current, nodes.const(matrices[-1].T)], node.output[0])  # the last axis: x · M_wᵀ
    return None


def _conv_transpose(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    x, weight = node.input[:2]
    shape, out_shape, kernel = ctx.shape(x), ctx.shape(node.output[0]), ctx.shape(weight)
    if shape is None or out_shape is None or kernel is None:
        return "its input, output or kernel size is unknown"
    spatial = len(shape) - 2
    strides = list(attr(node, "strides", [1] * spatial))
    dilations = list(attr(node, "dilations", [1] * spatial))
    group = int(attr(node, "group", 1))
    sizes = kernel[2:]
    auto_pad = attr(node, "auto_pad", "NOTSET")
    begins = []
    for i in range(spatial):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = strides[i] * (shape[2 + i] - 1) + dilations[i] * (sizes[i] - 1) + 1 - out_shape[2 + i]
            total += list(attr(node, "output_padding", [0] * spatial))[i]
            begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        elif auto_pad == "VALID":
            begins.append(0)
        else:
            begins.append(list(attr(node, "pads", [0] * 2 * spatial))[i])
    # zero-stuffing: [N, C, L1, 1, L2, 1] padded to [N, C, L1, s1, L2, s2], reshaped to [N, C, L1·s1, L2·s2]
    stuffed = x
    if any(s > 1 for s in strides):
        unsqueezed = nodes.op("Unsqueeze", [x, nodes.ints([3 + 2 * i for i in range(spatial)])])
        pads = [0] * (2 * spatial + 2) + [0, 0] + [v for s in strides for v in (0, s - 1)]
        padded = nodes.op("Pad", [unsqueezed, nodes.ints(pads)])
        stuffed = nodes.op("Reshape", [padded, nodes.ints([0, 0, *[length * s for length, s in zip(shape[2:], strides)]])])
    starts, ends, conv_pads_begin, conv_pads_end = [], [], [], []
    for i in range(spatial):
        reach = dilations[i] * (sizes[i] - 1)
        length = (shape[2 + i] - 1) * strides[i] + 1  # the stuffed length without trailing zeros
        front = reach - begins[i]
        back = out_shape[2 + i] - length - front + reach
        starts.append(max(-front, 0))
        ends.append(length - max(-back, 0))
        conv_pads_begin.append(max(front, 0))
        conv_pads_end.append(max(back, 0))
    cropped = nodes.op("Slice", [stuffed, nodes.ints(starts), nodes.ints(ends), nodes.ints(list(range(2, 2 + spatial)))])
    flipped = weight
    for i, size in enumerate(sizes):
        flipped = nodes.gather(flipped, list(range(size - 1, -1, -1)), 2 + i)
    c_in, c_out_per_group = kernel[0], kernel[1]
    grouped = nodes.op("Reshape", [flipped, nodes.ints([group, c_in // group, c_out_per_group, *sizes])])
    swapped = nodes.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, 3 + spatial)])
    conv_weight = nodes.op("Reshape", [swapped, nodes.ints([group * c_out_per_group, c_in // group, *sizes])])
    inputs = [cropped, conv_weight] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    nodes.op("Conv", inputs, node.output[0], dilations=dilations, group=group, kernel_shape=list(sizes),
             pads=conv_pads_begin + conv_pads_end, strides=[1] * spatial)
    return None


def _pad_indices(mode: str, length: int, before: int, after: int) -> list[int]:
    positions = np.arange(-before, length + after)
    if mode == "edge":
        return np.clip(positions, 0, length - 1).tolist()
    if mode == "wrap":
        return np.mod(positions, length).tolist()
    period = 2 * (length - 1)  # reflect about the first and last samples (without repeating them)
    folded = np.mod(positions, period) if period else np.zeros_like(positions)
    return np.where(folded < length, folded, period - folded).tolist()


def _pad(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    mode = attr(node, "mode", "constant")
    if mode == "constant":
        return None  # onnxruntime differentiates it; no rewrite needed
    shape = ctx.shape(node.input[0])
    pads = attr(node, "pads", None)
    if len(node.input) > 1 and node.input[1]:
        pads = ctx.constant(node.input[1])
    if shape is None or pads is None or (len(node.input) > 3 and node.input[3]):
        return "its pads or input size are unknown, or it pads selected axes"
    pads = [int(p) for p in np.ravel(pads)]
    if min(pads) < 0:
        return "negative pads"
    rank = len(shape)
    current = node.input[0]
    for axis in range(rank):
        if pads[axis] or pads[rank + axis]:
            current = nodes.gather(current, _pad_indices(mode, shape[axis], pads[axis], pads[rank + axis]), axis)
    nodes.op("Identity", [current], node.output[0])
    return None


def _depth_space(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    shape = ctx.shape(node.input[0])
    if shape is None or len(shape) != 4:
        return "its input is not a known [N, C, H, W]"
    _, channels, height, width = shape
    block = int(attr(node, "blocksize", 1))
    if node.op_type == "SpaceToDepth":
        split = [-1, channels, height // block, block, width // block, block]
        perm, merged = [0, 3, 5, 1, 2, 4], [-1, channels * block * block, height // block, width // block]
    elif attr(node, "mode", "DCR") == "DCR":
        split = [-1, block, block, channels // block**2, height, width]
        perm, merged = [0, 3, 4, 1, 5, 2], [-1, channels // block**2, height * block, width * block]
    else:  # CRD
        split = [-1, channels // block**2, block, block, height, width]
        perm, merged = [0, 1, 4, 2, 5, 3], [-1, channels // block**2, height * block, width * block]
    moved = nodes.op("Transpose", [nodes.op("Reshape", [node.input[0], nodes.ints(split)])], perm=perm)
    nodes.op("Reshape", [moved, nodes.ints(merged)], node.output[0])
    return None


def _cumsum(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    shape, axis = ctx.shape(node.input[0]), ctx.constant(node.input[1])
    if shape is None or axis is None:
        return "its axis or input size is unknown"
    rank = len(shape)
    axis = int(np.ravel(axis)[0]) % rank
    length = shape[axis]
    # y = x · U along the axis: U[i, j] = 1 when item i enters sum j
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    reverse, exclusive = attr(node, "reverse", 0), attr(node, "exclusive", 0)
    enters = (i >= j) if reverse else (i <= j)
    if exclusive:
        enters &= i != j
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = node.input[0] if axis == rank - 1 else nodes.op("Transpose", [node.input[0]], perm=perm)
    summed = nodes.op("MatMul", [moved, nodes.const(enters.astype(np.float32))],
                      node.output[0] if axis == rank - 1 else None)
    if axis != rank - 1:
        nodes.op("Transpose", [summed], node.output[0], perm=perm)
    return None


def _mod(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    if not attr(node, "fmod", 0):
        return None  # integer Mod: never on a float gradient path
    a, b = node.input[:2]
    quotient = nodes.op("Div", [a, b])
    truncated = nodes.op("Mul", [nodes.op("Sign", [quotient]), nodes.op("Floor", [nodes.op("Abs", [quotient])])])
    nodes.op("Sub", [a, nodes.op("Mul", [b, truncated])], node.output[0])
    return None


_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


def _reversed_in_time(nodes: Nodes, x: str, length: int) -> str:
    """``x`` reversed along axis 0 (time): Gather with constant indices (onnxruntime fuses a
    Gather over Range(T − 1, −1, −1) into a Slice that its kernel then refuses)."""
    return nodes.gather(x, list(range(length - 1, -1, -1)), 0)


def _recurrent(node: onnx.NodeProto, nodes: Nodes, ctx: Context) -> str | None:
    """LSTM / GRU as forward-direction nodes with every optional input slot present (what
    onnxruntime's LSTMTraining / GRUTraining accept); a reverse direction runs forward on the
    input reversed in time and its output is reversed back."""
    op, slots = node.op_type, 8 if node.op_type == "LSTM" else 6
    inputs = list(node.input) + [""] * (slots - len(node.input))
    outputs = list(node.output) + [""] * ((3 if op == "LSTM" else 2) - len(node.output))
    direction = attr(node, "direction", "forward")
    count = 2 if direction == "bidirectional" else 1
    activations = attr(node, "activations", None)
    # sequence_lens and clip that change nothing on the training data were dropped before
    # (trainable.drop_inert_recurrent_options); onnxruntime-training's kernels refuse them.
    if inputs[4]:
        return ("its sequence_lens shortens sequences of the training data, and onnxruntime-training's "
                f"{op}Training takes none")
    if attr(node, "clip", None) is not None:
        return f"its clip binds on the training data, and onnxruntime-training's {op}Training has no clip"
    if attr(node, "layout", 0) or attr(node, "input_forget", 0):
        return "it has a batch-first layout or input_forget"
    if activations and [a.decode().lower() if isinstance(a, bytes) else a.lower() for a in activations] \
            != _DEFAULT_ACTIVATIONS[op] * count:
        return f"its activations are {activations}"
    if attr(node, "activation_alpha", None) or attr(node, "activation_beta", None) or (op == "LSTM" and inputs[7]):
        return "it has activation parameters or peepholes"
    shape = ctx.shape(inputs[0])
    if direction != "forward" and shape is None:
        return "its sequence length is unknown"
    kept = {a.name: helper.get_attribute_value(a) for a in node.attribute
            if a.name in ("hidden_size", "linear_before_reset")}
    if direction == "forward":
        nodes.nodes.append(helper.make_node(op, inputs, outputs, name=node.name, **kept))
        return None
    parts: list[list[str]] = []
    for index, which in enumerate(["forward", "reverse"] if count == 2 else [direction]):
        x = inputs[0] if which == "forward" else _reversed_in_time(nodes, inputs[0], shape[0])
        own = [x] + [nodes.gather(name, [index], 0) if name and slot != 4 else name
                     for slot, name in enumerate(inputs[1:], start=1)]
        results = [nodes.name(f"{which}_out") if name else "" for name in outputs]
        nodes.nodes.append(helper.make_node(op, own, results, name=nodes.name(which), **kept))
        if which == "reverse" and results[0]:
            results[0] = _reversed_in_time(nodes, results[0], shape[0])
        parts.append(results)
    for slot, name in enumerate(outputs):
        if name:  # Y: [T, directions, N, H]; Y_h, Y_c: [directions, N, H]
            nodes.op("Concat", [part[slot] for part in parts], name, axis=1 if slot == 0 else 0)
    return None


# op type -> (what it becomes, rewrite)
REWRITES: dict[str, tuple[str, Rewrite]] = {
    "HardSigmoid": ("Relu/Min", _hardsigmoid),
    "HardSwish": ("Relu/Min/Mul", _hardswish),
    "PRelu": ("Relu/Mul", _prelu),
    "Softplus": ("Relu/Exp/Log", _softplus),
    "ReduceMax": ("one-hot ReduceSum", _reduce_extreme),
    "ReduceMin": ("one-hot ReduceSum", _reduce_extreme),
    "GlobalMaxPool": ("one-hot ReduceSum", _global_max_pool),
    "AveragePool": ("depthwise Conv", _average_pool),
    "InstanceNormalization": ("moments", _instance_norm),
    "Resize": ("Expand/MatMul", _resize),
    "ConvTranspose": ("Conv on zero-stuffed input", _conv_transpose),
    "Pad": ("Gather", _pad),
    "DepthToSpace": ("Reshape/Transpose", _depth_space),
    "SpaceToDepth": ("Reshape/Transpose", _depth_space),
    "CumSum": ("MatMul", _cumsum),
    "Mod": ("Sub/Mul/Floor", _mod),
    "LSTM": ("forward-direction LSTM", _recurrent),
    "GRU": ("forward-direction GRU", _recurrent),
}
