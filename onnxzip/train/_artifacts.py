"""Generate onnxruntime-training artifacts in a child process.

onnxruntime's gradient builder can abort the whole process (a C++ assertion) on graphs it does
not support, so :func:`generate` runs it in ``python -m onnxzip.train._artifacts SPEC`` and turns
any failure into a message; the caller then freezes instead of crashing.

Before generation a training copy whose Reshape or Expand takes a computed shape gets symbolic shapes (onnxruntime's
``symbolic_shape_infer``): a Reshape or Expand whose target shape is computed from ``Shape`` of an
input (jax2tf and tf2onnx exports) otherwise has no known output shape, and the gradient of a
broadcasting op after it is not reduced to its input's shape (onnxruntime then fails in
``TrainStep``: "Reshape_Grad … cannot be reshaped"). When inference fails or the generator refuses
the annotated graph, :func:`generate` is asked again without it.

A graph the generator accepts can still take the process down in its first training step (a
segmentation fault inside onnxruntime, seen on a PaddlePaddle classifier), so the same child,
once the artifacts exist, runs one training step and one evaluation step on a real batch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from onnxzip.core.runtime import onnxruntime_reason
from onnxzip.train.losses import LOSS_NAME

TIMEOUT_S = 900
GENERATED = "generated.ok"  # written by the child once the artifacts exist, before the first step
FAULT_HOOK = "ONNXZIP_TEST_FIRST_STEP_FAULT"  # tests only: "segv" kills the child in its first step
_NOISE = re.compile(r"\[[IVW]:onnxruntime:|Warning: ")


def _child(arguments: list[str], folder: Path) -> subprocess.CompletedProcess[str] | None:
    """``python -m onnxzip.train._artifacts ARGUMENTS`` in ``folder``; None when it runs over
    :data:`TIMEOUT_S`. The child imports this very onnxzip, also when it was put on sys.path
    rather than installed."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        return subprocess.run([sys.executable, "-m", "onnxzip.train._artifacts", *arguments], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None


def generate(folder: Path, model_file: Path, trainable: list[str], optimizer: str,
             weight_decay: float, symbolic: bool = True, probe: dict[str, Any] | None = None,
             device: str = "cpu") -> str | None:
    """Write training/eval/optimizer models and a checkpoint into ``folder``; returns None on
    success, else the reason (one line). With ``symbolic``, a graph with computed Reshape/Expand
    targets is first annotated with symbolic shapes; with ``probe`` (arrays by the training
    model's input names: one batch), the same child then runs one training, optimizer and
    evaluation step on it (see the module docstring)."""
    import numpy as np

    spec = folder / "spec.json"
    names = sorted(probe or {})
    if probe is not None:
        np.savez(folder / "probe.npz", *[np.asarray(probe[name]) for name in names])
    (folder / GENERATED).unlink(missing_ok=True)
    spec.write_text(json.dumps({"model": str(model_file), "trainable": trainable, "optimizer": optimizer,
                                "weight_decay": weight_decay, "out": str(folder), "symbolic": symbolic,
                                "probe": names if probe is not None else None, "device": device}))
    done = _child([str(spec)], folder)
    if done is None:
        return f"generating the training graph took over {TIMEOUT_S} s"
    if done.returncode == 0 and (folder / "optimizer_model.onnx").is_file():
        return None
    if (folder / GENERATED).is_file():  # generated; the first step failed
        return _step_failure(done)
    # onnxruntime's info/warning log lines ("[I:onnxruntime:...] GraphTransformer ... status: OK")
    # and Python warnings say nothing about why the generator failed; its error lines do
    lines = [line.strip() for line in done.stderr.splitlines()
             if line.strip() and not _NOISE.search(line)]
    errors = [line for line in lines if "Error" in line or "error" in line or "Assert" in line]
    detail = (errors or lines or [""])[-1]
    detail = detail.rsplit(" was false. ", 1)[-1]  # the message after the C++ assertion's signature
    if done.returncode < 0:
        detail = f"the generator was killed by signal {-done.returncode}" + (f" ({detail})" if detail else "")
    elif not detail:
        detail = f"exit status {done.returncode}"
    return detail[:400]


def _step_failure(done: subprocess.CompletedProcess[str]) -> str:
    """Why the first training step failed in the child (one line)."""
    if done.returncode < 0:
        return f"onnxruntime-training died in its first training step (signal {-done.returncode})"
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and not _NOISE.search(line)]
    detail = onnxruntime_reason((lines or [""])[-1])
    return f"onnxruntime-training failed in its first training step: {detail or f'exit status {done.returncode}'}"


def _first_step(folder: Path, names: list[str], device: str) -> None:
    """One training, optimizer and evaluation step of the artifacts in ``folder`` on the batch in
    ``probe.npz`` (a death here kills only this child)."""
    import numpy as np
    from onnxruntime.training import api

    arrays = np.load(folder / "probe.npz")
    batch = {name: arrays[f"arr_{i}"] for i, name in enumerate(names)}
    state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = api.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"), device=device)
    optimizer = api.Optimizer(str(folder / "optimizer_model.onnx"), module)
    inputs = [batch[name] for name in module.input_names()]
    if os.environ.get(FAULT_HOOK) == "segv":  # tests: a native crash in the first step
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
    module.train()
    module(*inputs)
    optimizer.step()
    module.lazy_reset_grad()
    module.eval()
    module(*inputs)


def _main(spec_path: str) -> None:
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    from onnxzip.train import gradients

    gradients.register()
    spec = json.loads(Path(spec_path).read_text())
    model = onnx.load(spec["model"])
    if spec.get("symbolic") and computed_shapes(model):
        model = with_symbolic_shapes(model)
    if spec["optimizer"] == "adamw":
        optimizer = onnxblock.optim.AdamW(weight_decay=spec["weight_decay"])
    else:
        optimizer = artifacts.OptimType.SGD
    artifacts.generate_artifacts(
        model, requires_grad=spec["trainable"], frozen_params=[], loss=None, optimizer=optimizer,
        artifact_directory=spec["out"], loss_input_names=[LOSS_NAME],
    )
    # onnx stamps the optimizer model with its own IR (14 with onnx 1.23); onnxruntime 1.19 loads <= 10.
    path = Path(spec["out"]) / "optimizer_model.onnx"
    optimizer_model = onnx.load(str(path))
    optimizer_model.ir_version = 10
    onnx.save(optimizer_model, str(path))
    if spec.get("probe") is not None:
        (Path(spec["out"]) / GENERATED).write_text("ok")
        _first_step(Path(spec["out"]), spec["probe"], spec.get("device", "cpu"))


def computed_shapes(model: Any) -> bool:
    """Whether a Reshape or Expand of the main graph takes a shape computed in the graph (not an
    initializer or a Constant): the case symbolic shapes are for."""
    known = {t.name for t in model.graph.initializer}
    known |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return any(n.op_type in ("Reshape", "Expand") and len(n.input) > 1 and n.input[1] not in known
               for n in model.graph.node)


def with_symbolic_shapes(model: Any) -> Any:
    """``model`` with every tensor's shape inferred symbolically (batch dims as names, computed
    Reshape/Expand targets followed through Shape/Slice/Concat), or ``model`` itself when the
    inference fails."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - an unsupported op or opset: generate from the graph as it is
        return model
    return inferred if inferred is not None else model


if __name__ == "__main__":
    _main(sys.argv[1])
