"""Checks for untrusted model files, beyond what the ONNX checker looks at.

The ONNX checker accepts models that later crash Python code or onnxruntime: tensors whose
``dims`` disagree with their data, string fields that are not UTF-8, a graph without outputs,
and convolution/pooling attributes that make onnxruntime kernels divide by zero (SIGFPE kills
the process). :func:`check_structure` refuses those with one sentence naming the problem;
:func:`probe_in_child` runs the first onnxruntime session of a model in a child process, so a
native crash the static checks do not foresee becomes an :class:`InvalidModelError` instead of
taking the user's process down.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto

from onnxzip.core.compat import iter_graphs
from onnxzip.errors import InvalidModelError, NativeCrashError

log = logging.getLogger(__name__)

# Bytes per element of each tensor type (4-bit types are packed two per byte; strings have none).
_ITEM_BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8, TensorProto.FLOAT8E4M3FNUZ: 8, TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8, TensorProto.UINT4: 4, TensorProto.INT4: 4,
}
# Which typed field holds the values when raw_data is empty, and how many entries one element takes.
_TYPED_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
}
# Ops whose spatial attributes onnxruntime kernels trust (zero strides/groups divide by zero).
_WINDOW_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
    "MaxUnpool", "DeformConv",
})
_POSITIVE_INTS = {"LRN": ("size",), "DepthToSpace": ("blocksize",), "SpaceToDepth": ("blocksize",)}
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3, "DeformConv": 1}


def check_structure(model: onnx.ModelProto, name: str = "the model") -> None:
    """Raise :class:`InvalidModelError` (one sentence) for what the ONNX checker lets through."""
    check_text(model, name)
    if not model.graph.output:
        raise InvalidModelError(f"{name} declares no graph outputs, so there is nothing to compute.")
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            _check_tensor(tensor, f"initializer '{tensor.name}'", name)
        for node in graph.node:
            label = f"node '{node.name or node.output[0] if node.output else node.op_type}' ({node.op_type})"
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    _check_tensor(attribute.t, f"attribute '{attribute.name}' of {label}", name)
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    for tensor in attribute.tensors:
                        _check_tensor(tensor, f"attribute '{attribute.name}' of {label}", name)
            if node.domain in ("", "ai.onnx"):
                _check_attributes(node, graph, label, name)


def check_text(model: onnx.ModelProto, name: str = "the model") -> None:
    """Refuse string fields holding bytes that are not UTF-8 (names, doc strings, metadata)."""
    bad = _first_non_utf8(model, "model")
    if bad:
        raise InvalidModelError(f"{name} has a text field that is not valid UTF-8 ({bad}).")


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 6 has ``is_repeated``; older releases only ``label``.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _first_non_utf8(message: Message, path: str) -> str | None:
    """Path of the first string field holding undecodable bytes (python protobuf then returns
    ``bytes`` instead of ``str``), or None."""
    for field, value in message.ListFields():
        repeated = _is_repeated(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if repeated else [value]
            for index, item in enumerate(values):
                if not isinstance(item, str):
                    return f"{path}.{field.name}" + (f"[{index}]" if repeated else "")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            for index, item in enumerate(value if repeated else [value]):
                found = _first_non_utf8(item, f"{path}.{field.name}" + (f"[{index}]" if repeated else ""))
                if found:
                    return found
    return None


def _check_tensor(tensor: TensorProto, what: str, name: str) -> None:
    if tensor.data_location == TensorProto.EXTERNAL:
        return  # io.load_model loads external data before checking; unresolved ones are its business
    if tensor.data_type not in _ITEM_BITS and tensor.data_type != TensorProto.STRING:
        raise InvalidModelError(f"{name} has {what} with an unknown element type ({tensor.data_type}).")
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"{name} has {what} with a negative dimension {list(tensor.dims)}.")
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.HasField("raw_data"):
        if tensor.data_type == TensorProto.STRING:
            raise InvalidModelError(f"{name} has {what} of type string stored as raw bytes.")
        expected = (count * _ITEM_BITS[tensor.data_type] + 7) // 8
        actual = len(tensor.raw_data)
    else:
        field, per = _TYPED_FIELD.get(tensor.data_type, ("int32_data", 1))
        actual = len(getattr(tensor, field))
        if tensor.data_type in (TensorProto.UINT4, TensorProto.INT4):
            expected = (count + 1) // 2
        else:
            expected = count * per
        if actual == 0 and count > 0 and not tensor.HasField("raw_data"):
            expected = count * per  # a missing payload is as inconsistent as a short one
    if actual != expected:
        raise InvalidModelError(
            f"{name} has {what} whose shape {list(tensor.dims)} needs {expected} "
            f"{'bytes' if tensor.HasField('raw_data') else 'values'} but it holds {actual}."
        )


def _ints(node: onnx.NodeProto, key: str) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == key:
            if attribute.type == onnx.AttributeProto.INTS:
                return list(attribute.ints)
            if attribute.type == onnx.AttributeProto.INT:
                return [int(attribute.i)]
            return []
    return None


def _weight_rank(node: onnx.NodeProto, graph: onnx.GraphProto) -> int | None:
    index = _WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.input) <= index:
        return None
    for tensor in graph.initializer:
        if tensor.name == node.input[index]:
            return len(tensor.dims)
    return None


def _check_attributes(node: onnx.NodeProto, graph: onnx.GraphProto, label: str, name: str) -> None:
    """Attributes that make onnxruntime kernels crash natively, refused before a session exists."""
    def refuse(problem: str) -> None:
        raise InvalidModelError(f"{name} has {label} with {problem}.")

    for key in _POSITIVE_INTS.get(node.op_type, ()):
        values = _ints(node, key)
        if values is not None and (len(values) != 1 or values[0] <= 0):
            refuse(f"{key}={values} (it must be a positive integer)")
    if node.op_type not in _WINDOW_OPS:
        return
    kernel = _ints(node, "kernel_shape")
    rank = _weight_rank(node, graph)
    spatial = rank - 2 if rank is not None and rank > 2 else len(kernel) if kernel else None
    for key in ("strides", "dilations", "kernel_shape"):
        values = _ints(node, key)
        if values is None:
            continue
        if not values or any(v <= 0 for v in values):
            refuse(f"{key}={values} (every entry must be positive)")
        if spatial is not None and len(values) != spatial:
            refuse(f"{key}={values} ({spatial} spatial axes expected)")
    group = _ints(node, "group")
    if group is not None and (len(group) != 1 or group[0] <= 0):
        refuse(f"group={group} (it must be a positive integer)")
    for key in ("pads", "output_padding"):
        values = _ints(node, key)
        if values is None:
            continue
        if any(v < 0 for v in values):
            refuse(f"{key}={values} (entries must not be negative)")
        wanted = 2 * spatial if key == "pads" and spatial is not None else spatial
        if wanted is not None and len(values) != wanted:
            refuse(f"{key}={values} ({wanted} entries expected)")


# The child imports only numpy and onnxruntime (not onnxzip), so it starts quickly (~0.5 s);
# onnxruntime-training's import-time check of ORTModule would import torch (~3.5 s more).
_CHILD = r"""
import sys
sys.modules["onnxruntime.training"] = None
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 4
try:
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
except Exception as exc:
    print("load", str(exc).strip().replace("\n", " "), sep="\t")
    sys.exit(0)
