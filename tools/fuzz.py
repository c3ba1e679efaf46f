"""Seeded fuzzing of onnxzip on mutated models.

Each case takes a base model (small hand-built graphs, or the reference ``cnn`` / ``transformer``
models), applies one mutation drawn from :data:`MUTATIONS` (bytes flipped, truncated, not ONNX,
initializer dims / dtype / raw data inconsistent, attributes out of range, outputs dropped,
opsets/IR changed, cycles, bad UTF-8, duplicate names, dangling inputs, ...) and runs
``onnxzip inspect`` and ``onnxzip compress --cluster bits=4`` on it through ``cli.main`` inside
worker processes (imports paid once per worker; a worker that dies is a defect and is replaced).
A case is a defect unless, for both commands: the exit code is 0, 1 or 2; exit 2 prints exactly
one line on stderr; nothing prints a traceback; a failure leaves no output file; the input file
is unchanged; a written model loads and runs in onnxruntime.

The data fuzzer (``--data-cases N``) mutates the DATA instead: sound ``.npz`` data for small
models (a plain batch, a stateful cell with a state ``[2, batch, 8]`` and a scalar int64 sample
rate, a batch fixed at 1, float + bool inputs) gets one mutation from :data:`DATA_MUTATIONS`
(inputs missing / extra / renamed, wrong rank or dtype, scalar for array and back, 0 samples,
sample counts that differ, NaN/Inf, huge values, labels/references of the wrong length, rank or
type, a wrong size on a fixed axis, a bad ``--sample-axis``, a non-npz / truncated file, a pickled
object array, no file) and goes through one of :data:`DATA_COMMANDS` (``inspect``, ``compress``
plain / ``avg_bits=4`` / ``--finetune`` / ``--metric accuracy`` / ``--metric cosine``,
``finetune``, ``validate`` with and without a metric, and ``inspect`` piped into a reader that
goes away early, in a real child process). The same defect checks apply, plus a hang past
:data:`DATA_CASE_TIMEOUT_S` and the data file unchanged; unlike the model fuzzer, onnxzip's
logged warnings stay on, so a warning before an exit-2 sentence is a defect too.

Usage: python tools/fuzz.py --cases 5000 --seed 0 [--jobs 2] [--reference-share 0.1]
       python tools/fuzz.py --seed 0 --only 1234        # re-run one case (prints its details)
       python tools/fuzz.py --data-cases 1000 --seed 0  # the data fuzzer; --data-only I re-runs one
Case ``i`` of seed ``s`` is the same mutated model (or data and command) on every run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASE_TIMEOUT_S = 300.0
DATA_CASE_TIMEOUT_S = 120.0  # a data case runs one command on a model of a few hundred bytes
COMMANDS = ("inspect", "compress")


# ----------------------------------------------------------------------------- base models
def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> bytes:
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def convnet() -> bytes:
    """Conv(pads) → BatchNorm → Relu → MaxPool → grouped Conv → GAP → Flatten → Gemm (bias in a
    Constant node) → Softmax."""
    rng = np.random.default_rng(1)
    f = np.float32
    bias = helper.make_node("Constant", [], ["fc_b"], name="fc_bias",
                            value=_init("fc_b_value", rng.standard_normal(5).astype(f)))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[1, 1],
                         kernel_shape=[3, 3], dilations=[1, 1], group=1),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", group=2, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        bias,
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    inits = [
        _init("w1", rng.standard_normal((8, 3, 3, 3)).astype(f)), _init("b1", rng.standard_normal(8).astype(f)),
        _init("g", rng.uniform(0.5, 1.5, 8).astype(f)), _init("beta", rng.standard_normal(8).astype(f)),
        _init("mean", rng.standard_normal(8).astype(f)), _init("var", rng.uniform(0.5, 1.5, 8).astype(f)),
        _init("w2", rng.standard_normal((8, 4, 3, 3)).astype(f)), _init("fc_w", rng.standard_normal((5, 8)).astype(f)),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])], inits)


def mlp() -> bytes:
    """MatMul + Add → Relu → Reshape/Transpose/Concat/ReduceMean → Gemm, two outputs."""
    rng = np.random.default_rng(2)
    f = np.float32
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("Reshape", ["h3", "shape"], ["r"], name="reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["t"], ["m"], name="mean", axes=[2], keepdims=0),
        helper.make_node("Concat", ["h3", "m"], ["cat"], name="concat", axis=1),
        helper.make_node("Gemm", ["cat", "w2", "b2"], ["y"], name="fc2", transB=1),
        helper.make_node("Sigmoid", ["y"], ["aux"], name="aux"),
    ]
    inits = [
        _init("w1", rng.standard_normal((8, 16)).astype(f)), _init("b1", rng.standard_normal(16).astype(f)),
        _init("shape", np.array([0, 4, 4], np.int64)),
        _init("w2", rng.standard_normal((4, 20)).astype(f)), _init("b2", rng.standard_normal(4).astype(f)),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 4])], inits)


def embedding() -> bytes:
    """Gather(embedding) → MatMul → LayerNormalization → ReduceMean → Gemm, with an If whose
    branches hold a weight (subgraph initializers)."""
    rng = np.random.default_rng(3)
    f = np.float32

    def branch(name: str, scale: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["pooled", f"{name}_w"], [f"{name}_out"], name=f"{name}_mul")], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
            [_init(f"{name}_w", (scale * rng.standard_normal(8)).astype(f))],
        )

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "proj"], ["p"], name="proj"),
        helper.make_node("LayerNormalization", ["p", "ln_g", "ln_b"], ["n"], name="ln", axis=-1, epsilon=1e-5),
        helper.make_node("ReduceMean", ["n"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("If", ["flag"], ["chosen"], name="branch",
                         then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
        helper.make_node("Gemm", ["chosen", "cls", "cls_b"], ["scores"], name="cls", transB=1),
    ]
    inits = [
        _init("table", rng.standard_normal((20, 8)).astype(f)), _init("proj", rng.standard_normal((8, 8)).astype(f)),
        _init("ln_g", np.ones(8, f)), _init("ln_b", np.zeros(8, f)), _init("flag", np.array(True)),
        _init("cls", rng.standard_normal((3, 8)).astype(f)), _init("cls_b", np.zeros(3, f)),
    ]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                  [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])], inits)


HAND_BUILT: dict[str, Callable[[], bytes]] = {"convnet": convnet, "mlp": mlp, "embedding": embedding}
REFERENCE = ("cnn", "transformer")


def base_models(reference: bool) -> dict[str, bytes]:
    """Serialized base models by name (the reference ones come from the shared cache)."""
    bases = {name: build() for name, build in HAND_BUILT.items()}
    if reference:
        from onnxzip.models.zoo import get_reference_model

        for name in REFERENCE:
            bases[name] = Path(get_reference_model(name).onnx_path).read_bytes()
    return bases


# ----------------------------------------------------------------------------- mutations
Rng = np.random.Generator
BAD_INTS = (-(2**31), -7, -1, 0, 0, 1, 3, 7, 1000, 2**31 - 1)


def _parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model


def _all_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    from onnxzip.core.compat import iter_graphs

    return list(iter_graphs(model.graph))


def _pick(rng: Rng, items):  # noqa: ANN001, ANN202
    items = list(items)
    return items[int(rng.integers(len(items)))] if items else None


def flip_bytes(data: bytes, rng: Rng) -> bytes:
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(len(buffer)))
        buffer[position] ^= int(rng.integers(1, 256))
    return bytes(buffer)


def truncate(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def not_onnx(data: bytes, rng: Rng) -> bytes:
    choices = [
        b"", b"hello world\n", json.dumps({"graph": [1, 2]}).encode(), b"\x89PNG\r\n\x1a\n" + bytes(40),
        b"PK\x03\x04" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)), bytes(rng.integers(0, 256, 512, dtype=np.uint8)),
        data[::-1], b"\x08" * 100,
    ]
    return choices[int(rng.integers(len(choices)))]


def _initializer(model: onnx.ModelProto, rng: Rng, predicate=lambda t: True) -> TensorProto | None:  # noqa: ANN001
    return _pick(rng, [t for g in _all_graphs(model) for t in g.initializer if predicate(t)])


def initializer_dims(model: onnx.ModelProto, rng: Rng) -> None:
    tensor = _initializer(model, rng, lambda t: len(t.dims) > 0)
    if tensor is None:
        return
    dims = list(tensor.dims)
    how = int(rng.integers(5))
    if how == 0:
        dims[int(rng.integers(len(dims)))] += int(rng.choice([-1, 1, 3]))
    elif how == 1:
        dims[int(rng.integers(len(dims)))] = int(rng.choice([0, -1, -5]))
    elif how == 2:
        dims.append(int(rng.integers(1, 4)))
    elif how == 3:
        dims.pop()
    else:
        dims = dims[::-1] if len(dims) > 1 else [dims[0] * 2]
    del tensor.dims[:]
    tensor.dims.extend(dims)


def dtype_changed(model: onnx.ModelProto, rng: Rng) -> None:
    tensor = _initializer(model, rng)
    if tensor is not None:
        tensor.data_type = int(rng.choice([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 21, 22, 23, 99]))


def raw_data_length(model: onnx.ModelProto, rng: Rng) -> None:
    tensor = _initializer(model, rng, lambda t: t.HasField("raw_data"))
    if tensor is None:
        return
    raw = tensor.raw_data
    how = int(rng.integers(3))
    tensor.raw_data = raw[: max(0, len(raw) - int(rng.integers(1, 9)))] if how == 0 else (
        raw + bytes(int(rng.integers(1, 9))) if how == 1 else b"")


_WINDOW = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")
_AXIS = ("Softmax", "Flatten", "Concat", "Gather", "LayerNormalization", "ReduceMean", "Transpose")


def _set_attribute(node: onnx.NodeProto, key: str, value) -> None:  # noqa: ANN001
    kept = [a for a in node.attribute if a.name != key]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value is not None:
        node.attribute.append(helper.make_attribute(key, value))


def attribute_range(model: onnx.ModelProto, rng: Rng) -> None:
    nodes = [n for g in _all_graphs(model) for n in g.node]
    window = [n for n in nodes if n.op_type in _WINDOW]
    if window and rng.random() < 0.6:
        node = _pick(rng, window)
        key = str(rng.choice(["strides", "dilations", "kernel_shape", "pads", "group"]))
        if key == "group":
            value = int(rng.choice([0, -1, 3, 5, 1000]))
        elif key == "pads":
            value = [int(v) for v in rng.choice([-3, -1, 0, 1, 9], size=int(rng.choice([2, 4, 6])))]
        else:
            value = [int(v) for v in rng.choice([-1, 0, 0, 1, 2, 9], size=int(rng.choice([1, 2, 3])))]
        _set_attribute(node, key, value)
        return
    axis_nodes = [n for n in nodes if n.op_type in _AXIS]
    if axis_nodes and rng.random() < 0.6:
        node = _pick(rng, axis_nodes)
        if node.op_type == "Transpose":
            _set_attribute(node, "perm", [int(v) for v in rng.choice([-1, 0, 1, 2, 5], size=int(rng.integers(1, 5)))])
        elif node.op_type == "ReduceMean":
            _set_attribute(node, "axes", [int(rng.choice([-9, 5, 9]))])
        else:
            _set_attribute(node, "axis", int(rng.choice([-9, -5, 4, 9, 2**31 - 1])))
        return
    node = _pick(rng, [n for n in nodes if n.attribute])
    if node is None:
        return
    attribute = _pick(rng, node.attribute)
    if attribute.type == onnx.AttributeProto.INT:
        attribute.i = int(rng.choice(BAD_INTS))
    elif attribute.type == onnx.AttributeProto.INTS:
        del attribute.ints[:]
        attribute.ints.extend(int(v) for v in rng.choice(BAD_INTS, size=int(rng.integers(0, 5))))
    elif attribute.type == onnx.AttributeProto.FLOAT:
        attribute.f = float(rng.choice([-1.0, 0.0, np.inf, np.nan, 1e30]))
    else:
        _set_attribute(node, attribute.name, None)  # drop it (a required attribute goes missing)


def outputs_dropped(model: onnx.ModelProto, rng: Rng) -> None:
    outputs = list(model.graph.output)
    keep = [] if rng.random() < 0.6 else outputs[: int(rng.integers(len(outputs)))]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    if rng.random() < 0.3:
        model.graph.output.append(helper.make_tensor_value_info("no_such_tensor", TensorProto.FLOAT, [1]))


def opset_ir(model: onnx.ModelProto, rng: Rng) -> None:
    how = int(rng.integers(4))
    if how == 0:
        model.ir_version = int(rng.choice([0, 1, 2, 3, 4, 11, 12, 99]))
    elif how == 1:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = int(rng.choice([0, 1, 5, 6, 7, 9, 11, 13, 22, 23, 99]))
    elif how == 2:
        kept = [e for e in model.opset_import if e.domain not in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    else:
        model.opset_import.append(helper.make_opsetid(str(rng.choice(["com.example", "ai.onnx.ml", ""])),
                                                      int(rng.choice([1, 3, 99]))))


def cycle(model: onnx.ModelProto, rng: Rng) -> None:
    nodes = model.graph.node
    if len(nodes) < 2:
        return
    if rng.random() < 0.3:
        order = list(nodes)
        rng.shuffle(order)
        del nodes[:]
        nodes.extend(order)
        return
    late = int(rng.integers(1, len(nodes)))
    early = int(rng.integers(0, late + 1))
    if nodes[early].input and nodes[late].output:
        nodes[early].input[int(rng.integers(len(nodes[early].input)))] = nodes[late].output[0]


def bad_utf8(data: bytes, rng: Rng) -> bytes:
    try:
        model = _parse(data)
    except Exception:  # noqa: BLE001 - an earlier mutation broke the bytes already
        return data
    names = sorted(name for name in {n.name for g in _all_graphs(model) for n in g.node}
                   | {t.name for g in _all_graphs(model) for t in g.initializer} | {model.producer_name}
                   if isinstance(name, str) and len(name) >= 2)  # names already broken are bytes
    if not names:
        return data
    name = _pick(rng, names).encode()
    bad = bytes(int(rng.choice([0x80, 0xC0, 0xFF, 0xFE])) for _ in name)
    return data.replace(name, bad, 1 + int(rng.integers(2)))


def duplicate_names(model: onnx.ModelProto, rng: Rng) -> None:
    graph = model.graph
    how = int(rng.integers(4))
    if how == 0 and len(graph.node) >= 2:
        first, second = rng.choice(len(graph.node), 2, replace=False)
        graph.node[int(second)].output[0] = graph.node[int(first)].output[0]
    elif how == 1 and graph.initializer:
        graph.initializer.append(copy.deepcopy(_pick(rng, graph.initializer)))
    elif how == 2:
        graph.input.append(copy.deepcopy(graph.input[0]))
    elif graph.initializer:
        tensor = _pick(rng, graph.initializer)
        graph.initializer.append(copy.deepcopy(tensor))
        graph.initializer[-1].name = graph.input[0].name
        graph.initializer[-1].data_type = TensorProto.FLOAT


def dangling_input(model: onnx.ModelProto, rng: Rng) -> None:
    graph = model.graph
    how = int(rng.integers(3))
    if how == 0:
        node = _pick(rng, [n for n in graph.node if n.input])
        if node is None:
            return
        node.input[int(rng.integers(len(node.input)))] = "dangling_tensor"
    elif how == 1 and graph.initializer:
        del graph.initializer[int(rng.integers(len(graph.initializer)))]
    elif len(graph.node) > 1:
        del graph.node[int(rng.integers(len(graph.node) - 1))]


def signature_changed(model: onnx.ModelProto, rng: Rng) -> None:
    info = _pick(rng, list(model.graph.input) + list(model.graph.output))
    tensor = info.type.tensor_type
    how = int(rng.integers(4))
    if how == 0:
        tensor.elem_type = int(rng.choice([0, 2, 6, 7, 8, 9, 10, 11, 16]))
    elif how == 1 and tensor.shape.dim:
        dim = tensor.shape.dim[int(rng.integers(len(tensor.shape.dim)))]
        value = rng.choice(["0", "-1", "3", "100000", "", "?", "seq"])
        if value.lstrip("-").isdigit():
            dim.dim_value = int(value)
        else:
            dim.dim_param = str(value)
    elif how == 2:
        tensor.ClearField("shape") if rng.random() < 0.5 else tensor.shape.dim.add().CopyFrom(
            onnx.TensorShapeProto.Dimension(dim_value=2))
    else:
        info.type.Clear()


def op_changed(model: onnx.ModelProto, rng: Rng) -> None:
    node = _pick(rng, [n for g in _all_graphs(model) for n in g.node])
    if rng.random() < 0.2:
        node.domain = str(rng.choice(["com.example", "com.microsoft", "ai.onnx.ml"]))
    else:
        node.op_type = str(rng.choice(["Conv", "Relu", "MatMul", "Gemm", "Softmax", "Reshape", "Concat",
                                       "Identity", "NoSuchOp", "Loop", "If", "Gather", "Div", "TopK"]))


MutationFn = Callable[..., object]
# name -> (function, works on bytes?)
MUTATIONS: dict[str, tuple[MutationFn, bool]] = {
    "flip_bytes": (flip_bytes, True),
    "truncate": (truncate, True),
    "not_onnx": (not_onnx, True),
    "initializer_dims": (initializer_dims, False),
    "dtype_changed": (dtype_changed, False),
    "raw_data_length": (raw_data_length, False),
    "attribute_range": (attribute_range, False),
    "outputs_dropped": (outputs_dropped, False),
    "opset_ir": (opset_ir, False),
    "cycle": (cycle, False),
    "bad_utf8": (bad_utf8, True),
    "duplicate_names": (duplicate_names, False),
    "dangling_input": (dangling_input, False),
    "signature_changed": (signature_changed, False),
    "op_changed": (op_changed, False),
}


@dataclass
class Case:
    index: int
    base: str
    mutations: list[str]
    data: bytes


def make_case(seed: int, index: int, bases: dict[str, bytes], reference_share: float = 0.1) -> Case:
    """Case ``index`` of ``seed``: a base model with one mutation (sometimes two)."""
    rng = np.random.default_rng([seed, index])
    reference = [b for b in REFERENCE if b in bases]
    hand = [b for b in bases if b not in REFERENCE]
    base = _pick(rng, reference) if reference and rng.random() < reference_share else _pick(rng, hand)
    names = list(MUTATIONS)
    chosen = [names[int(rng.integers(len(names)))]]
    if rng.random() < 0.15:
        chosen.append(names[int(rng.integers(len(names)))])
    data = bases[base]
    for name in chosen:
        function, on_bytes = MUTATIONS[name]
        if on_bytes:
            data = function(data, rng)
            continue
        try:
            model = _parse(data)
        except Exception:  # noqa: BLE001 - an earlier mutation already broke the bytes
            continue
        function(model, rng)
        data = model.SerializeToString()
    return Case(index, base, chosen, data)


# ----------------------------------------------------------------------------- running cases
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _captured(folder: Path):  # noqa: ANN202
    """Redirect file descriptors 1 and 2 (Python and native writes) into files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    out_path, err_path = folder / "stdout", folder / "stderr"
    out_path.write_bytes(b"")
    err_path.write_bytes(b"")
    with open(out_path, "ab") as out, open(err_path, "ab") as err, \
            open(out_path, "a", encoding="utf-8") as text_out, open(err_path, "a", encoding="utf-8") as text_err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        texts: dict[str, str] = {}
        try:
            # sys.stdout/sys.stderr may not write to fds 1/2 (pytest replaces them): redirect both.
            with contextlib.redirect_stdout(text_out), contextlib.redirect_stderr(text_err):
                yield texts
        finally:
            text_out.flush()
            text_err.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    texts["stdout"] = out_path.read_text(errors="replace")
    texts["stderr"] = err_path.read_text(errors="replace")


