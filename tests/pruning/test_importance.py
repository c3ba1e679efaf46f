"""Importance scores and channel selection (pure numpy)."""
from __future__ import annotations

import numpy as np

from onnxzip.pruning.importance import filter_norms, keep_count, select_channels


def test_filter_norms_along_output_axis():
    weight = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    np.testing.assert_allclose(filter_norms(weight, 0, 1), np.abs(weight).reshape(2, -1).sum(axis=1))
    np.testing.assert_allclose(filter_norms(weight, 1, 2), np.sqrt((weight**2).sum(axis=(0, 2))))


def test_keep_count_honours_minimum_and_rounding():
    assert keep_count(10, 9, 1, 1) == 1
    assert keep_count(10, 10, 3, 1) == 3
    assert keep_count(20, 7, 1, 8) == 16
    assert keep_count(6, 1, 1, 8) == 6


def test_threshold_global_and_layer_ratios():
    scores = {"a": np.array([0.0, 0.5, 0.2, 0.9]), "b": np.array([0.1, 0.05, 3.0, 2.0, 1.0, 0.7])}
    assert select_channels(scores, threshold=0.15) == {"a": [1, 2, 3], "b": [2, 3, 4, 5]}
    # global ratio 0.3 of 10 channels: the 3 lowest overall are a0, b1, b0
    assert select_channels(scores, ratio=0.3) == {"a": [1, 2, 3], "b": [2, 3, 4, 5]}
    assert select_channels(scores, ratio=0.5, scope="layer") == {"a": [1, 3], "b": [2, 3, 4]}
    assert select_channels(scores, ratio=0.5, scope="layer", layer_ratios={"a": 0.0}) == {"a": [0, 1, 2, 3], "b": [2, 3, 4]}
    assert select_channels(scores, threshold=10.0, min_channels=2) == {"a": [1, 3], "b": [2, 3]}
    assert select_channels(scores, threshold=10.0, round_to=4) == {"a": [0, 1, 2, 3], "b": [2, 3, 4, 5]}
