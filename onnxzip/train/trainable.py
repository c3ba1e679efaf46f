"""Make a graph trainable by onnxruntime-training, and decide which weights train.

The rewrites below only change the *training copy* of a model; trained values are written back
into the original graph by initializer name (:func:`with_weights`), so every rewrite is undone
on export by construction and names/shapes of trainable tensors never change:

* a model older than opset 13 is converted to opset 13 (onnxruntime's gradient builders emit
  newer ops: a Gemm without C, LessOrEqual);
* an ``If`` whose condition is the same on every training sample is replaced by the branch that
  runs (:func:`inline_fixed_branches`); the branch's weights train and go back into that branch;
* ``BatchNormalization`` → ``x·a + (β − μ·a)``, ``a = γ·(1/√(σ² + ε))``, with μ and 1/√(σ² + ε) frozen
  constants and γ, β reshaped to ``[C, 1, …]``: onnxruntime would otherwise train with batch
  statistics and overwrite the running ones. Statistics computed in the graph (decoded from a
  codebook) get the same form with 1/√(σ² + ε) computed by nodes;
* ``LayerNormalization`` declares its optional Mean / InvStdDev outputs (its gradient needs them);
* the op rewrites of :mod:`onnxzip.train.rewrites` (HardSigmoid, GlobalMaxPool, Resize,
  ConvTranspose, bidirectional LSTM/GRU, ...).

What cannot train stays frozen with a reason naming the op: weights read inside Loop/Scan bodies
or an If whose condition varies, and every weight whose gradient would have to pass through a
node that neither onnxruntime nor a rewrite can differentiate.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from onnxzip.core.compat import default_opset, iter_graphs, node_subgraph_reads, subgraph_reads
from onnxzip.core.tables import MIN_VALUES, sinusoid_of
from onnxzip.train.rewrites import PREFIX, REWRITES, Context, Nodes, attr

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
    "InstanceNormalization": (1, 2),
    # data movement on a weight (a weight sliced, transposed or shared between heads)
    **{op: (0,) for op in ("Transpose", "Slice", "Squeeze", "Unsqueeze", "Identity", "Split", "Expand", "Tile")},
    "Concat": tuple(range(64)),
}
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
NO_GRADIENT = frozenset({"Einsum"})  # no gradient builder in onnxruntime-training 1.19, no rewrite here
TRAINING_OPSET = 13
log = logging.getLogger(__name__)


def _unique(node: onnx.NodeProto, index: int, what: str) -> str:
    return f"{PREFIX}/{node.name or node.op_type + str(index)}/{what}"


def _rewrite_batchnorm(node, index, inits, shapes, new_inits) -> list[onnx.NodeProto] | None:
    if len(node.output) != 1 and any(node.output[1:]):
        return None  # a training-mode BN; leave it (its weights get frozen by onnxruntime's rules)
    x, scale, bias, mean, var = node.input[:5]
    rank = len(shapes.get(x, (0,) * 4))
    eps = float(attr(node, "epsilon", 1e-5))
    shape = [-1] + [1] * max(rank - 2, 0)  # per channel, broadcast over the spatial axes
    names = {k: _unique(node, index, k) for k in ("mean", "inv_std", "shape", "eps", "var", "ve", "sd", "g", "b", "c", "n", "s", "a")}
    new_inits.append(numpy_helper.from_array(np.asarray(shape, np.int64), names["shape"]))
    if mean in inits and var in inits:  # μ and 1/√(σ² + ε) as constants
        mu = numpy_helper.to_array(inits[mean]).astype(np.float32).reshape(shape)
        inv = (1.0 / np.sqrt(numpy_helper.to_array(inits[var]).astype(np.float32) + eps)).reshape(shape)
        new_inits += [numpy_helper.from_array(mu, names["mean"]), numpy_helper.from_array(inv, names["inv_std"])]
        statistics: list[onnx.NodeProto] = []
    else:  # statistics computed in the graph (e.g. decoded from a codebook): the same, as nodes
        new_inits.append(numpy_helper.from_array(np.float32(eps), names["eps"]))
        statistics = [
            helper.make_node("Reshape", [mean, names["shape"]], [names["mean"]]),
            helper.make_node("Reshape", [var, names["shape"]], [names["var"]]),
            helper.make_node("Add", [names["var"], names["eps"]], [names["ve"]]),
            helper.make_node("Sqrt", [names["ve"]], [names["sd"]]),
            helper.make_node("Reciprocal", [names["sd"]], [names["inv_std"]]),
        ]
    # x·a + c with a = γ/√(σ² + ε) and c = β − μ·a per channel: two ops on the activations (and
    # three in the backward pass) where (x − μ)·(1/√(σ² + ε))·γ + β takes four.
    return statistics + [
        helper.make_node("Reshape", [scale, names["shape"]], [names["g"]]),
        helper.make_node("Reshape", [bias, names["shape"]], [names["b"]]),
        helper.make_node("Mul", [names["g"], names["inv_std"]], [names["n"]]),
        helper.make_node("Mul", [names["mean"], names["n"]], [names["c"]]),
        helper.make_node("Sub", [names["b"], names["c"]], [names["s"]]),
        helper.make_node("Mul", [x, names["n"]], [names["a"]]),
        helper.make_node("Add", [names["a"], names["s"]], [node.output[0]], name=node.name),
    ]


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset ≥ 13: onnxruntime's gradient builders emit nodes of newer opsets (Gemm
    without C, LessOrEqual), which make the training graph of an older model invalid."""
    if default_opset(model) >= TRAINING_OPSET:
        return model
    try:
        return version_converter.convert_version(model, TRAINING_OPSET)
    except Exception:  # noqa: BLE001 - the converter refuses some graphs; train at the model's opset
        log.debug("opset conversion failed", exc_info=True)
        return model


