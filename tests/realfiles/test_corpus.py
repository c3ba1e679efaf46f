"""Real deployment files trained by others (``../shared/realfiles``): the automatic modes run on
the three smallest corpus files with their own calibration data, and 4-bit codebooks keep each
file's task tolerance as the corpus's own scorer measures it.

Needs the corpus scorer (``../shared/realfiles/realfiles.py``, or ``ONNXZIP_REALFILES``) and the
fetched models (``$REALFILES_DIR/models``, default ``~/.cache/realfiles/models``; ``.ci/run``
fetches them); the tests say so and skip when either is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxzip.core.runtime import make_session, run_batched

ROOT = Path(__file__).resolve().parents[2]
SCORER = Path(os.environ.get("ONNXZIP_REALFILES", ROOT.parent / "shared" / "realfiles" / "realfiles.py"))
MODELS = Path(os.environ.get("REALFILES_DIR", Path.home() / ".cache" / "realfiles")) / "models"
SMALLEST = ["dtln_stage1", "dtln_stage2", "romanizer_encoder"]
MODES = {
    "bits=4": ["--cluster", "bits=4"],
    "bits=3": ["--cluster", "bits=3"],
    "avg_bits=4": ["--cluster", "avg_bits=4"],
    "avg_bits=3": ["--cluster", "avg_bits=3"],
    "avg_bits=2.5": ["--cluster", "avg_bits=2.5"],
    "bits=3+finetune": ["--cluster", "bits=3", "--finetune", "epochs=1"],
    "avg_bits=3+finetune": ["--cluster", "avg_bits=3", "--finetune", "epochs=1"],
}
SUBSET = 48  # calibration samples for the exit-code runs (the scored run uses all of them)


def _missing() -> str | None:
    if not SCORER.is_file():
        return f"the real-file corpus scorer is absent ({SCORER}); set ONNXZIP_REALFILES"
    absent = [name for name in SMALLEST if not (MODELS / f"{name}.onnx").is_file()]
    if absent:
        return f"corpus files {', '.join(absent)} are absent from {MODELS} (run ../shared/realfiles/fetch.sh)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _env() -> dict[str, str]:
    return {**os.environ, "REALFILES_DIR": str(MODELS.parent)}


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory) -> dict[str, Path]:
    """Each file's real calibration and evaluation data, written by the corpus's own tool."""
    root = tmp_path_factory.mktemp("realfiles")
    folders = {}
    for name in SMALLEST:
        folder = root / name
        done = subprocess.run([sys.executable, str(SCORER), "data", name, str(folder)], env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        calib = dict(np.load(folder / "calib.npz"))
        np.savez(folder / "subset.npz", **{k: v[:SUBSET] for k, v in calib.items()})
        folders[name] = folder
    return folders


def _compress(name: str, data: Path, out: Path, flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxzip.cli", "-q", "compress", str(MODELS / f"{name}.onnx"),
                           "-o", str(out), "--data", str(data), "--force", *flags],
                          capture_output=True, text=True, timeout=900, env=_env())


@pytest.mark.parametrize("name", SMALLEST)
def test_every_automatic_mode_runs(name, corpus_data, tmp_path) -> None:
    """No exit 3 and no traceback in any automatic mode; every output runs on the file's data."""
    calib = dict(np.load(corpus_data[name] / "subset.npz"))
    for mode, flags in MODES.items():
        out, report = tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
        done = _compress(name, corpus_data[name] / "subset.npz", out, [*flags, "--report", str(report)])
        assert done.returncode == 0, f"{name} {mode}: {done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr
        steps = [p for p in json.loads(report.read_text())["passes"] if p["pass_name"] == "finetune"]
        assert len(steps) == ("--finetune" in flags)
        for step in steps:  # fine-tuning reaches (nearly) every float weight of the compressed file
            assert step["details"]["trained_fraction"] >= 0.95, f"{name} {mode}: {step['notes']}"
        outputs = run_batched(make_session(str(out), "cpu"), {k: v[:4] for k, v in calib.items()})
        assert all(np.all(np.isfinite(v)) for v in outputs.values() if np.issubdtype(v.dtype, np.floating))
        assert out.stat().st_size < (MODELS / f"{name}.onnx").stat().st_size


@pytest.mark.parametrize("name", SMALLEST)
def test_four_bit_codebooks_keep_the_task_tolerance(name, corpus_data, tmp_path) -> None:
    """4-bit codebooks assigned with the calibration activations (method=gptq) keep the file's task
    score within its tolerance, as the corpus scorer measures it through the file's own pipeline."""
    out = tmp_path / "bits4.onnx"
    done = _compress(name, corpus_data[name] / "calib.npz", out, ["--cluster", "bits=4,method=gptq"])
    assert done.returncode == 0, done.stderr[-2000:]
    scored = subprocess.run([sys.executable, str(SCORER), "score", name, str(out), "--data", str(corpus_data[name])],
                            capture_output=True, text=True, timeout=600, env=_env())
    assert scored.returncode == 0, scored.stderr[-2000:]
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    ratio = (MODELS / f"{name}.onnx").stat().st_size / out.stat().st_size
    assert ratio > 6.0, f"{name}: only {ratio:.2f}x smaller"
    assert result["quality_kept"], f"{name} at 4 bits left its tolerance: {result}"
