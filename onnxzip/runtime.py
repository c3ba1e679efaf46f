"""The one place that builds onnxruntime sessions.

``device="auto"`` uses CUDAExecutionProvider when the installed onnxruntime offers it *and* a
session really starts on it (a CUDA build on a machine without a GPU lists the provider but
cannot use it); otherwise the CPU. The provider actually used is logged and returned.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import ConfigError, InvalidModelError, RuntimeUnavailableError

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
    from onnxzip.compat import MAX_IR_VERSION, ir_version_as, required_ir_version

    ir = model.ir_version if model.ir_version <= MAX_IR_VERSION else max(required_ir_version(model), 3)
    with ir_version_as(model, ir):
        return model.SerializeToString()


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds`` and return outputs by name."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return dict(zip(names, values))


def session_batch_size(session: Any) -> int | None:
    """The fixed size of axis 0 shared by the session's inputs, or None when it is symbolic
    (or the inputs disagree, or have no axis 0)."""
    sizes = {i.shape[0] for i in session.get_inputs() if i.shape}
    if len(sizes) == 1:
        size = next(iter(sizes))
        if isinstance(size, int) and size > 0:
            return size
    return None


def run_batched(
    session: Any, feeds: dict[str, np.ndarray], batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds`` holding N samples on axis 0, in chunks the model accepts,
    and concatenate the outputs on axis 0: the one place that feeds N samples to a model.

    A model whose inputs fix axis 0 at k (deployment files often fix k = 1) runs k samples at a
    time; the last chunk is filled up by repeating its last sample and the extra output rows are
    dropped, so any N works. A symbolic batch runs ``batch_size`` samples at a time (all at
    once when None). Feeds whose axis 0 sizes differ (a state tensor beside the batch) run as
    they are, in one call.
    """
    rows = {np.shape(v)[0] if np.ndim(v) else None for v in feeds.values()}
    fixed = session_batch_size(session)
    chunk = fixed or batch_size
    if len(rows) != 1 or None in rows or chunk is None:
        return run_session(session, feeds)
    total = int(rows.pop())
    if total == chunk or (fixed is None and total <= chunk):
        return run_session(session, feeds)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, chunk):
        real = min(chunk, total - start)
        part = {k: np.asarray(v[start:start + real]) for k, v in feeds.items()}
        if fixed is not None and real < chunk:
            part = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)]) for k, v in part.items()}
        for name, value in run_session(session, part).items():
            if np.ndim(value) and value.shape[0] == chunk and real < chunk:
                value = value[:real]
            parts.setdefault(name, []).append(value if np.ndim(value) else np.reshape(value, (1,)))
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


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
