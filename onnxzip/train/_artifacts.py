"""Generate onnxruntime-training artifacts in a child process.

onnxruntime's gradient builder can abort the whole process (a C++ assertion) on graphs it does
not support, so :func:`generate` runs it in ``python -m onnxzip.train._artifacts SPEC`` and turns
any failure into a message; the caller then freezes instead of crashing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from onnxzip.train.losses import LOSS_NAME

TIMEOUT_S = 900
_NOISE = re.compile(r"\[[IVW]:onnxruntime:|Warning: ")


def generate(folder: Path, model_file: Path, trainable: list[str], optimizer: str,
             weight_decay: float) -> str | None:
    """Write training/eval/optimizer models and a checkpoint into ``folder``; returns None on
    success, else the reason (one line)."""
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"model": str(model_file), "trainable": trainable, "optimizer": optimizer,
                                "weight_decay": weight_decay, "out": str(folder)}))
    # The child imports this very onnxzip, also when it was put on sys.path rather than installed.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "onnxzip.train._artifacts", str(spec)], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"generating the training graph took over {TIMEOUT_S} s"
    if done.returncode == 0 and (folder / "optimizer_model.onnx").is_file():
        return None
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


def _main(spec_path: str) -> None:
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    from onnxzip.train import gradients

    gradients.register()
    spec = json.loads(Path(spec_path).read_text())
    model = onnx.load(spec["model"])
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


if __name__ == "__main__":
    _main(sys.argv[1])
