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


def test_demo_loop_is_the_method2_recipe_with_one_value_per_sweep():
    import yaml

    from onnxzip.demo import DEMO_EPOCHS, DEMO_SWEEP_VALUES, demo_loop
    from onnxzip.recipe import RECIPES_DIR, Recipe

    full = yaml.safe_load((RECIPES_DIR / "method2.yaml").read_text())["loop"]["stages"]
    short = demo_loop()["loop"]["stages"]
    assert [s["name"] for s in short] == [s["name"] for s in full]
    for mine, theirs in zip(short, full):
        if theirs.get("sweep"):
            assert mine["sweep"] == [DEMO_SWEEP_VALUES[theirs["name"]]]
            assert mine["sweep"][0] in theirs["sweep"]  # a value the full recipe tries too
        for step, original in zip(mine["steps"], theirs["steps"]):
            (name, options), = step.items()
            (original_name, original_options), = original.items()
            assert name == original_name
            expected = dict(original_options)
            if name == "finetune":
                assert options["epochs"] == DEMO_EPOCHS[theirs["name"]] <= original_options["epochs"]
                expected["epochs"] = options["epochs"]
            assert options == expected
    assert Recipe.from_dict(demo_loop()).loop is not None