if len(sys.argv) < 3:
    print("ok")
    sys.exit(0)
sets = {}
with np.load(sys.argv[2], allow_pickle=False) as archive:
    for key in archive.files:
        index, _, name = key.partition("/")
        sets.setdefault(int(index), {})[name] = archive[key]
try:
    for index in sorted(sets):
        session.run(None, sets[index])
except Exception as exc:
    print("run", str(exc).strip().replace("\n", " "), sep="\t")
    sys.exit(0)
print("ok")
"""

PROBE_TIMEOUT_S = float(os.environ.get("ONNXZIP_PROBE_TIMEOUT", "600"))


def _clean(message: str) -> str:
    """onnxruntime's message without its status prefix, on one line, ending in a full stop."""
    for marker in (" : INVALID_ARGUMENT : ", " : FAIL : ", " : RUNTIME_EXCEPTION : ", " : NOT_IMPLEMENTED : ",
                   " : INVALID_GRAPH : ", " : NO_SUCHFILE : "):
        if marker in message:
            message = message.split(marker, 1)[1]
            break
    message = " ".join(message.split())
    if " was false. " in message:  # an internal check: keep what it says, not the source location
        message = message.split(" was false. ", 1)[1]
    if message.startswith("Load model from ") and " failed:" in message:  # names our temporary file
        message = message.split(" failed:", 1)[1].strip()
    if len(message) > 300:
        message = message[:297] + "..."
    return message.rstrip(".") + "."


