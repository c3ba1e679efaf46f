from __future__ import annotations

import sys

import pytest

from onnxzip.train import availability as training
from onnxzip.errors import RuntimeUnavailableError


def test_training_api_is_installed_here():
    # constraints.txt installs onnxruntime-training on this platform
    if sys.platform == "linux" and sys.version_info[:2] in ((3, 10), (3, 11)):
        assert training.training_available()
        assert hasattr(training.require_training("sparsity training"), "artifacts")


def test_missing_training_api_is_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(training, "_import_training", lambda: "No module named 'onnxruntime.training'")
    assert not training.training_available()
    with pytest.raises(RuntimeUnavailableError, match="sparsity training needs onnxruntime-training"):
        training.require_training("sparsity training")
