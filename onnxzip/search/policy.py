"""``policy=ddpg`` of the prune-channels pass: search per-group ratios, hand the pass a plan.

The pass layer never imports the search. :func:`resolve_step` runs at API level (``compress``,
hence the CLI and recipes) before a ``prune-channels`` step whose ``policy`` is ``ddpg``: it
searches, then returns the same pass configured with the found ``layer_ratios``. Its plan is an
ordinary plan (kept channel indices per group) that ``--plan`` replays without searching.

Reward of an episode (method 2): ``R = A(Δacc; b) · (−log η_params)`` with ``η_params`` the
share of params kept and ``Δacc`` the original's minus the candidate's accuracy on the reward
split (``A = exp(−Δacc / b)`` or ``A = 1 − Δacc / b``); without labels accuracy is agreement
with the original's argmax. ``reward_cost=latency`` replaces ``η_params`` by the share of the
batch-1 latency kept, measured per episode in onnxruntime on one thread, the pruned model and the
original taking turns (:meth:`onnxzip.measure.latency.Timing.compare`): under the same params or
FLOPs wall, the agent is paid for the configurations that actually run faster (odd channel
counts, layers whose time is not their FLOPs).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxzip.errors import ConfigError, DataError
from onnxzip.core.inputs import samples_from
from onnxzip.evaluators.quality import is_dataset_source
from onnxzip.evaluators import load_dataset
from onnxzip.passes.base import Pass, PassContext
from onnxzip.pruning.groups import analyze_channels
from onnxzip.search.ddpg import DdpgAgent, DdpgConfig
from onnxzip.search.env import Budget, Episode, PruningEnv, prunable_groups
from onnxzip.search.evaluate import Measurement, RewardTask, make_evaluator

log = logging.getLogger(__name__)


def accuracy_term(delta: float, kind: str, b: float) -> float:
    """``exp(−Δacc/b)`` (``exp``) or ``1 − Δacc/b`` (``linear``): 1 when nothing is lost."""
    if b <= 0:
        raise ConfigError("reward_b must be positive.")
    if kind == "exp":
        return math.exp(-delta / b)
    if kind == "linear":
        return 1.0 - delta / b
    raise ConfigError(f"Unknown reward shape {kind!r}; choose exp or linear.")


def reward(measurement: Measurement, params_kept: float, kind: str, b: float, cost: str = "params") -> float:
    """``A(Δacc; b) · (−log η)``, η the share of params kept (``cost="params"``) or of the
    measured batch-1 latency (``cost="latency"``; a model no faster than the original gets 0)."""
    delta = measurement.original_accuracy - measurement.accuracy
    kept = params_kept if cost == "params" else measurement.latency_kept
    if kept is None:
        raise ConfigError("reward_cost=latency needs each episode timed (the measurement has no latency).")
    return accuracy_term(delta, kind, b) * -math.log(max(min(kept, 1.0 - 1e-12), 1e-12))


@dataclass
class EpisodeRecord:
    episode: int
    ratios: dict[str, float]
    channels: dict[str, int]
    params: int
    flops: int
    accuracy: float
    reward: float
    latency_kept: float | None = None  # reward_cost=latency: measured batch-1 time / the original's


@dataclass
class SearchResult:
    """The best *measured* episode's ratios and every episode's record.

    ``best`` is the episode with the highest measured reward over the whole search, random
    warm-up episodes included (as AMC keeps its best-reward policy), never an unmeasured output
    of the final actor; ties go to the earlier episode. ``warmup`` episodes came first.
    """

    ratios: dict[str, float]
    best: EpisodeRecord
    original_accuracy: float
    params_before: int
    flops_before: int
    history: list[EpisodeRecord] = field(default_factory=list)
    seconds: float = 0.0
    labels: bool = False
    warmup: int = 0

    @property
    def best_from(self) -> str:
        """``warm-up`` when a random warm-up episode was the best, else ``agent``."""
        return "warm-up" if self.best.episode < self.warmup else "agent"

    def summary(self) -> dict[str, Any]:
        return {
            "best_episode": self.best.episode, "best_from": self.best_from, "best_reward": self.best.reward,
            "best_accuracy": self.best.accuracy,
            "original_accuracy": self.original_accuracy, "params_kept": self.best.params / self.params_before,
            "flops_kept": self.best.flops / max(self.flops_before, 1), "episodes": len(self.history),
            "seconds": round(self.seconds, 2), "accuracy": "labels" if self.labels else "agreement with the original",
            **({} if self.best.latency_kept is None else {"latency_kept": self.best.latency_kept}),
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary and every episode (ratios, channels, params, FLOPs, accuracy, reward)."""
        return {"summary": self.summary(), "episodes": [asdict(r) for r in self.history]}