def probe_in_child(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]] | None
) -> float:
    """Build a session for ``model`` and run it on ``feeds`` (a feed set or a list of them; only
    build the session when None) in a child process; returns the seconds it took. A native crash, a load error or a run error of onnxruntime becomes an
    :class:`InvalidModelError` with one sentence.

    This is done once per untrusted input (the first time onnxruntime sees it): once the model
    has run there, running it in-process is safe.
    """
    from onnxzip.core.runtime import _serialize_compatible

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxzip-probe-") as folder:
        model_path = Path(folder) / "model.onnx"
        feeds_path = Path(folder) / "feeds.npz"
        model_path.write_bytes(_serialize_compatible(model))
        command = [sys.executable, "-c", _CHILD, str(model_path)]
        if feeds is not None:
            sets = feeds if isinstance(feeds, list) else [feeds]
            np.savez(feeds_path, **{f"{i}/{k}": v for i, one in enumerate(sets) for k, v in one.items()})
            command.append(str(feeds_path))
        try:
            done = subprocess.run(
                command,
                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise InvalidModelError(
                f"onnxruntime did not finish running the model within {PROBE_TIMEOUT_S:.0f} s."
            ) from exc
    seconds = time.perf_counter() - start
    log.info("onnxruntime probe in a child process: %.2f s", seconds)
    if done.returncode < 0:
        number = -done.returncode
        raise NativeCrashError(f"onnxruntime crashed while running the model (signal {number}).")
    verdict, _, message = done.stdout.strip().partition("\t")
    if done.returncode != 0 or verdict not in ("ok", "load", "run"):
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise InvalidModelError(f"onnxruntime failed while running the model ({_clean(last).rstrip('.')}).")
    if verdict == "load":
        raise InvalidModelError(f"onnxruntime could not load the model: {_clean(message)}")
    if verdict == "run":
        raise InvalidModelError(f"onnxruntime could not run the model: {_clean(message)}")
    return seconds




def probe_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Feed sets for the probe that cover how the model will be run at a fraction of the cost:
    with a symbolic batch axis, the first sample and the first two (a model may run at batch 1
    and fail or crash at 2, e.g. Flatten(axis=0) feeding a Gemm); with a fixed batch k, the
    first k samples (a chunk :func:`onnxzip.core.runtime.run_batched` would feed). Sample axes follow
    the layout rule (:func:`onnxzip.core.inputs.infer_sample_axes`)."""
    from onnxzip.core.inputs import as_samples, declared_shapes, fixed_batches

    if not feeds:
        return [feeds]
    shapes = declared_shapes(model)
    if set(feeds) - set(shapes):
        return [dict(feeds)]
    feeds = as_samples(feeds, shapes)
    fixed = fixed_batches(shapes, feeds.axes)
    if len(fixed) > 1:
        return [dict(feeds)]
    sizes = [min(feeds.count, next(iter(fixed)))] if fixed else sorted({min(feeds.count, 1), min(feeds.count, 2)})
    return [dict(feeds.take(slice(0, size))) for size in sizes]


def probe_batch(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, str | None]:
    """:func:`probe_in_child` on :func:`probe_feeds`, with one fallback: a model that declares a
    symbolic batch but runs only one sample at a time (an exporter traced batch 1 into a
    ``Reshape``; onnxruntime refuses, or crashes on, two) comes back as a copy whose inputs
    declare 1 on their sample axis, so every run feeds one sample at a time, with a note saying
    so; otherwise ``model`` itself and None. Anything else the probe finds is raised as it is."""
    import copy

    from onnxzip.core.inputs import as_samples, declared_shapes

    sets = probe_feeds(model, feeds)
    try:
        probe_in_child(model, sets)
        return model, None
    except InvalidModelError as exc:
        if len(sets) < 2:  # one sample and two were probed only where the batch is symbolic
            raise
        try:
            probe_in_child(model, sets[:1])
        except InvalidModelError:
            raise exc from None
        reason = str(exc).rstrip(".")
    shapes = declared_shapes(model)
    axes = as_samples(feeds, shapes).axes
    pinned = copy.deepcopy(model)
    names = []
    for info in pinned.graph.input:
        axis = axes.get(info.name)
        shape = shapes.get(info.name)
        if axis is None or not shape or axis >= len(shape) or isinstance(shape[axis], int):
            continue
        dim = info.type.tensor_type.shape.dim[axis]
        names.append(f"{info.name}[{axis}] '{dim.dim_param}'" if dim.dim_param else f"{info.name}[{axis}]")
        dim.Clear()
        dim.dim_value = 1
    if not names:
        raise InvalidModelError(reason + ".")
    return pinned, (f"the model declares a symbolic batch ({', '.join(names)}) but runs only one sample at a time "
                    f"({reason[0].lower() + reason[1:]} at two): samples are fed one at a time; the output declares "
                    "its inputs as the input did")


def declare_inputs_like(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give ``model``'s graph inputs the declared types of ``template``'s inputs of the same name
    (in place): what :func:`probe_batch` pinned goes back to the user's declaration."""
    declared = {info.name: info.type for info in template.graph.input}
    for info in model.graph.input:
        if info.name in declared and info.type != declared[info.name]:
            info.type.CopyFrom(declared[info.name])