def rewrite_for_training(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, dict[str, int], list[str], dict[str, str], dict[str, str]]:
    """Training copy of ``model`` with the rewrites of the module docstring; returns
    ``(model, {rewrite: count}, gamma names, {frozen statistic: reason}, {node name: why it
    stays as it is})``. ``shapes`` maps tensor names to their observed shapes."""
    model = _upgraded(copy.deepcopy(model))
    graph = model.graph
    opset = default_opset(model)
    inits = {t.name: t for t in graph.initializer}
    context = Context(shapes, inits, opset)
    counts: dict[str, int] = defaultdict(int)
    gammas: list[str] = []
    statistics: dict[str, str] = {}
    kept: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for index, node in enumerate(graph.node):
        replacement = None
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            replacement = _rewrite_batchnorm(node, index, inits, shapes, new_inits)
            for name in node.input[3:5]:  # rewritten or not, running statistics never train
                statistics[name] = f"running statistic of BatchNormalization '{node.name}' (kept frozen)"
            if replacement is not None:
                counts["BatchNormalization -> affine"] += 1
                if node.input[1] in inits:  # a γ decoded from a codebook has no value of its own
                    gammas.append(node.input[1])
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
        elif node.op_type in REWRITES and node.domain in ("", "ai.onnx"):
            label, rewrite = REWRITES[node.op_type]
            nodes = Nodes(node, index, opset, [])
            why = (f"the model's opset {opset} could not be converted to {TRAINING_OPSET}"
                   if opset < TRAINING_OPSET else rewrite(node, nodes, context))
            if why is not None:
                kept[node.name] = f"{node.op_type} '{node.name}' (no CPU gradient, and it cannot be rewritten: {why})"
            elif nodes.nodes:
                replacement = nodes.nodes
                new_inits += nodes.initializers
                counts[f"{node.op_type} -> {label}"] += 1
                if node.op_type == "InstanceNormalization" and node.input[1] in inits:
                    gammas.append(node.input[1])
        new_nodes.extend(replacement if replacement is not None else [node])
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return model, {k: v for k, v in counts.items() if v}, gammas, statistics, kept


