"""Graph-editing layer: onnx-graphsurgeon import/export that keeps what gs drops, recursive
node walks (``If``/``Loop``/``Scan`` bodies included), and constant resolution through
constant-only chains (``Constant`` nodes, Transpose, Slice, Concat, Unsqueeze, Reshape, ...).
"""
from __future__ import annotations

import itertools
from typing import Any
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

# Ops whose output is a pure function of constant inputs and cheap to fold in numpy.
FOLDABLE_OPS = frozenset(
    {"Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Concat", "Slice", "Cast"}
)

_MODEL_FIELDS = ("producer_name", "producer_version", "doc_string", "domain", "model_version")


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx → graphsurgeon graph (initializers become shared ``gs.Constant`` objects).

    A ``value_info`` entry without a shape that repeats a graph input or output (onnx.quantize
    writes them: ddddocr's common_old.onnx) would replace the declared shape on import; the
    declared one is kept, as the checker requires a shape on graph inputs and outputs."""
    graph = gs.import_onnx(model)
    declared = {info.name: info for info in (*model.graph.input, *model.graph.output)
                if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")}
    for tensor in (*graph.inputs, *graph.outputs):
        info = declared.get(tensor.name)
        if info is not None and tensor.shape is None:
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                            for d in info.type.tensor_type.shape.dim]
    return graph


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """graphsurgeon graph → ModelProto, restoring the model-level fields gs does not keep
    (metadata_props, doc strings, producer, model version, functions)."""
    model = gs.export_onnx(graph, do_type_check=False)
    for field in _MODEL_FIELDS:
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.graph.doc_string = template.graph.doc_string
    if template.functions and not model.functions:
        model.functions.extend(template.functions)
    model.ir_version = template.ir_version
    return model


def tidy(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and tensors (graph inputs stay) and sort topologically, subgraphs too."""
    return graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort(
        recurse_subgraphs=True
    )


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    """The subgraphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def walk_nodes(graph: gs.Graph, path: str = "") -> Iterator[tuple[gs.Node, gs.Graph, str]]:
    """Yield ``(node, owning_graph, graph_path)`` for every node, recursing into subgraphs.

    ``graph_path`` is ``""`` for the main graph, else e.g. ``"If_3/then_branch"``.
    """
    for node in list(graph.nodes):
        yield node, graph, path
        for key, value in node.attrs.items():
            subs = [value] if isinstance(value, gs.Graph) else (
                [v for v in value if isinstance(v, gs.Graph)] if isinstance(value, (list, tuple)) else []
            )
            for index, sub in enumerate(subs):
                label = key if len(subs) == 1 else f"{key}[{index}]"
                sub_path = f"{path}/{node.name or node.op}/{label}".lstrip("/")
                yield from walk_nodes(sub, sub_path)


def constant_value(tensor: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
    """Value of ``tensor`` if it is constant: an initializer, a ``Constant`` node output, or the
    output of a constant-only chain of :data:`FOLDABLE_OPS`; else ``None``."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if _depth > 64 or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        return _constant_node_value(producer)
    if producer.op not in FOLDABLE_OPS or (producer.domain or "") not in ("", "ai.onnx"):
        return None
    values = []
    for inp in producer.inputs:
        if inp.name == "":
            values.append(None)
            continue
        value = constant_value(inp, _depth + 1)
        if value is None:
            return None
        values.append(value)
    try:
        return _fold(producer, values)
    except (ValueError, IndexError, TypeError):
        return None


def constant_chain(tensor: gs.Tensor) -> list[str]:
    """Human-readable origin of a constant tensor, e.g. ``['Transpose', 'initializer W']``."""
    if isinstance(tensor, gs.Constant):
        return [f"initializer {tensor.name}"]
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        return [f"Constant node {producer.name or tensor.name}"]
    first = next((i for i in producer.inputs if i.name), None)
    return [producer.op, *(constant_chain(first) if first is not None else [])]


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else numpy_helper.to_array(value))
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def _axes(node: gs.Node, values: list[np.ndarray | None]) -> list[int] | None:
    if len(values) > 1 and values[1] is not None:
        return [int(a) for a in values[1]]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _fold(node: gs.Node, values: list[np.ndarray | None]) -> np.ndarray:
    """Numpy evaluation of one :data:`FOLDABLE_OPS` node (ONNX semantics)."""
    op, data = node.op, values[0]
    if op == "Identity":
        return data
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return np.transpose(data, perm if perm is None else list(perm))
    if op == "Cast":
        return data.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % max(data.ndim, 1) if data.ndim else 0
        return data.reshape(int(np.prod(data.shape[:axis], dtype=np.int64)), -1)
    if op == "Concat":
        return np.concatenate(values, axis=int(node.attrs["axis"]))
    if op == "Reshape":
        shape = [int(s) for s in values[1]]
        if not node.attrs.get("allowzero", 0):
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return data.reshape(shape)
    if op == "Unsqueeze":
        axes = sorted(a % (data.ndim + len(_axes(node, values))) for a in _axes(node, values))
        out = data
        for axis in axes:
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = _axes(node, values)
        return np.squeeze(data) if axes is None else np.squeeze(data, axis=tuple(axes))
    if op == "Slice":
        if len(values) == 1:  # opset < 10: attributes
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes, steps = node.attrs.get("axes"), None
        else:
            starts, ends = values[1], values[2]
            axes = values[3] if len(values) > 3 and values[3] is not None else None
            steps = values[4] if len(values) > 4 and values[4] is not None else None
        axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        index = [slice(None)] * data.ndim
        for axis, start, end, step in zip(axes, starts, ends, steps):
            index[axis] = slice(int(start), _clamp_end(int(end), step, data.shape[axis]), step)
        return data[tuple(index)]
    raise ValueError(op)


