"""Make a graph trainable by onnxruntime-training, and decide which weights train.

The rewrites below only change the *training copy* of a model; trained values are written back
into the original graph by initializer name (:func:`onnxzip.train.engine.with_weights`), so every
rewrite is undone on export by construction and names/shapes of trainable tensors never change:

* ``BatchNormalization`` → ``(x − μ)·(1/√(σ² + ε))·γ + β`` with μ and 1/√(σ² + ε) frozen
  constants and γ, β reshaped to ``[C, 1, …]``: onnxruntime would otherwise train with batch
  statistics and overwrite the running ones. Statistics computed in the graph (decoded from a
  codebook) get the same form with ``(x − μ) / √(σ² + ε)`` as nodes.
* ``LayerNormalization`` declares its optional Mean / InvStdDev outputs (its gradient needs them).
* ``LSTM`` / ``GRU`` inputs padded with ``""`` to 8 / 6 slots (LSTMTraining / GRUTraining).
* ``HardSigmoid(x)`` → ``Clip(α·x + β, 0, 1)`` (no gradient builder is registered for it).
* ``Resize`` nearest with integer spatial scales → Unsqueeze/Expand/Reshape (ResizeGrad is
  CUDA-only).

What cannot train stays frozen with a reason: weights read inside If/Loop/Scan bodies, and every
weight whose gradient would have to pass through a node onnxruntime cannot differentiate here
(control flow, a bidirectional or customised LSTM/GRU, ConvTranspose on the CPU, an unrewritten
Resize on the CPU).
"""
from __future__ import annotations

import copy
import fnmatch
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.compat import default_opset, iter_graphs

# (op type) -> input slots that hold learnable weights.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "MatMul": (0, 1),
    "Gemm": (0, 1, 2),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Div": (0, 1),
    "LayerNormalization": (1, 2),
    "LSTM": (1, 2, 3),
    "GRU": (1, 2, 3),
    "Gather": (0,),  # embedding tables and codebooks (indices stay fixed)
    "PRelu": (1,),
    "Reshape": (0,),  # the BatchNormalization rewrite reshapes γ and β
    "Einsum": tuple(range(8)),
}
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
CPU_ONLY_MISSING = frozenset({"ConvTranspose", "Resize"})  # gradient kernels exist on CUDA only
PREFIX = "onnxzip_train"


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _unique(node: onnx.NodeProto, index: int, what: str) -> str:
    return f"{PREFIX}/{node.name or node.op_type + str(index)}/{what}"


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _rewrite_batchnorm(node, index, inits, ranks, new_inits) -> list[onnx.NodeProto] | None:
    if len(node.output) != 1 and any(node.output[1:]):
        return None  # a training-mode BN; leave it (its weights get frozen by onnxruntime's rules)
    x, scale, bias, mean, var = node.input[:5]
    rank = ranks.get(x, 4)
    eps = float(_attr(node, "epsilon", 1e-5))
    shape = [-1] + [1] * max(rank - 2, 0)  # per channel, broadcast over the spatial axes
    names = {k: _unique(node, index, k) for k in ("mean", "inv_std", "shape", "eps", "var", "ve", "sd", "g", "b", "c", "n", "s")}
    new_inits.append(_const(names["shape"], np.asarray(shape, np.int64)))
    if mean in inits and var in inits:  # μ and 1/√(σ² + ε) as constants
        mu = numpy_helper.to_array(inits[mean]).astype(np.float32).reshape(shape)
        inv = (1.0 / np.sqrt(numpy_helper.to_array(inits[var]).astype(np.float32) + eps)).reshape(shape)
        new_inits += [_const(names["mean"], mu), _const(names["inv_std"], inv)]
        statistics: list[onnx.NodeProto] = []
    else:  # statistics computed in the graph (e.g. decoded from a codebook): the same, as nodes
        new_inits.append(_const(names["eps"], np.float32(eps)))
        statistics = [
            helper.make_node("Reshape", [mean, names["shape"]], [names["mean"]]),
            helper.make_node("Reshape", [var, names["shape"]], [names["var"]]),
            helper.make_node("Add", [names["var"], names["eps"]], [names["ve"]]),
            helper.make_node("Sqrt", [names["ve"]], [names["sd"]]),
            helper.make_node("Reciprocal", [names["sd"]], [names["inv_std"]]),
        ]
    return statistics + [
        helper.make_node("Reshape", [scale, names["shape"]], [names["g"]]),
        helper.make_node("Reshape", [bias, names["shape"]], [names["b"]]),
        helper.make_node("Sub", [x, names["mean"]], [names["c"]]),
        helper.make_node("Mul", [names["c"], names["inv_std"]], [names["n"]]),
        helper.make_node("Mul", [names["n"], names["g"]], [names["s"]]),
        helper.make_node("Add", [names["s"], names["b"]], [node.output[0]], name=node.name),
    ]


