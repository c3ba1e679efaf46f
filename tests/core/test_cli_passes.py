"""Each pass's "done when" command, through the real command line, on the reference models
with their held-back data and an accuracy condition."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxzip.cli import main
from onnxzip.models.zoo import get_reference_model


def _npz(tmp_path, reference):
    path = tmp_path / "test.npz"
    np.savez(path, **{reference.input_name: reference.test_inputs, "labels": reference.test_labels})
    return path


# Limits with room for another machine's training run of the reference models (measured here:
# drops of 0.003, 0.003, 0.006, 0.003, 0.017; cosines 0.989, 0.993, 0.988, 0.995, 0.972).
@pytest.mark.parametrize(
    "model, flags, max_drop",
    [
        ("transformer", ["--svd", "energy=0.8"], 0.02),
        ("transformer", ["--svd", "budget=0.5"], 0.03),
        ("cnn", ["--cluster", "k=16"], 0.02),
        ("cnn", ["--cluster", "auto"], 0.02),
        ("cnn", ["--prune-channels", "ratio=0.05", "--svd", "budget=0.5", "--cluster", "bits=4"], 0.04),
    ],
)
def test_pass_flags_on_reference_models(tmp_path, model, flags, max_drop):
    reference = get_reference_model(model)
    out = tmp_path / "out.onnx"
    report_path = tmp_path / "report.json"
    code = main(["compress", str(reference.onnx_path), "-o", str(out), *flags, "--data", str(_npz(tmp_path, reference)),
                 "--metric", f"accuracy:max_drop={max_drop}", "--min-cosine", "0.9", "--report", str(report_path), "-q"])
    assert code == 0
    report = json.loads(report_path.read_text())
    names = [flag[2:] for flag in flags if flag.startswith("--")]
    assert [p["pass_name"] for p in report["passes"]][: len(names)] == names
    assert report["quality"]["passed"] and report["validation"]["passed"]
    assert report["after"]["bytes"] < report["before"]["bytes"]
    assert any(not c["decision"] == "skipped" for p in report["passes"][:-1] for c in p["changes"])
    assert reference.accuracy(out) >= reference.accuracy(reference.onnx_path) - max_drop
    assert onnx.load(out).ir_version <= 10


def test_prune_flags_done_when_command(tmp_path):
    reference = get_reference_model("cnn")
    out = tmp_path / "pruned.onnx"
    code = main(["compress", str(reference.onnx_path), "-o", str(out), "--prune-channels", "ratio=0.5",
                 "--prune-blocks", "2", "--force", "--report", str(tmp_path / "r.json"), "-q"])
    assert code == 0  # the unslimmed model loses accuracy without fine-tuning: written with --force
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["params"] < report["before"]["params"] / 2
    blocks = report["passes"][1]
    assert sum(c["decision"] == "removed" for c in blocks["changes"]) == 2
    assert all(c["reason"] for c in blocks["changes"] if c["decision"] == "skipped")
