"""Label-free training data for the speech reference model in the benchmarks: noisy magnitude
spectrograms of random one-second crops of the model's *training* utterances, mixed with random
noise exactly as its training did (the held-out utterances stay for STOI/PESQ)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from onnxzip.models.speech import INPUT_NAME, SpeechTrainConfig, _training_batch, held_out_dataset
from onnxzip.models.speech_data import speech_corpus


def training_inputs(count: int = 96, seed: int = 1) -> dict[str, np.ndarray]:
    """``{noisy_magnitude: [count, frames, 257]}`` (seed 1: other crops and noises than the
    reference model's own training, seed 0)."""
    corpus = speech_corpus(seed=0)
    stft = held_out_dataset(corpus, 0).stft
    rng = np.random.default_rng(seed)
    config = replace(SpeechTrainConfig(), batch_size=count)
    noisy, _ = _training_batch(corpus, config, rng, stft)
    return {INPUT_NAME: noisy.numpy()}
