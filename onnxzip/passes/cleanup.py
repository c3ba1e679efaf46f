"""The cleanup pass: dead nodes and unused initializers removed, weights held in ``Constant``
nodes or constant chains turned into initializers, nodes topologically sorted, stale
``value_info`` dropped, and graph output shapes that contradict what onnxruntime really
produces corrected.

ONNX shape inference can be wrong on real files, so it is never trusted blindly: with
``shape_inference=true`` the inferred intermediate shapes are kept only where they agree with
the shapes observed in an onnxruntime run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.core.compat import iter_graphs
from onnxzip.core.graph import export_model, import_graph, tidy
from onnxzip.core.layout import collapse_layout_chains
from onnxzip.core.tables import regenerate_sinusoids
from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, register_pass
from onnxzip.core.schema import option
from onnxzip.core.weights import materialize_weights


@dataclass
class CleanupConfig:
    fold_weights: bool = option(True, "turn Constant nodes and constant chains feeding weights into initializers")
    fix_output_shapes: bool = option(True, "correct declared output shapes that onnxruntime contradicts")
    collapse_layout: bool = option(
        True, "replace each chain of layout-only nodes (Squeeze, Unsqueeze, Reshape, Flatten, Identity, a "
              "Transpose that only moves axes of size 1) between tensors of static shape by one Reshape, or by "
              "none where its ends have the same shape: exact, fewer nodes per run (dtln_stage1: 36 -> 20 nodes, "
              "1.11x the speed a frame)")
    sinusoids: bool = option(
        True, "store sinusoidal position-encoding tables (sin/cos of position x frequency, interleaved or in "
              "halves, 1024 values or more) as the nodes computing them from their frequencies, which onnxruntime "
              "folds at load; only where the float32 recomputation is within 2e-4 of the table (khmersm's 2048x192 "
              "table: 1.5 MB of its 2.2 MB 4-bit file)")
    shape_inference: bool = option(False, "store inferred intermediate shapes that onnxruntime confirms")
    short_names: bool = option(
        False, "rename nodes, initializers and intermediate tensors to short names (n12, t34); the graph's "
               "inputs and outputs keep theirs. Saves the bytes long exported names take (captcha_crnn at 3 bits: "
               "12% of the file), but the report's layer names no longer appear in the output")
    half_small: bool = option(
        False, "store the main graph's small float32 initializers (64 to 65536 values: biases, normalization "
               "parameters, raw small weights; not codebooks) as float16 behind a Cast that onnxruntime folds at "
               "load, where float16 holds every value within 1e-3 relative (measured per tensor). Saves 2 bytes per "
               "value: a few percent of a small compressed file")


@register_pass
class CleanupPass(Pass):
    name = "cleanup"
    config_class = CleanupConfig
    weight_only = True
    reduces_bytes = False
    summary = "Remove dead nodes and unused initializers, fold constant weight chains, sort, fix shapes."

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        report = self.new_report()
        graph = import_graph(model)
        nodes_before = _count_nodes(model)
        if self.config.fold_weights:
            report.notes.extend(materialize_weights(graph))
        tidy(graph)
        new_model = export_model(graph, model)
        if self.config.sinusoids:
            report.notes.extend(regenerate_sinusoids(new_model))
        if self.config.collapse_layout:
            chains, dropped = collapse_layout_chains(new_model, context.shapes(new_model))
            if chains:
                report.notes.append(f"collapse_layout: {chains} chains of layout-only nodes became one Reshape "
                                    f"or none, {dropped} nodes fewer")
        live = _tensor_names(new_model.graph)
        kept_info = [vi for vi in new_model.graph.value_info if vi.name in live]
        del new_model.graph.value_info[:]
        new_model.graph.value_info.extend(kept_info)
        shapes = context.shapes(new_model)
        if self.config.fix_output_shapes:
            report.notes.extend(_fix_output_shapes(new_model, shapes))
        if self.config.shape_inference:
            report.notes.append(_confirmed_shape_inference(new_model, shapes))
        if self.config.half_small:
            before = new_model.ByteSize()
            halved = store_half(new_model)
            report.notes.append(f"half_small: {halved} initializers stored as float16, "
                                f"{before - new_model.ByteSize():,} bytes saved")
        if self.config.short_names:
            before = new_model.ByteSize()
            renamed = shorten_names(new_model)
            report.notes.append(f"short_names: {renamed} names shortened, {before - new_model.ByteSize():,} bytes saved")
        removed = nodes_before - _count_nodes(new_model)
        unused = len(model.graph.initializer) - len(new_model.graph.initializer)
        if removed or unused:
            report.notes.append(f"removed {removed} nodes and {max(unused, 0)} initializers")
        report.modified = new_model.SerializeToString() != model.SerializeToString() if model.ByteSize() < 2**28 else True
        return PassResult(new_model, report, plan)



HALF_SIZES = (64, 1 << 16)  # half_small: the initializers considered, by element count
HALF_RTOL = 1e-3


def _half_ok(values: np.ndarray) -> bool:
    """Whether float16 holds ``values`` within :data:`HALF_RTOL` relative (values below float16's
    normal range within that fraction of the tensor's largest magnitude)."""
    if not np.all(np.isfinite(values)) or np.max(np.abs(values)) >= 65504:
        return False
    error = np.abs(values.astype(np.float16).astype(np.float64) - values)
    bound = HALF_RTOL * np.maximum(np.abs(values), np.max(np.abs(values)) * 1e-2)
    return bool(np.all(error <= bound))


def store_half(model: onnx.ModelProto) -> int:
    """Store the main graph's small float32 initializers as float16, each behind a Cast to
    float32 that takes its name (so every reader is unchanged and onnxruntime folds the Cast at
    load). Left as they are: graph inputs and outputs, tensors read inside subgraphs, codebooks
    and value tables (the first input of a Gather) and channel scales (what the cluster pass's decodes
    read back), and tensors float16 would round by more than :data:`HALF_RTOL`. Returns how many
    were stored."""
    graph = model.graph
    kept = {i.name for i in graph.input} | {o.name for o in graph.output}  # the interface
    kept |= {name for sub in list(iter_graphs(graph))[1:] for node in sub.node for name in node.input}  # nested reads
    kept |= {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input}
    kept |= {t.name for t in graph.initializer if t.name.endswith("channel_scale")}  # read back with their decode
    taken = _all_names(graph)
    casts, halved = [], 0
    for index, tensor in enumerate(graph.initializer):
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if (tensor.data_type != onnx.TensorProto.FLOAT or not HALF_SIZES[0] <= count <= HALF_SIZES[1]
                or tensor.name in kept or tensor.data_location == onnx.TensorProto.EXTERNAL):
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64)
        if not _half_ok(values):
            continue
        original = tensor.name
        name = original + "_f16"
        while name in taken:
            name += "_"
        taken.add(name)
        graph.initializer[index].CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
        casts.append(helper.make_node("Cast", [name], [original], name=f"{original}_cast", to=onnx.TensorProto.FLOAT))
        halved += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return halved


