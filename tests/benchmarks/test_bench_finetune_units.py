"""benchmarks/bench_finetune.py's onnxruntime session settings (part 4's --ort-session)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_finetune as bench  # noqa: E402
from onnxzip.train import engine  # noqa: E402


def test_ort_session_applies_the_settings_to_the_training_session_and_restores_the_options():
    default = engine._session_options()
    with bench._ort_session("spin=0+threads=1"):
        options = engine._session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    restored = engine._session_options()
    assert restored.intra_op_num_threads == default.intra_op_num_threads
    with pytest.raises(Exception):  # no such entry: onnxruntime raises on reading it
        restored.get_session_config_entry("session.intra_op.allow_spinning")


def test_ort_session_refuses_an_unknown_setting():
    with bench._ort_session("spinning=off"), pytest.raises(SystemExit, match="unknown setting"):
        engine._session_options()
