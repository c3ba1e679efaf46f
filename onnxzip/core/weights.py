"""Weight discovery.

A *weight* is a constant float tensor feeding a weight input (Conv W, the constant operand of
MatMul/Gemm, LSTM/GRU/RNN W and R, an embedding table, ...), wherever it lives: an initializer,
a ``Constant`` node, the end of a constant-only chain (Transpose, Slice, Concat, Unsqueeze,
Reshape, ...) or inside ``If``/``Loop``/``Scan`` bodies. A tensor shared by several nodes is one
weight with several uses. Integer weights of already-quantized models (QDQ, QOperator,
MatMulInteger, ConvInteger) are recognised and reported, never rewritten.

:func:`materialize_weights` turns every discovered float weight into a plain initializer
(``gs.Constant``) so passes only ever deal with one form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxzip.core.graph import NameScope, constant_chain, constant_value, walk_nodes

# op type -> [(input index, role)]; the roles later passes look for.
WEIGHT_INPUTS: dict[str, tuple[tuple[int, str], ...]] = {
    "Conv": ((1, "weight"), (2, "bias")),
    "ConvTranspose": ((1, "weight"), (2, "bias")),
    "Gemm": ((0, "weight"), (1, "weight"), (2, "bias")),
    "MatMul": ((0, "weight"), (1, "weight")),
    "LSTM": ((1, "input_weight"), (2, "recurrent_weight"), (3, "bias")),
    "GRU": ((1, "input_weight"), (2, "recurrent_weight"), (3, "bias")),
    "RNN": ((1, "input_weight"), (2, "recurrent_weight"), (3, "bias")),
    "Gather": ((0, "embedding"),),
    "BatchNormalization": ((1, "norm_scale"), (2, "norm_bias"), (3, "norm_mean"), (4, "norm_var")),
    "LayerNormalization": ((1, "norm_scale"), (2, "norm_bias")),
    "InstanceNormalization": ((1, "norm_scale"), (2, "norm_bias")),
}
# Integer weights of quantized models: op type -> input indices holding quantized weights.
QUANTIZED_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "QLinearConv": (3,),
    "QLinearMatMul": (3,),
    "MatMulInteger": (1,),
    "ConvInteger": (1,),
    "DequantizeLinear": (0,),
    "QGemm": (3,),
    "MatMulNBits": (1,),
}
WEIGHT_ROLES = frozenset({"weight", "input_weight", "recurrent_weight", "embedding"})


@dataclass
class WeightUse:
    """One place a weight is consumed."""

    node: str
    op_type: str
    input_index: int
    role: str
    graph_path: str = ""


@dataclass
class Weight:
    """A constant tensor feeding weight inputs; ``origin`` says where its value comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    origin: str
    uses: list[WeightUse] = field(default_factory=list)
    quantized: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def is_float(self) -> bool:
        return np.issubdtype(np.dtype(self.dtype), np.floating)

    @property
    def roles(self) -> set[str]:
        return {use.role for use in self.uses}

    @property
    def graph_path(self) -> str:
        return self.uses[0].graph_path if self.uses else ""

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "origin": self.origin,
            "quantized": self.quantized,
            "uses": [use.__dict__ for use in self.uses],
        }


@dataclass
class WeightTable:
    """All weights of a model plus notes (quantized model, folded chains, ...)."""

    weights: list[Weight]
    notes: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Weight]:
        return {w.name: w for w in self.weights}

    def float_weights(self, roles: frozenset[str] = WEIGHT_ROLES) -> list[Weight]:
        return [w for w in self.weights if w.is_float and not w.quantized and w.roles & roles]


def _constant_input(node: gs.Node, index: int) -> tuple[gs.Tensor, np.ndarray] | None:
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    tensor = node.inputs[index]
    value = constant_value(tensor)
    return None if value is None else (tensor, value)


def _float_roles(node: gs.Node) -> list[tuple[int, str]]:
    """Weight inputs of ``node`` that are constant, with MatMul/Gemm's either-side rule."""
    slots = WEIGHT_INPUTS.get(node.op, ())
    if (node.domain or "") not in ("", "ai.onnx"):
        return []
    if node.op in ("MatMul", "Gemm"):
        constant = [i for i in (0, 1) if _constant_input(node, i) is not None]
        if len(constant) != 1:  # both constant: a constant subexpression, not a layer
            return [(i, r) for i, r in slots if i == 2]
        return [(i, r) for i, r in slots if i == constant[0] or i == 2]
    if node.op == "Gather":
        indices = _constant_input(node, 1)
        return [] if indices is not None else list(slots)
    return list(slots)


