"""How fine-tuning picks the epoch it keeps: select=db (per-sample relative output error in dB)
against the pooled loss, and a task metric (``metric=task:FILE.py:function``) that scores each
epoch's whole model file. Every number comes from onnxruntime runs of the models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import init, make_model, mlp, tensor
from onnxzip.core.runtime import make_session, run_session
from onnxzip.errors import ConfigError
from onnxzip.train import finetune
from onnxzip.train.availability import training_available
from onnxzip.train.engine import _Data, _output_db, _output_loss, _within_noise
from onnxzip.train.losses import LossTerm
from onnxzip.core.inputs import samples_from

pytestmark = pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")


def _linear(w: np.ndarray) -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [tensor("x", ["N", 8])],
                      [tensor("y", ["N", 4])], [init("w", w.astype(np.float32))])


def _y(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_session(make_session(model, "cpu"), {"x": x})["y"]


def test_db_selection_rejects_an_epoch_whose_pooled_loss_fell_only_on_the_loud_samples():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4))
    # 4 loud samples along input 0, 8 quiet ones along inputs 1..7: the pooled MSE is the loud ones'
    loud = 100.0 * (np.eye(8)[0] + 0.01 * rng.standard_normal((4, 8)))
    quiet = np.eye(8)[1 + np.arange(8) % 7] + 0.01 * rng.standard_normal((8, 8))
    x = np.concatenate([loud, quiet]).astype(np.float32)
    teacher = _linear(w)
    before = _linear(w + 0.1 * rng.choice([-1.0, 1.0], (8, 4)))  # every input row off by 0.1
    after = np.array(w + 0.1 * rng.choice([-1.0, 1.0], (8, 4)))
    after[0] = w[0] + 0.01 * rng.choice([-1.0, 1.0], 4)  # the loud input's row 10x closer ...
    after[1:] = w[1:] + 0.5 * rng.choice([-1.0, 1.0], (7, 4))  # ... the quiet ones 5x farther
    after = _linear(after)
    data = _Data(samples_from(teacher, {"x": x}), None, None)
    term = [LossTerm("y", "mse", "onnxzip_teacher_0")]
    targets = {"onnxzip_teacher_0": _y(teacher, x)}

    loss_before, loss_after = (_output_loss(m, term, data, targets, 4, "cpu") for m in (before, after))
    db_before, db_after = (_output_db(m, term, data, targets, 4, "cpu") for m in (before, after))
    # the per-sample loss is onnxruntime's output error, the dB its ratio to the teacher's power
    errors = ((_y(after, x) - targets["onnxzip_teacher_0"]) ** 2).mean(axis=1)
    np.testing.assert_allclose(loss_after, errors, rtol=1e-5)
    np.testing.assert_allclose(db_after, 10 * np.log10(errors / (targets["onnxzip_teacher_0"] ** 2).mean(axis=1)),
                               rtol=1e-5)
    # the old rule: the pooled held-out loss fell by far more than its 2 paired standard errors
    assert loss_after.mean() < 0.1 * loss_before.mean() and _within_noise(loss_before, loss_after) is None
    # per sample in dB, 8 of the 12 samples got worse and the mean relative error rose: not kept
    assert (db_after > db_before).sum() == 8 and db_after.mean() > db_before.mean()


def test_select_db_records_the_held_out_db_of_the_returned_model():
    teacher, student = mlp(np.random.default_rng(0)), mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={"epochs": 3, "lr": 0.01, "patience": 0, "select": "db"})
    assert "held back 8 of 40" in result.notes[0] and result.best_epoch > 0
    # the held-back part is the seeded fifth; its dB recomputed from onnxruntime runs of the two models
    held = x[np.sort(np.random.default_rng(0).permutation(40)[:8])]
    t = _y(teacher, held)
    db = lambda m: float(np.mean(10 * np.log10(((_y(m, held) - t) ** 2).mean(axis=1) / (t ** 2).mean(axis=1))))  # noqa: E731
    kept = [row for row in result.history if row["epoch"] == result.best_epoch][-1]
    np.testing.assert_allclose(result.history[0]["val_output_db"], db(student), rtol=1e-4)
    np.testing.assert_allclose(kept["val_output_db"], db(result.model), rtol=1e-4)
    assert db(result.model) < db(student) - 0.1


def _scorer(tmp_path, body: str) -> str:
    (tmp_path / "scorer.py").write_text(
        "import numpy as np, onnxruntime as ort\n"
        f"DATA = np.load({str(tmp_path / 'task.npz')!r})\n"
        "def output(path):\n"
        "    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    return session.run(None, {'x': DATA['x']})[0]\n"
        f"def score(path):\n    {body}\n")
    return f"task:{tmp_path / 'scorer.py'}:score"


def _task_setup(tmp_path) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray, np.ndarray, dict]:
    teacher, student = mlp(np.random.default_rng(0)), mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    task_x = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)
    np.savez(tmp_path / "task.npz", x=task_x, teacher=_y(teacher, task_x), student=_y(student, task_x))
    return teacher, student, x, task_x, {"epochs": 2, "lr": 0.01, "patience": 0}


def test_a_task_metric_selects_the_epoch_on_the_whole_model_file(tmp_path):
    teacher, student, x, task_x, config = _task_setup(tmp_path)
    # a task that agrees with distillation: the closer to the teacher's outputs, the better
    metric = _scorer(tmp_path, "return -float(np.mean((output(path) - DATA['teacher']) ** 2))")
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={**config, "metric": metric})
    assert not any("held back" in note for note in result.notes)  # the task brings its own data
    scores = [row[metric] for row in result.history]
    kept = [row for row in result.history if row["epoch"] == result.best_epoch][-1][metric]
    assert result.best_epoch > 0 and kept == max(scores)
    np.testing.assert_allclose(kept, -np.mean((_y(result.model, task_x) - _y(teacher, task_x)) ** 2), rtol=1e-5)


def test_a_task_metric_keeps_the_input_when_every_epoch_scores_worse_on_it(tmp_path):
    teacher, student, x, _, config = _task_setup(tmp_path)
    # a task that any change makes worse (distance to the student's own outputs): distillation
    # lowers its loss, the task score picks the input
    worse = _scorer(tmp_path, "return -float(np.mean((output(path) - DATA['student']) ** 2))")
    kept_input = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                          config={**config, "epochs": 1, "metric": worse})
    assert kept_input.best_epoch == 0
    assert all(row[worse] < kept_input.history[0][worse] for row in kept_input.history[1:])
    assert any(f"no epoch beat the input on {worse}" in note for note in kept_input.notes)
    assert any(note.startswith("epoch 1 made the task score worse: undone") for note in kept_input.notes)
    assert kept_input.model.SerializeToString() == student.SerializeToString()


def test_an_unknown_metric_is_refused_before_anything_trains():
    student = mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    with pytest.raises(ConfigError, match="Unknown metric 'sisdr'"):
        finetune(student, {"x": x}, teacher=student, device="cpu", progress=False, config={"metric": "sisdr"})


def test_an_undone_epoch_is_retried_from_the_best_weights_with_fresh_optimizer_moments():
    teacher, student = mlp(np.random.default_rng(0)), mlp(np.random.default_rng(0))
    noise = np.random.default_rng(1)
    for weight in student.graph.initializer:  # the teacher, a little off
        value = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(value + 0.01 * noise.standard_normal(value.shape).astype(value.dtype),
                                                weight.name))
    x = np.random.default_rng(2).standard_normal((48, 8)).astype(np.float32)
    y = _y(teacher, x)
    data, val = {"x": x[:32], "references": y[:32]}, {"x": x[32:], "references": y[32:]}
    # one full-batch step per epoch at a rate far too high: the epoch is undone, retried at half
    config = {"epochs": 1, "batch_size": 32, "warmup": 0.0, "schedule": "constant", "patience": 0, "match": ["none"],
              "max_step": 0}  # the same learning rate for every weight, as the two runs compare rates
    undone = finetune(student, data, val=val, device="cpu", progress=False, config={**config, "lr": 0.5})
    assert "undone and retried at half the learning rate (0.5× the schedule)" in undone.notes[0]
    # the retry is the first step of a fresh run at half the rate: the rejected step's Adam moments
    # are gone (carried over, they moved the retry elsewhere)
    fresh = finetune(student, data, val=val, device="cpu", progress=False, config={**config, "lr": 0.25})
    assert undone.history[0]["val_loss"] == pytest.approx(fresh.history[0]["val_loss"], rel=1e-6)
    assert undone.history[2]["val_loss"] == pytest.approx(fresh.history[1]["val_loss"], rel=1e-4)


def test_compress_metric_task_selects_the_finetune_steps_epoch(tmp_path):
    from onnxzip.api import compress

    teacher, _student, x, task_x, _config = _task_setup(tmp_path)
    metric = _scorer(tmp_path, "return -float(np.mean((output(path) - DATA['teacher']) ** 2))")
    recipe = {"passes": [{"cluster": {"bits": 2, "min_size": 16}},
                         {"finetune": {"epochs": 2, "lr": 0.01, "patience": 0}}]}
    result = compress(teacher, recipe, data={"x": x}, metrics=[f"{metric}:min=-1e9"], check=False)
    step = next(p for p in result.report.passes if p.pass_name == "finetune")
    assert f"epochs selected on the run's task metric {metric} (--metric)" in step.notes
    scores = [row[metric] for row in step.details["history"]]
    kept = [row for row in step.details["history"] if row["epoch"] == step.details["best_epoch"]][-1][metric]
    assert kept == max(scores)
    np.testing.assert_allclose(kept, -np.mean((_y(result.model, task_x) - _y(teacher, task_x)) ** 2), rtol=1e-5)