def _run_cli(argv: list[str], folder: Path) -> tuple[int, dict[str, str]]:
    """``onnxzip ARGV -q`` in this process, its fds 1 and 2 captured: (exit code, texts)."""
    from onnxzip import cli

    with _captured(folder) as texts:
        try:
            code = cli.main([*argv, "-q"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, texts


def _check_written(path: Path) -> str | None:
    """None when the written model loads and runs in onnxruntime, else the problem."""
    import onnxruntime as ort

    from onnxzip.core.inputs import generate_inputs

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"written model does not load: {str(exc).splitlines()[0][:200]}"
    try:
        feeds = generate_inputs(onnx.load(str(path)), batch=1, seed=0)
    except Exception:  # noqa: BLE001 - unknown dims: loading is the check
        return None
    try:
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return f"written model does not run: {str(exc).splitlines()[0][:200]}"
    return None


def run_case(data: bytes, folder: Path) -> dict:
    """Run both commands on one mutated model; returns exit codes and defects."""
    source = folder / "input.onnx"
    source.write_bytes(data)
    digest = _digest(source)
    result: dict = {"codes": {}, "defects": [], "messages": {}}
    for command in COMMANDS:
        output = folder / "out" / "small.onnx"
        output.parent.mkdir(exist_ok=True)
        argv = ["inspect", str(source)] if command == "inspect" else [
            "compress", str(source), "-o", str(output), "--cluster", "bits=4"]
        code, texts = _run_cli(argv, folder)
        stderr_lines = [line for line in texts["stderr"].splitlines() if line.strip()]
        result["codes"][command] = code
        if stderr_lines:
            result["messages"][command] = stderr_lines[-1][:300]
        result["defects"] += _check_outcome(command, code, texts, {source: digest},
                                            output if command == "compress" else None)
        for leftover in output.parent.iterdir():
            leftover.unlink()
    return result


# ----------------------------------------------------------------------------- data fuzzing
# Models the data is fed to: a plain batch, a stateful streaming cell (a state [2, batch, 8] and a
# scalar int64 sample rate), a fixed batch of 1, and float + bool inputs.
def _value(name: str, elem: int, shape) -> onnx.ValueInfoProto:  # noqa: ANN001
    return helper.make_tensor_value_info(name, elem, shape)


def stateful(batch: int | str = "batch") -> bytes:
    """x[batch, 8], state[2, batch, 8], sr (int64 scalar) → y = (x + Σ state)·W·sr/16000 [batch, 4],
    state_out = state/2 + x [2, batch, 8]; ``batch`` may be fixed (1) instead of symbolic."""
    rng = np.random.default_rng(4)
    f = np.float32
    nodes = [
        helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["xs"]),
        helper.make_node("MatMul", ["xs", "w"], ["h"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k"], ["scale"]),
        helper.make_node("Mul", ["h", "scale"], ["y"]),
        helper.make_node("Mul", ["state", "half"], ["sh"]),
        helper.make_node("Add", ["sh", "x"], ["state_out"]),
    ]
    inits = [_init("w", rng.standard_normal((8, 4)).astype(f)), _init("axes0", np.array([0], np.int64)),
             _init("k", f(16000.0)), _init("half", f(0.5))]
    return _model(nodes, [_value("x", TensorProto.FLOAT, [batch, 8]), _value("state", TensorProto.FLOAT, [2, batch, 8]),
                          _value("sr", TensorProto.INT64, [])],
                  [_value("y", TensorProto.FLOAT, [batch, 4]), _value("state_out", TensorProto.FLOAT, [2, batch, 8])],
                  inits)


def fixed_batch() -> bytes:
    """x[1, 8] → MatMul → Relu → MatMul → y[1, 4] (a batch fixed at 1)."""
    rng = np.random.default_rng(5)
    f = np.float32
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return _model(nodes, [_value("x", TensorProto.FLOAT, [1, 8])], [_value("y", TensorProto.FLOAT, [1, 4])],
                  [_init("w1", rng.standard_normal((8, 16)).astype(f)), _init("w2", rng.standard_normal((16, 4)).astype(f))])


def masked() -> bytes:
    """x[N, 8] float and mask[N, 4] bool → Where(mask, x·W, 0) [N, 4]."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Where", ["mask", "h", "zero"], ["y"])]
    return _model(nodes, [_value("x", TensorProto.FLOAT, ["N", 8]), _value("mask", TensorProto.BOOL, ["N", 4])],
                  [_value("y", TensorProto.FLOAT, ["N", 4])],
                  [_init("w", rng.standard_normal((8, 4)).astype(np.float32)), _init("zero", np.float32(0.0))])


DATA_MODELS: dict[str, Callable[[], bytes]] = {"mlp": mlp, "stateful": stateful, "fixed_batch": fixed_batch,
                                                 "masked": masked}
SAMPLE_AXES = {"mlp": {"x": 0}, "stateful": {"x": 0, "state": 1, "sr": None}, "fixed_batch": {"x": 0},
               "masked": {"x": 0, "mask": 0}}


def sound_data(base: str, count: int, rng: Rng) -> dict[str, np.ndarray]:
    """Valid data for ``base``: ``count`` samples of every input, class labels for the 4 outputs."""
    f = np.float32
    arrays = {
        "mlp": lambda: {"x": rng.standard_normal((count, 8)).astype(f)},
        "stateful": lambda: {"x": rng.standard_normal((count, 8)).astype(f),
                             "state": rng.standard_normal((2, count, 8)).astype(f), "sr": np.array(16000, np.int64)},
        "fixed_batch": lambda: {"x": rng.standard_normal((count, 8)).astype(f)},
        "masked": lambda: {"x": rng.standard_normal((count, 8)).astype(f), "mask": rng.random((count, 4)) < 0.7},
    }[base]()
    if rng.random() < 0.6:
        arrays["labels"] = rng.integers(0, 4, count).astype(np.int64)
    return arrays


def _inputs(arrays: dict[str, np.ndarray]) -> list[str]:
    return sorted(k for k in arrays if k not in ("labels", "references"))


def _resize(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``value`` with ``size`` entries on ``axis`` (cut, or repeated from the start)."""
    if value.shape[axis] == 0 or size == 0:
        shape = list(value.shape)
        shape[axis] = size
        return np.zeros(shape, value.dtype)
    return np.take(value, np.arange(size) % value.shape[axis], axis=axis)


def data_missing(arrays: dict, base: str, rng: Rng) -> dict:
    del arrays[_pick(rng, _inputs(arrays))]
    return arrays


def data_extra(arrays: dict, base: str, rng: Rng) -> dict:
    count = len(next(iter(arrays.values()))) if np.ndim(next(iter(arrays.values()))) else 3
    name = str(rng.choice(["extra", "X", "x_", "sample_rate", "y", "state_out", "", " "]))
    arrays[name] = _pick(rng, [np.zeros((count, 8), np.float32), np.array("text"), np.arange(5), np.zeros(())])
    return arrays


def data_renamed(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, _inputs(arrays))
    arrays[str(rng.choice([name.upper(), name + "_0", "input", "labels", "references", "arr_0"]))] = arrays.pop(name)
    return arrays


def data_rank(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, _inputs(arrays))
    value = arrays[name]
    how = int(rng.integers(3))
    arrays[name] = value[None] if how == 0 else (value[..., None] if how == 1 else
                                                 (value.reshape(-1) if value.ndim > 1 else value.reshape(1, 1, -1)))
    return arrays


def data_dtype(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, _inputs(arrays))
    value = arrays[name]
    kinds = [np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex64, "U5", "S3",
             "datetime64[s]", np.int8]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "datetime64[s]":
        arrays[name] = np.zeros(value.shape, "datetime64[s]")
    elif kind in ("U5", "S3"):
        arrays[name] = np.full(value.shape, "ab", dtype=kind)
    else:
        try:
            arrays[name] = (value * 7.3 if value.dtype.kind == "f" else value).astype(kind)
        except (TypeError, ValueError):  # an earlier mutation made it text
            arrays[name] = np.zeros(value.shape, kind)
    return arrays


def data_scalar(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, _inputs(arrays))
    value = arrays[name]
    if value.ndim == 0:  # a scalar given per sample, as [1] or [N]
        size = int(rng.choice([1, 2, 6, 0]))
        arrays[name] = np.full((size,), value, value.dtype)
    else:
        arrays[name] = np.asarray(value.reshape(-1)[0] if value.size else 0, value.dtype)
    return arrays


def data_empty(arrays: dict, base: str, rng: Rng) -> dict:
    for name in _inputs(arrays) + [k for k in ("labels", "references") if k in arrays]:
        axis = SAMPLE_AXES[base].get(name, 0)
        if axis is not None and arrays[name].ndim > axis:
            arrays[name] = _resize(arrays[name], axis, 0)
    return arrays


def data_counts(arrays: dict, base: str, rng: Rng) -> dict:
    names = [n for n in _inputs(arrays) + [k for k in ("labels", "references") if k in arrays]
             if SAMPLE_AXES[base].get(n, 0) is not None and arrays[n].ndim]
    name = _pick(rng, names)
    if name is None:
        return arrays
    axis = SAMPLE_AXES[base].get(name, 0)
    arrays[name] = _resize(arrays[name], axis, int(rng.choice([1, 2, 5, 7, 13])))
    return arrays


def data_nonfinite(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, [n for n in _inputs(arrays) if arrays[n].dtype.kind == "f" and arrays[n].size])
    if name is None:
        return arrays
    value = arrays[name].copy()
    value.reshape(-1)[int(rng.integers(value.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    arrays[name] = value
    return arrays


def data_huge(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, _inputs(arrays))
    value = arrays[name]
    if value.dtype.kind == "f":
        scale = float(rng.choice([1e30, 1e38, -1e30, 3e38]))
        arrays[name] = (value * scale).astype(value.dtype) if rng.random() < 0.5 else np.full_like(value, scale)
    elif value.dtype.kind in "iu":
        arrays[name] = np.full_like(value, np.iinfo(value.dtype).max if rng.random() < 0.5 else np.iinfo(value.dtype).min)
    return arrays


def data_targets(arrays: dict, base: str, rng: Rng) -> dict:
    key = str(rng.choice(["labels", "references"]))
    count = 6
    options = [np.arange(count + 3) % 4, np.arange(max(count - 2, 1)) % 4, np.array(2), np.zeros((count, 3, 2)),
               np.full(count, "cat"), np.linspace(0, 1, count), np.zeros((0,)), np.zeros((count, 4), np.float32),
               np.zeros((count, 5), np.float32), np.zeros((2, count, 4), np.float32), np.full(count, np.nan),
               np.full(count, -1), np.full(count, 99)]
    arrays[key] = options[int(rng.integers(len(options)))]
    return arrays


def data_fixed_axis(arrays: dict, base: str, rng: Rng) -> dict:
    name = _pick(rng, [n for n in _inputs(arrays) if arrays[n].ndim >= 2])
    if name is None:
        return arrays
    value = arrays[name]
    axis = value.ndim - 1 if rng.random() < 0.7 else 0
    if base == "stateful" and name == "state" and rng.random() < 0.5:
        axis = 0
    arrays[name] = _resize(value, axis, int(rng.choice([1, 3, 7, 9])))
    return arrays


DataFn = Callable[[dict, str, Rng], dict]
DATA_MUTATIONS: dict[str, DataFn | None] = {
    "sound": None, "missing_input": data_missing, "extra_input": data_extra, "renamed_input": data_renamed,
    "wrong_rank": data_rank, "wrong_dtype": data_dtype, "scalar_swap": data_scalar, "empty": data_empty,
    "count_mismatch": data_counts, "nan_inf": data_nonfinite, "huge": data_huge, "bad_targets": data_targets,
    "fixed_axis_size": data_fixed_axis,
    # on the file, not the arrays
    "not_npz": None, "truncated_npz": None, "pickled_object": None, "no_file": None, "sample_axis_flag": None,
}


FILE_MUTATIONS = ("not_npz", "truncated_npz", "pickled_object", "no_file")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _file_mutation(name: str, arrays: dict, rng: Rng) -> bytes | None:
    """The data file's bytes for a mutation of the file itself (None: no file at all)."""
    if name == "no_file":
        return None
    if name == "not_npz":
        choices = [b"", b"x,y\n1,2\n", b"\x93NUMPY\x01\x00" + bytes(30), b"PK\x03\x04" + bytes(40),
                   bytes(rng.integers(0, 256, 300, dtype=np.uint8)), fixed_batch()]
        return choices[int(rng.integers(len(choices)))]
    valid = _npz(arrays)
    if name == "truncated_npz":
        return valid[: int(rng.integers(0, len(valid)))]
    # pickled_object: one input (or the labels) holds Python objects
    key = _pick(rng, [*_inputs(arrays), "labels"])
    value = np.empty(6, dtype=object)
    value[:] = [np.zeros(8, np.float32), "a", None, 1, [1, 2], {"k": 1}]
    arrays[key] = value
    return _npz(arrays)


# Each command is an argv template: {model} {data} {out} {candidate}; run with -q.
DATA_COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "{model}"],
    "compress": ["compress", "{model}", "-o", "{out}", "--data", "{data}"],
    "compress_avg_bits": ["compress", "{model}", "-o", "{out}", "--data", "{data}", "--cluster", "avg_bits=4"],
    "compress_finetune": ["compress", "{model}", "-o", "{out}", "--data", "{data}", "--cluster", "bits=4",
                          "--finetune", "epochs=1"],
    "compress_accuracy": ["compress", "{model}", "-o", "{out}", "--data", "{data}", "--cluster", "bits=4",
                          "--metric", "accuracy:max_drop=0.5"],
    "compress_cosine": ["compress", "{model}", "-o", "{out}", "--data", "{data}", "--cluster", "bits=4",
                        "--metric", "cosine:min=0.5"],
    "finetune": ["finetune", "{model}", "-o", "{out}", "--data", "{data}", "--epochs", "1"],
    "validate": ["validate", "{model}", "{candidate}", "--data", "{data}"],
    "validate_accuracy": ["validate", "{model}", "{candidate}", "--data", "{data}", "--metric", "accuracy:min=0"],
    "inspect_pipe": ["inspect", "{model}"],  # in a real child process, stdout closed after 10 bytes
}
DATA_COMMAND_WEIGHTS = {"inspect": 1, "compress": 2, "compress_avg_bits": 3, "compress_finetune": 2,
                        "compress_accuracy": 2, "compress_cosine": 2, "finetune": 3, "validate": 3,
                        "validate_accuracy": 2, "inspect_pipe": 0.3}


@dataclass
class DataCase:
    index: int
    base: str
    mutations: list[str]
    command: str
    argv: list[str]
    model: bytes
    data: bytes | None


def make_data_case(seed: int, index: int) -> DataCase:
    """Case ``index`` of ``seed``: a model, sound data with one mutation (sometimes two), one command."""
    with np.errstate(all="ignore"), warnings.catch_warnings():  # casts to bad dtypes are the point
        warnings.simplefilter("ignore")
        return _make_data_case(seed, index)


def _make_data_case(seed: int, index: int) -> DataCase:
    rng = np.random.default_rng([seed, index, 1])
    base = _pick(rng, DATA_MODELS)
    names = list(DATA_MUTATIONS)
    chosen = [names[int(rng.integers(len(names)))]]
    if rng.random() < 0.15:
        chosen.append(names[int(rng.integers(len(names)))])
    commands = list(DATA_COMMAND_WEIGHTS)
    weights = np.array([DATA_COMMAND_WEIGHTS[c] for c in commands], float)
    command = commands[int(rng.choice(len(commands), p=weights / weights.sum()))]
    arrays = sound_data(base, 6, rng)
    argv = list(DATA_COMMANDS[command])
    data: bytes | None = b""
    file_level = None
    for name in chosen:
        function = DATA_MUTATIONS[name]
        if function is not None and _inputs(arrays):  # (an earlier mutation may have dropped them all)
            arrays = function(arrays, base, rng)
        elif name == "sample_axis_flag" and "--data" in argv:
            flag = _pick(rng, ["x=5", "x=-1", "x=none", "state=0", "state=2", "sr=0", "nosuch=1", "x=abc", "x", "=1",
                               "state=none", "mask=1", "x=0,x=1"])
            argv += ["--sample-axis", flag]
        elif name in FILE_MUTATIONS:
            file_level = name
    data = _file_mutation(file_level, arrays, rng) if file_level else _npz(arrays)
    return DataCase(index, base, chosen, command, argv, DATA_MODELS[base](), data)


def _check_outcome(command: str, code: int, texts: dict[str, str], inputs: dict[Path, str | None],
                   output: Path | None) -> list[str]:
    """The defects of one finished command (see the module docstring), shared by both fuzzers."""
    defects = []
    stderr_lines = [line for line in texts["stderr"].splitlines() if line.strip()]
    if code not in (0, 1, 2):
        defects.append(f"{command}: exit {code}: {stderr_lines[-1][:300] if stderr_lines else ''}")
    if code == 2 and len(stderr_lines) != 1:
        defects.append(f"{command}: exit 2 with {len(stderr_lines)} stderr lines: {stderr_lines[:3]}")
    if "Traceback" in texts["stderr"] or "Traceback" in texts["stdout"]:
        defects.append(f"{command}: traceback printed")
    for path, digest in inputs.items():
        if digest is not None and (not path.exists() or _digest(path) != digest):
            defects.append(f"{command}: the input file {path.name} changed")
    if output is None:
        return defects
    leftovers = sorted(p.name for p in output.parent.iterdir())
    if code != 0 and leftovers:
        defects.append(f"{command}: exit {code} left files behind: {leftovers}")
    if code == 0:
        if not output.exists():
            defects.append(f"{command}: exit 0 but no output written")
        else:
            problem = _check_written(output)
            if problem:
                defects.append(f"{command}: {problem}")
    return defects


def _pipe_closed_early(argv: list[str], folder: Path, keep: int = 0) -> tuple[int, dict[str, str]]:
    """Run ``onnxzip ARGV | head -c KEEP`` in a real child process; its exit code and output.

    With ``keep=0`` the reader is gone before the child writes, so its write always meets a
    closed pipe (output smaller than the pipe's buffer may otherwise fit before ``head`` exits)."""
    import subprocess

    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "onnxzip.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=environment, cwd=folder)
    head = child.stdout.read(keep) if keep else b""
    child.stdout.close()  # the reader goes away, like `| head -c KEEP`
    try:
        stderr = child.stderr.read()
        code = child.wait(DATA_CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        return 124, {"stdout": "", "stderr": "timed out"}
    return code, {"stdout": head.decode(errors="replace"), "stderr": stderr.decode(errors="replace")}


def run_data_case(case: DataCase, folder: Path) -> dict:
    """Run the case's command on its model and data; returns the exit code and defects."""
    model, candidate, data = folder / "model.onnx", folder / "candidate.onnx", folder / "data.npz"
    model.write_bytes(case.model)
    candidate.write_bytes(case.model)
    if case.data is not None:
        data.write_bytes(case.data)
    output = folder / "out" / "small.onnx"
    output.parent.mkdir(exist_ok=True)
    argv = [part.format(model=model, candidate=candidate, data=data, out=output) for part in case.argv]
    inputs = {path: _digest(path) if path.exists() else None for path in (model, candidate, data)}
    if case.command == "inspect_pipe":
        code, texts = _pipe_closed_early([*argv, "-q"], folder, keep=case.index % 2 * 10)
    else:
        code, texts = _run_cli(argv, folder)
    stderr_lines = [line for line in texts["stderr"].splitlines() if line.strip()]
    writes = "-o" in case.argv
    defects = _check_outcome(case.command, code, texts, inputs, output if writes else None)
    if case.command == "inspect_pipe" and code != 0:
        defects.append(f"inspect_pipe: exit {code} when stdout closed early")
    return {"codes": {case.command: code}, "defects": defects,
            "messages": {case.command: stderr_lines[-1][:300]} if stderr_lines else {}}


def _one_case(kind: str, seed: int, index: int, bases: dict[str, bytes], reference_share: float) -> dict:
    """Generate and run case ``index`` of the model (``kind="model"``) or data fuzzer."""
    try:
        case = make_case(seed, index, bases, reference_share) if kind == "model" else make_data_case(seed, index)
    except Exception as exc:  # noqa: BLE001 - a generator bug is reported, not fatal
        return {"index": index, "base": "?", "mutations": ["?"], "codes": {},
                "defects": [f"fuzz generator failed: {type(exc).__name__}: {exc}"]}
    with tempfile.TemporaryDirectory(prefix="onnxzip-fuzz-") as folder:
        result = run_case(case.data, Path(folder)) if kind == "model" else run_data_case(case, Path(folder))
    result.update(index=index, base=case.base, mutations=case.mutations)
    if kind == "data":
        result["argv"] = case.argv
    return result


def _worker(connection, seed: int, reference: bool, reference_share: float, kind: str) -> None:  # noqa: ANN001
    """Worker loop: receive case indices, send results (imports paid once)."""
    import logging

    if kind == "model":  # the data fuzzer keeps onnxzip's warnings: they count as stderr lines
        logging.disable(logging.CRITICAL)
    bases = base_models(reference) if kind == "model" else {}
    from onnxzip import cli  # noqa: F401 - import before the first case

    while True:
        index = connection.recv()
        if index is None:
            return
        connection.send(_one_case(kind, seed, index, bases, reference_share))


@dataclass
class Summary:
    cases: int = 0
    seconds: float = 0.0
    kind: str = "model"
    codes: dict[str, Counter] = field(default_factory=dict)
    by_mutation: Counter = field(default_factory=Counter)
    defects: list[dict] = field(default_factory=list)

    def add(self, result: dict) -> None:
        self.cases += 1
        for command, code in result.get("codes", {}).items():
            self.codes.setdefault(command, Counter())[code] += 1
        for name in result.get("mutations", []):
            self.by_mutation[name] += 1
        if result["defects"]:
            self.defects.append(result)

    def text(self, seed: int) -> str:
        flag = "--only" if self.kind == "model" else "--data-only"
        lines = [f"fuzz ({self.kind}): {self.cases} cases (seed {seed}) in {self.seconds:.0f} s "
                 f"({self.seconds / max(self.cases, 1):.2f} s/case), {len(self.defects)} defect case(s)"]
        for command in sorted(self.codes):
            histogram = ", ".join(f"exit {code}: {n}" for code, n in sorted(self.codes[command].items(), key=str))
            lines.append(f"  {command:18s} {histogram}")
        lines.append("  mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_mutation.items())))
        kinds: dict[str, list[dict]] = {}
        for result in self.defects:
            for defect in result["defects"]:
                kinds.setdefault(_defect_kind(defect), []).append(result)
        if kinds:
            lines.append("defects by kind (count, one example):")
        for name, results in sorted(kinds.items(), key=lambda item: -len(item[1])):
            example = results[0]
            command = " ".join(example.get("argv", [])).format(model="m.onnx", candidate="c.onnx", data="d.npz",
                                                                 out="out.onnx") or "compress/inspect"
            lines.append(f"  {len(results):4d}  {name}\n        e.g. case {example['index']} (base {example['base']}, "
                         f"{'+'.join(example['mutations'])}): onnxzip {command}  "
                         f"[re-run: python tools/fuzz.py --seed {seed} {flag} {example['index']}]")
        for result in self.defects:
            lines.append(f"DEFECT case {result['index']} (base {result['base']}, {'+'.join(result['mutations'])}): "
                         f"{'; '.join(result['defects'])}  [re-run: python tools/fuzz.py --seed {seed} "
                         f"{flag} {result['index']}]")
        return "\n".join(lines)


def _defect_kind(defect: str) -> str:
    """A defect's kind for the summary: its command and what went wrong, without the details."""
    import re

    command, _, rest = defect.partition(": ")
    error = re.search(r"internal error: (\w+)", rest)
    rest = re.sub(r"(exit \d+ with \d+ stderr lines|exit \d+ left files behind|exit \d+)\b.*", r"\1", rest)
    rest += f" ({error.group(1)})" if error else ""
    return f"{command}: {rest[:120]}"


def run_fuzz(cases: int, seed: int = 0, *, jobs: int = 2, reference: bool = True, reference_share: float = 0.1,
             start: int = 0, progress: bool = True, kind: str = "model") -> Summary:
    """Run cases ``start .. start+cases-1`` of ``seed`` of the model (``kind="model"``) or data
    fuzzer in ``jobs`` worker processes."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pending = list(range(start, start + cases))[::-1]
    summary = Summary(kind=kind)
    timeout = CASE_TIMEOUT_S if kind == "model" else DATA_CASE_TIMEOUT_S
    began = time.perf_counter()
    workers: list[dict] = []

    def spawn() -> dict:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, seed, reference, reference_share, kind),
                                  daemon=True)
        process.start()
        child.close()
        return {"process": process, "pipe": parent, "index": None, "since": 0.0}

    def assign(worker: dict) -> None:
        if pending:
            worker["index"] = pending.pop()
            worker["since"] = time.perf_counter()
            worker["pipe"].send(worker["index"])
        else:
            worker["index"] = None

    from tqdm.auto import tqdm

    bar = tqdm(total=cases, desc="fuzz", unit="case", disable=None if progress else True)
    for _ in range(max(1, min(jobs, cases))):
        workers.append(spawn())
        assign(workers[-1])
    while any(w["index"] is not None for w in workers):
        for slot, worker in enumerate(workers):
            if worker["index"] is None:
                continue
            index = worker["index"]
            failure = None
            if worker["pipe"].poll(0.05):
                try:
                    summary.add(worker["pipe"].recv())
                    bar.update()
                    assign(worker)
                    continue
                except EOFError:
                    worker["process"].join(5)
                    failure = f"worker died (exit {worker['process'].exitcode}: a signal kills the user's process too)"
            elif not worker["process"].is_alive():
                failure = f"worker died (exit {worker['process'].exitcode})"
            elif time.perf_counter() - worker["since"] > timeout:
                worker["process"].kill()
                failure = f"no result within {timeout:.0f} s (a hang)"
            if failure:
                summary.add({"index": index, "base": "?", "mutations": ["?"], "defects": [failure]})
                bar.update()
                worker["process"].join(5)
                workers[slot] = spawn()
                assign(workers[slot])
    for worker in workers:
        with contextlib.suppress(OSError, BrokenPipeError):
            worker["pipe"].send(None)
        worker["process"].join(10)
    bar.close()
    summary.seconds = time.perf_counter() - began
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--reference-share", type=float, default=0.1,
                        help="share of cases mutating the reference cnn/transformer (default 0.1; 0 skips them)")
    parser.add_argument("--only", type=int, default=None, help="run one case index and print its details")
    parser.add_argument("--save", metavar="FILE.onnx", help="with --only: also write the mutated model")
    parser.add_argument("--data-cases", type=int, default=None,
                        help="run this many cases of the data fuzzer instead (mutated .npz through every command)")
    parser.add_argument("--data-only", type=int, default=None, help="run one data case index and print its details")
    args = parser.parse_args(argv)
    reference = args.reference_share > 0
    if args.data_only is not None:
        data_case = make_data_case(args.seed, args.data_only)
        if args.save:
            Path(args.save).write_bytes(data_case.model)
            if data_case.data is not None:
                Path(args.save).with_suffix(".npz").write_bytes(data_case.data)
        result = _one_case("data", args.seed, args.data_only, {}, 0.0)
        print(json.dumps(result, indent=2))
        return 1 if result["defects"] else 0
    if args.data_cases is not None:
        summary = run_fuzz(args.data_cases, args.seed, jobs=args.jobs, start=args.start, kind="data")
        print(summary.text(args.seed))
        return 1 if summary.defects else 0
    if args.only is not None:
        case = make_case(args.seed, args.only, base_models(reference), args.reference_share)
        if args.save:
            Path(args.save).write_bytes(case.data)
        with tempfile.TemporaryDirectory(prefix="onnxzip-fuzz-") as folder:
            result = run_case(case.data, Path(folder))
        print(json.dumps({"index": case.index, "base": case.base, "mutations": case.mutations, **result}, indent=2))
        return 1 if result["defects"] else 0
    summary = run_fuzz(args.cases, args.seed, jobs=args.jobs, reference=reference,
                       reference_share=args.reference_share, start=args.start)
    print(summary.text(args.seed))
    return 1 if summary.defects else 0


if __name__ == "__main__":
    sys.exit(main())