def _rewrite_hardsigmoid(node, index, opset, new_inits) -> list[onnx.NodeProto] | None:
    if opset < 11:
        return None
    alpha, beta = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
    names = {k: _unique(node, index, k) for k in ("alpha", "beta", "lo", "hi", "m", "a")}
    new_inits += [_const(names["alpha"], np.float32(alpha)), _const(names["beta"], np.float32(beta)),
                  _const(names["lo"], np.float32(0.0)), _const(names["hi"], np.float32(1.0))]
    return [
        helper.make_node("Mul", [node.input[0], names["alpha"]], [names["m"]]),
        helper.make_node("Add", [names["m"], names["beta"]], [names["a"]]),
        helper.make_node("Clip", [names["a"], names["lo"], names["hi"]], [node.output[0]], name=node.name),
    ]


def _integer_scales(node, inits, ranks) -> list[int] | None:
    """Integer upsampling factors of a nearest Resize on an [N, C, spatial...] tensor, or None."""
    if _attr(node, "mode", b"nearest") not in (b"nearest", "nearest"):
        return None
    mode = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rounding = _attr(node, "nearest_mode", b"round_prefer_floor")
    rounding = rounding.decode() if isinstance(rounding, bytes) else rounding
    # out[i] = in[i // s] for integer s: asymmetric needs floor; half_pixel works for both rounds.
    if not ((mode == "asymmetric" and rounding == "floor") or (mode in ("half_pixel", "pytorch_half_pixel")
                                                                and rounding.startswith("round"))):
        return None
    scales = node.input[2] if len(node.input) > 2 else ""
    if not scales or scales not in inits:
        return None
    values = numpy_helper.to_array(inits[scales]).astype(np.float64)
    rank = ranks.get(node.input[0])
    if rank is None or values.size != rank or rank < 3 or np.any(values[:2] != 1):
        return None
    if np.any(values < 1) or np.any(values != np.round(values)):
        return None
    return [int(v) for v in values[2:]]


def _rewrite_resize(node, index, inits, ranks, new_inits) -> list[onnx.NodeProto] | None:
    factors = _integer_scales(node, inits, ranks)
    if factors is None:
        return None
    spatial = len(factors)
    names = {k: _unique(node, index, k) for k in ("axes", "u", "reps", "e", "shp", "lead", "sp", "mul", "out")}
    # x[N,C,d1..dk] -> [N,C,d1,1,d2,1,...] -> expand to [..,d1,s1,..] -> reshape [N,C,d1*s1,...]
    axes = [3 + 2 * i for i in range(spatial)]
    reps = [1, 1] + [v for s in factors for v in (1, s)]
    new_inits += [
        _const(names["axes"], np.asarray(axes, np.int64)),
        _const(names["reps"], np.asarray(reps, np.int64)),
        _const(names["mul"], np.asarray([1, 1, *factors], np.int64)),
    ]
    return [
        helper.make_node("Unsqueeze", [node.input[0], names["axes"]], [names["u"]]),
        helper.make_node("Expand", [names["u"], names["reps"]], [names["e"]]),
        helper.make_node("Shape", [node.input[0]], [names["shp"]]),
        helper.make_node("Mul", [names["shp"], names["mul"]], [names["out"]]),
        helper.make_node("Reshape", [names["e"], names["out"]], [node.output[0]], name=node.name),
    ]


