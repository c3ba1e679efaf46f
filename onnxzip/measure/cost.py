"""Parameter and FLOP counting per node.

FLOPs are counted per input sample (batch dimension 1) as 2 × multiply-accumulates of the
matrix-like ops: Conv, ConvTranspose, Gemm, MatMul (weight × activation and activation ×
activation, i.e. attention), LSTM, GRU, RNN. Element-wise ops are not counted (they are a small
share of these models and not what compression changes). Parameters are the elements of the
constant float tensors a node consumes; a shared tensor counts once at model level.

Shapes come from running the model once in onnxruntime at batch 1 and recording every
intermediate tensor's shape (declared shapes in real files can be wrong); ONNX shape inference
fills in what the run cannot see (tensors inside subgraphs).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.core.graph import FOLDABLE_OPS, constant_value, import_graph, subgraphs_of, walk_nodes

log = logging.getLogger(__name__)

COUNTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"})


@dataclass
class NodeCost:
    name: str
    op_type: str
    params: int
    flops: int


@dataclass
class ModelCost:
    """Per-node costs plus model totals (unique parameters, FLOPs per sample)."""

    nodes: list[NodeCost] = field(default_factory=list)
    params: int = 0
    flops: int = 0
    shapes_known: bool = True
    unmeasured: list[str] = field(default_factory=list)  # counted nodes whose FLOPs are unknown

    def by_node(self) -> dict[str, NodeCost]:
        return {n.name: n for n in self.nodes}

    def by_op_type(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for node in self.nodes:
            row = table.setdefault(node.op_type, {"count": 0, "params": 0, "flops": 0})
            row["count"] += 1
            row["params"] += node.params
            row["flops"] += node.flops
        return table


def observed_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of all main-graph tensors, observed in onnxruntime on ``feeds`` (batch-1 inputs
    generated from the signature when omitted), completed by ONNX shape inference."""
    from onnxzip.core.runtime import make_session, run_session
    from onnxzip.core.shapes import generated_feeds

    shapes: dict[str, tuple[int, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False) if model.ByteSize() < 2**31 - 1 else model
        for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            dims = info.type.tensor_type.shape.dim
            if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                shapes[info.name] = tuple(d.dim_value for d in dims)
    except Exception:  # noqa: BLE001 - shape inference is best effort on real files
        log.debug("ONNX shape inference failed", exc_info=True)
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    names = []
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in existing:
                names.append(out)
                existing.add(out)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    del probe.graph.value_info[:]
    try:
        if feeds is None:
            feeds = generated_feeds(model, batch=1, seed=0, probe=False)[0]
        shapes.update({name: tuple(np.shape(value)) for name, value in feeds.items()})
        session = make_session(probe, "cpu", optimization="disabled")
        for name, value in run_session(session, feeds).items():
            shapes[name] = tuple(int(d) for d in np.shape(value))
    except Exception:  # noqa: BLE001 - fall back to inferred shapes
        log.info("could not run the model to observe shapes; FLOPs use ONNX shape inference", exc_info=True)
    return shapes


def _shape(tensor: gs.Tensor, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    if tensor.name in shapes:
        return shapes[tensor.name]
    if tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape):
        return tuple(tensor.shape)
    if tensor.inputs and (tensor.inputs[0].op == "Constant" or tensor.inputs[0].op in FOLDABLE_OPS):
        # A Constant node or a constant chain (inside If branches no run observes): fold it.
        value = constant_value(tensor)
        if value is not None:
            return tuple(int(d) for d in value.shape)
    return None


def node_flops(node: gs.Node, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """FLOPs (2 × MACs) of one node for one sample, or None when shapes are unknown."""
    op = node.op
    ins = [(_shape(t, shapes) if t.name else None) for t in node.inputs]
    out = _shape(node.outputs[0], shapes) if node.outputs else None
    if op == "Conv":
        if out is None or ins[1] is None:
            return None
        _cout, cin_per_group, *kernel = ins[1]
        return 2 * int(np.prod(out, dtype=np.int64)) * cin_per_group * int(np.prod(kernel, dtype=np.int64))
    if op == "ConvTranspose":
        if ins[0] is None or ins[1] is None:
            return None
        cin, cout_per_group, *kernel = ins[1]
        macs = int(np.prod(ins[0][2:], dtype=np.int64)) * cin * cout_per_group * int(np.prod(kernel, dtype=np.int64))
        return 2 * macs
    if op in ("MatMul", "Gemm"):
        if out is None or ins[0] is None:
            return None
        a = ins[0]
        inner = a[0] if op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
        return 2 * int(np.prod(out, dtype=np.int64)) * int(inner)
    if op in ("LSTM", "GRU", "RNN"):
        if ins[0] is None or ins[1] is None:
            return None
        seq = ins[0][0] if node.attrs.get("layout", 0) == 0 else ins[0][1]
        directions, gates_hidden, input_size = ins[1]
        hidden = int(node.attrs.get("hidden_size", gates_hidden // {"LSTM": 4, "GRU": 3, "RNN": 1}[op]))
        return 2 * directions * seq * gates_hidden * (input_size + hidden)
    return 0


def _constant_derived(tensor: gs.Tensor, memo: dict[str, bool]) -> bool:
    """True when ``tensor`` is computed from constants only (a folded chain, a codebook decode)."""
    if isinstance(tensor, gs.Constant):
        return True
    if tensor.name in memo:
        return memo[tensor.name]
    memo[tensor.name] = False  # cycles (loop-carried values) are not constant
    producers = tensor.inputs
    result = len(producers) == 1 and not subgraphs_of(producers[0]) and all(
        _constant_derived(t, memo) for t in producers[0].inputs if t.name
    ) and (producers[0].op == "Constant" or any(t.name for t in producers[0].inputs))
    memo[tensor.name] = result
    return result


def _float_size(tensor: gs.Tensor, shapes: dict[str, tuple[int, ...]]) -> int:
    if isinstance(tensor, gs.Constant):
        value = tensor.values
        return int(value.size) if np.issubdtype(value.dtype, np.floating) and value.size > 1 else 0
    dtype = tensor.dtype
    if dtype is None and tensor.inputs and tensor.inputs[0].op in FOLDABLE_OPS | {"Constant"}:
        value = constant_value(tensor)  # a Constant node or chain: its value says the dtype
        if value is not None:
            return int(value.size) if np.issubdtype(value.dtype, np.floating) and value.size > 1 else 0
    shape = _shape(tensor, shapes)
    floating = dtype is None or np.issubdtype(np.dtype(dtype), np.floating)
    size = int(np.prod(shape, dtype=np.int64)) if shape is not None else 0
    return size if floating and size > 1 else 0


def model_cost(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> ModelCost:
    """Per-node parameters and FLOPs, plus totals, for ``model``.

    A node's parameters are the elements of its float inputs that are constant or computed
    from constants only (so a weight stored as codebook + indices still counts as the weight
    it decodes to); nodes whose inputs are all constant (the decode itself) count none.
    """
    graph = import_graph(model)
    if shapes is None:
        shapes = observed_shapes(model)
    cost = ModelCost()
    seen: set[str] = set()
    memo: dict[str, bool] = {}
    for node, _owner, _path in walk_nodes(graph):
        named = [t for t in node.inputs if t.name]
        constant = [t for t in named if _constant_derived(t, memo)]
        params = 0
        if len(constant) < len(named) or subgraphs_of(node):
            for tensor in constant:
                size = _float_size(tensor, shapes)
                params += size
                if size and tensor.name not in seen:
                    seen.add(tensor.name)
                    cost.params += size
        flops = node_flops(node, shapes) if node.op in COUNTED_OPS else 0
        if flops is None:
            cost.shapes_known = False
            cost.unmeasured.append(node.name or node.op)
            flops = 0
        cost.flops += flops
        cost.nodes.append(NodeCost(node.name, node.op, params, flops))
    return cost
