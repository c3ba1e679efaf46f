"""Compress-until-the-limit loops: sweeps accept while the gate passes, failures roll back,
checkpoints resume, the report's trajectory and plots."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper

import onnxzip
from onnxzip.cli import main
from onnxzip.errors import ConfigError
from onnxzip.recipe import Recipe
from onnxzip.core.runtime import make_session, run_session
from onnxzip.search.loops import CompressionLoop, LoopConfig


def low_rank_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N,64] → MatMul 64×64 (rank-8 signal + small noise) → Relu → MatMul 64×10: SVD can cut
    deep before the output moves, then fails."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((64, 8)) @ rng.standard_normal((8, 64)) / 8
    w1 = (signal + 0.02 * rng.standard_normal((64, 64))).astype(np.float32)
    w2 = rng.standard_normal((64, 10)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["h2"], name="relu"),
         helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")],
        [tensor("x", ["N", 64])], [tensor("y", ["N", 10])],
        [init("w1", w1), init("w2", w2)],
    )


SWEEP = [0.9, 0.5, 0.2, 0.05, 0.01]


def loop_recipe(**extra) -> dict:
    return {
        "gate": {"min_cosine": None, "min_argmax_agreement": None},
        "metrics": ["cosine:min=0.995"],
        "loop": {"stages": [
            {"name": "svd", "sweep": SWEEP, "steps": [{"svd": {"budget": "$value"}}]},
            {"name": "cluster", "steps": [{"cluster": {"bits": 1}}]},  # far too coarse: rolled back
            {"name": "cluster8", "steps": [{"cluster": {"bits": 8}}]},
        ]},
        **extra,
    }


def test_sweep_keeps_most_compressed_passing_try_and_rolls_back_failures(tmp_path):
    model = low_rank_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    result = onnxzip.compress(model, loop_recipe(), data=feeds, work_dir=tmp_path / "work")
    decisions = [(p["stage"], p["value"], p["decision"]) for p in result.report.trajectory]
    assert decisions[0] == ("original", None, "original")
    svd = [d for d in decisions if d[0] == "svd"]
    accepted = [v for _, v, d in svd if d == "accepted"]
    # Accepted while passing, then the first failure ends the sweep (later values never tried).
    assert accepted and svd[len(accepted)][2] == "rejected" and len(svd) == len(accepted) + 1
    assert ("cluster", None, "rolled back") in decisions
    assert ("cluster8", None, "accepted") in decisions
    # The output is the last accepted try, and it still passes the gate against the original.
    out = run_session(make_session(result.model, "cpu"), feeds)["y"]
    ref = run_session(make_session(model, "cpu"), feeds)["y"]
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine >= 0.995 and result.passed
    last_svd = [p for p in result.report.trajectory if p["stage"] == "svd" and p["decision"] == "accepted"][-1]
    assert result.report.after.params == [p for p in result.report.trajectory if p["decision"] == "accepted"][-1]["params"]
    assert last_svd["params"] < result.report.before.params
    assert result.report.after.bytes < result.report.before.bytes / 2
    # Rejected tries leave no checkpoint; accepted ones do, and every point has its measurements.
    for point in result.report.trajectory:
        assert (point["checkpoint"] is not None) == (point["decision"] == "accepted")
        if point["decision"] != "skipped":
            assert point["bytes"] > 0 and point["latency_ms"] > 0 and "cosine" in point["metrics"]


class Interrupt(Exception):
    pass


def _loop(tmp_path, measure_hook=None):
    from onnxzip.api import prepare_model  # noqa: F401  (the API prepares models the same way)
    from onnxzip.passes import PassContext
    from onnxzip.search.loops import Measurement

    feeds = {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)}
    original = low_rank_mlp()
    reference = run_session(make_session(original, "cpu"), feeds)["y"]
    calls = []

    def measure(model):
        calls.append(model)
        if measure_hook:
            measure_hook(len(calls))
        out = run_session(make_session(model, "cpu"), feeds)["y"]
        cosine = float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
        return Measurement(model.ByteSize(), 0, 0, None, cosine >= 0.995, {"min_cosine": cosine}, [])

    config = LoopConfig.from_dict(loop_recipe()["loop"])
    loop = CompressionLoop(config, work_dir=tmp_path / "work", measure=measure,
                           make_context=lambda: PassContext(feeds=feeds, device="cpu"), run_id="test")
    return loop, original, calls


def test_interrupted_loop_resumes_from_the_last_finished_try(tmp_path):
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    loop, original, _ = _loop(reference_dir)
    uninterrupted = loop.run(original)

    def stop_on_fourth(count):
        if count == 4:
            raise Interrupt

    loop, original, calls = _loop(tmp_path, stop_on_fourth)
    with pytest.raises(Interrupt):
        loop.run(original)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert [p["stage"] for p in state["trajectory"]] == ["original", "svd", "svd"]
    loop, original, calls = _loop(tmp_path)
    resumed = loop.run(original)
    assert resumed.resumed == 2
    assert len(calls) == len(uninterrupted.trajectory) - 3  # original and two tries were not redone
    assert [(p.stage, p.value, p.decision) for p in resumed.trajectory] == \
        [(p.stage, p.value, p.decision) for p in uninterrupted.trajectory]
    assert resumed.model.SerializeToString() == uninterrupted.model.SerializeToString()
    assert [p.to_dict() for p in resumed.plans] == [p.to_dict() for p in uninterrupted.plans]


def test_a_spent_budget_shortens_sweeps_but_runs_every_stage(tmp_path):
    """With no time at all, each stage still runs its first try: the result does not depend on
    how busy the machine is beyond the length of the sweeps."""
    model = low_rank_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    recipe = loop_recipe()
    recipe["loop"]["time_budget_s"] = 0.0
    result = onnxzip.compress(model, recipe, data=feeds, work_dir=tmp_path / "work")
    decisions = [(p["stage"], p["iteration"], p["decision"]) for p in result.report.trajectory]
    assert decisions == [("original", 0, "original"), ("svd", 0, "accepted"), ("svd", 1, "skipped"),
                         ("cluster", 0, "rolled back"), ("cluster8", 0, "accepted")]
    assert "share" in result.report.trajectory[2]["failures"][0]


def test_a_loops_plan_replays_to_the_same_file(tmp_path):
    """--save-plan of a loop holds the steps that made its output (the kept sweep value's SVD
    ranks, the codebooks that passed; not the rolled-back 1-bit try), and --plan rebuilds the
    same bytes from the original without searching."""
    model = low_rank_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    result = onnxzip.compress(model, loop_recipe(), data=feeds, work_dir=tmp_path / "work")
    assert [step.pass_name for step in result.plan.steps] == ["svd", "cluster"]
    assert result.plan.steps[1].config["bits"] == 8
    result.plan.save(tmp_path / "plan.json")
    replayed = onnxzip.compress(model, data=feeds, plan=tmp_path / "plan.json",
                                gate={"min_cosine": None, "min_argmax_agreement": None})
    assert replayed.model.SerializeToString() == result.model.SerializeToString()


def test_ungated_stage_is_continued_from_but_never_the_output(tmp_path, monkeypatch):
    import onnxzip.api as api

    calls = []
    real_gate = api._gate
    monkeypatch.setattr(api, "_gate", lambda *a, **k: calls.append(1) or real_gate(*a, **k))
    model = low_rank_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    recipe = loop_recipe()
    recipe["loop"]["stages"] = [
        {"name": "svd", "sweep": [0.9, 0.5], "steps": [{"svd": {"budget": "$value"}}]},
        {"name": "coarse", "gate": False, "steps": [{"cluster": {"bits": 1}}]},  # fails, continued from
        {"name": "fine", "steps": [{"cluster": {"bits": 8}}]},  # on the 1-bit model: still fails
    ]
    result = onnxzip.compress(model, recipe, data=feeds, work_dir=tmp_path / "work")
    decisions = [(p["stage"], p["decision"]) for p in result.report.trajectory]
    assert decisions == [("original", "original"), ("svd", "accepted"), ("svd", "accepted"),
                         ("coarse", "ungated"), ("fine", "rolled back")]
    coarse = result.report.trajectory[3]
    assert coarse["checkpoint"] is not None and coarse["failures"]
    # The output is the last try that passed (svd=0.5), not the ungated one it continued from.
    assert result.passed and result.report.after.bytes == result.report.trajectory[2]["bytes"]
    # ... and its pass reports are those of the passes it went through: the svd=0.5 try's (not
    # also svd=0.9's, which it did not start from) and no 1-bit cluster report.
    assert [r.pass_name for r in result.report.passes] == ["svd"]
    out = run_session(make_session(result.model, "cpu"), feeds)["y"]
    ref = run_session(make_session(model, "cpu"), feeds)["y"]
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) >= 0.995
    # Each try is gated once; the output's gate is the one its try already had.
    assert len(calls) == len(decisions)


def test_loop_without_a_quality_condition_is_refused():
    recipe = loop_recipe()
    del recipe["metrics"]
    feeds = {"x": np.zeros((2, 64), np.float32)}
    with pytest.raises(ConfigError, match="needs a quality condition"):
        onnxzip.compress(low_rank_mlp(), recipe, data=feeds)


def test_work_dir_of_another_run_is_refused(tmp_path):
    loop, original, _ = _loop(tmp_path)
    loop.run(original)
    loop.run_id = "another"
    with pytest.raises(ConfigError, match="different model, recipe or data"):
        loop.run(original)


@pytest.mark.parametrize("loop, message", [
    ({"stages": []}, "non-empty 'stages'"),
    ({"stages": [{"steps": [{"svd": {"budget": 0.5}}], "sweep": [0.5]}]}, "needs '\\$value'"),
    ({"stages": [{"steps": [{"svd": {"budget": "$value"}}]}]}, "has no 'sweep'"),
    ({"stages": [{"steps": [{"nope": {}}]}]}, "nope"),
    ({"stages": [{"steps": [{"svd": {"budget": "$value"}}], "sweep": ["x"]}]}, "budget"),
    ({"stages": [{"steps": [{"svd": {}}], "repeat": 2}]}, "unknown keys repeat"),
    ({"stages": [{"steps": [{"svd": {}}], "gate": "no"}]}, "'gate' must be true or false"),
    ({"stages": [{"steps": [{"svd": {"budget": "$value"}}], "sweep": [0.5], "gate": False}]}, "for plain stages"),
])
def test_bad_loops_are_one_sentence_config_errors(loop, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"loop": loop})


def test_builtin_recipes_parse():
    for name in ("method1", "method2", "speed"):
        recipe = Recipe.from_file(name)
        assert recipe.loop is not None and len(recipe.loop.stages) >= 3
    # the speed loop cuts measured latency (svd, prune-channels) before the int8 codebooks
    steps = [name for stage in Recipe.from_file("speed").loop.stages for name, _ in stage.steps_for(0.5)]
    assert steps == ["svd", "reconstruct", "prune-channels", "reconstruct", "cluster"]


def test_cli_loop_report_and_plots(tmp_path, capsys):
    model_path = tmp_path / "in.onnx"
    onnx.save(low_rank_mlp(), model_path)
    before = model_path.read_bytes()
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32))
    (tmp_path / "loop.json").write_text(json.dumps(loop_recipe()))
    out = tmp_path / "out.onnx"
    code = main(["compress", str(model_path), "-o", str(out), "--recipe", str(tmp_path / "loop.json"),
                 "--data", str(tmp_path / "data.npz"), "--report", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "plots"), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists() and model_path.read_bytes() == before
    assert "rejected" in printed and "rolled back" in printed and "latency (batch 1)" in printed
    assert (tmp_path / "out.onnx.work" / "state.json").exists()
    assert (tmp_path / "plots" / "trajectory.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "layers.png").stat().st_size > 1000
    # Rerunning the same command resumes every try from the work folder.
    code = main(["compress", str(model_path), "-o", str(tmp_path / "out2.onnx"), "--recipe", str(tmp_path / "loop.json"),
                 "--data", str(tmp_path / "data.npz"), "--work-dir", str(tmp_path / "out.onnx.work"), "-q"])
    assert code == 0 and (tmp_path / "out2.onnx").read_bytes() == out.read_bytes()
    code = main(["report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "plots2")])
    assert code == 0 and (tmp_path / "plots2" / "trajectory.png").exists()
    assert "svd=0.9" in capsys.readouterr().out


def test_report_command_refuses_a_non_report(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    result = subprocess.run([sys.executable, "-m", "onnxzip.cli", "report", str(tmp_path / "x.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_plots_without_matplotlib_say_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from onnxzip.plots import plot_report

    trajectory = [{"stage": "original", "iteration": 0, "value": None, "decision": "original", "bytes": 10,
                   "metrics": {"min_cosine": 1.0}}]
    with pytest.raises(ConfigError, match="pip install 'onnxzip\\[plots\\]'"):
        plot_report({"trajectory": trajectory}, tmp_path)


def test_a_sweep_whose_first_value_fails_tries_its_wider_values(tmp_path):
    """cluster bits sweep [1, 2] (both far too coarse for cosine 0.995) with wider [3, 6, 8]: the
    first value fails, so the wider ones run in order and the first that passes (6 or 8 bits,
    whichever the gate takes first) is kept; the narrow sweep's later value is never tried."""
    model = low_rank_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    recipe = {
        "gate": {"min_cosine": None, "min_argmax_agreement": None},
        "metrics": ["cosine:min=0.995"],
        "loop": {"stages": [{"name": "cluster", "sweep": [1, 2], "wider": [3, 6, 8],
                             "steps": [{"cluster": {"bits": "$value", "min_size": 1}}]}]},
    }
    result = onnxzip.compress(model, recipe, data=feeds, work_dir=tmp_path / "work")
    tries = [(p["value"], p["decision"]) for p in result.report.trajectory if p["stage"] == "cluster"]
    assert tries[0] == (1, "rejected") and 2 not in [v for v, _ in tries]
    accepted = [v for v, d in tries if d == "accepted"]
    assert len(accepted) == 1 and tries[-1] == (accepted[0], "accepted")  # the first wider value that passes
    assert all(d == "rejected" for v, d in tries[1:-1]) and accepted[0] in (6, 8)
    assert result.passed and result.report.after.bytes < result.report.before.bytes
    # without wider values the same stage ends at its first failure with the original
    del recipe["loop"]["stages"][0]["wider"]
    plain = onnxzip.compress(model, recipe, data=feeds, work_dir=tmp_path / "work2")
    assert [(p["value"], p["decision"]) for p in plain.report.trajectory if p["stage"] == "cluster"] == [(1, "rejected")]
    with pytest.raises(ConfigError, match="'wider'"):
        LoopConfig.from_dict({"stages": [{"name": "x", "wider": [5], "steps": [{"cluster": {"bits": 4}}]}]})