def rewrite_for_training(
    model: onnx.ModelProto, ranks: dict[str, int]
) -> tuple[onnx.ModelProto, dict[str, int], list[str], dict[str, str]]:
    """Training copy of ``model`` with the rewrites of the module docstring; returns
    ``(model, {rewrite: count}, gamma names, {frozen statistic: reason})``. ``ranks`` maps
    tensor names to their rank."""
    model = copy.deepcopy(model)
    graph = model.graph
    opset = default_opset(model)
    inits = {t.name: t for t in graph.initializer}
    counts: dict[str, int] = defaultdict(int)
    gammas: list[str] = []
    statistics: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for index, node in enumerate(graph.node):
        replacement = None
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            replacement = _rewrite_batchnorm(node, index, inits, ranks, new_inits)
            for name in node.input[3:5]:  # rewritten or not, running statistics never train
                statistics[name] = f"running statistic of BatchNormalization '{node.name}' (kept frozen)"
            if replacement is not None:
                counts["BatchNormalization -> affine"] += 1
                if node.input[1] in inits:  # a γ decoded from a codebook has no value of its own
                    gammas.append(node.input[1])
        elif node.op_type == "HardSigmoid":
            replacement = _rewrite_hardsigmoid(node, index, opset, new_inits)
            counts["HardSigmoid -> Clip"] += replacement is not None
        elif node.op_type == "Resize" and opset >= 13:
            replacement = _rewrite_resize(node, index, inits, ranks, new_inits)
            counts["Resize -> Expand"] += replacement is not None
        elif node.op_type == "LayerNormalization":
            outputs = list(node.output) + [""] * (3 - len(node.output))
            for slot, what in ((1, "mean"), (2, "inv_std")):
                if not outputs[slot]:
                    outputs[slot] = _unique(node, index, what)
            del node.output[:]
            node.output.extend(outputs)
            counts["LayerNormalization outputs declared"] += 1
            if len(node.input) > 1 and node.input[1] in inits:
                gammas.append(node.input[1])
        elif node.op_type in ("LSTM", "GRU"):
            slots = 8 if node.op_type == "LSTM" else 6
            if len(node.input) < slots:
                node.input.extend([""] * (slots - len(node.input)))
                counts[f"{node.op_type} inputs padded"] += 1
        new_nodes.extend(replacement if replacement is not None else [node])
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return model, {k: v for k, v in counts.items() if v}, gammas, statistics


