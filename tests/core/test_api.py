"""The Python API is the command line's twin: every option of a command reaches a parameter of
its function, ``help()`` lists them, and validate/finetune/inspect behave as their commands."""
from __future__ import annotations

import argparse
import inspect
import pydoc

import numpy as np
import onnx
import pytest
from helpers import mlp

import onnxzip
import onnxzip.train.reconstruct  # noqa: F401 - registers the reconstruct step (a pass flag of compress)
import onnxzip.train.step  # noqa: F401 - registers the finetune step (a pass flag of compress)
from onnxzip.cli import build_parser
from onnxzip.passes import PASSES
from onnxzip.train import FinetuneConfig
from onnxzip.train.availability import training_available

GATE_FLAGS = {"min_cosine", "max_rel_l2", "max_abs", "min_argmax_agreement"}
# Flags that are the same thing under another name in Python, or that Python users do with the
# returned object (result.save(), report.to_dict()...), and logging flags.
TWINS = {
    "compress": {"input": "model", "sample_axis": "sample_axes", "dim": "dims", "input_shape": "input_shapes", "metric": "metrics",
                 "force": "allow_gate_failure", "quiet": "progress", **{flag: "gate" for flag in GATE_FLAGS},
                 **{name: "pass_options" for name in PASSES}},
    "validate": {"sample_axis": "sample_axes", "dim": "dims", "input_shape": "input_shapes", "metric": "metrics", "quiet": "progress",
                 **{flag: "gate" for flag in GATE_FLAGS}},
    "finetune": {"input": "model", "sample_axis": "sample_axes", "quiet": "progress",
                 **{name: "options" for name in ("options", "epochs", "lr", "sparsity", "batch_size", "loss", "match")}},
    "inspect": {"dim": "dims", "input_shape": "input_shapes", "model": "source", "quiet": None},  # no progress bars
}
ON_THE_RESULT = {
    "compress": {"output", "report", "save_plan", "plot", "external_data"},  # result.save/.report/.plan
    "validate": {"report"},  # report.to_dict()
    "finetune": {"output", "report"},  # result.model, result.to_dict()
    "inspect": {"json"},  # inspection.to_dict()
}
LOGGING = {"verbose", "debug", "help"}


def _subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", sorted(TWINS))
def test_every_cli_option_reaches_a_parameter_of_the_function(command):
    parameters = inspect.signature(getattr(onnxzip, command)).parameters
    for action in _subparser(command)._actions:
        dest = action.dest
        if dest in LOGGING or dest in ON_THE_RESULT[command] or dest == "pass_flags":
            continue
        twin = TWINS[command].get(dest, dest)
        assert twin is None or twin in parameters, f"onnxzip {command} --{dest.replace('_', '-')} has no twin in onnxzip.{command}"
    if command == "finetune":  # the flags are options of the finetune step
        fields = set(FinetuneConfig.__dataclass_fields__)
        assert {"epochs", "lr", "sparsity", "batch_size", "loss", "match"} <= fields


@pytest.mark.parametrize("command", sorted(TWINS))
def test_help_lists_the_parameters(command):
    function = getattr(onnxzip, command)
    text = pydoc.render_doc(function, renderer=pydoc.plaintext)
    for name in inspect.signature(function).parameters:
        assert name in text
    assert len(function.__doc__) > 200  # a docstring that explains them, not a pointer elsewhere


def test_validate_judges_metric_conditions(tmp_path):
    model = mlp()
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    from onnxzip.core.runtime import make_session, run_session

    labels = run_session(make_session(model, "cpu"), {"x": x})["y"].argmax(axis=1)
    data = {"x": x, "labels": labels}
    report = onnxzip.validate(model, model, data, metrics=["accuracy:min=1"])
    assert report.passed and report.quality.rows[0].candidate == 1.0
    assert report.to_dict()["quality"]["passed"] and "quality gate: PASSED" in report.table()
    failing = onnxzip.validate(model, model, data, metrics="accuracy:min=1.5", gate={"min_cosine": 0.9})
    assert not failing.passed and not failing.failures  # fidelity passes, the condition does not
    with pytest.raises(onnxzip.errors.ConfigError, match="need data"):
        onnxzip.validate(model, model, metrics=["accuracy:min=1"])


def test_inspect_is_the_function_even_after_the_module_is_imported(tmp_path):
    import onnxzip.inspection  # noqa: F401 - a submodule import must not replace the function

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    info = onnxzip.inspect(path, top=2)
    assert callable(onnxzip.inspect) and info.to_dict()["params"] == 8 * 16 + 16 + 4 * 16 + 4
    assert "MatMul" in info.text()


@pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")
def test_finetune_takes_the_step_options_as_keywords():
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((32, 8)).astype(np.float32), "labels": rng.integers(0, 4, 32)}
    result = onnxzip.finetune(mlp(), data, epochs=1, lr=1e-3, batch_size=16)
    assert result.history[-1]["epoch"] == 1 and result.model.graph.output[0].name == "y"
    with pytest.raises(onnxzip.errors.ConfigError):
        onnxzip.finetune(mlp(), data, epochz=1)


def test_a_model_that_declares_a_batch_but_runs_one_sample_is_fed_one_at_a_time():
    """An exporter traced batch 1 into a Reshape under a symbolic input batch (khmersm's
    transformer): two samples fail in onnxruntime, one runs. compress feeds one sample at a time
    (before: exit 2, "could not run the model"), says so, and the output declares the input as
    the user's file did."""
    from helpers import traced_batch_one

    rng = np.random.default_rng(0)
    model = traced_batch_one(rng)
    x = rng.standard_normal((16, 4, 6)).astype(np.float32)
    result = onnxzip.compress(model, data={"x": x}, cluster={"bits": 8})
    assert any("declares a symbolic batch (x[0] 'N') but runs only one sample at a time" in note
               for note in result.report.notes)
    declared = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert declared.dim_param == "N"
    assert result.report.validation["passed"]
    from onnxzip.core.runtime import make_session, run_session

    ours, theirs = make_session(result.model, "cpu"), make_session(model, "cpu")
    np.testing.assert_allclose(run_session(ours, {"x": x[:1]})["y"], run_session(theirs, {"x": x[:1]})["y"], atol=0.05)


def test_validate_runs_a_model_that_takes_one_sample_at_a_time():
    """onnxzip validate on a batch-1 trace with data ended in an internal error (exit 3)."""
    from helpers import traced_batch_one

    model = traced_batch_one()
    x = np.random.default_rng(1).standard_normal((6, 4, 6)).astype(np.float32)
    report = onnxzip.validate(model, model, data={"x": x})
    assert report.passed and report.outputs[0].cosine > 0.999999
