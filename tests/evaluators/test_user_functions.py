"""User code in quality conditions as users write it: ``user:scorer.py:fn``,
``user:package.module:fn`` and the model-level ``task:scorer.py:fn``, through compress, validate
and a loop; a scorer that raises is one sentence naming it (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import mlp

import onnxzip
from onnxzip.cli import main
from onnxzip.errors import ConfigError, UserFunctionError
from onnxzip.evaluators import QualityGate
from onnxzip.evaluators.quality import quality_gate
from onnxzip.core.runtime import make_session, run_session

sys.path.insert(0, str(Path(__file__).parent))  # user_metrics.py for package.module:function

SCORER = '''
import numpy as np
import onnxruntime as ort

DATA = np.load({data!r})
CALLS = {calls!r}


def score_model(model_path):
    """Task score of a whole model file: share of items whose argmax matches the stored labels."""
    with open(CALLS, "a") as log:
        log.write(model_path + "\\n")
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {{"x": DATA["x"]}})[0]
    return float((outputs.argmax(axis=1) == DATA["labels"]).mean())


def mean_abs_error(predictions, targets):
    return float(np.mean([np.abs(p - t).mean() for p, t in zip(predictions, targets)]))


def broken(predictions, targets):
    raise ValueError("no scores today")


def not_a_number(model_path):
    return "high"
'''


@pytest.fixture
def setup(tmp_path):
    """An MLP, data with its own argmax as labels and references, and a scorer file."""
    model = mlp()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)
    y = run_session(make_session(model, "cpu"), {"x": x})["y"]
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=y.argmax(axis=1), references=y)
    scorer = tmp_path / "scorer.py"
    calls = tmp_path / "calls.txt"
    scorer.write_text(textwrap.dedent(SCORER.format(data=str(data), calls=str(calls))))
    return path, data, scorer, calls


def _calls(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


def test_user_metric_from_a_file_and_from_a_module(setup):
    path, data, scorer, _ = setup
    for metric in (f"user:{scorer}:mean_abs_error:max=0.05", "user:user_metrics:mean_abs_error:max=0.05"):
        report = quality_gate(path, path, data, [metric])
        assert report.passed and report.rows[0].metric == metric.rsplit(":", 1)[0]
        assert report.rows[0].original == 0.0  # the original against its own outputs
    # The same condition fails on a candidate that is off by 1 everywhere.
    shifted = onnx.load(path)
    bias = next(t for t in shifted.graph.initializer if t.name == "b2")
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1, "b2"))
    report = quality_gate(path, shifted, data, [f"user:{scorer}:mean_abs_error:max=0.05"])
    assert not report.passed and report.rows[0].candidate == pytest.approx(1.0, rel=1e-5)


def test_bad_user_references_are_one_sentence(setup, tmp_path):
    _, _, scorer, _ = setup
    with pytest.raises(ConfigError, match="does not exist"):
        QualityGate([f"user:{tmp_path / 'missing.py'}:fn:min=1"])
    with pytest.raises(ConfigError, match="has no 'nope'"):
        QualityGate([f"user:{scorer}:nope:min=1"])
    with pytest.raises(ConfigError, match="write user:FILE.py:FUNCTION"):
        QualityGate(["user:scorer.py:max_drop=1"])


def test_task_metric_in_compress_validate_and_a_loop(setup, tmp_path):
    path, data, scorer, calls = setup
    condition = f"task:{scorer}:score_model:max_drop=0.1"
    # compress: no --data needed, the scorer brings its own; original and candidate scored once each.
    result = onnxzip.compress(path, cluster={"bits": 8}, metrics=[condition])
    row = result.quality.rows[0]
    assert row.metric == f"task:{scorer}:score_model" and row.original == 1.0 and row.passed
    scored = _calls(calls)
    assert len(scored) == 2 and all(p.endswith(".onnx") for p in scored)
    assert not any(Path(p).exists() for p in scored[1:])  # the candidate's temporary file is gone
    # An unreachable bound fails the gate: exit 1, nothing written.
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "-o", str(out), "--cluster", "bits=8", "-q",
                 "--metric", f"task:{scorer}:score_model:min=1.5"]) == 1
    assert not out.exists()
    # validate: the task metric beside a data metric.
    report = tmp_path / "report.json"
    assert main(["validate", str(path), str(path), "--data", str(data), "--metric", condition,
                 "--metric", "accuracy:min=1", "--report", str(report), "-q"]) == 0
    assert [r["metric"] for r in json.loads(report.read_text())["quality"]["rows"]] == [
        f"task:{scorer}:score_model", "accuracy"]
    # A loop judges each try with it; the original's score is remembered (from the first call above).
    calls.unlink()
    recipe = {"gate": {"min_cosine": None, "min_argmax_agreement": None}, "metrics": [condition],
              "loop": {"stages": [{"name": "cluster", "sweep": [8, 4, 2], "steps": [{"cluster": {"bits": "$value"}}]}]}}
    looped = onnxzip.compress(path, recipe, work_dir=tmp_path / "work")
    measured = [p for p in looped.report.trajectory if p["decision"] != "skipped"]
    assert len(measured) >= 3 and all(f"task:{scorer}:score_model" in p["metrics"] for p in measured)
    assert len(_calls(calls)) == len(measured)


def test_a_raising_or_non_numeric_scorer_is_one_sentence_exit_2(setup, tmp_path):
    path, data, scorer, _ = setup
    with pytest.raises(UserFunctionError, match=r"mean_abs_error|broken"):
        quality_gate(path, path, data, [f"user:{scorer}:broken:max=1"])
    for metric, expected in ((f"user:{scorer}:broken:max=1", "broken raised ValueError: no scores today"),
                             (f"task:{scorer}:not_a_number:min=1", "not_a_number returned str 'high'")):
        result = subprocess.run([sys.executable, "-m", "onnxzip.cli", "validate", str(path), str(path),
                                 "--data", str(data), "--metric", metric, "-q"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxzip: error: The metric function ") and expected in lines[0]