def _node_subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read by the nodes of the subgraphs of ``node`` (an If/Loop/Scan's implicit inputs)."""
    names: set[str] = set()
    for attribute in node.attribute:
        subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for sub in subs:
            for inner in iter_graphs(sub):
                for n in inner.node:
                    names.update(n.input)
    return names


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of every subgraph nested in ``graph``'s nodes."""
    return set().union(*(_node_subgraph_reads(node) for node in graph.node))


def _rnn_limit(node: onnx.NodeProto) -> str | None:
    """Why onnxruntime's LSTMTraining / GRUTraining kernel cannot run this node, or None."""
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        return f"a {direction} {node.op_type} (the training kernel is forward-only)"
    if len(node.input) > 4 and node.input[4]:
        return f"an {node.op_type} with sequence_lens (unsupported by the training kernel)"
    if _attr(node, "activations", None) or _attr(node, "clip", None) is not None:
        return f"an {node.op_type} with custom activations or clip (unsupported by the training kernel)"
    return None


def _blocking_reason(node: onnx.NodeProto, device: str) -> str | None:
    if node.op_type in CONTROL_FLOW:
        return f"control flow ({node.op_type})"
    if node.op_type in ("LSTM", "GRU"):
        return _rnn_limit(node)
    if device == "cpu" and node.op_type in CPU_ONLY_MISSING:
        return f"{node.op_type} (its gradient kernel exists only on CUDA)"
    return None


def select_weights(
    model: onnx.ModelProto,
    device: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Split the float initializers of the training copy into trainable names and
    ``{frozen name: reason}``. Integer initializers (indices, shapes) never train."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                consumers[name].append((node, slot))
        for name in node.output:
            producer[name] = node
    frozen: dict[str, str] = {}
    candidates: list[str] = []
    inner_reads = _subgraph_reads(graph)
    for sub in list(iter_graphs(graph))[1:]:
        for tensor in sub.initializer:
            frozen[tensor.name] = "stored inside an If/Loop/Scan body (onnxruntime cannot train it)"
    for name, tensor in inits.items():
        if name.startswith(PREFIX):
            continue
        if tensor.data_type not in (onnx.TensorProto.FLOAT,):
            if tensor.data_type != onnx.TensorProto.INT64 or len(tensor.dims) > 0:
                frozen[name] = "not a float32 tensor (indices and integer constants stay fixed)"
            continue
        if name in inner_reads:
            frozen[name] = "read inside an If/Loop/Scan body (onnxruntime cannot train it)"
            continue
        if int(np.prod(tensor.dims)) <= 1:
            frozen[name] = "a scalar constant (eps, scale factors, activation constants), not a weight"
            continue
        uses = consumers.get(name, [])
        bad = [(n, s) for n, s in uses if s not in WEIGHT_SLOTS.get(n.op_type, ())]
        if not uses:
            continue
        if bad:
            node, slot = bad[0]
            frozen[name] = f"input {slot} of {node.op_type} '{node.name}' is not a weight"
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            frozen[name] = "not selected (include)"
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            frozen[name] = "excluded"
            continue
        candidates.append(name)
    # Weights whose gradient would have to flow through a node onnxruntime cannot differentiate.
    for node in graph.node:
        reason = _blocking_reason(node, device)
        if reason is None:
            continue
        stack, seen = [*node.input, *_node_subgraph_reads(node)], set()
        while stack:
            tensor_name = stack.pop()
            if not tensor_name or tensor_name in seen:
                continue
            seen.add(tensor_name)
            if tensor_name in inits:
                if tensor_name in candidates:
                    frozen.setdefault(tensor_name, f"its gradient would pass through {reason} '{node.name}'")
                continue
            if tensor_name in producer:
                stack.extend(producer[tensor_name].input)
    trainable = [name for name in candidates if name not in frozen]
    return trainable, frozen


def _upstream_initializers(graph: onnx.GraphProto, tensor: str) -> set[str]:
    """Initializers a tensor is computed from (e.g. the codebook a decoded statistic comes from)."""
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    found, todo, seen = set(), [tensor], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inits:
            found.add(name)
        elif name in producer:
            todo.extend(i for i in producer[name].input if i)
    return found


def complete_frozen(
    original: onnx.ModelProto, trainable: list[str], frozen: dict[str, str], statistics: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """``trainable`` less the running statistics (and what they are decoded from, such as a
    codebook), and ``frozen`` plus a reason for every other initializer of ``original`` that does
    not train."""
    result = dict(frozen)
    for tensor, reason in statistics.items():
        for name in _upstream_initializers(original.graph, tensor) | {tensor}:
            result.setdefault(name, reason)
    trainable = [name for name in trainable if name not in result]
    for tensor in original.graph.initializer:
        if tensor.name not in trainable and tensor.name not in result:
            result[tensor.name] = "a constant of a node rewritten for training (not a weight)"
    return trainable, result
