"""Target compatibility: every model onnxzip writes must load in onnxruntime 1.19 and the newest.

onnxruntime 1.19 loads IR version ≤ 10 and default-domain opset ≤ 21. onnx ≥ 1.18 stamps a newer
IR by default, so before saving we set ``ir_version`` to the *lowest* IR that supports the
model's opsets and tensor types, and refuse what cannot be made compatible.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper

from onnxzip.errors import UnsupportedModelError

MAX_IR_VERSION = 10
MAX_OPSET = {"": 21, "ai.onnx": 21, "ai.onnx.ml": 5, "ai.onnx.training": 1, "com.microsoft": 1}
# Element types introduced after IR 3: (first IR that has them).
_TYPE_MIN_IR = {
    TensorProto.FLOAT8E4M3FN: 9,
    TensorProto.FLOAT8E4M3FNUZ: 9,
    TensorProto.FLOAT8E5M2: 9,
    TensorProto.FLOAT8E5M2FNUZ: 9,
    TensorProto.UINT4: 10,
    TensorProto.INT4: 10,
}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ("" / "ai.onnx") opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise UnsupportedModelError("The model declares no default ONNX opset (opset_import is empty).")


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from iter_graphs(sub)


def node_subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read by the nodes of the subgraphs of ``node`` (an If/Loop/Scan's implicit inputs)."""
    names: set[str] = set()
    for attribute in node.attribute:
        subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for sub in subs:
            for inner in iter_graphs(sub):
                for n in inner.node:
                    names.update(n.input)
    return names


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of every subgraph nested in ``graph``'s nodes."""
    return set().union(*(node_subgraph_reads(node) for node in graph.node))


def _min_ir_for_types(model: onnx.ModelProto) -> int:
    needed = 3
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            needed = max(needed, _TYPE_MIN_IR.get(tensor.data_type, 3))
    return needed


CONVERTED_KEY = "onnxzip.converted_from_opset"  # metadata a loaded model carries until compress reports it


def convert_to_supported_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when onnxruntime 1.19 loads its default opset, else the model converted
    down to opset 21 by ``onnx.version_converter`` (where every op it uses has an opset-21 form:
    opset 22 only added types to most ops), with :data:`CONVERTED_KEY` in its metadata. A model
    that cannot be converted (an op new in its opset, such as ``Attention`` in 23) raises
    :class:`UnsupportedModelError` naming why."""
    opset, target = default_opset(model), MAX_OPSET[""]
    if opset <= target:
        return model
    from onnx import version_converter

    known = onnx.defs.onnx_opset_version()
    if opset > known:
        raise UnsupportedModelError(
            f"The model uses ONNX opset {opset}, newer than this onnx package knows ({known}); onnxruntime 1.19 "
            f"supports at most opset {target}: re-export it with opset ≤ {target}.")

    try:
        converted = version_converter.convert_version(model, target)
        if converted.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter's C++ assertions arrive as RuntimeError
        text = " ".join(str(exc).split())
        reason = text.rsplit("failed: ", 1)[-1].rsplit("] ", 1)[-1][:200]
        raise UnsupportedModelError(
            f"The model uses ONNX opset {opset}, but onnxruntime 1.19 supports at most opset {target}, and "
            f"onnx.version_converter cannot convert it to opset {target} ({reason}); re-export it with "
            f"opset ≤ {target}.") from exc
    entry = next((p for p in converted.metadata_props if p.key == CONVERTED_KEY), None) or converted.metadata_props.add()
    entry.key, entry.value = CONVERTED_KEY, str(opset)
    return converted


def pop_conversion_note(model: onnx.ModelProto) -> str | None:
    """The note of :func:`convert_to_supported_opset`'s conversion, removed from ``model``'s
    metadata (so no output carries it); None when the model was not converted."""
    for index, entry in enumerate(model.metadata_props):
        if entry.key == CONVERTED_KEY:
            opset = entry.value
            del model.metadata_props[index]
            return (f"converted from ONNX opset {opset} to {MAX_OPSET['']} with onnx.version_converter "
                    f"(onnxruntime 1.19 loads at most opset {MAX_OPSET['']}); the output is at opset {MAX_OPSET['']}")
    return None


def check_opsets(model: onnx.ModelProto) -> None:
    """Raise :class:`UnsupportedModelError` when an opset is newer than onnxruntime 1.19 loads."""
    opset = default_opset(model)
    if opset > MAX_OPSET[""]:
        raise UnsupportedModelError(
            f"The model uses ONNX opset {opset}, but onnxruntime 1.19 supports at most opset "
            f"{MAX_OPSET['']}; re-export it with opset ≤ {MAX_OPSET['']}."
        )
    if opset < 7:
        raise UnsupportedModelError(
            f"The model uses ONNX opset {opset}; onnxzip supports opset 7 to {MAX_OPSET['']} "
            "(convert it with onnx.version_converter first)."
        )
    for entry in model.opset_import:
        limit = MAX_OPSET.get(entry.domain)
        if limit is not None and entry.version > limit:
            raise UnsupportedModelError(
                f"The model uses opset {entry.version} of domain '{entry.domain}', newer than "
                f"onnxruntime 1.19 supports ({limit})."
            )


def required_ir_version(model: onnx.ModelProto) -> int:
    """Lowest IR version that supports the model's opsets and element types."""
    opsets = [
        helper.make_opsetid(entry.domain, entry.version)
        for entry in model.opset_import
        if entry.domain in ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training")
    ]
    ir = helper.find_min_ir_version_for(opsets, ignore_unknown=True) if opsets else 3
    if len(model.functions) > 0:
        ir = max(ir, 8)
    inputs = {i.name for i in model.graph.input}
    if any(t.name not in inputs for t in model.graph.initializer):
        ir = max(ir, 4)  # IR 3 requires every initializer to be listed as a graph input
    return max(ir, _min_ir_for_types(model))


def compatible_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR the model's content needs; refuses models onnxruntime 1.19 cannot load."""
    check_opsets(model)
    ir = required_ir_version(model)
    if ir > MAX_IR_VERSION:
        raise UnsupportedModelError(
            f"The model needs ONNX IR version {ir}, but onnxruntime 1.19 loads at most IR "
            f"{MAX_IR_VERSION}."
        )
    return ir


def make_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set ``model.ir_version`` in place to the lowest IR its content needs; refuse too-new models."""
    model.ir_version = compatible_ir_version(model)
    return model


@contextlib.contextmanager
def ir_version_as(model: onnx.ModelProto, ir_version: int) -> Iterator[onnx.ModelProto]:
    """``model`` with ``ir_version`` for the duration of the block (to serialize or save it),
    the caller's value restored afterwards."""
    original = model.ir_version
    model.ir_version = ir_version
    try:
        yield model
    finally:
        model.ir_version = original
