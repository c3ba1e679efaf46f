"""The command line as a user meets it: exit codes, one-sentence errors, no stray output files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import make_model, mlp, tensor
from onnx import helper

from onnxzip.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxzip.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(mlp(), path)
    return path


def _bad_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXZIP_RECORD_WRITES", raising=False)  # these files are broken on purpose
    cases = {}
    (tmp_path / "text.onnx").write_text("hello")
    cases["not onnx"] = tmp_path / "text.onnx"
    data = mlp().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    cases["truncated"] = tmp_path / "cut.onnx"
    unknown = make_model([helper.make_node("NoSuchOp", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    onnx.save(unknown, tmp_path / "unknown.onnx")
    cases["unknown op"] = tmp_path / "unknown.onnx"
    new = mlp()
    new.opset_import[0].version = onnx.defs.onnx_opset_version() + 1  # newer than onnx knows: no conversion
    (tmp_path / "new.onnx").write_bytes(new.SerializeToString())
    cases["opset too new"] = tmp_path / "new.onnx"
    from onnxzip.core.io import save_model

    wide = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 64])], [tensor("y", ["N", 64])],
                      [onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    save_model(wide, tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    cases["missing external data"] = tmp_path / "ext.onnx"
    (tmp_path / "folder.onnx").mkdir()
    cases["directory"] = tmp_path / "folder.onnx"
    return cases


def test_bad_inputs_exit_2_with_one_sentence_and_no_output(tmp_path, monkeypatch):
    for label, path in _bad_inputs(tmp_path, monkeypatch).items():
        before = path.read_bytes() if path.is_file() else None
        out = tmp_path / f"out-{label.replace(' ', '_')}.onnx"
        for argv in (["compress", str(path), "-o", str(out), "--identity"], ["inspect", str(path)],
                     ["validate", str(path), str(path)]):
            result = _run(*argv)
            assert result.returncode == 2, (label, argv, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("onnxzip: error: "), (label, result.stderr)
            assert "Traceback" not in result.stderr
            assert not out.exists()
        if before is not None:
            assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_compress_validate_inspect_roundtrip(tmp_path, model_path, capsys):
    original = model_path.read_bytes()
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    assert main(["compress", str(model_path), "-o", str(out), "--identity", "--cleanup", "--report", str(report),
                 "--save-plan", str(tmp_path / "plan.json"), "-q"]) == 0
    assert model_path.read_bytes() == original
    data = json.loads(report.read_text())
    assert [p["pass_name"] for p in data["passes"]] == ["identity", "cleanup"]
    assert data["validation"]["passed"] is True
    assert main(["validate", str(model_path), str(out), "--report", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert main(["inspect", str(model_path)]) == 0
    text = capsys.readouterr().out
    assert "MatMul" in text and "Gemm" in text and "w1" in text


def test_validate_fails_on_damaged_candidate_with_exit_1(tmp_path, model_path):
    damaged = mlp()
    w = onnx.numpy_helper.to_array(damaged.graph.initializer[0])
    damaged.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w + 3.0, "w1"))
    onnx.save(damaged, tmp_path / "damaged.onnx")
    result = _run("validate", str(model_path), str(tmp_path / "damaged.onnx"))
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_data_file_errors(tmp_path, model_path):
    np.savez(tmp_path / "d.npz", wrong=np.ones((2, 3), np.float32), other=np.ones(2))
    result = _run("validate", str(model_path), str(model_path), "--data", str(tmp_path / "d.npz"))
    assert result.returncode == 2 and "no array for input 'x'" in result.stderr
    np.savez(tmp_path / "ok.npz", x=np.ones((5, 8), np.float32))
    assert _run("validate", str(model_path), str(model_path), "--data", str(tmp_path / "ok.npz")).returncode == 0


def test_refuses_to_overwrite_input(model_path):
    result = _run("compress", str(model_path), "-o", str(model_path), "--identity")
    assert result.returncode == 2 and "never overwrites its input" in result.stderr


def test_help_on_every_command():
    for command in ("inspect", "compress", "validate", "demo"):
        result = _run(command, "--help")
        assert result.returncode == 0 and "usage: onnxzip" in result.stdout
