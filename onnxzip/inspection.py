"""``onnxzip inspect``: what a model is made of and what onnxzip could do with it."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxzip.measure.cost import model_cost, observed_shapes
from onnxzip.core.graph import import_graph, walk_nodes
from onnxzip.errors import DataError, InvalidModelError, NativeCrashError
from onnxzip.core.io import load_model
from onnxzip.passes import PASSES
from onnxzip.core.sanity import probe_in_child
from onnxzip.core.report import human_bytes, human_count, render_table
from onnxzip.core.shapes import generated_feeds
from onnxzip.core.weights import discover_weights


def _signature(values: Any) -> list[dict[str, Any]]:
    rows = []
    for info in values:
        tensor = info.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
        rows.append({"name": info.name, "dtype": dtype, "shape": dims})
    return rows


DEFAULT_DOMAIN = "ai.onnx"


@dataclass
class Inspection:
    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_histogram: dict[str, int]
    by_op_type: dict[str, dict[str, int]]
    params: int
    flops: int
    size_bytes: int
    flops_unmeasured: int = 0  # counted nodes whose FLOPs could not be measured
    weights: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def _flops_text(self) -> str:
        if not self.flops_unmeasured:
            return human_count(self.flops)
        if not self.flops:
            return f"not measured ({self.flops_unmeasured} nodes with unknown shapes)"
        return f"≥ {human_count(self.flops)} ({self.flops_unmeasured} nodes not measured)"

    def text(self) -> str:
        lines = [
            f"model: {self.path}",
            f"IR {self.ir_version}, opsets {', '.join(f'{d or DEFAULT_DOMAIN}={v}' for d, v in self.opsets.items())}, "
            f"producer {self.producer or '?'}, {human_bytes(self.size_bytes)}",
            f"parameters {human_count(self.params)}, FLOPs/sample {self._flops_text()}",
        ]
        if self.metadata:
            lines.append("metadata: " + ", ".join(f"{k}" for k in self.metadata))
        for title, rows in (("inputs", self.inputs), ("outputs", self.outputs)):
            lines.append(f"{title}: " + ", ".join(f"{r['name']} {r['dtype']}[{','.join(map(str, r['shape']))}]" for r in rows))
        lines.append("")
        hist = [[op, str(n), human_count(self.by_op_type.get(op, {}).get("params", 0)),
                 human_count(self.by_op_type.get(op, {}).get("flops", 0))]
                for op, n in sorted(self.op_histogram.items(), key=lambda kv: -kv[1])]
        lines.append(render_table(["op", "count", "params", "FLOPs"], hist))
        lines.append("")
        rows = [[w["name"], "x".join(map(str, w["shape"])), w["dtype"], w["used_by"], w["origin"],
                 ", ".join(w["passes"]) or "-"] for w in self.weights]
        lines.append(render_table(["largest weights", "shape", "dtype", "used by", "lives in", "passes"], rows))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def inspect_model(source: str | os.PathLike[str] | onnx.ModelProto, *, dims: dict[str, int] | None = None,
                  input_shapes: dict[str, Any] | None = None, top: int = 10) -> Inspection:
    """What ``onnxzip inspect`` shows: opsets, signature, op histogram, parameters (weights
    wherever they live: initializers, Constant nodes, constant chains, subgraphs), FLOPs per
    sample at sizes onnxruntime accepts (:func:`onnxzip.core.shapes.resolve_input_shapes` at batch 1;
    ``dims`` [``--dim``], ``input_shapes`` [``--input-shape``]) and the ``top`` [``--top``]
    largest weights with the passes that apply to them. Returns an :class:`Inspection`
    (``.text()``, ``.to_dict()`` [``--json``])."""
    model = load_model(source)
    notes: list[str] = []
    measured = True
    try:
        feeds: dict | None
        feeds, resolution = generated_feeds(model, batch=1, dims=dims, input_shapes=input_shapes)
        if resolution.chosen:
            notes.append(f"FLOPs measured with {resolution.describe()}")
    except DataError as exc:  # FLOPs then come from shape inference alone
        notes.append(f"could not run the model to measure shapes: {exc}")
        feeds, measured = None, False
    if feeds is not None:
        try:
            probe_in_child(model, feeds)  # the first run, where a native crash cannot take us down
        except NativeCrashError:
            raise
        except InvalidModelError as exc:
            notes.append(f"could not run the model to measure shapes ({exc})")
            feeds, measured = None, False
    shapes = observed_shapes(model, feeds or {})
    cost = model_cost(model, shapes)
    if cost.unmeasured:
        shown = ", ".join(cost.unmeasured[:5]) + (", ..." if len(cost.unmeasured) > 5 else "")
        notes.append(f"FLOPs of {len(cost.unmeasured)} nodes could not be measured (shapes unknown: {shown}); "
                     "the total is a lower bound" + ("" if measured else "; give sizes with --input-shape"))
    graph = import_graph(model)
    table = discover_weights(graph)
    notes.extend(table.notes)
    passes = [cls() for cls in PASSES.values()]
    weights = sorted(table.weights, key=lambda w: -w.size)[:top]
    histogram: Counter[str] = Counter()
    for node, _owner, _path in walk_nodes(graph):
        histogram[node.op] += 1
    return Inspection(
        path=str(source) if not isinstance(source, onnx.ModelProto) else "<in memory>",
        ir_version=model.ir_version,
        opsets={e.domain: e.version for e in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=_signature([i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]),
        outputs=_signature(model.graph.output),
        op_histogram=dict(histogram),
        by_op_type=cost.by_op_type(),
        params=cost.params,
        flops=cost.flops,
        size_bytes=model.ByteSize(),
        flops_unmeasured=len(cost.unmeasured),
        weights=[
            {
                "name": w.name, "shape": list(w.shape), "dtype": w.dtype,
                "used_by": ", ".join(sorted({f"{u.op_type}:{u.role}" for u in w.uses})),
                "origin": (w.graph_path + ": " if w.graph_path else "") + w.origin,
                "quantized": w.quantized,
                "passes": [p.name for p in passes if p.applies_to(w)],
            }
            for w in weights
        ],
        notes=notes,
        metadata={p.key: p.value for p in model.metadata_props},
    )
