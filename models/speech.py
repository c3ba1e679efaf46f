"""Speech-enhancement reference model for Method 1: LSTM layers each followed by LayerNorm.

The ONNX model maps the noisy magnitude spectrogram |STFT(noisy)| (batch, frames, 257; 16 kHz,
n_fft 512, hop 128) to a mask in (0, 1) of the same shape::

    features = (log(|Y| + ε) − μ) / σ          μ, σ: per-bin statistics of the training data
    h1 = LayerNorm(LSTM(features))
    h2 = LayerNorm(LSTM(h1))
    mask = Sigmoid(Linear(h2))

The enhanced waveform is iSTFT(mask · STFT(noisy)) (noisy phase); the
:class:`~onnxzip.evaluators.audio.SpeechDataset` returned with the model does the STFT
front-end and this reconstruction, so the evaluators score the model end to end.

Training minimizes the error between power-law compressed magnitudes,
L = mean((mask·|Y|)^0.3 − |S|^0.3)², on random one-second crops of espeak-ng speech (see
:mod:`onnxzip.models.speech_data`) mixed with fresh noise at every step.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import onnxzip.evaluators.audio
from onnxzip.errors import RuntimeUnavailableError
from onnxzip.evaluators import (
    Dataset,
    Predictions,
    SpeechDataset,
    Stft,
    load_wav_folder,
    resolve_metric,
    score,
)
from onnxzip.evaluators.base import fit_length
from onnxzip.torch_export import export
from onnxzip.core.io import write_atomically
from onnxzip.models import speech_data
from onnxzip.models.cache import build_once, reference_folder
from onnxzip.models.speech_data import (
    SAMPLE_RATE,
    Corpus,
    held_out_mixtures,
    noisy_version,
    speech_corpus,
)
from onnxzip.models.train import deterministic

log = logging.getLogger(__name__)

N_FFT = 512
HOP = 128
BINS = N_FFT // 2 + 1
INPUT_NAME = "noisy_magnitude"
OUTPUT_NAME = "mask"
OPSET = 17
LOG_FLOOR = 1e-4
COMPRESSION = 0.3
MODEL_FILE = "model.onnx"
HELD_OUT_DIR = "heldout"


@dataclass(frozen=True)
class SpeechTrainConfig:
    """Hyper-parameters of one training run (part of the cache key)."""

    hidden: int = 128
    steps: int = 320
    batch_size: int = 16
    crop_seconds: float = 1.0
    learning_rate: float = 3e-3
    seed: int = 0
    threads: int = 1  # small recurrent matmuls gain nothing from more threads on 2 cores


class SpeechEnhancer(nn.Module):
    """Mask estimator: 2 × (LSTM → LayerNorm) → Linear → Sigmoid (see the module docstring)."""

    def __init__(self, hidden: int = 128, layers: int = 2, bins: int = BINS) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(bins))
        self.register_buffer("feature_std", torch.ones(bins))
        self.lstms = nn.ModuleList(
            nn.LSTM(bins if index == 0 else hidden, hidden, batch_first=True)
            for index in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.mask = nn.Linear(hidden, bins)

    def features(self, magnitude: torch.Tensor) -> torch.Tensor:
        """log(|Y| + ε), before the per-bin standardization."""
        return torch.log(magnitude + LOG_FLOOR)

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        hidden = (self.features(magnitude) - self.feature_mean) / self.feature_std
        for lstm, norm in zip(self.lstms, self.norms):
            hidden = norm(lstm(hidden)[0])
        return torch.sigmoid(self.mask(hidden))


def held_out_dataset(corpus: Corpus, seed: int = 0) -> SpeechDataset:
    """The test utterances in every noise, described for the evaluators (mask representation)."""
    noisy, clean = held_out_mixtures(corpus, seed)
    return SpeechDataset(
        noisy,
        clean,
        sample_rate=SAMPLE_RATE,
        n_fft=N_FFT,
        hop=HOP,
        representation="mask",
        input_name=INPUT_NAME,
        output=OUTPUT_NAME,
    )


def _training_batch(
    corpus: Corpus, config: SpeechTrainConfig, rng: np.random.Generator, stft: Stft
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy magnitudes, clean magnitudes) of random crops mixed with random noise."""
    crop = int(config.crop_seconds * SAMPLE_RATE)
    noisy_batch, clean_batch = [], []
    for _ in range(config.batch_size):
        clean = corpus.train[rng.integers(len(corpus.train))]
        start = rng.integers(max(1, len(clean) - crop))
        clean = fit_length(clean[start : start + crop], crop)
        noisy = noisy_version(clean, rng, corpus.train)
        noisy_batch.append(np.abs(stft.forward(noisy)))
        clean_batch.append(np.abs(stft.forward(clean)))
    return (
        torch.tensor(np.stack(noisy_batch), dtype=torch.float32),
        torch.tensor(np.stack(clean_batch), dtype=torch.float32),
    )