def reward_data(model: onnx.ModelProto, data: Any, feeds: dict[str, np.ndarray] | None,
                samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The reward split: the first ``samples`` items of ``data`` with their labels when they are
    class indices, else the fidelity feeds (accuracy then means agreement with the original)."""
    if data is None:
        if not feeds:
            raise ConfigError("policy=ddpg needs data for its reward (--data), or model inputs it can generate.")
        log.warning("policy=ddpg without --data: rewards measure agreement with the original on generated inputs")
        return feeds, None
    if not is_dataset_source(data):  # arrays: each input cut on its own sample axis
        picked = samples_from(model, data)
        picked = picked.take(slice(0, min(samples, picked.count)))
        labels = None if picked.labels is None else np.asarray(picked.labels)
        return picked, (labels.astype(np.int64) if labels is not None and np.issubdtype(labels.dtype, np.integer)
                        and labels.ndim == 1 else None)
    dataset = load_dataset(data)
    count = min(samples, len(dataset))
    items = [dataset.inputs(i) for i in range(count)]
    names = [i.name for i in model.graph.input if i.name in items[0]]
    if not names:
        raise DataError(f"The reward data holds none of the model's inputs ({', '.join(i.name for i in model.graph.input)}).")
    inputs = {name: np.stack([item[name] for item in items]) for name in names}
    labels = [dataset.label(i) for i in range(count)]
    if any(label is None for label in labels):
        return inputs, None
    array = np.asarray(labels)
    return inputs, (array.astype(np.int64) if np.issubdtype(array.dtype, np.integer) else None)


class Search:
    """Environment, agent and evaluator wired together (suggest → measure → record)."""

    def __init__(self, model: onnx.ModelProto, context: PassContext, inputs: dict[str, np.ndarray],
                 labels: np.ndarray | None, *, budget: Budget, ddpg: DdpgConfig, selection: dict[str, Any],
                 selected=lambda group: True, max_ratio: float = 0.8,  # noqa: ANN001
                 reward_shape: str = "exp", reward_b: float = 0.05, workers: int = 0,
                 ray_address: str | None = None, evaluator: Any = None, reward_cost: str = "params") -> None:
        shapes = context.shapes(model)
        analysis = analyze_channels(model, shapes=shapes)
        self.env = PruningEnv(analysis, context.cost(model), prunable_groups(analysis, selected), budget,
                              max_ratio=max_ratio, min_channels=selection.get("min_channels", 1),
                              round_to=selection.get("round_to", 1), compensate=selection.get("compensate", True))
        self.agent = DdpgAgent(self.env, ddpg)
        self.reward_shape, self.reward_b, self.reward_cost = reward_shape, reward_b, reward_cost
        accuracy_term(0.0, reward_shape, reward_b)  # checks the options before any worker starts
        self.labels = labels is not None
        self.owns_evaluator = evaluator is None
        self.evaluator = evaluator or make_evaluator(
            self.task(model, context, inputs, labels, selection, timed=reward_cost == "latency"),
            workers=workers, address=ray_address)
        self.history: list[EpisodeRecord] = []

    @staticmethod
    def task(model: onnx.ModelProto, context: PassContext, inputs: dict[str, np.ndarray], labels: np.ndarray | None,
             selection: dict[str, Any], timed: bool = False) -> RewardTask:
        """The measurement task (share one evaluator between searches by passing ``evaluator``);
        ``timed``: each pruned model is timed at batch 1 against the original (the context's timer)."""
        task = RewardTask(model.SerializeToString(), context.shapes(model), inputs, labels, context.feeds, selection)
        if timed:
            timing = context.timer()
            task.latency_feeds = timing.feeds_for(model)
            task.model_timer = timing.model_timer
        return task

    def measure(self, episodes: list[Episode]) -> list[EpisodeRecord]:
        """Rewards of ``episodes`` (measured together, recorded in order)."""
        results = self.evaluator.map([e.ratios for e in episodes])
        records = []
        for episode, result in zip(episodes, results):
            value = reward(result, episode.params / self.env.cost.params0, self.reward_shape, self.reward_b,
                           self.reward_cost)
            records.append(EpisodeRecord(len(self.history) + len(records), episode.ratios, episode.counts,
                                         episode.params, episode.flops, result.accuracy, value, result.latency_kept))
            self.original_accuracy = result.original_accuracy
        self.history.extend(records)
        return records

    def run(self, progress: bool = False) -> SearchResult:
        start = time.perf_counter()
        bar = tqdm(total=self.agent.config.episodes, desc="ddpg search", unit="episode", disable=not progress)
        try:
            while not self.agent.done:
                episodes = self.agent.ask()
                records = self.measure(episodes)
                self.agent.tell(episodes, [r.reward for r in records])
                bar.update(len(episodes))
        finally:
            bar.close()
            if self.owns_evaluator:
                self.evaluator.close()
        # the best measured episode (warm-up included), not the last actor's output
        best = max(self.history, key=lambda r: (r.reward, -r.episode))
        result = SearchResult(best.ratios, best, self.original_accuracy, self.env.cost.params0, self.env.cost.flops0,
                              self.history, time.perf_counter() - start, self.labels,
                              min(self.agent.config.warmup, len(self.history)))
        log.info("ddpg search: best episode %d (%s), accuracy %.4f, reward %.4f", best.episode, result.best_from,
                 best.accuracy, best.reward)
        return result


def _check_options(config: Any) -> None:
    if config.params_budget is None and config.flops_budget is None:
        raise ConfigError("policy=ddpg needs params_budget or flops_budget.")
    if any(b is not None and not 0 < b <= 1 for b in (config.params_budget, config.flops_budget)):
        raise ConfigError("policy=ddpg: params_budget and flops_budget must be in (0, 1].")
    if config.episodes < 1 or config.warmup < 0 or config.proposals < 1 or config.reward_samples < 1:
        raise ConfigError("policy=ddpg: episodes, proposals and reward_samples must be at least 1, warmup at least 0.")
    if not 0 < config.max_ratio < 1 or config.workers < 0:
        raise ConfigError("policy=ddpg: max_ratio must be in (0, 1) and workers at least 0.")


def resolve_step(step: Pass, model: onnx.ModelProto, context: PassContext, data: Any) -> tuple[Pass, SearchResult | None]:
    """``step`` itself, or for ``prune-channels`` with ``policy=ddpg`` the same pass configured
    with the searched ``layer_ratios`` (and the search that found them)."""
    config = step.config
    if step.name != "prune-channels" or getattr(config, "policy", "importance") != "ddpg":
        return step, None
    _check_options(config)
    inputs, labels = reward_data(model, data, context.feeds, config.reward_samples)
    ddpg = DdpgConfig(episodes=config.episodes, warmup=config.warmup, proposals=config.proposals, seed=config.seed)
    selection = {k: getattr(config, k) for k in ("importance", "aggregate", "min_channels", "round_to", "compensate")}

    search = Search(model, context, inputs, labels, budget=Budget(config.params_budget, config.flops_budget),
                    ddpg=ddpg, selection=selection, selected=step.selects, max_ratio=config.max_ratio,
                    reward_shape=config.reward, reward_b=config.reward_b, workers=config.workers,
                    ray_address=config.ray_address, reward_cost=config.reward_cost)
    result = search.run(progress=context.progress)
    options = {**asdict(config), "layer_ratios": result.ratios, "ratio": None, "threshold": None}
    return type(step)(options), result
