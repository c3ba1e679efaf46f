"""How the command line behaves in a shell (real subprocesses): a usage error is one sentence and
exit 2, a reader that goes away ends quietly with exit 0, Ctrl-C is exit 130, a warning is
printed once (also under -q)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from helpers import mlp

COMMAND = [sys.executable, "-m", "onnxzip.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(mlp(), path)
    return path


@pytest.mark.parametrize("args, expected", [
    ((), "give a command: inspect, compress"),
    (("compress", "MODEL"), "required: -o/--output"),
    (("inspect", "MODEL", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    (("validate", "MODEL", "MODEL", "--device", "tpu"), "invalid choice: 'tpu'"),
])
def test_usage_error_is_one_sentence_and_exit_2(model_path, args, expected):
    result = _run(*(str(model_path) if a == "MODEL" else a for a in args))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxzip: error: ") and expected in lines[0], result.stderr
    assert lines[0].endswith("--help' lists the options).")


def test_closed_pipe_ends_quietly_with_exit_0(model_path):
    process = subprocess.Popen([*COMMAND, "inspect", str(model_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before onnxzip writes anything (| head -0)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and stderr == b""


def test_ctrl_c_is_exit_130_with_one_line(model_path, tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((4, 8), np.float32), labels=np.zeros(4, np.int64))
    ready = tmp_path / "ready"
    (tmp_path / "slow.py").write_text(textwrap.dedent(f"""
        import pathlib, time

        def wait(predictions, targets):
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(120)
            return 1.0
    """))
    # A shell's background job (`pytest &`, as a CI runner may start it) ignores SIGINT, and a child
    # inherits that: Python then installs no KeyboardInterrupt handler. Ctrl-C reaches a foreground
    # process with the default disposition, which is what the child gets here.
    process = subprocess.Popen([*COMMAND, "validate", str(model_path), str(model_path), "--data", str(data),
                                "--metric", f"user:{tmp_path / 'slow.py'}:wait:min=0", "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["onnxzip: interrupted; the output was not written."]


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_a_warning_is_printed_once(model_path, tmp_path, quiet):
    # --identity writes nothing smaller than the input: onnxzip warns, once.
    result = _run("compress", str(model_path), "-o", str(tmp_path / "out.onnx"), "--identity", *quiet)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("is not smaller than the input") == 1, result.stderr
    assert "WARNING onnxzip.api: the output" in result.stderr


@pytest.mark.parametrize("flags, names", [
    (("--cluster", "bits=4", "--reconstruct"), "the reconstruct step"),
    (("--cluster", "bits=4", "--finetune", "epochs=1"), "the finetune step"),
    (("--cluster", "bits=4,execute=int8"), "cluster execute=int8"),
])
def test_a_step_that_needs_data_stops_before_any_work_without_it(model_path, tmp_path, flags, names):
    """No --data: the run stops with one sentence naming the step before the cluster pass runs (its
    work would be thrown away), writes nothing and leaves the input as it was."""
    before = model_path.read_bytes()
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = _run("compress", str(model_path), "-o", str(out), "--report", str(report), *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxzip: error: ") and names in lines[0].lower(), result.stderr
    assert "--data" in lines[0] and "Traceback" not in result.stderr
    assert "cluster" not in result.stdout  # no step ran
    assert not out.exists() and not report.exists() and model_path.read_bytes() == before


def test_the_python_api_refuses_a_data_step_without_data():
    import onnxzip
    from onnxzip.errors import ConfigError

    with pytest.raises(ConfigError, match="reconstruct step .* --data"):
        onnxzip.compress(mlp(), cluster={"bits": 4}, reconstruct={})
