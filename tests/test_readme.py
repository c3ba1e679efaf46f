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

    from onnxzip.evaluators.quality import quality_gate

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


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, README.parent / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_examples() -> list[str]:
    """Every ``onnxzip ...`` command in the README's code blocks, continuations joined, comments cut."""
    commands, fence = [], None
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("", "bash", "sh"):
            line = line.split(" # ", 1)[0].strip()
            if line == "onnxzip" or line.startswith("onnxzip "):
                commands.append(line)
    return commands


def _accepted_flags() -> set[str]:
    import argparse

    from onnxzip.cli import build_parser

    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags |= {s for sub in action.choices.values() for a in sub._actions for s in a.option_strings}
    return flags


def test_readme_all_options_block_is_what_the_parser_and_schemas_say():
    from onnxzip.cli import options_reference

    tool = _tool("readme_options")
    assert tool.current_block(README.read_text()) == options_reference(), "run python tools/readme_options.py --write"


def test_every_cli_example_in_the_readme_parses():
    import shlex

    from onnxzip.cli import build_parser
    from onnxzip.evaluators import parse_conditions
    from onnxzip.passes import get_pass
    from onnxzip.core.schema import parse_flag_value

    examples = _cli_examples()
    assert len(examples) >= 10
    for command in examples:
        args = build_parser().parse_args(shlex.split(command)[1:])  # a usage error exits: the test fails
        for name, text in getattr(args, "pass_flags", None) or []:
            cls = get_pass(name)
            cls(parse_flag_value(text, shorthand=cls.shorthand, owner=f"--{name}"))
        parse_conditions([m for m in getattr(args, "metric", None) or [] if not m.startswith(("user:", "task:"))])


def test_every_flag_the_readme_names_is_accepted_and_inline_pass_examples_build():
    from onnxzip.passes import PASSES, get_pass
    from onnxzip.core.schema import parse_flag_value

    text = README.read_text()
    accepted = _accepted_flags()
    named = set()
    for command in _cli_examples():
        named |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
    named |= set(re.findall(r"`(--[a-z][a-z0-9-]*)", text))
    assert named and not named - accepted, f"the README names flags the parser refuses: {sorted(named - accepted)}"
    inline = re.findall(r"`--([a-z-]+) ([^`]+)`", text)
    built = 0
    for name, value in inline:
        if name in PASSES:
            cls = get_pass(name)
            cls(parse_flag_value(value, shorthand=cls.shorthand, owner=f"--{name}"))
            built += 1
    assert built >= 8
