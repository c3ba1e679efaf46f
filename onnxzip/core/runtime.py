"""The one place that builds onnxruntime sessions.

``device="auto"`` uses CUDAExecutionProvider when the installed onnxruntime offers it *and* a
session really starts on it (a CUDA build on a machine without a GPU lists the provider but
cannot use it); otherwise the CPU. The provider actually used is logged and returned.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import ConfigError, DataError, InvalidModelError, RuntimeUnavailableError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when a tiny model really runs on CUDAExecutionProvider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 7
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # The CUDA build logs loud errors when CUDA libraries are missing; the probe stays quiet.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CUDAExecutionProvider"]
        )
        usable = "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        usable = False
    finally:
        ort.set_default_logger_severity(2)
    if not usable:
        log.info("CUDAExecutionProvider is not usable here; onnxruntime runs on the CPU")
    return usable


def resolve_device(device: str = "auto") -> str:
    """Map ``auto``/``cpu``/``cuda`` to the device that will really be used."""
    if device not in DEVICES:
        raise ConfigError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if device == "cuda":
        raise RuntimeUnavailableError(
            "device='cuda' was asked for, but onnxruntime cannot run on CUDA here "
            "(no GPU, no CUDA build, or missing CUDA libraries); use device='auto' or 'cpu'."
        )
    return "cpu"


def _providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else [
        "CPUExecutionProvider"
    ]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs the tensors ``names`` (untyped, each
    once; those already outputs are left as they are), to read inner activations in one run.
    Graph inputs are left out: the caller has their values, and onnxruntime 1.19 returns a wrong
    one for an input listed as an output (a Relu of it, when the Relu reads it)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in known)
    return probe


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str] | bytes,
    device: str = "auto",
    *,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    intra_op_threads: int | None = None,
) -> Any:
    """Build an ``onnxruntime.InferenceSession`` for ``model`` on ``device``.

    ``optimization`` is ``"all"``, ``"extended"``, ``"basic"`` or ``"disabled"``.
    ``optimized_model_path`` asks onnxruntime to write the graph it optimized (used by tests
    that check constant folding).
    """
    import onnxruntime as ort

    resolved = resolve_device(device)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions (one sentence), not log lines
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ConfigError(f"Unknown optimization level {optimization!r}.")
    options.graph_optimization_level = levels[optimization]
    if optimized_model_path:
        options.optimized_model_filepath = str(optimized_model_path)
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= 2**31 - 1:
            raise ConfigError(
                "Models over 2 GB must be saved with external data and passed as a path."
            )
        source: Any = _serialize_compatible(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = os.fspath(model)
    try:
        session = ort.InferenceSession(source, options, providers=_providers(resolved))
    except Exception as exc:  # onnxruntime raises its own exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"onnxruntime could not load the model: {first_line}") from exc
    log.info("onnxruntime session on %s", session.get_providers()[0])
    return session


def _serialize_compatible(model: onnx.ModelProto) -> bytes:
    """Serialize with the lowest IR version the model needs (onnx stamps newer IRs than
    onnxruntime 1.19 accepts), leaving the caller's object unchanged."""
    from onnxzip.core.compat import MAX_IR_VERSION, ir_version_as, required_ir_version

    ir = model.ir_version if model.ir_version <= MAX_IR_VERSION else max(required_ir_version(model), 3)
    with ir_version_as(model, ir):
        return model.SerializeToString()


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds`` and return outputs by name."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return dict(zip(names, values))