def discover_weights(graph: gs.Graph) -> WeightTable:
    """Find every weight of ``graph`` (and its subgraphs)."""
    found: dict[str, Weight] = {}
    quantized_nodes = 0
    for node, _owner, path in walk_nodes(graph):
        if node.op in QUANTIZED_WEIGHT_INPUTS:
            quantized_nodes += 1
            for index in QUANTIZED_WEIGHT_INPUTS[node.op]:
                hit = _constant_input(node, index)
                if hit is not None and not np.issubdtype(hit[1].dtype, np.floating):
                    _record(found, node, index, "quantized_weight", path, *hit, quantized=True)
            continue
        for index, role in _float_roles(node):
            hit = _constant_input(node, index)
            if hit is not None:
                _record(found, node, index, role, path, *hit, quantized=False)
    notes = []
    if quantized_nodes:
        count = sum(1 for w in found.values() if w.quantized)
        notes.append(
            f"already-quantized model: {quantized_nodes} quantized nodes, {count} integer weights "
            "left as they are"
        )
    folded = [w for w in found.values() if not w.origin.startswith("initializer")]
    if folded:
        notes.append(f"{len(folded)} weights come from Constant nodes or constant chains")
    return WeightTable(list(found.values()), notes)


def _record(found, node, index, role, path, tensor, value, *, quantized: bool) -> None:
    weight = found.get(tensor.name)
    if weight is None:
        weight = Weight(
            name=tensor.name,
            shape=tuple(int(d) for d in value.shape),
            dtype=str(value.dtype),
            origin=" ← ".join(constant_chain(tensor)),
            quantized=quantized,
        )
        found[tensor.name] = weight
    weight.uses.append(WeightUse(node.name, node.op, index, role, path))


def materialize_weights(graph: gs.Graph) -> list[str]:
    """Replace every weight that is not already an initializer by one holding its folded value.

    Returns one note per materialized weight. The now-dead ``Constant`` nodes and chains are left
    for ``graph.cleanup()``. Graph outputs are never touched. A chain that reads a large tensor
    other nodes read too (a tied embedding: ``Gather(E)`` and ``MatMul(h, Transpose(E))``) is
    left as it is: folding it would store the tensor twice, and compressing ``E`` once serves both.
    """
    notes: list[str] = []
    names = NameScope(graph)
    outputs = {t.name for t in graph.outputs}
    found: list[tuple[gs.Node, int, gs.Tensor]] = []
    values: dict[int, np.ndarray] = {}
    for node, _owner, _path in walk_nodes(graph):
        for index, _role in _float_roles(node):
            if index >= len(node.inputs):
                continue
            tensor = node.inputs[index]
            if isinstance(tensor, gs.Constant) or not tensor.name or tensor.name in outputs:
                continue
            if id(tensor) not in values:
                value = constant_value(tensor)
                if value is None:
                    continue
                values[id(tensor)] = value
            found.append((node, index, tensor))
    chains = {id(t): _chain(t) for _, _, t in found}
    folded = set().union(*(nodes for nodes, _ in chains.values()))  # the nodes that die once all are folded
    replaced: dict[int, gs.Constant | None] = {}
    for node, index, tensor in found:
        key = id(tensor)
        if key not in replaced:
            origin = " ← ".join(constant_chain(tensor))
            shared = next((s.name for s in chains[key][1] if s.values.nbytes >= SHARED_BYTES
                           and any(id(reader) not in folded for reader in s.outputs)), None)
            if shared is not None:
                replaced[key] = None
                notes.append(f"{tensor.name}: left as {origin}, not folded into an initializer: other nodes read "
                             f"'{shared}' too, which would then be stored twice")
            else:
                replaced[key] = gs.Constant(names.fresh(f"{tensor.name}_const"), np.ascontiguousarray(values[key]))
                notes.append(f"{tensor.name}: folded {origin} into an initializer")
        if replaced[key] is not None:
            node.inputs[index] = replaced[key]
    return notes


SHARED_BYTES = 4096  # a chain's source at least this large, read elsewhere too, is not folded into a copy


def _chain(tensor: gs.Tensor) -> tuple[set[int], list[gs.Constant]]:
    """The nodes (ids) of the constant chain computing ``tensor`` and the constants it reads."""
    chain: set[int] = set()
    sources: list[gs.Constant] = []
    pending = [tensor]
    while pending:
        current = pending.pop()
        if isinstance(current, gs.Constant):
            sources.append(current)
            continue
        if not current.inputs:
            continue
        producer = current.inputs[0]
        if id(producer) in chain:
            continue
        chain.add(id(producer))
        pending.extend(t for t in producer.inputs if t.name)
    return chain, sources


def constant_uses(graph: gs.Graph) -> dict[str, tuple[gs.Constant, list[tuple[gs.Node, gs.Graph]]]]:
    """Initializer name → (its one ``gs.Constant``, [(consumer node, graph holding it)]).

    Names held by several different constants (shadowing in subgraphs) and constants that are
    also graph outputs are left out: rewriting them is not safe."""
    found: dict[str, tuple[gs.Constant, list[tuple[gs.Node, gs.Graph]]]] = {}
    unsafe: set[str] = set()
    outputs: set[str] = set()
    for node, owner, _path in walk_nodes(graph):
        outputs.update(t.name for t in owner.outputs)
        for tensor in node.inputs:
            if not isinstance(tensor, gs.Constant) or not tensor.name:
                continue
            entry = found.setdefault(tensor.name, (tensor, []))
            if entry[0] is not tensor:
                unsafe.add(tensor.name)
            elif not any(n is node for n, _ in entry[1]):
                entry[1].append((node, owner))
    outputs.update(t.name for t in graph.outputs)
    return {name: entry for name, entry in found.items() if name not in unsafe | outputs}