def _clamp_end(end: int, step: int, dim: int) -> int | None:
    # ONNX uses INT64_MIN / -INT_MAX as "before the start" for negative steps; Python needs None.
    if step < 0 and end < -dim:
        return None
    return end


class NameScope:
    """Hands out tensor/node names unused anywhere in a graph and its subgraphs."""

    def __init__(self, graph: gs.Graph) -> None:
        self._taken: set[str] = set()
        for node, owner, _ in walk_nodes(graph):
            self._taken.add(node.name)
            self._taken.update(t.name for t in itertools.chain(node.inputs, node.outputs))
        self._taken.update(t.name for t in itertools.chain(graph.inputs, graph.outputs))

    def fresh(self, base: str) -> str:
        """``base`` if free, else ``base_1``, ``base_2``, ... (the name is then reserved)."""
        candidate, suffix = base, 0
        while candidate in self._taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self._taken.add(candidate)
        return candidate


def _graph_tree(graph: onnx.GraphProto) -> list[tuple[onnx.GraphProto, int | None]]:
    """Every graph of the model with the index of its parent graph (None for the main graph)."""
    found: list[tuple[onnx.GraphProto, int | None]] = []

    def visit(current: onnx.GraphProto, parent: int | None) -> None:
        index = len(found)
        found.append((current, parent))
        for node in current.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g, index)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for sub in attribute.graphs:
                        visit(sub, index)

    visit(graph, None)
    return found


def dedupe_initializers(model: onnx.ModelProto, min_bytes: int = 64) -> list[str]:
    """Store identical initializers (same type, shape and bytes) once, in place.

    Materializing constant chains that several ``If``/``Loop`` branches repeat leaves one copy
    per branch; the copy kept moves to the innermost graph enclosing all copies (subgraphs see
    outer names), and the other names are rewritten to it in their graph and its subgraphs.
    Names of main-graph inputs and outputs are never touched. Returns one note, or none."""
    import hashlib

    tree = _graph_tree(model.graph)
    protected = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}

    def ancestors(index: int) -> list[int]:
        chain = [index]
        while tree[chain[-1]][1] is not None:
            chain.append(tree[chain[-1]][1])  # type: ignore[arg-type]
        return chain[::-1]

    groups: dict[tuple[Any, ...], list[tuple[int, onnx.TensorProto]]] = {}
    for index, (graph, _parent) in enumerate(tree):
        for tensor in graph.initializer:
            if tensor.name in protected or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            value = numpy_helper.to_array(tensor)
            if value.nbytes < min_bytes:
                continue
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha1(value.tobytes()).digest())
            groups.setdefault(key, []).append((index, tensor))
    renames: dict[int, dict[str, str]] = {}
    removed: dict[int, set[str]] = {}
    saved, merged = 0, 0
    for members in groups.values():
        if len(members) < 2:
            continue
        chains = [ancestors(index) for index, _ in members]
        keeper_graph = chains[0][0]
        for level in zip(*chains):
            if any(g != level[0] for g in level):
                break
            keeper_graph = level[0]
        keep_index, keep = next(((i, t) for i, t in members if i == keeper_graph), members[0])
        if keep_index != keeper_graph:
            moved = onnx.TensorProto()
            moved.CopyFrom(keep)
            tree[keeper_graph][0].initializer.append(moved)
            removed.setdefault(keep_index, set()).add(keep.name)
        for index, tensor in members:
            if tensor is keep:
                continue
            removed.setdefault(index, set()).add(tensor.name)
            renames.setdefault(index, {})[tensor.name] = keep.name
            saved += numpy_helper.to_array(tensor).nbytes
            merged += 1
    if not merged:
        return []
    for index, names in removed.items():
        graph = tree[index][0]
        kept = [t for t in graph.initializer if t.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if tree[index][1] is not None:  # old IRs list a subgraph's initializers as its inputs
            inputs = [i for i in graph.input if i.name not in names]
            del graph.input[:]
            graph.input.extend(inputs)
    for index, mapping in renames.items():
        for sub_index, _ in enumerate(tree):
            if index not in ancestors(sub_index):
                continue
            graph = tree[sub_index][0]
            for node in graph.node:
                for position, name in enumerate(node.input):
                    if name in mapping:
                        node.input[position] = mapping[name]
            if sub_index != 0:
                for output in graph.output:
                    if output.name in mapping:
                        output.name = mapping[output.name]
    return [f"stored {merged} duplicate weights once ({saved} B saved)"]