def _blocking_reason(node: onnx.NodeProto, kept: dict[str, str]) -> str | None:
    """Why no gradient can pass through ``node`` (a sentence naming the op), or None."""
    if node.op_type == "If":
        return f"If '{node.name}', whose condition the training data does not fix (onnxruntime cannot differentiate control flow)"
    if node.op_type in CONTROL_FLOW:
        return f"{node.op_type} '{node.name}' (onnxruntime cannot differentiate control flow)"
    if node.name in kept:
        return kept[node.name]
    if node.op_type in NO_GRADIENT:
        return f"{node.op_type} '{node.name}' (onnxruntime-training has no gradient for it)"
    return None


def select_weights(
    model: onnx.ModelProto,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    kept: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Split the float initializers of the training copy into trainable names and
    ``{frozen name: reason}``. Integer initializers (indices, shapes) never train; ``kept``
    names the nodes no rewrite could make differentiable, with the reason."""
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
    unselected: dict[str, str] = {}
    candidates: list[str] = []
    inner_reads = subgraph_reads(graph)
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
        if int(np.prod(tensor.dims)) >= MIN_VALUES and sinusoid_of(numpy_helper.to_array(tensor)) is not None:
            frozen[name] = "a sinusoidal position table (a formula, not a weight: cleanup stores it as one)"
            continue
        uses = consumers.get(name, [])
        bad = [(n, s) for n, s in uses if s not in WEIGHT_SLOTS.get(n.op_type, ())]
        if not uses:
            continue
        if bad:
            node, slot = bad[0]
            frozen[name] = f"input {slot} of {node.op_type} '{node.name}' is not a weight"
            continue
        # Left out by include/exclude, said only where nothing in the graph freezes it anyway (below):
        # a step that selects its weights by name must not hide why the others cannot train.
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            unselected[name] = "not selected (include)"
        elif exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            unselected[name] = "excluded"
        candidates.append(name)
    # Weights whose gradient would have to flow through a node onnxruntime cannot differentiate.
    for node in graph.node:
        reason = _blocking_reason(node, kept or {})
        if reason is None:
            continue
        stack, seen = [*node.input, *node_subgraph_reads(node)], set()
        while stack:
            tensor_name = stack.pop()
            if not tensor_name or tensor_name in seen:
                continue
            seen.add(tensor_name)
            if tensor_name in inits:
                if tensor_name in candidates:
                    frozen.setdefault(tensor_name, f"its gradient would pass through {reason}")
                continue
            if tensor_name in producer:
                stack.extend(producer[tensor_name].input)
    # onnxruntime-training turns every LSTM/GRU of the graph into its training kernel, which
    # refuses sequence_lens and clip whether a gradient passes through the node or not.
    for node in graph.node:
        if node.op_type in ("LSTM", "GRU") and node.name in (kept or {}) and (
                (len(node.input) > 4 and node.input[4]) or any(a.name == "clip" for a in node.attribute)):
            for name in candidates:
                frozen.setdefault(name, f"onnxruntime-training runs every LSTM/GRU in its training kernel, which "
                                        f"refuses {kept[node.name]}")
    for name, reason in unselected.items():
        frozen.setdefault(name, reason)
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


# A lifted branch weight: the path to its graph in the original model, as (node index, attribute
# name) steps from the main graph, and its name there.
Location = tuple[tuple[tuple[int, str], ...], str]


def _ancestors(graph: onnx.GraphProto, names: list[str]) -> list[onnx.NodeProto]:
    """The nodes ``names`` are computed from, in graph order."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed, todo = set(), list(names)
    while todo:
        index = producer.get(todo.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        todo.extend([*graph.node[index].input, *node_subgraph_reads(graph.node[index])])
    return [graph.node[i] for i in sorted(needed)]


def _fixed_conditions(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> dict[int, bool]:
    """{index of a main-graph If: its condition} for the Ifs whose condition is the same on
    every sample of ``data`` (each sample run alone)."""
    from onnxzip.core.runtime import make_session, run_batched, run_session

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    conditions = {i: node.input[0] for i, node in enumerate(graph.node) if node.op_type == "If"}
    fixed = {i: bool(np.all(numpy_helper.to_array(inits[name]))) for i, name in conditions.items() if name in inits}
    computed = sorted({name for i, name in conditions.items() if i not in fixed})
    if not computed:
        return fixed
    nodes = _ancestors(graph, computed)
    used = {name for node in nodes for name in [*node.input, *node_subgraph_reads(node)]} | set(computed)
    probe = helper.make_graph(nodes, "conditions", [i for i in graph.input if i.name in used and i.name not in inits],
                              [helper.make_tensor_value_info(n, onnx.TensorProto.BOOL, None) for n in computed],
                              [t for t in graph.initializer if t.name in used])
    probe_model = helper.make_model(probe, opset_imports=model.opset_import)
    probe_model.ir_version = model.ir_version
    feeds = {k: v for k, v in data.items() if k in used}
    try:
        session = make_session(probe_model, "cpu")
        values = run_batched(session, feeds, 1) if feeds else run_session(session, {})
    except Exception:  # noqa: BLE001 - a condition we cannot evaluate is one that varies
        log.debug("evaluating If conditions failed", exc_info=True)
        return fixed
    for index, name in conditions.items():
        if name in values:
            seen = np.unique(np.asarray(values[name]).astype(bool))
            if seen.size == 1:
                fixed[index] = bool(seen[0])
    return fixed


_RECURRENT = ("LSTM", "GRU", "RNN")


def _without_inert_options(node: onnx.NodeProto) -> onnx.NodeProto | None:
    """``node`` without its ``sequence_lens`` input and ``clip`` attribute (None when it has neither)."""
    if node.op_type not in _RECURRENT or node.domain not in ("", "ai.onnx"):
        return None
    has_lens = len(node.input) > 4 and bool(node.input[4])
    has_clip = any(a.name == "clip" for a in node.attribute)
    if not (has_lens or has_clip):
        return None
    plain = copy.deepcopy(node)
    if has_lens:
        plain.input[4] = ""
    kept = [a for a in plain.attribute if a.name != "clip"]
    del plain.attribute[:]
    plain.attribute.extend(kept)
    return plain


def drop_inert_recurrent_options(model: onnx.ModelProto, data: dict[str, np.ndarray] | None
                                 ) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` (a copy when changed) whose LSTM/GRU/RNN nodes lose ``sequence_lens`` and ``clip``
    where that changes none of their outputs on ``data``, and one note per such node.

    onnxruntime-training's LSTMTraining/GRUTraining refuse both ("Sequence lengths input tensor
    ... is not supported", "Clip is not supported ... yet"), even for values that do nothing: a
    ``sequence_lens`` equal to the sequence length of every sample, a ``clip`` the gate
    pre-activations never reach. Such a node trains without them in the training copy (the
    exported model keeps them, written back by weight name). Where they matter on the data,
    the node keeps them and its weights stay frozen."""
    graph = model.graph
    candidates = {i: plain for i, node in enumerate(graph.node) if (plain := _without_inert_options(node)) is not None}
    if not candidates or data is None:
        return model, []
    from onnxzip.core.runtime import make_session, run_batched

    def run(changed: set[int]) -> dict[str, np.ndarray] | None:
        probe = copy.deepcopy(model)
        for index in changed:
            probe.graph.node[index].CopyFrom(candidates[index])
        declared = {o.name for o in probe.graph.output}
        probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for index in candidates for name in graph.node[index].output
                                  if name and name not in declared)
        try:
            return run_batched(make_session(probe, "cpu"), data, 32)
        except Exception:  # noqa: BLE001 - a model we cannot run here keeps its options
            log.debug("running without sequence_lens / clip failed", exc_info=True)
            return None

    reference = run(set())
    accepted = set(candidates)
    while accepted and reference is not None:
        trial = run(accepted)
        if trial is None:
            accepted = set()
            break
        same = {index for index in accepted
                if all(np.array_equal(reference[name], trial[name]) for name in graph.node[index].output if name)}
        if same == accepted:
            break
        accepted = same
    if not accepted or reference is None:
        return model, []
    model = copy.deepcopy(model)
    notes = []
    for index in sorted(accepted):
        node = graph.node[index]
        what = " and ".join(w for w, has in (("sequence_lens", len(node.input) > 4 and node.input[4]),
                                             ("clip", any(a.name == "clip" for a in node.attribute))) if has)
        model.graph.node[index].CopyFrom(candidates[index])
        notes.append(f"{node.op_type} '{node.name or index}': its {what} change{'s' * (' and ' not in what)} "
                     "nothing on the training data, so it trains without (the written model keeps it)")
    return model, notes


def inline_fixed_branches(
    model: onnx.ModelProto, data: dict[str, np.ndarray] | None
) -> tuple[onnx.ModelProto, dict[str, Location], list[str]]:
    """A copy of ``model`` in which every If whose condition ``data`` fixes is replaced by the
    branch that runs (repeated for Ifs nested in it), the branch's initializers lifted into the
    main graph; returns ``(copy, {lifted weight: where it lives in model}, notes)``."""
    model = copy.deepcopy(model)
    graph = model.graph
    # where each main-graph node of the copy lives in the original: (path to its graph, index)
    origin: list[tuple[tuple[tuple[int, str], ...], int]] = [((), i) for i in range(len(graph.node))]
    locations: dict[str, Location] = {}
    notes: list[str] = []
    if data is None:
        return model, locations, notes
    for _depth in range(8):
        fixed = _fixed_conditions(model, data)
        if not fixed:
            break
        names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        nodes, places = [], []
        for index, node in enumerate(graph.node):
            if index not in fixed:
                nodes.append(node)
                places.append(origin[index])
                continue
            which = "then_branch" if fixed[index] else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == which)
            path = (*origin[index][0], (origin[index][1], which))
            if any(t.name in names for t in branch.initializer):
                nodes.append(node)
                places.append(origin[index])
                continue
            for tensor in branch.initializer:
                graph.initializer.append(tensor)
                locations[tensor.name] = (path, tensor.name)
            lifted = [*branch.node, *(helper.make_node("Identity", [out.name], [target])
                                      for out, target in zip(branch.output, node.output) if target)]
            nodes.extend(lifted)
            places.extend([(path, i) for i in range(len(branch.node))] + [((), -1)] * (len(lifted) - len(branch.node)))
            notes.append(f"If '{node.name or index}' always takes its {which.split('_')[0]} branch on the training "
                         "data: that branch trains")
        if len(nodes) == len(graph.node) and all(a is b for a, b in zip(nodes, graph.node)):
            break
        del graph.node[:]
        graph.node.extend(nodes)
        origin = places
    return model, locations, notes


def with_weights(model: onnx.ModelProto, values: dict[str, Any],
                 locations: dict[str, Location] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold the new values (same
    dtype); a name in ``locations`` is written into the If branch it was lifted from."""
    result = copy.deepcopy(model)
    by_graph: dict[tuple[tuple[int, str], ...], dict[str, Any]] = defaultdict(dict)
    for name, value in values.items():
        path, original = (locations or {}).get(name, ((), name))
        by_graph[path][original] = value
    for path, named in by_graph.items():
        graph = result.graph
        for index, attribute in path:
            graph = next(a.g for a in graph.node[index].attribute if a.name == attribute)
        for tensor in graph.initializer:
            if tensor.name in named:
                dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(named[tensor.name], dtype), tensor.name))
    return result


@dataclass
class TrainingCopy:
    """The training copy of a model and which of its weights train (the rest frozen, with why)."""

    model: onnx.ModelProto
    trainable: list[str]
    frozen: dict[str, str]
    rewrites: dict[str, int] = field(default_factory=dict)
    gammas: list[str] = field(default_factory=list)
    locations: dict[str, Location] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # nodes no gradient passes through, with why
    limits: dict[str, float] = field(default_factory=dict)  # weights whose steps are scaled (scale_steps)


def prepare(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    data: dict[str, np.ndarray] | None = None,
    probe: dict[str, np.ndarray] | None = None,
) -> TrainingCopy:
    """The training copy of ``model`` (Ifs fixed by ``data`` inlined, then rewritten) and the
    split of its weights into trainable and frozen; ``shapes`` are ``model``'s observed on
    ``probe``, which also gives the shapes inside inlined branches."""
    inlined, locations, notes = inline_fixed_branches(model, data)
    if notes and probe is not None:
        from onnxzip.measure.cost import observed_shapes

        shapes = {**shapes, **observed_shapes(inlined, probe)}
    inlined, dropped = drop_inert_recurrent_options(inlined, data)  # the same shapes
    notes = [*notes, *dropped]
    training_copy, rewrites, gammas, statistics, kept = rewrite_for_training(inlined, shapes)
    trainable, frozen = select_weights(training_copy, include, exclude, kept)
    trainable, frozen = complete_frozen(inlined, trainable, frozen, statistics)
    return TrainingCopy(training_copy, trainable, frozen, rewrites, gammas, locations, notes, kept)


def step_limits(model: onnx.ModelProto, names: list[str], lr: float, max_step: float) -> dict[str, float]:
    """Per trainable weight whose RMS is so small that a step of about ``lr`` per value (Adam's)
    would move it by more than ``max_step`` of its RMS: the factor < 1 its steps are scaled by so
    that they do not (:func:`scale_steps`), rounded down to a power of two. A BN-folded first Conv of a raw-pixel input (open_nsfw:
    channel scales of RMS 5e-4 against a learning rate of 3e-4) is what this is for."""
    if max_step <= 0 or lr <= 0:
        return {}
    wanted = set(names)
    outputs = {o.name for o in model.graph.output}
    limits: dict[str, float] = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted and tensor.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor).astype(np.float64)
            rms = float(np.sqrt(np.mean(values ** 2))) if values.size else 0.0
            if rms > 0 and lr > max_step * rms and tensor.name not in outputs:
                # a power of two, so that w / m · m gives w back bit for bit
                limits[tensor.name] = float(2.0 ** np.floor(np.log2(max_step * rms / lr)))
    return limits


def scale_steps(model: onnx.ModelProto, limits: dict[str, float]) -> None:
    """Reparametrize each weight ``w`` of ``limits`` in the training copy (in place) as ``m · w'``:
    the initializer holds ``w' = w / m`` and one ``Mul`` by ``m`` feeds every reader, so an Adam
    step of ``lr`` on ``w'`` moves ``w`` by ``m · lr``. The parameter keeps its name; its values are
    ``w / m`` (:func:`unscaled` turns them back)."""
    if not limits:
        return
    graph = model.graph
    renamed = {name: f"{PREFIX}_stepped/{name}" for name in limits}
    for sub in iter_graphs(graph):
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
    muls, factors = [], []
    for tensor in graph.initializer:
        if tensor.name in limits:
            factor = np.float32(limits[tensor.name])
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) / factor, tensor.name))
            factors.append(numpy_helper.from_array(np.asarray(factor, np.float32), f"{PREFIX}_step/{tensor.name}"))
            muls.append(helper.make_node("Mul", [tensor.name, f"{PREFIX}_step/{tensor.name}"], [renamed[tensor.name]],
                                         name=f"{PREFIX}_step_mul/{tensor.name}"))
    graph.initializer.extend(factors)  # not while iterating over them
    nodes = [*muls, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def unscaled(values: dict[str, np.ndarray], limits: dict[str, float], back: bool = False) -> dict[str, np.ndarray]:
    """Training parameters' values as the weights they stand for (``w = m · w'``), or with
    ``back`` the weights as parameters (``w' = w / m``)."""
    if not limits:
        return values
    return {name: (value / np.float32(limits[name]) if back else value * np.float32(limits[name]))
            if name in limits else value for name, value in values.items()}
