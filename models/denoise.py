"""Image reference model for SNR/PSNR: a small convolutional denoising autoencoder.

Data: scikit-image's packaged photographs in grayscale, scaled to [0, 1] and cut into 32×32
patches; noisy = clean + N(0, σ²) with σ = 0.1 (PSNR of the noisy patches ≈ 20 dB). Training and
held-out patches come from different images.

Model (input ``noisy`` (batch, 1, 32, 32), output ``denoised``): an encoder of three 3×3
convolutions (the last two with stride 2, down to 8×8×32), a decoder of two 4×4 transposed
convolutions back to 32×32 and a 3×3 convolution to one channel that estimates the noise n̂;
the output is noisy − n̂ (residual learning). Loss: mean squared error to the clean patch.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import onnxzip.torch_export
from onnxzip.errors import RuntimeUnavailableError
from onnxzip.evaluators import ArrayDataset, Predictions
from onnxzip.torch_export import export
from onnxzip.core.io import write_atomically
from onnxzip.models.cache import build_once, reference_folder
from onnxzip.models.speech import measure
from onnxzip.models.train import deterministic

log = logging.getLogger(__name__)

PATCH = 32
SIGMA = 0.1
INPUT_NAME = "noisy"
OUTPUT_NAME = "denoised"
TRAIN_IMAGES = (
    "camera",
    "coins",
    "page",
    "text",
    "clock",
    "grass",
    "gravel",
    "brick",
    "astronaut",
    "chelsea",
    "rocket",
)
HELD_OUT_IMAGES = ("moon", "coffee")
HELD_OUT_PATCHES = 96
MODEL_FILE = "model.onnx"
HELD_OUT_FILE = "heldout.npz"


@dataclass(frozen=True)
class DenoiseTrainConfig:
    """Hyper-parameters of one training run (part of the cache key through this file)."""

    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    threads: int = 1


class DenoisingAutoencoder(nn.Module):
    """Encoder–decoder estimating the noise; output = input − estimate."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy - self.decoder(self.encoder(noisy))


def _gray(name: str) -> np.ndarray:
    """Packaged scikit-image picture ``name`` as float64 grayscale in [0, 1]."""
    try:
        import skimage.color
        import skimage.data
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "The denoising reference model needs scikit-image; install it with "
            "`pip install onnxzip[images]`."
        ) from exc

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    return np.asarray(image, dtype=np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)


def patches(names: tuple[str, ...], stride: int) -> np.ndarray:
    """All PATCH×PATCH patches at ``stride`` of the named images, (N, 1, PATCH, PATCH) float32."""
    tiles = []
    for name in names:
        image = _gray(name)
        windows = np.lib.stride_tricks.sliding_window_view(image, (PATCH, PATCH))[
            ::stride, ::stride
        ]
        tiles.append(windows.reshape(-1, PATCH, PATCH))
    return np.concatenate(tiles)[:, None].astype(np.float32)


def held_out_dataset(seed: int = 0) -> ArrayDataset:
    """Noisy/clean patches of the held-out images (fixed noise), for the evaluators."""
    rng = np.random.default_rng(seed + 1)
    clean = patches(HELD_OUT_IMAGES, PATCH)
    clean = clean[rng.choice(len(clean), HELD_OUT_PATCHES, replace=False)]
    noisy = (clean + rng.normal(0.0, SIGMA, clean.shape)).astype(np.float32)
    return ArrayDataset({INPUT_NAME: noisy}, references=clean, output=OUTPUT_NAME)


@torch.no_grad()
def denoise(module: DenoisingAutoencoder, dataset: ArrayDataset) -> Predictions:
    """Denoised patches of every item, computed in PyTorch."""
    module.eval()
    noisy = np.stack([dataset.inputs(index)[INPUT_NAME] for index in range(len(dataset))])
    return Predictions.of(module(torch.tensor(noisy)).numpy())


def noisy_inputs(dataset: ArrayDataset) -> Predictions:
    """The noisy patches themselves, as the do-nothing baseline."""
    return Predictions.of(dataset.inputs(index)[INPUT_NAME] for index in range(len(dataset)))


def train_denoiser(
    seed: int = 0, config: DenoiseTrainConfig | None = None
) -> tuple[DenoisingAutoencoder, dict[str, Any]]:
    """Train with Adam, a cosine learning rate and fresh noise each step; measure held-out PSNR."""
    config = replace(config or DenoiseTrainConfig(), seed=seed)
    clean = torch.tensor(patches(TRAIN_IMAGES, PATCH // 2))
    dataset = held_out_dataset(seed)
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):
        generator = torch.Generator().manual_seed(config.seed)
        module = DenoisingAutoencoder()
        optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
        module.train()
        for _ in range(config.steps):
            batch = clean[torch.randint(len(clean), (config.batch_size,), generator=generator)]
            noisy = batch + SIGMA * torch.randn(batch.shape, generator=generator)
            loss = torch.mean((module(noisy) - batch) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        module.eval()
    metrics = {
        **measure(
            {"noisy": noisy_inputs(dataset), "denoised": denoise(module, dataset)},
            dataset,
            ["psnr", "snr"],
        ),
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    log.info("trained denoising autoencoder: %s", metrics)
    return module, metrics


def _build_denoiser(folder: Path, seed: int) -> dict[str, Any]:
    log.info("training the denoising reference model (cache %s)", folder)
    module, metrics = train_denoiser(seed)
    export(
        module,
        torch.zeros(2, 1, PATCH, PATCH),
        folder / MODEL_FILE,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    dataset = held_out_dataset(seed)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **{INPUT_NAME: np.stack(noisy_inputs(dataset).items)},
        references=np.stack([dataset.reference(i) for i in range(len(dataset))]),
    )
    write_atomically(folder / HELD_OUT_FILE, buffer.getvalue())
    return metrics


def build_denoise_reference(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[Path, ArrayDataset]:
    """The trained denoiser's ONNX path and its held-out patches (``noisy`` + ``references``),
    trained on first use and cached in ``<cache>/denoise-<hash>/``."""
    folder = reference_folder(
        "denoise", (sys.modules[__name__], onnxzip.torch_export), str(seed), cache_dir
    )
    build_once(folder, lambda target: _build_denoiser(target, seed))
    return folder / MODEL_FILE, ArrayDataset.from_npz(folder / HELD_OUT_FILE, output=OUTPUT_NAME)
