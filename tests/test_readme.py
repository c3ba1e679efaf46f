"""The README's Python API block runs verbatim (issue 9, item 7)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no ```python block under '## Python API'"
    return match.group(1)


def test_readme_python_block_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch_module = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    example_inputs = torch.randn(2, 8)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    import onnxzip

    onnxzip.export(torch_module, example_inputs, "model.onnx")
    np.savez("inputs.npz", input=x)
    namespace = {"torch_module": torch_module, "example_inputs": example_inputs, "x": x}
    exec(compile(_python_block(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert (tmp_path / "small.onnx").is_file()
    assert namespace["result"].passed and namespace["report"].passed
    assert namespace["report"].rows == 5
    # the functions stay functions whatever the block imported
    assert callable(onnxzip.compress) and callable(onnxzip.validate) and callable(onnxzip.export)


def test_readme_yaml_recipes_parse_and_their_steps_build():
    import yaml

    from onnxzip.recipe import Recipe

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for text in blocks:
        recipe = Recipe.from_dict(yaml.safe_load(text))
        recipe.build_passes()
        if recipe.loop is not None:
            recipe.loop.validate_steps()


def test_readme_example_scorer_works_in_both_forms(tmp_path, monkeypatch):
    """The scorer under 'Your own metric' is a working user: and task: function."""
    from helpers import make_model, tensor
    from onnx import helper

    from onnxzip.quality import quality_gate

    monkeypatch.chdir(tmp_path)
    section = README.read_text().split("#### Your own metric", 1)[1]
    (tmp_path / "scorer.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["input", "w"], ["logits"])], [tensor("input", ["N", 8])],
                       [tensor("logits", ["N", 4])], [helper.make_tensor("w", 1, [8, 4], weights.ravel())])
    inputs = rng.standard_normal((40, 8)).astype(np.float32)
    labels = (inputs @ weights).argmax(axis=1)
    np.savez("eval.npz", input=inputs, labels=labels)
    report = quality_gate(model, model, "eval.npz", ["user:scorer.py:f1:target=label,min=1",
                                                     "task:scorer.py:score_model:min=1,max_drop=0"])
    assert report.passed and [row.candidate for row in report.rows] == [1.0, 1.0, 1.0]
