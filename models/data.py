"""The scikit-learn digits data set (1,797 8×8 images, shipped with the package), two views.

One fixed stratified split (seed 0, 20 % test) serves every model, so accuracies are comparable.
Arrays are returned read-only because they are cached and shared between callers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.2
CNN_SIZE = 16


@dataclass(frozen=True)
class Splits:
    """Train and test arrays of one view: float32 inputs, int64 labels."""

    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=1)
def _digits_split() -> Splits:
    """Images scaled to [0, 1], shape (N, 8, 8), split once."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return Splits(*_read_only(train_x, train_y, test_x, test_y))


def _upsample(images: np.ndarray) -> np.ndarray:
    tensor = torch.tensor(images).unsqueeze(1)
    resized = torch.nn.functional.interpolate(
        tensor, size=(CNN_SIZE, CNN_SIZE), mode="bilinear", align_corners=False
    )
    return resized.numpy().astype(np.float32)


@functools.lru_cache(maxsize=1)
def digits_images() -> Splits:
    """CNN view: images in [0, 1] upsampled bilinearly to 16×16, shape (N, 1, 16, 16)."""
    split = _digits_split()
    return Splits(
        *_read_only(_upsample(split.train_inputs), split.train_labels.copy()),
        *_read_only(_upsample(split.test_inputs), split.test_labels.copy()),
    )


@functools.lru_cache(maxsize=1)
def digits_rows() -> Splits:
    """Transformer view: each digit as 8 rows (tokens) of 8 pixels, shape (N, 8, 8).

    Standardized with the training set's pixel mean and standard deviation (one scalar each:
    per-column statistics would blow up the nearly always blank border columns).
    """
    split = _digits_split()
    mean = float(split.train_inputs.mean())
    std = float(split.train_inputs.std())

    def normalize(images: np.ndarray) -> np.ndarray:
        return ((images - mean) / std).astype(np.float32)

    return Splits(
        *_read_only(normalize(split.train_inputs), split.train_labels.copy()),
        *_read_only(normalize(split.test_inputs), split.test_labels.copy()),
    )
