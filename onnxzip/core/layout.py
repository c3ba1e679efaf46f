"""Chains of layout-only nodes collapsed into one ``Reshape`` (or none).

Exporters move tensors between ops' conventions with chains of ``Squeeze``, ``Unsqueeze``,
``Transpose``, ``Reshape``, ``Flatten`` and ``Identity`` nodes: dtln's streaming LSTM stage spends
24 of its 36 nodes slicing its state into the LSTMs' ``[1, 1, 128]`` layout and stacking it back,
and a frame takes 0.06 ms, so each node's fixed cost in onnxruntime counts. None of them moves
data out of memory order, so a chain of them is one ``Reshape`` (zero-copy in onnxruntime), or
nothing when its ends have the same shape: dtln_stage1 goes from 36 to 20 nodes and runs a frame
1.11x as fast (CPU time of the running thread), dtln_stage2 1.04x.

A ``Transpose`` counts as layout-only when the axes it moves past each other are of size 1 (the
order of the others is kept). Everything here needs static shapes: a tensor's shape is used only
where ONNX shape inference gives every dimension a number *and* onnxruntime produced that shape
(``observed``), so a batch or time axis that can vary is never baked into a ``Reshape``. The
rewrite is exact: the same values in the same order.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.core.compat import subgraph_reads

log = logging.getLogger(__name__)

LAYOUT_OPS = frozenset({"Squeeze", "Unsqueeze", "Transpose", "Reshape", "Flatten", "Identity"})


def static_shapes(model: onnx.ModelProto, observed: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Main-graph tensors whose inferred shape is all numbers and agrees with ``observed``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort on real files
        log.debug("ONNX shape inference failed", exc_info=True)
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.output) + list(graph.input):
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shape = tuple(int(d.dim_value) for d in dims)
            if observed.get(info.name) == shape:
                shapes[info.name] = shape
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _keeps_order(node: onnx.NodeProto, shape: tuple[int, ...]) -> bool:
    """Whether the node leaves the values in memory order (every layout op but a Transpose that
    moves an axis of size > 1 past another one of size > 1)."""
    if node.op_type != "Transpose":
        return True
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if perm is None:
        perm = list(range(len(shape)))[::-1]
    big = [axis for axis in perm if shape[axis] != 1]
    return big == sorted(big)


def collapse_layout_chains(model: onnx.ModelProto, observed: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """Collapse chains of layout-only nodes of the main graph in place.

    A chain is a run of layout-only nodes, each one's data output read only by the next (not a
    graph output, not read inside a subgraph). It becomes one ``Reshape`` to the last node's
    shape, or disappears when the first node's input has that shape already (its readers read
    that input instead; a graph output keeps its name through one ``Identity``). A lone layout
    node is replaced only when that removes it or turns a ``Transpose`` into a ``Reshape``.
    Returns (chains rewritten, nodes removed)."""
    graph = model.graph
    shapes = static_shapes(model, observed)
    if not shapes:
        return 0, 0
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    in_subgraphs = subgraph_reads(graph)
    producer = {out: node for node in graph.node for out in node.output if out}

    def layout(node: onnx.NodeProto) -> bool:
        if node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx") or not node.input:
            return False
        src, dst = node.input[0], node.output[0]
        if src not in shapes or dst not in shapes or 0 in shapes[dst] or 0 in shapes[src]:
            return False
        return _keeps_order(node, shapes[src])

    def private(name: str) -> bool:
        return name not in graph_outputs and name not in in_subgraphs and len(readers.get(name, [])) == 1

    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # by the id of a chain's last node
    renames: dict[str, str] = {}
    chains = removed = 0
    taken: set[int] = set()  # ids of the nodes of every chain
    for node in graph.node:
        if id(node) in taken or not layout(node):
            continue
        out = node.output[0]
        # a chain ends where its output is not read by exactly one layout node
        if private(out) and layout(readers[out][0]):
            continue
        chain = [node]
        while True:
            head = chain[0].input[0]
            before = producer.get(head)
            if before is None or not private(head) or not layout(before) or id(before) in taken:
                break
            chain.insert(0, before)
        start, end = chain[0].input[0], out
        same = shapes[start] == shapes[end]
        if len(chain) == 1 and not same and node.op_type != "Transpose":
            continue
        taken.update(id(member) for member in chain)
        if same and end not in graph_outputs and end not in in_subgraphs:
            renames[end] = start
            replacement = []
        elif same:
            replacement = [helper.make_node("Identity", [start], [end], name=f"{node.name or end}_collapsed")]
        else:
            target = f"{end}__layout_shape"
            graph.initializer.append(numpy_helper.from_array(np.asarray(shapes[end], np.int64), target))
            replacement = [helper.make_node("Reshape", [start, target], [end], name=f"{node.name or end}_collapsed")]
        new_nodes[id(node)] = replacement
        chains += 1
        removed += len(chain) - len(replacement)
    if not chains:
        return 0, 0

    def resolve(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    graph_nodes_before = list(graph.node)
    kept: list[onnx.NodeProto] = []
    for node in graph_nodes_before:
        if id(node) in new_nodes:
            kept.extend(new_nodes[id(node)])
        elif id(node) not in taken:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = resolve(name)
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in kept for name in node.input} | in_subgraphs | graph_outputs
    dropped = {name for node in graph_nodes_before if id(node) in taken for name in node.input}
    unused = [init for init in graph.initializer if init.name in dropped and init.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    return chains, removed