def _audio_metrics() -> list[str]:
    """SNR, plus STOI and PESQ when the audio extra is installed."""
    names = ["snr"]
    for name in ("stoi", "pesq"):
        try:
            resolve_metric(name)
        except RuntimeUnavailableError:
            log.warning("%s is unavailable; the speech model is reported without it", name)
            continue
        names.append(name)
    return names


@torch.no_grad()
def enhance(module: SpeechEnhancer, dataset: SpeechDataset) -> Predictions:
    """Enhanced waveforms of every item, computed in PyTorch."""
    module.eval()
    masks = (
        module(torch.tensor(dataset.inputs(index)[INPUT_NAME])[None])[0].numpy()
        for index in range(len(dataset))
    )
    return Predictions.of(
        dataset.postprocess({OUTPUT_NAME: mask}, index) for index, mask in enumerate(masks)
    )


def measure(
    variants: Mapping[str, Predictions], dataset: Dataset, names: list[str]
) -> dict[str, float]:
    """``<variant>_<metric>`` for each named set of predictions, e.g. noisy vs enhanced."""
    return {
        f"{variant}_{name}": round(result.value, 4)
        for variant, predictions in variants.items()
        for name, result in score(predictions, dataset, names).items()
    }


def train_speech_model(
    seed: int = 0, config: SpeechTrainConfig | None = None
) -> tuple[SpeechEnhancer, dict[str, float]]:
    """Train the enhancer with Adam and a cosine learning rate; measure it on held-out speech.

    Returns the module (eval mode) and metrics: noisy vs enhanced SNR/STOI/PESQ on the held-out
    utterances, training seconds and the corpus source.
    """
    config = replace(config or SpeechTrainConfig(), seed=seed)
    corpus = speech_corpus(seed=config.seed)
    dataset = held_out_dataset(corpus, config.seed)
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):
        rng = np.random.default_rng(config.seed)
        module = SpeechEnhancer(config.hidden)
        sample, _ = _training_batch(corpus, config, rng, dataset.stft)
        features = module.features(sample).reshape(-1, BINS)
        module.feature_mean.copy_(features.mean(dim=0))
        module.feature_std.copy_(features.std(dim=0) + 1e-3)
        optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
        module.train()
        for step in range(config.steps):
            noisy, clean = _training_batch(corpus, config, rng, dataset.stft)
            estimate = module(noisy) * noisy
            loss = torch.mean((estimate.clamp_min(1e-8) ** COMPRESSION - clean**COMPRESSION) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                log.debug("step %d loss %.5f", step, loss.item())
        module.eval()
    seconds = round(time.perf_counter() - started, 2)
    variants = {"noisy": Predictions.of(dataset.noisy), "enhanced": enhance(module, dataset)}
    metrics = {
        **measure(variants, dataset, _audio_metrics()),
        "train_seconds": seconds,
        "corpus": corpus.source,
    }
    log.info("trained speech enhancer: %s", metrics)
    return module, metrics


def export_speech_model(module: SpeechEnhancer) -> onnx.ModelProto:
    """ONNX (opset 17) with dynamic batch and frame axes."""
    return export(
        module,
        torch.ones(1, 20, BINS),
        opset=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={1: "frames"},
    )


def _build_speech(folder: Path, seed: int) -> dict[str, Any]:
    log.info("training the speech reference model (cache %s)", folder)
    module, metrics = train_speech_model(seed)
    write_atomically(folder / MODEL_FILE, export_speech_model(module).SerializeToString())
    held_out_dataset(speech_corpus(seed=seed), seed).save(folder / HELD_OUT_DIR)
    return metrics


def build_speech_reference(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[Path, SpeechDataset]:
    """The trained speech model's ONNX path and its held-out dataset, trained on first use.

    Cached in ``<cache>/speech-<hash>/`` (cache: ``cache_dir``, else ``$ONNXZIP_CACHE/models``,
    else ``~/.cache/onnxzip/models``): ``model.onnx``, ``heldout/`` (noisy/ and clean/ WAVs with
    ``dataset.json``) and ``metrics.json``.
    """
    source = "espeak-ng" if speech_data.espeak_available() else "synthetic"
    folder = reference_folder(
        "speech",
        (sys.modules[__name__], speech_data, onnxzip.evaluators.audio),
        f"{seed}|{source}",
        cache_dir,
    )
    build_once(folder, lambda target: _build_speech(target, seed))
    return folder / MODEL_FILE, load_wav_folder(folder / HELD_OUT_DIR)

