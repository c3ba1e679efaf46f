"""Registry of the reference models and their on-disk cache.

Each entry is trained once per machine and cached under ``$ONNXZIP_CACHE/models`` (default
``~/.cache/onnxzip/models``) in a folder named by a hash of everything that decides the trained
weights: the source files of the model, data and training functions, the training config
(including its seed) and the torch version. The ONNX files inside are additionally named by a
hash of the exporter's source, so a change to the export re-exports without retraining.

Adding a model is one line in :data:`REFERENCE_MODELS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from filelock import FileLock
from torch import nn

import onnxzip.torch_export
from onnxzip.errors import ConfigError
from onnxzip.torch_export import export
from onnxzip.core.io import write_atomically
from onnxzip.models import cnn, transformer
from onnxzip.models.cache import LOCK_FILE, build_once, cache_root
from onnxzip.models.data import Splits, digits_images, digits_rows
from onnxzip.models.train import TrainConfig, fit_classifier
from onnxzip.core.runtime import make_session, run_session

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class ReferenceSpec:
    """How to build, feed and train one reference model.

    ``fit(module, data, config, quiet=...)`` trains ``module`` in place and returns its metrics.
    ``task`` is ``"classification"`` when the labels are class indices (enables ``accuracy``).
    """

    build: Callable[[], nn.Module]
    data: Callable[[], Splits]
    config: TrainConfig
    fit: Callable[..., dict[str, float]] = fit_classifier
    input_name: str = "input"
    task: str = "classification"


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "cnn": ReferenceSpec(cnn.build, digits_images, cnn.TRAIN_CONFIG),
    "cnn-sparse": ReferenceSpec(cnn.build, digits_images, cnn.SPARSE_TRAIN_CONFIG),
    "transformer": ReferenceSpec(transformer.build, digits_rows, transformer.TRAIN_CONFIG),
}


@dataclass(frozen=True, eq=False)
class ReferenceModel:
    """A trained reference model: its cached ONNX and weights, its data and torch metrics."""

    name: str
    onnx_path: Path
    torch_state_path: Path
    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    input_name: str
    metrics: dict[str, float]
    task: str = "classification"

    def predict(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        inputs: np.ndarray | None = None,
        *,
        batch_size: int = 256,
        device: str = "auto",
    ) -> np.ndarray:
        """First output of ``model`` in onnxruntime on ``inputs`` (default: the test set)."""
        inputs = self.test_inputs if inputs is None else inputs
        session = make_session(model, device)
        outputs = []
        for start in range(0, len(inputs), batch_size):
            feeds = {self.input_name: inputs[start : start + batch_size]}
            outputs.append(next(iter(run_session(session, feeds).values())))
        return np.concatenate(outputs)

    def accuracy(
        self, model: onnx.ModelProto | str | os.PathLike[str], *, device: str = "auto"
    ) -> float:
        """Top-1 test accuracy of ``model`` (an ONNX model or path) measured in onnxruntime."""
        if self.task != "classification":
            raise ConfigError(f"Reference model {self.name!r} is not a classifier; use predict().")
        return float((self.predict(model, device=device).argmax(axis=1) == self.test_labels).mean())


def _spec(name: str) -> ReferenceSpec:
    if name not in REFERENCE_MODELS:
        raise ConfigError(
            f"Unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}."
        )
    return REFERENCE_MODELS[name]


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def _source_bytes(obj: object) -> bytes:
    """Contents of the file that defines ``obj`` (a function or module)."""
    return Path(inspect.getsourcefile(inspect.unwrap(obj))).read_bytes()


def cache_key(name: str) -> str:
    """Hash of what decides the trained weights of reference model ``name``."""
    spec = _spec(name)
    sources = sorted({_source_bytes(function) for function in (spec.build, spec.data, spec.fit)})
    return _hash(
        *sources,
        repr(dataclasses.asdict(spec.config)).encode(),
        torch.__version__.encode(),
    )


def _export_key() -> str:
    return _hash(
        _source_bytes(onnxzip.torch_export), onnx.__version__.encode(), torch.__version__.encode()
    )


def _build_trained(spec: ReferenceSpec, state_path: Path) -> nn.Module:
    module = spec.build()
    module.load_state_dict(torch.load(state_path, weights_only=True))
    return module.eval()


def _train(spec: ReferenceSpec, folder: Path, quiet: bool) -> dict[str, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.config.seed)
        module = spec.build()
    metrics = spec.fit(module, spec.data(), spec.config, quiet=quiet)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    for stale in folder.glob("*.onnx"):  # exported from weights this run replaces
        stale.unlink()
    write_atomically(folder / STATE_FILE, buffer.getvalue())
    return metrics


def _prepare(
    name: str, cache_dir: str | os.PathLike[str] | None, retrain: bool, folded: bool, quiet: bool
) -> tuple[ReferenceSpec, Path, Path, dict[str, float]]:
    """Train (once) and export (once per exporter version); return spec, folder, ONNX, metrics."""
    spec = _spec(name)
    folder = cache_root(cache_dir) / f"{name}-{cache_key(name)}"
    metrics = build_once(folder, lambda target: _train(spec, target, quiet), rebuild=retrain)
    onnx_path = folder / f"model{'-folded' if folded else ''}-{_export_key()}.onnx"
    if not onnx_path.exists():
        with FileLock(str(folder / LOCK_FILE)):
            if not onnx_path.exists():
                export(
                    _build_trained(spec, folder / STATE_FILE),
                    torch.tensor(spec.data().test_inputs[:2]),
                    onnx_path,
                    keep_batchnorm=not folded,
                    input_names=[spec.input_name],
                )
    return spec, folder, onnx_path, metrics


def get_reference_model(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    folded: bool = False,
    quiet: bool = True,
) -> ReferenceModel:
    """The trained reference model ``name``, training and exporting it on first use.

    ``folded=True`` gives the same weights exported with BatchNorm folded into Conv (a
    deployment-style file); otherwise BatchNormalization nodes are kept. ``quiet=False`` shows
    a progress bar while training.
    """
    spec, folder, onnx_path, metrics = _prepare(name, cache_dir, retrain, folded, quiet)
    data = spec.data()
    return ReferenceModel(
        name=name,
        onnx_path=onnx_path,
        torch_state_path=folder / STATE_FILE,
        train_inputs=data.train_inputs,
        train_labels=data.train_labels,
        test_inputs=data.test_inputs,
        test_labels=data.test_labels,
        input_name=spec.input_name,
        metrics=metrics,
        task=spec.task,
    )


def load_reference_module(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> nn.Module:
    """The trained torch module of reference model ``name``, in eval mode (trains on first use)."""
    spec, folder, _, _ = _prepare(name, cache_dir, retrain=False, folded=False, quiet=True)
    return _build_trained(spec, folder / STATE_FILE)