def shorten_names(model: onnx.ModelProto) -> int:
    """Give every node a short name, and every tensor a graph defines that is not one of its
    inputs or outputs (initializers included) a short one, everywhere it is read: in its graph and,
    by outer-scope reference, in nested bodies (If/Loop/Scan). The main graph's inputs and outputs
    keep their names; new names are unique across all graphs. Returns how many names changed."""
    taken = {name for g in iter_graphs(model.graph) for name in _all_names(g)}
    counter = iter(range(1 << 62))

    def fresh(prefix: str) -> str:
        while True:
            name = f"{prefix}{next(counter)}"
            if name not in taken:
                taken.add(name)
                return name

    def scope(graph: onnx.GraphProto, outer: dict[str, str]) -> int:
        interface = {i.name for i in graph.input} | {o.name for o in graph.output}
        own = _tensor_names(graph)  # its own names shadow an outer tensor of the same name
        local = sorted(({t.name for t in graph.initializer} | {o for n in graph.node for o in n.output})
                       - interface - {""})
        mapping = {k: v for k, v in outer.items() if k not in own}
        mapping.update({name: fresh("t") for name in local})
        changed = len(local)
        for tensor in graph.initializer:
            tensor.name = mapping.get(tensor.name, tensor.name)
        for info in graph.value_info:
            info.name = mapping.get(info.name, info.name)
        for node in graph.node:
            for index, name in enumerate(node.input):
                node.input[index] = mapping.get(name, name)
            for index, name in enumerate(node.output):
                node.output[index] = mapping.get(name, name)
            if node.name:
                node.name = fresh("n")
                changed += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    changed += scope(attribute.g, mapping)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    changed += sum(scope(sub, mapping) for sub in attribute.graphs)
        return changed

    return scope(model.graph, {})


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = _tensor_names(graph) | {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.add(node.name)
    return names


def _count_nodes(model: onnx.ModelProto) -> int:
    return sum(len(graph.node) for graph in iter_graphs(model.graph))


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
    return names


def _fix_output_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Replace declared output dims that disagree with the observed batch-1 run.

    The result is always a valid declaration: axis 0 becomes the symbol 'batch'; another axis
    takes the observed size when every non-batch input dim is fixed (the size cannot depend on
    the probe's choices), else a fresh symbol. A wrong rank is redeclared the same way, axis by
    axis, so the type keeps a shape (old IRs require one on graph outputs)."""
    notes = []
    reliable = _non_batch_dims_fixed(model)
    for output in model.graph.output:
        observed = shapes.get(output.name)
        tensor_type = output.type.tensor_type
        if observed is None or not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if len(dims) != len(observed):
            old = [d.dim_param or d.dim_value for d in dims]
            tensor_type.shape.ClearField("dim")
            for axis, size in enumerate(observed):
                _set_dim(tensor_type.shape.dim.add(), output.name, axis, size, reliable)
            new = [d.dim_param or d.dim_value for d in dims]
            notes.append(f"output '{output.name}': declared {old} but onnxruntime gives rank {len(observed)}; "
                         f"declared {new}")
            continue
        for axis, (dim, size) in enumerate(zip(dims, observed)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                old = dim.dim_value
                _set_dim(dim, output.name, axis, size, reliable)
                notes.append(f"output '{output.name}' axis {axis}: declared {old}, onnxruntime gives {size}; "
                             f"declared {dim.dim_param or dim.dim_value}")
    return notes


def _set_dim(dim: onnx.TensorShapeProto.Dimension, output: str, axis: int, size: int, reliable: bool) -> None:
    if axis == 0:
        dim.dim_param = "batch"
    elif reliable:
        dim.dim_value = size
    else:
        dim.dim_param = f"{output}_dim{axis}"


def _non_batch_dims_fixed(model: onnx.ModelProto) -> bool:
    """True when every input dim after axis 0 has a fixed size."""
    from onnxzip.core.inputs import graph_inputs

    return all(
        d.HasField("dim_value") and d.dim_value > 0
        for info in graph_inputs(model)
        for d in list(info.type.tensor_type.shape.dim)[1:]
    )


def _confirmed_shape_inference(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> str:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - inference is best effort
        return f"shape inference failed ({str(exc).splitlines()[0]}); no shapes stored"
    keep, dropped = [], 0
    for info in inferred.graph.value_info:
        observed = shapes.get(info.name)
        dims = info.type.tensor_type.shape.dim
        agrees = observed is not None and len(dims) == len(observed) and all(
            not d.HasField("dim_value") or d.dim_value == s or axis == 0
            for axis, (d, s) in enumerate(zip(dims, observed))
        )
        if agrees:
            keep.append(info)
        else:
            dropped += 1
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return f"shape inference: kept {len(keep)} shapes, dropped {dropped} not confirmed by onnxruntime"