def onnxruntime_reason(error: BaseException | str, limit: int = 300) -> str:
    """The informative part of an onnxruntime error in one line: the node it names, then what
    went wrong, after onnxruntime's source location and C++ signature."""
    text = " ".join(str(error).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    for marker in ("Status Message: ", " was false. "):
        text = text.rsplit(marker, 1)[-1]
    text = text.rsplit("] : ", 1)[-1]
    return ((f"{node.group(1)} node '{node.group(2)}': " if node else "") + text)[:limit]


def run_batched(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    batch_size: int | None = None,
    *,
    sample_axes: Mapping[str, int | None] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds`` holding N samples, in chunks the model accepts, and join the
    outputs on their sample axes: the one place that feeds N samples to a model (see
    :func:`run_samples`)."""
    return run_samples(session, feeds, batch_size, sample_axes=sample_axes)[0]


def run_samples(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    batch_size: int | None = None,
    *,
    sample_axes: Mapping[str, int | None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int | None]]:
    """Outputs of ``session`` over the N samples in ``feeds``, and each output's sample axis.

    Each input's sample axis comes from ``feeds.axes`` (:class:`onnxzip.core.inputs.Samples`), then
    ``sample_axes``, else the layout rule (:func:`onnxzip.core.inputs.infer_sample_axes`); an input
    that is the same for every sample is fed whole to every chunk. A model that fixes its batch
    at k runs k samples at a time (the last chunk is filled up by repeating its last sample and
    the extra outputs dropped), so any N works; a symbolic batch runs ``batch_size`` samples at
    a time (all at once when None). An output's sample axis is the one the model names like an
    input's sample axis (``[20, batch, 37]``), else one named like a batch, else the first axis
    of the chunk's size; an output without one is stacked per chunk (axis None).
    """
    from onnxzip.core.inputs import fixed_batches, infer_sample_axes, session_shapes, take

    shapes = session_shapes(session)
    arrays = {name: np.asarray(value) for name, value in feeds.items()}
    given = {**dict(getattr(feeds, "axes", {}) or {}), **dict(sample_axes or {})}
    given = {name: axis for name, axis in given.items() if name in arrays and name in shapes}
    axes, count = infer_sample_axes(shapes, arrays, given)
    sampled = {name: axis for name, axis in axes.items() if axis is not None}
    fixed = fixed_batches(shapes, sampled)
    if len(fixed) > 1:
        raise DataError(f"The model's inputs fix different batch sizes on their sample axes: {sorted(fixed)}.")
    chunk = next(iter(fixed)) if fixed else (batch_size or count)
    symbols = {shapes[name][axis] for name, axis in sampled.items()
               if shapes.get(name) and isinstance(shapes[name][axis], str)}
    declared_out = {o.name: o.shape for o in session.get_outputs()}
    out_axes: dict[str, int | None] = {}
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, chunk):
        real = min(chunk, count - start)
        part = {name: take(value, slice(start, start + real), axes[name]) for name, value in arrays.items()}
        if fixed and real < chunk:
            fill = np.repeat(np.arange(real - 1, real), chunk - real)
            part = {name: value if axes[name] is None else np.concatenate(
                [value, take(value, fill, axes[name])], axis=axes[name]) for name, value in part.items()}
        mirrors = [(np.shape(part[n]), a) for n, a in sampled.items()]  # a state output mirrors its input
        for name, value in run_session(session, part).items():
            if name not in out_axes:
                out_axes[name] = _output_axis(declared_out.get(name), np.shape(value), chunk if fixed else real, symbols,
                                              mirrors)
            axis = out_axes[name]
            if axis is not None and real < np.shape(value)[axis]:
                value = take(value, slice(0, real), axis)
            parts.setdefault(name, []).append(value)
    joined = {}
    for name, values in parts.items():
        axis = out_axes[name]
        if axis is not None and len(values) > 1:
            axis = out_axes[name] = _joined_axis(name, values, axis)
        if axis is None and len({np.shape(v) for v in values}) > 1:
            raise DataError(f"The model's output '{name}' has no axis that follows the samples (its shape changes "
                            f"with the number of samples run together: {sorted({np.shape(v) for v in values})}), so its "
                            "values cannot be joined per sample.")
        joined[name] = values[0] if len(values) == 1 else (
            np.concatenate(values, axis=axis) if axis is not None else np.stack(values))
    return joined, out_axes


def _output_axis(declared: Any, shape: tuple[int, ...], rows: int, symbols: set[str],
                 mirrors: list[tuple[tuple[int, ...], int]] = ()) -> int | None:
    """The sample axis of one output (see :func:`run_samples`); where several axes have the
    chunk's size, an output shaped like a sampled input (``mirrors``: its shape and sample axis in
    the chunk), as a state output is, takes that input's axis."""
    from onnxzip.core.inputs import BATCH_NAMES

    if declared is not None and len(declared) == len(shape):
        for test in (lambda d: d in symbols, lambda d: isinstance(d, str) and (d in BATCH_NAMES or "batch" in d.lower())):
            named = [axis for axis, dim in enumerate(declared) if test(dim) and shape[axis] == rows]
            if named:
                return named[0]
    matching = [axis for axis, size in enumerate(shape) if size == rows]
    if len(matching) > 1:
        mirrored = {axis for like, axis in mirrors if tuple(like) == tuple(shape)}
        if len(mirrored) == 1:
            return mirrored.pop()
    return (0 if 0 in matching else matching[0]) if matching else None


def _joined_axis(name: str, values: list[np.ndarray], axis: int) -> int:
    """``axis``, or, when the chunks' shapes say otherwise (they differ on one other axis, as a
    last shorter chunk does), that axis."""
    shapes = [np.shape(v) for v in values]
    if len({len(s) for s in shapes}) == 1:
        differ = {i for s in shapes for i, size in enumerate(s) if size != shapes[0][i]}
        if not differ or differ == {axis}:
            return axis
        if len(differ) == 1:
            return differ.pop()
    raise DataError(f"The model's output {name!r} changes shape between runs of samples ({shapes[0]} and "
                    f"{next(s for s in shapes if s != shapes[0])}) in a way that does not follow the samples.")


def measure_latency(
    model: onnx.ModelProto | str | os.PathLike[str] | bytes,
    feeds: dict[str, np.ndarray],
    device: str = "auto",
    *,
    repeats: int = 20,
    warmup: int = 3,
    max_seconds: float = 2.0,
) -> float:
    """Median wall time in milliseconds of one ``session.run`` on ``feeds`` (after ``warmup``
    runs), over ``repeats`` runs or as many as fit in ``max_seconds``."""
    import time

    session = make_session(model, device)
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feeds)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)
