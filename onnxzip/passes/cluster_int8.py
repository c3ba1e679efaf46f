"""int8 execution of codebook weights (``--cluster ...,execute=int8``).

The cluster pass stores a weight as a float codebook and packed indices; onnxruntime folds
that decode when the session loads, so a codebook file runs the float kernels of the original.
With ``execute=int8`` this module rewrites, after clustering, each codebook weight consumed by
MatMul, Gemm or Conv (the ops with onnxruntime QDQ fusions) into the QDQ form onnxruntime's
int8 kernels are selected from::

    codebook (int8 [K] or [C·K]) ─Gather(index decode)─ W_q (int8) ─DequantizeLinear(s_w, 0)─ W
    x ─QuantizeLinear(s_x, z_x)─DequantizeLinear─ x̂ (uint8 asymmetric, calibrated min/max)
    bias (Conv, Gemm) → int32 round(b / (s_x·s_w)) ─DequantizeLinear(s_x·s_w)─ b̂
    Conv: y (or the Relu after it) ─QuantizeLinear(s_y, z_y)─DequantizeLinear─ consumers of y

The int8 codebook holds round(c / s_w) of the float centroids c, s_w = max|c| / 127 per tensor
or per codebook row (per-channel codebooks: per output channel, DequantizeLinear ``axis``; a
channel-scaled codebook's s_c multiplies into a per-channel s_w = t·s_c and its Mul goes), so
the file stays as small as the codebook model (the codebook itself shrinks 4×). After the index
decode folds at load, W_q is an int8 initializer feeding a DequantizeLinear, which is what the
QDQ selectors need. What onnxruntime 1.19.2 and 1.32 were seen to fuse (the optimized model
saved with ``optimized_model_filepath``, level ALL; checked by tests/passes/test_cluster_int8.py):

* MatMul (weight 2-D, no output QuantizeLinear) → MatMulIntegerToFloat (per tensor and per
  column scales);
* Gemm with an int32 DequantizeLinear bias (or no bias) → QGemm; with a float bias 1.19 keeps
  a float Gemm, hence the bias quantization;
* Conv with an int32 bias and a QuantizeLinear on its output → QLinearConv (NHWC, with
  Transposes); without the output pair it stays a float FusedConv, and with a float bias 1.19
  does not fuse while 1.32 rewrites the bias with a Round node, which is invalid at opset 10.

Where no fusion happens, the weight stays a float codebook (the report says why): weights of
LSTM/GRU/RNN (onnxruntime has no int8 kernel for these ops in the standard domain;
com.microsoft DynamicQuantizeLSTM is not used), ConvTranspose, Gather (embeddings) and other
consumers; weights used inside If/Loop/Scan bodies (activation ranges are calibrated on the main
graph only); weights whose activation input is a constant or not float32; Gemm with beta ≠ 1.
A weight shared by several nodes (an unrolled RNN cell) is converted when every use qualifies:
its inputs share one activation scale (the union of their ranges), so its int32 bias is stored
once. Each activation tensor gets one QuantizeLinear→DequantizeLinear pair that all its
main-graph consumers read (graph outputs stay float), so residual Adds between quantized Convs
fuse into QLinearAdd too. QuantizeLinear needs opset ≥ 10 and a
per-channel DequantizeLinear opset ≥ 13: a model below 13 is converted with
onnx.version_converter when the converted model gives the same outputs on the calibration
data; otherwise, at opset 10-12 the scales are per tensor, and below 10 nothing runs int8.

Layer gate: each candidate weight's int8 form alone is scored on the calibration data as the
relative output distortion D = mean over float outputs of ‖y − y₀‖² / ‖y₀‖² against the float
codebook model (onnxruntime, all optimizations, so the int8 kernels themselves are measured).
Weights over ``int8_max_error`` alone stay float; the others are added least sensitive first,
and the longest such prefix whose combined model stays within the budget is kept (bisection:
distortion grows with the prefix). Last, the int8 model and the float codebook model are timed at
batch 1 on one thread, alternately (:meth:`onnxzip.measure.latency.Timing.compare`, the
context's timer, injectable in tests): unless the int8 form is ``int8_min_speedup`` times faster
(on tiny layers the quantize/dequantize steps cost more than the int8 kernels save) every weight
stays a float codebook, and the report says so. Without calibration data ``execute=int8`` is refused
(ConfigError): activation scales cannot be set without data.

On x86 CPUs without VNNI, onnxruntime's u8·s8 kernels may saturate int16 pair sums;
``int8_reduce_range`` keeps weights in ±63 (7 bits) as onnxruntime's own quantizer does there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxzip.core.compat import default_opset
from onnxzip.errors import ConfigError
from onnxzip.core.graph import NameScope, export_model, import_graph, walk_nodes
from onnxzip.core.inputs import first_samples, fixed_batch
from onnxzip.passes.cluster_calibration import float_outputs, output_distortion, run_outputs, sample_chunks
from onnxzip.passes.cluster_decode import find_decodes
from onnxzip.core.runtime import make_session, run_batched

log = logging.getLogger(__name__)

INT8_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPSET = 10  # QuantizeLinear / DequantizeLinear
AXIS_OPSET = 13  # DequantizeLinear axis (per-channel scales)
CONVERT_TOLERANCE = 1e-4  # relative output change an opset conversion may cause
SWEEP_SAMPLES = 16  # calibration items each gate measurement runs (at most)


@dataclass
class Int8Layer:
    """One codebook weight and how its int8 form is built: its uses (consumer layer key, op),
    the DequantizeLinear axis (None: per tensor) and the activation tensors to quantize."""

    name: str
    ops: str
    axis: int | None
    inputs: list[str]  # activation inputs of its uses
    outputs: list[str] = field(default_factory=list)  # Conv outputs (after a lone Relu) to quantize
    biases: list[str] = field(default_factory=list)  # codebook biases it stores as int32 instead
    notes: list[str] = field(default_factory=list)


@dataclass
class Int8Result:
    model: onnx.ModelProto
    int8: dict[str, float]  # weight → its distortion alone
    kept_float: dict[str, str]  # weight → why it stays a float codebook
    combined: float | None  # distortion of the final model against the float codebook model
    notes: list[str]
    int32_biases: dict[str, str] = field(default_factory=dict)  # codebook bias → the int8 weight it serves


def find_int8_decodes(graph: gs.Graph) -> list[str]:
    """Names of the int8 codebooks (a decode of an int8 codebook feeding a DequantizeLinear) in
    ``graph``: weights this module converted, which float-codebook steps leave alone."""
    return [decoded.name for decoded in find_decodes(graph, dtypes=frozenset({"int8"}))
            if any(user.op == "DequantizeLinear" for user in decoded.output.outputs)]


def require_data(feeds: Any, generated: bool = False) -> None:
    """execute=int8 refuses to run without calibration data (generated inputs are not data)."""
    if not feeds or generated:
        raise ConfigError("cluster execute=int8 needs calibration inputs (--data): activation scales "
                          "and each layer's error are measured on them.")


def convert_int8(
    model: onnx.ModelProto,
    feeds: Any,
    device: str,
    *,
    max_error: float,
    reduce_range: bool = False,
    sweep_samples: int = SWEEP_SAMPLES,
    min_speedup: float = 0.0,
    timing: Any = None,
) -> Int8Result:
    """The clustered ``model`` with the codebook weights the gate allows running int8."""
    require_data(feeds)
    notes: list[str] = []
    original = model
    model = _raise_opset(model, feeds, device, notes)
    opset = default_opset(model)
    graph = import_graph(model)
    layers, kept_float = _candidates(graph, find_decodes(graph), opset)
    if opset < QDQ_OPSET:
        kept_float.update({name: f"opset {opset} < 10 has no QuantizeLinear" for name in layers})
        layers = {}
    if not layers:
        return Int8Result(original, {}, kept_float, None, notes)
    ranges = _ranges(model, feeds, device, sorted({t for layer in layers.values() for t in layer.inputs + layer.outputs}))
    ranges = _shared_ranges(ranges, [layer.inputs for layer in layers.values()])
    builder = _Builder(model, layers, ranges, reduce_range)
    sweep = first_samples(feeds, sweep_samples, model)
    reference = float_outputs(run_batched(make_session(model, device), sweep))
    alone: dict[str, float] = {}
    for name in layers:
        alone[name] = _distortion(builder.build([name]), sweep, reference, device)
    order = sorted((n for n in layers if alone[n] <= max_error), key=lambda n: alone[n])
    for name in layers:
        if alone[name] > max_error:
            kept_float[name] = f"int8 alone distorts the outputs by {alone[name]:.3g} > int8_max_error {max_error:g}"
    count, combined = _longest_prefix(builder, order, sweep, reference, device, max_error)
    for name in order[count:]:
        kept_float[name] = (f"int8 alone {alone[name]:.3g}, but with the less sensitive layers the model "
                            f"would exceed int8_max_error {max_error:g}")
    chosen = order[:count]
    for name in chosen:
        notes.extend(f"{name}: {note}" for note in layers[name].notes)
    final = builder.build(chosen) if chosen else original
    if chosen and min_speedup > 0:
        if timing is None:
            from onnxzip.measure.latency import Timing

            timing = Timing(feeds=dict(first_samples(feeds, 1, model)))
        before, after = timing.compare(model, final)
        speedup = before / after
        if speedup < min_speedup:
            notes.append(f"the int8 form ran {speedup:.2f}x the float codebooks' batch-1 speed "
                         f"(< int8_min_speedup {min_speedup:g}): all stay float")
            kept_float.update({n: f"the int8 model was not faster ({speedup:.2f}x at batch 1)" for n in chosen})
            return Int8Result(original, {}, kept_float, None, notes)
        notes.append(f"int8 form: {speedup:.2f}x the float codebooks' batch-1 speed (one thread)")
    int32 = {bias: name for name in chosen for bias in layers[name].biases}
    for bias in int32:
        kept_float.pop(bias, None)
    return Int8Result(final, {n: alone[n] for n in chosen}, kept_float, combined if chosen else None, notes, int32)


def _longest_prefix(builder: _Builder, order: list[str], sweep: Any, reference: dict[str, np.ndarray],
                    device: str, max_error: float) -> tuple[int, float]:
    """The longest prefix of ``order`` whose combined int8 model stays within ``max_error``."""
    measured: dict[int, float] = {0: 0.0}

    def error(count: int) -> float:
        if count not in measured:
            measured[count] = _distortion(builder.build(order[:count]), sweep, reference, device)
        return measured[count]

    low, high = 0, len(order)
    if high and error(high) <= max_error:
        return high, measured[high]
    while low < high - 1:  # error(low) within budget, error(high) over it
        middle = (low + high) // 2
        if error(middle) <= max_error:
            low = middle
        else:
            high = middle
    return low, measured[low]


def _raise_opset(model: onnx.ModelProto, feeds: Any, device: str, notes: list[str]) -> onnx.ModelProto:
    """``model`` at opset 13 when it is lower and the converted model gives the same outputs."""
    opset = default_opset(model)
    if opset >= AXIS_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, AXIS_OPSET)
        converted.ir_version = max(model.ir_version, 7)
        onnx.checker.check_model(converted)
        sample = first_samples(feeds, 4, model)
        before = float_outputs(run_batched(make_session(model, device), sample))
        change = output_distortion(run_batched(make_session(converted, device), sample), before)
    except Exception as exc:  # noqa: BLE001 - the converter fails on many real graphs
        notes.append(f"opset {opset} could not be converted to {AXIS_OPSET} ({str(exc).splitlines()[0][:120]}); "
                     + ("per-tensor int8 scales" if opset >= QDQ_OPSET else "no int8 execution below opset 10"))
        return model
    if change > CONVERT_TOLERANCE:
        notes.append(f"opset {opset} → {AXIS_OPSET} changed the outputs by {change:.3g}; kept opset {opset}")
        return model
    notes.append(f"opset raised from {opset} to {AXIS_OPSET} for QuantizeLinear/DequantizeLinear")
    return converted


def _uses(graph: gs.Graph, tensor: gs.Tensor) -> list[tuple[gs.Node, gs.Graph, int]]:
    return [(node, owner, slot) for node, owner, _path in walk_nodes(graph)
            for slot, inp in enumerate(node.inputs) if inp is tensor]


def _out_axis(node: gs.Node) -> int:
    """The weight axis of the output channels of a MatMul B, Gemm B or Conv W."""
    if node.op == "MatMul":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 0


def _candidates(graph: gs.Graph, decodes: list[Any], opset: int) -> tuple[dict[str, Int8Layer], dict[str, str]]:
    """The codebook weights whose every use has an int8 QDQ fusion, and why the others stay float."""
    layers: dict[str, Int8Layer] = {}
    skipped: dict[str, str] = {}
    for decoded in decodes:
        if decoded.pair_axis is not None:
            skipped[decoded.name] = ("vector codebook (codewords of pairs): onnxruntime's int8 kernels take one "
                                     "int8 value per weight; it stays a float codebook")
            continue
        uses = _uses(graph, decoded.output)
        reason = _use_problem(graph, decoded, uses)
        if reason is not None:
            skipped[decoded.name] = reason
            continue
        nodes = [node for node, _owner, _slot in uses]
        ops = "/".join(sorted({n.op for n in nodes}))
        axes = {_out_axis(n) for n in nodes}
        layer = Int8Layer(decoded.name, ops, None, sorted({n.inputs[0].name for n in nodes}))
        reason = None
        if decoded.scale is not None:  # the channel scale becomes the int8 weight's per-channel scale
            if axes == {decoded.scale_axis} and opset >= AXIS_OPSET:
                layer.axis = decoded.scale_axis
            else:
                skipped[decoded.name] = ("channel-scaled codebook whose scale is not along the output channels "
                                         f"at opset >= 13 (opset {opset})")
                continue
        elif decoded.axis is not None:
            if axes == {decoded.axis} and opset >= AXIS_OPSET:
                layer.axis = decoded.axis
            else:
                layer.notes.append("per-channel codebook with one int8 scale per tensor"
                                   + (f" (opset {opset} < 13)" if opset < AXIS_OPSET else ""))
        for node in nodes:
            if node.op == "Conv":
                layer.outputs.append(_conv_output(graph, node).name)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and bias.name and _bias_value(bias, decodes) is None and opset < 11:
                reason = (f"{node.op} bias is not constant: at opset {opset} < 11 newer onnxruntime "
                          "rewrites its float bias with a Round node the opset lacks")
                break
            owner = next((d.name for d in decodes if bias is not None and d.output is bias), None)
            if owner is not None:
                layer.biases.append(owner)
            if bias is not None and bias.name and _bias_value(bias, decodes) is None:
                layer.notes.append("its bias is not constant: onnxruntime 1.19 will not fuse the "
                                   f"{node.op} into an int8 kernel")
        if reason is not None:
            skipped[decoded.name] = reason
            continue
        layers[decoded.name] = layer
    return layers, skipped


def _use_problem(graph: gs.Graph, decoded: Any, uses: list[tuple[gs.Node, gs.Graph, int]]) -> str | None:
    if decoded.graph is not graph:
        return "decoded inside an If/Loop/Scan body (activation ranges are calibrated on the main graph)"
    if np.asarray(decoded.codebook.values).dtype != np.float32:
        return "not a float32 codebook"
    if not uses:
        return "unused"
    for node, owner, slot in uses:
        if owner is not graph:
            return "used inside an If/Loop/Scan body"
        if node.op in INT8_OPS and slot == 2:
            return f"{node.op} bias (input 2): only weights (input 1) run on int8 kernels"
        if node.op not in INT8_OPS or slot != 1:
            return f"{node.op} input {slot} (onnxruntime has int8 kernels for MatMul/Gemm/Conv weights only)"
        if node.op in ("MatMul", "Gemm") and len(decoded.shape) != 2:
            return f"{len(decoded.shape)}-D {node.op} weight (2-D only)"
        source = node.inputs[0]
        if isinstance(source, gs.Constant) or not source.name:
            return f"{node.op} input is a constant"
        if source.dtype is not None and np.dtype(source.dtype) != np.float32:
            return f"{node.op} input is {np.dtype(source.dtype)}, not float32"
        if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0 and len(node.inputs) > 2:
            return "Gemm with beta ≠ 1"
    return None


def _conv_output(graph: gs.Graph, node: gs.Node) -> gs.Tensor:
    """Where a Conv's output pair goes: after a Relu that is its only user (onnxruntime folds the
    Relu into the quantized output range), else on the Conv output."""
    output = node.outputs[0]
    users = list(output.outputs)
    if len(users) == 1 and users[0].op == "Relu" and output not in graph.outputs:
        return users[0].outputs[0]
    return output


def _bias_value(tensor: gs.Tensor, decodes: list[Any]) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    for decoded in decodes:
        if decoded.output is tensor:
            return decoded.stored().decode()
    return None


def _ranges(model: onnx.ModelProto, feeds: Any, device: str, names: list[str]) -> dict[str, tuple[float, float]]:
    """(min, max) of each tensor in ``names`` over the calibration data (float codebook model)."""
    ranges: dict[str, tuple[float, float]] = {}
    for chunk in sample_chunks(feeds, fixed_batch(model) or 8):
        values = {**chunk, **run_outputs(model, chunk, device, [n for n in names if n not in chunk])}
        for name in names:
            value = np.asarray(values[name], dtype=np.float64)
            if value.size:
                low, high = float(value.min()), float(value.max())
                old = ranges.get(name, (low, high))
                ranges[name] = (min(old[0], low), max(old[1], high))
    return ranges


def _shared_ranges(ranges: dict[str, tuple[float, float]], groups: list[list[str]]) -> dict[str, tuple[float, float]]:
    """Ranges widened so that the inputs of one weight (an unrolled RNN cell's steps) share one
    scale: its int32 bias is then stored once, not once per use."""
    parent = {name: name for name in ranges}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for group in groups:
        for name in group[1:]:
            parent[root(name)] = root(group[0])
    merged: dict[str, tuple[float, float]] = {}
    for name, (low, high) in ranges.items():
        old = merged.get(root(name), (low, high))
        merged[root(name)] = (min(old[0], low), max(old[1], high))
    return {name: merged[root(name)] for name in ranges}


def activation_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric scale and zero point covering [min(low, 0), max(high, 0)]."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        return np.float32(1.0), np.uint8(0)
    zero = int(np.clip(np.round(-low / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def weight_params(codebook: np.ndarray, rows: int | None, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codebook, float32 scales): symmetric, per row of a [rows, K] codebook or per tensor."""
    table = codebook.reshape(rows, -1) if rows else codebook.reshape(1, -1)
    peak = np.max(np.abs(table), axis=1).astype(np.float64)
    scale = np.where(peak > 0, peak / levels, 1.0)
    quantized = np.clip(np.round(table / scale[:, None]), -levels, levels).astype(np.int8)
    scale = scale.astype(np.float32)
    return quantized.reshape(-1), (scale if rows else scale.reshape(()))


class _Builder:
    """Builds the model with a chosen set of weights in their int8 form."""

    def __init__(self, model: onnx.ModelProto, layers: dict[str, Int8Layer],
                 ranges: dict[str, tuple[float, float]], reduce_range: bool) -> None:
        self.model, self.layers, self.ranges = model, layers, ranges
        self.levels = 63 if reduce_range else 127

    def build(self, chosen: list[str]) -> onnx.ModelProto:
        graph = import_graph(self.model)
        names = NameScope(graph)
        decodes = find_decodes(graph)
        by_name = {d.name: d for d in decodes}
        self.scales: dict[str, np.float32] = {}
        for name in chosen:  # Conv outputs first, so an input produced by one is already quantized
            for tensor_name in self.layers[name].outputs:
                self._quantize(graph, names, graph.tensors()[tensor_name], output=True)
        for name in chosen:
            self._weight(graph, names, self.layers[name], by_name[name], decodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return export_model(graph, self.model)

    def _const(self, names: NameScope, base: str, value: Any) -> gs.Constant:
        return gs.Constant(names.fresh(base), np.asarray(value))

    def _pair(self, graph: gs.Graph, names: NameScope, source: gs.Tensor, target: gs.Variable,
              scale: gs.Constant, zero: gs.Constant) -> None:
        quantized = gs.Variable(names.fresh(f"{target.name}_q"))
        graph.nodes.append(gs.Node("QuantizeLinear", inputs=[source, scale, zero], outputs=[quantized]))
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=[quantized, scale, zero], outputs=[target]))

    def _quantize(self, graph: gs.Graph, names: NameScope, tensor: gs.Variable, output: bool = False) -> np.float32:
        """Q→DQ on ``tensor`` for all its main-graph consumers (once per tensor); its scale. A
        graph output stays float unless it is a Conv's ``output`` (QLinearConv needs the pair)."""
        if tensor.name in self.scales:
            return self.scales[tensor.name]
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "DequantizeLinear" and isinstance(producer.inputs[1], gs.Constant):
            return np.float32(np.asarray(producer.inputs[1].values).reshape(-1)[0])  # quantized already
        scale, zero = activation_params(*self.ranges[tensor.name])
        scale_c = self._const(names, f"{tensor.name}_scale", scale)
        zero_c = self._const(names, f"{tensor.name}_zero_point", zero)
        if producer is None or (tensor in graph.outputs and not output):  # keep the graph's tensor float
            target = gs.Variable(names.fresh(f"{tensor.name}_dq"))
            for node in list(tensor.outputs):
                if node in graph.nodes:
                    for slot, inp in enumerate(list(node.inputs)):
                        if inp is tensor:
                            node.inputs[slot] = target
            self._pair(graph, names, tensor, target, scale_c, zero_c)
        else:  # the producer writes a new tensor; the pair's output takes the old name
            raw = gs.Variable(names.fresh(f"{tensor.name}_float"))
            producer.outputs[producer.outputs.index(tensor)] = raw
            self._pair(graph, names, raw, tensor, scale_c, zero_c)
        self.scales[tensor.name] = scale
        return scale

    def _weight(self, graph: gs.Graph, names: NameScope, layer: Int8Layer, decoded: Any, decodes: list[Any]) -> None:
        uses = [(node, slot) for node, owner, slot in _uses(graph, decoded.output)]
        rows = decoded.shape[layer.axis] if layer.axis is not None and decoded.scale is None else None
        values = np.asarray(decoded.codebook.values, dtype=np.float32)
        if decoded.axis is not None and rows is None:
            values = values.reshape(-1)
        codebook, w_scale = weight_params(values, rows, self.levels)
        if decoded.scale is not None:  # W = s_c · t · q: the DequantizeLinear scale per channel is t · s_c
            w_scale = (np.float64(w_scale) * np.asarray(decoded.scale.values, np.float64).reshape(-1)).astype(np.float32)
        decoded.codebook.values = codebook
        weight_q = decoded.unscaled
        for tensor in decoded.value_tensors():  # int8 now (typed float where the opset was raised)
            tensor.dtype, tensor.shape = None, None
        weight = gs.Variable(names.fresh(f"{layer.name}_dequantized"))
        attrs = {"axis": int(layer.axis)} if layer.axis is not None else {}
        zero = np.zeros(w_scale.shape, np.int8)
        graph.nodes.append(gs.Node("DequantizeLinear", attrs=attrs,
                                   inputs=[weight_q, self._const(names, f"{layer.name}_scale", w_scale),
                                           self._const(names, f"{layer.name}_zero_point", zero)],
                                   outputs=[weight]))
        biases: dict[str, gs.Variable] = {}
        for node, slot in uses:
            node.inputs[slot] = weight
            use_scale = self._quantize(graph, names, node.inputs[0])
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is None or not bias.name:
                continue
            value = _bias_value(bias, decodes)
            channels = decoded.shape[_out_axis(node)]
            if value is None or value.size not in (1, channels) or value.dtype != np.float32:
                continue
            key = f"{bias.name}@{float(use_scale)!r}"
            if key not in biases:
                scale = np.float64(use_scale) * w_scale.astype(np.float64)
                flat = value.reshape(-1).astype(np.float64)
                if scale.ndim and flat.size != scale.size:
                    continue
                limit = np.iinfo(np.int32).max
                quantized = np.clip(np.round(flat / scale if scale.ndim else flat / float(scale)), -limit, limit)
                b_scale = scale.astype(np.float32) if scale.ndim else np.float32(scale)
                b_attrs = {"axis": 0} if scale.ndim else {}
                if not scale.ndim and value.ndim == 1 and value.size == 1 and channels != 1:
                    continue  # a broadcast scalar bias: leave float
                biases[key] = gs.Variable(names.fresh(f"{bias.name}_dequantized"))
                graph.nodes.append(gs.Node(
                    "DequantizeLinear", attrs=b_attrs,
                    inputs=[self._const(names, f"{bias.name}_int32", quantized.astype(np.int32).reshape(value.shape)),
                            self._const(names, f"{bias.name}_scale", b_scale),
                            self._const(names, f"{bias.name}_zero_point", np.zeros(np.shape(b_scale), np.int32))],
                    outputs=[biases[key]]))
            node.inputs[2] = biases[key]


def _distortion(model: onnx.ModelProto, sweep: Any, reference: dict[str, np.ndarray], device: str) -> float:
    value = output_distortion(run_batched(make_session(model, device), sweep), reference)
    return value if np.isfinite(value) else float("inf")
