"""DDPG channel-pruning search: exact costs and budget on hand-built graphs with residual Adds,
depthwise convs and Concat, reproducibility, plan replay, the CLI, and Ray == in-process."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs
from pruning.graphs import GraphBuilder

import onnxzip
from onnxzip.cli import main
from onnxzip.measure.cost import model_cost
from onnxzip.errors import ConfigError
from onnxzip.core.inputs import generate_inputs
from onnxzip.passes import PassContext, get_pass
from onnxzip.pruning import analyze_channels
from onnxzip.core.runtime import make_session, run_session
from onnxzip.search import Budget, PruningEnv, resolve_step
from onnxzip.search import policy as search_policy
from onnxzip.search.env import prunable_groups


def mixed_graph() -> onnx.ModelProto:
    """stem → depthwise → Concat(side branch) → mix Conv → Add(stem) → Conv → GAP → Gemm; no
    BN scale is zero, so every removed channel carries a value (a compensation bias appears)."""
    b = GraphBuilder(7)
    stem = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="stem"), 8, name="stem_bn")])
    dw = b.node("Relu", [b.bn(b.conv(stem, 8, 8, group=8, name="dw"), 8, name="dw_bn")])
    side = b.node("Relu", [b.bn(b.conv(stem, 8, 6, name="side"), 6, name="side_bn")])
    joined = b.node("Concat", [dw, side], axis=1)
    mix = b.node("Relu", [b.bn(b.conv(joined, 14, 8, name="mix"), 8, name="mix_bn")])
    block = b.node("Relu", [b.node("Add", [mix, stem])])
    top = b.node("Relu", [b.bn(b.conv(block, 8, 12, name="top"), 12, name="top_bn")])
    return b.model(b.head(top, 12))


def _env(model: onnx.ModelProto, **budget: float) -> PruningEnv:
    context = PassContext()
    analysis = analyze_channels(model, shapes=context.shapes(model))
    return PruningEnv(analysis, context.cost(model), prunable_groups(analysis, lambda g: True), Budget(**budget))


def _labelled(model: onnx.ModelProto, count: int = 48) -> dict[str, np.ndarray]:
    feeds = generate_inputs(model, batch=count, seed=3)
    logits = next(iter(run_session(make_session(model, "cpu"), feeds).values()))
    return {**feeds, "labels": logits.argmax(axis=1)}


def _ddpg(**extra) -> dict:
    return {"policy": "ddpg", "params_budget": 0.6, "episodes": 10, "warmup": 4, "proposals": 3, **extra}


def test_groups_in_graph_order_and_costs_are_exact():
    model = mixed_graph()
    env = _env(model, params=0.6)
    assert [g.id for g in env.groups] == ["stem", "side", "top"]
    rng = np.random.default_rng(0)
    for _ in range(4):
        episode = env.rollout(lambda state, step: rng.uniform())
        pruned = get_pass("prune-channels")(layer_ratios=episode.ratios).run(model, PassContext())
        kept = {gid: len(d["keep"]) for gid, d in pruned.plan.layers.items()}
        assert kept == episode.counts
        actual = model_cost(pruned.model)
        assert (episode.params, episode.flops) == (actual.params, actual.flops)


@pytest.mark.parametrize("budget", [{"params": 0.5}, {"params": 0.7}, {"flops": 0.45}])
def test_budget_is_met_within_one_channel(budget):
    env = _env(mixed_graph(), **budget)
    kind = next(iter(budget))
    target = budget[kind] * (env.cost.params0 if kind == "params" else env.cost.flops0)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(20):
        episode = env.rollout(lambda state, step: rng.uniform())
        value = episode.params if kind == "params" else episode.flops
        one_channel = env.one_channel(episode.counts, env.groups[-1].id)[0 if kind == "params" else 1]
        assert target - one_channel < value <= target
        seen.add(tuple(episode.counts.values()))
    assert len(seen) > 3  # the wall leaves the agent real choices


def test_search_is_reproducible_records_episodes_and_replays(tmp_path, monkeypatch):
    model = mixed_graph()
    data = _labelled(model)
    first = onnxzip.compress(model, prune_channels=_ddpg(seed=5), data=data, allow_gate_failure=True)
    recipe = {"passes": [{"prune-channels": _ddpg(seed=5)}]}  # the same through a recipe
    second = onnxzip.compress(model, recipe, data=data, allow_gate_failure=True)
    report = first.report.passes[0]
    search = report.details["search"]
    assert len(search["episodes"]) == 10 and {"ratios", "params", "flops", "reward", "accuracy"} <= set(search["episodes"][0])
    assert first.plan.to_dict() == second.plan.to_dict()
    assert search["episodes"] == second.report.passes[0].details["search"]["episodes"]
    best = max(search["episodes"], key=lambda e: e["reward"])
    assert first.plan.steps[0].config["layer_ratios"] == best["ratios"]
    assert report.params_after == best["params"] <= 0.6 * report.params_before
    # the plan replays without searching
    path = tmp_path / "plan.json"
    first.plan.save(path)
    monkeypatch.setattr(search_policy.Search, "run", lambda self, progress=False: pytest.fail("searched again"))
    replayed = onnxzip.compress(model, plan=path, allow_gate_failure=True)
    assert_same_outputs(first.model, replayed.model)


def test_cli_ddpg_then_plan(tmp_path):
    model = mixed_graph()
    source, data = tmp_path / "m.onnx", tmp_path / "data.npz"
    onnx.save(model, source)
    np.savez(data, **_labelled(model))
    plan, report = tmp_path / "plan.json", tmp_path / "report.json"
    flags = "policy=ddpg,params_budget=0.5,episodes=6,warmup=3,proposals=2,seed=1,reward=linear,reward_b=0.2"
    assert main(["compress", str(source), "-o", str(tmp_path / "a.onnx"), "--prune-channels", flags, "--data", str(data),
                 "--save-plan", str(plan), "--report", str(report), "--force", "-q"]) == 0
    assert json.loads(plan.read_text())["steps"][0]["config"]["layer_ratios"]
    assert main(["compress", str(source), "-o", str(tmp_path / "b.onnx"), "--plan", str(plan), "--force", "-q"]) == 0
    assert_same_outputs(str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"))
    assert main(["compress", str(source), "-o", str(tmp_path / "c.onnx"), "--prune-channels", "policy=ddpg", "-q"]) == 2


@pytest.mark.parametrize("options, message", [
    ({"policy": "ddpg"}, "needs params_budget or flops_budget"),
    (_ddpg(params_budget=1.5), "must be in (0, 1]"),
    (_ddpg(reward_b=0), "reward_b must be positive"),
    (_ddpg(params_budget=0.01), "cannot be met"),
])
def test_bad_options_are_config_errors(options, message):
    model = mixed_graph()
    step = get_pass("prune-channels")(options)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        resolve_step(step, model, PassContext(feeds=generate_inputs(model, batch=4)), _labelled(model, 8))
    with pytest.raises(ConfigError, match="runs its search through onnxzip.compress"):
        get_pass("prune-channels")(_ddpg()).run(model, PassContext())


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
def test_two_ray_workers_give_the_in_process_plan():
    model = mixed_graph()
    data = _labelled(model, 32)
    context = PassContext(feeds=generate_inputs(model, batch=4))
    options = _ddpg(episodes=8, warmup=4, proposals=4, seed=2)
    _, local = resolve_step(get_pass("prune-channels")(options), model, context, data)
    _, remote = resolve_step(get_pass("prune-channels")({**options, "workers": 2}), model, context, data)
    assert remote.ratios == local.ratios
    assert [(r.ratios, r.accuracy, r.reward) for r in remote.history] == [(r.ratios, r.accuracy, r.reward) for r in local.history]


def test_reward_data_without_the_model_inputs_is_a_data_error():
    from onnxzip.errors import DataError

    model = mixed_graph()
    step = get_pass("prune-channels")(_ddpg())
    with pytest.raises(DataError, match="no array for input"):
        resolve_step(step, model, PassContext(), {"other": np.zeros((4, 3, 8, 8), np.float32),
                                                  "another": np.zeros((4, 3, 8, 8), np.float32)})


class _Scripted:
    """An evaluator whose accuracies follow a script by call order (the original scores 1.0)."""

    def __init__(self, good: set[int]) -> None:
        self.good, self.calls = good, 0

    def map(self, candidates):
        from onnxzip.search.evaluate import Measurement

        results = []
        for _ in candidates:
            results.append(Measurement(1.0 if self.calls in self.good else 0.5, 1.0))
            self.calls += 1
        return results

    def close(self) -> None:
        pass


def _search(evaluator, **ddpg) -> search_policy.Search:
    from onnxzip.search import DdpgConfig

    model = mixed_graph()
    context = PassContext(feeds=generate_inputs(model, batch=4))
    data = _labelled(model, 16)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    selection = {"importance": "auto", "aggregate": "mean", "min_channels": 1, "round_to": 1, "compensate": True}
    return search_policy.Search(model, context, inputs, data["labels"], budget=Budget(params=0.6),
                                ddpg=DdpgConfig(**ddpg), selection=selection, evaluator=evaluator)


@pytest.mark.parametrize("good, source", [(1, "warm-up"), (6, "agent")])
def test_search_returns_the_best_measured_episode(good, source):
    """The result is the episode with the highest measured reward, wherever it came in the search
    (a warm-up episode too), not what the actor would propose at the end."""
    result = _search(_Scripted({good}), episodes=9, warmup=4, proposals=2, hidden=16, seed=3).run()
    assert [r.episode for r in result.history] == list(range(9))
    assert result.best.episode == good and result.best_from == source == result.summary()["best_from"]
    assert result.ratios == result.history[good].ratios
    assert result.best.reward == max(r.reward for r in result.history)
    assert result.best.reward > 1.5 * max(r.reward for r in result.history if r.episode != good)


def test_best_episode_measures_again_to_its_recorded_accuracy():
    """With real onnxruntime rewards the returned ratios are a measured policy: measuring them
    again gives the recorded accuracy, and no episode scored a higher reward."""
    from onnxzip.search.evaluate import Measurer

    search = _search(None, episodes=8, warmup=3, proposals=2, hidden=16, seed=1)
    task = search.evaluator.measurer.task
    result = search.run()
    again = Measurer(task, threads=1).measure(result.ratios)
    assert again.accuracy == result.best.accuracy
    assert all(r.reward <= result.best.reward for r in result.history)
    assert len({tuple(r.channels.values()) for r in result.history}) > 1


@pytest.mark.parametrize("normalize", [False, True])
def test_agent_learns_with_and_without_reward_normalisation(normalize):
    """The moving baseline (and, with ``normalize``, the moving std) of the rewards: the
    advantages the buffer holds are centred, and scaled to about unit spread when normalised."""
    search = _search(_Scripted(set(range(0, 30, 3))), episodes=30, warmup=10, proposals=3, hidden=16,
                     normalize=normalize, seed=0)
    result = search.run()
    advantages = np.array([row[2] for row in search.agent.buffer])
    rewards = np.array([r.reward for r in result.history])
    assert abs(search.agent.baseline - rewards.mean()) < rewards.std()
    assert search.agent.variance > 0
    spread = advantages.std()
    if normalize:
        assert 0.5 < spread < 3
    else:
        assert 0.5 * rewards.std() < spread < 2 * rewards.std()


def blocks_graph() -> onnx.ModelProto:
    """Two residual blocks (depthwise 3×3 → pointwise, each added to the trunk), a strided
    Conv, then two branches joined by a Concat and a 1×1 mix before the head."""
    b = GraphBuilder(11)
    trunk = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="stem"), 8, name="stem_bn")])
    for i in range(2):
        dw = b.node("Relu", [b.bn(b.conv(trunk, 8, 8, group=8, name=f"dw{i}"), 8, name=f"dw{i}_bn")])
        pw = b.bn(b.conv(dw, 8, 8, k=1, name=f"pw{i}"), 8, name=f"pw{i}_bn")
        trunk = b.node("Relu", [b.node("Add", [pw, trunk])])
    down = b.node("Relu", [b.bn(b.node("Conv", [trunk, b.const("w", b.rng.standard_normal((12, 8, 3, 3)) * 0.3)],
                                       "down", pads=[1] * 4, strides=[2, 2]), 12, name="down_bn")])
    left = b.node("Relu", [b.bn(b.conv(down, 12, 6, name="left"), 6, name="left_bn")])
    right = b.node("Relu", [b.bn(b.conv(down, 12, 10, k=1, name="right"), 10, name="right_bn")])
    mix = b.node("Relu", [b.bn(b.conv(b.node("Concat", [left, right], axis=1), 16, 14, k=1, name="mix"), 14,
                                 name="mix_bn")])
    return b.model(b.head(mix, 14))


@pytest.mark.parametrize("graph", [mixed_graph, blocks_graph])
@pytest.mark.parametrize("budget", [{"params_budget": 0.5}, {"flops_budget": 0.45}])
def test_ddpg_meets_its_budget_within_one_channel_and_replays(graph, budget, tmp_path):
    """Through compress, on graphs with residual Adds, depthwise convs and Concat: the searched
    model keeps at most the budget and misses it by less than one channel of the last group
    (counted by onnxzip's cost model on the written graph), and its plan replays to the same model."""
    model = graph()
    kind = "params" if "params_budget" in budget else "flops"
    share = next(iter(budget.values()))
    options = {"policy": "ddpg", "episodes": 6, "warmup": 3, "proposals": 3, "seed": 4, **budget}
    result = onnxzip.compress(model, prune_channels=options, data=_labelled(model, 24), allow_gate_failure=True)
    before, after = model_cost(model), model_cost(result.model)
    target = share * getattr(before, kind)
    env = _env(model, **{kind: share})
    assert len(env.groups) >= 3
    search = result.report.passes[0].details["search"]
    counts = search["episodes"][search["summary"]["best_episode"]]["channels"]
    one_channel = env.one_channel(counts, env.groups[-1].id)[0 if kind == "params" else 1]
    assert target - one_channel < getattr(after, kind) <= target
    path = tmp_path / "plan.json"
    result.plan.save(path)
    replayed = onnxzip.compress(model, plan=path, allow_gate_failure=True)
    assert (model_cost(replayed.model).params, model_cost(replayed.model).flops) == (after.params, after.flops)
    assert_same_outputs(result.model, replayed.model)


def test_costs_are_exact_on_blocks_and_when_nothing_is_pruned():
    """The cost model equals onnxzip's count on the pruned graph for random episodes, and the
    unpruned counts cost exactly the original (no compensation bias for an untouched consumer
    of a Concat whose group weights sum in floating point)."""
    model = blocks_graph()
    env = _env(model, params=0.5)
    assert env.cost.costs(env.full) == (env.cost.params0, env.cost.flops0) == (model_cost(model).params,
                                                                                model_cost(model).flops)
    rng = np.random.default_rng(2)
    for _ in range(4):
        episode = env.rollout(lambda state, step: rng.uniform())
        pruned = get_pass("prune-channels")(layer_ratios=episode.ratios).run(model, PassContext())
        actual = model_cost(pruned.model)
        assert (episode.params, episode.flops) == (actual.params, actual.flops)


def test_latency_reward_pays_for_measured_time():
    """reward_cost=latency: each episode's pruned model is timed against the original (here by an
    injected timer that counts the Conv weights' output channels) and the reward's cost term is
    -log of that share, not of the params; the report's episodes carry it."""
    from onnxzip.measure.latency import Timing

    def conv_channels(model):
        return float(sum(onnx.numpy_helper.to_array(i).shape[0] for i in model.graph.initializer
                         if any(n.op_type == "Conv" and n.input[1] == i.name for n in model.graph.node)))

    model = mixed_graph()
    data = _labelled(model, 16)
    context = PassContext(feeds={k: v for k, v in data.items() if k != "labels"},
                          timing=Timing(model_timer=conv_channels))
    step = get_pass("prune-channels")(_ddpg(episodes=6, warmup=3, proposals=2, reward_cost="latency"))
    _, result = resolve_step(step, model, context, data)
    total = conv_channels(model)
    for record in result.history:
        assert record.latency_kept is not None and 0 < record.latency_kept < 1
        expected = search_policy.accuracy_term(result.original_accuracy - record.accuracy, "exp", 0.05) * -np.log(
            record.latency_kept)
        assert record.reward == pytest.approx(expected)
    # the timer saw the pruned models: a channel count the wall allows, not the original's
    assert {round(r.latency_kept * total) for r in result.history} != {int(total)}
    assert result.summary()["latency_kept"] == result.best.latency_kept
