from __future__ import annotations

import onnx

from onnxzip.demo import run_demo
from onnxzip.models.zoo import get_reference_model


def test_demo_runs_method2_loop_on_reference_cnn_and_keeps_accuracy(tmp_path, capsys):
    assert run_demo("cnn", tmp_path, quiet=True) == 0
    out = capsys.readouterr().out
    assert "method 2 as a loop with a short budget" in out
    assert "accuracy" in out and "max_drop=0.02 pass" in out
    for stage in ("sparsity", "prune", "blocks", "cluster"):
        assert stage in out  # the trajectory table
    original, compressed = tmp_path / "cnn.onnx", tmp_path / "cnn.compressed.onnx"
    assert compressed.stat().st_size * 10 < original.stat().st_size
    assert not (tmp_path / "cnn.work").exists()
    reference = get_reference_model("cnn")
    assert reference.accuracy(compressed) >= reference.accuracy(original) - 0.02
    assert onnx.load(compressed).ir_version <= 10


def test_demo_runs_a_given_loop_recipe(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("gate: {min_cosine: null, min_argmax_agreement: null}\n"
                      "loop:\n  stages:\n    - name: codebooks\n      sweep: [8, 1]\n"
                      "      steps: [{cluster: {bits: $value}}]\n")
    assert run_demo("cnn", tmp_path / "out", quiet=True, recipe=str(recipe)) == 0
    out = capsys.readouterr().out
    assert f"recipe {recipe}" in out and "codebooks=8" in out and "codebooks=1" in out
    assert "rejected" in out  # 1-bit codebooks fail the accuracy gate; the 8-bit try is the output
    compressed = tmp_path / "out" / "cnn.compressed.onnx"
    assert compressed.stat().st_size * 3 < (tmp_path / "out" / "cnn.onnx").stat().st_size
    assert get_reference_model("cnn").accuracy(compressed) >= 0.98
