"""The reference-model cache: ``$ONNXZIP_CACHE/models`` (default ``~/.cache/onnxzip/models``),
one folder per model and hash of everything that shapes its weights, filled once under a lock."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from filelock import FileLock

from onnxzip.core.io import write_atomically

METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding cached reference models."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("ONNXZIP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "onnxzip") / "models"


def reference_folder(
    name: str,
    modules: tuple[ModuleType, ...],
    settings: str,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    """``<cache>/<name>-<hash>``: the hash covers the source files of ``modules``, ``settings``
    and the torch and onnx versions, so any change to them builds afresh."""
    import onnx
    import torch

    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    digest.update(f"{settings}|{torch.__version__}|{onnx.__version__}".encode())
    return cache_root(cache_dir) / f"{name}-{digest.hexdigest()[:16]}"


def build_once(
    folder: Path, build: Callable[[Path], dict[str, Any]], *, rebuild: bool = False
) -> dict[str, Any]:
    """Run ``build(folder)`` unless the folder is complete (or ``rebuild``); return its metrics.

    ``build`` writes its files atomically and returns the metrics, which are written last, so
    their file marks a complete entry. A file lock makes a second process wait for the first
    one's build instead of repeating it.
    """
    metrics_path = folder / METRICS_FILE
    if rebuild or not metrics_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / LOCK_FILE)):
            if rebuild or not metrics_path.exists():
                metrics = build(folder)
                write_atomically(metrics_path, json.dumps(metrics, indent=2).encode())
    return json.loads(metrics_path.read_text())
