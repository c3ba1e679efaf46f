"""Measuring candidates in onnxruntime, in this process or on Ray actors, with equal results.

A :class:`RewardTask` holds everything one measurement needs: the model bytes, its observed
shapes, how the prune-channels pass selects channels, the reward split's inputs and labels
(or ``None``: agreement with the original's argmax). :class:`LocalEvaluator` measures
candidates one after the other; :class:`RayEvaluator` sends the task to the object store once
(``ray.put``) and keeps one actor per worker, each with a warm onnxruntime session of the
original and one intra-op thread, and returns results in the order asked. A measurement is a
pure function of the task and the ratios, so the number of workers never changes a result.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import ConfigError
from onnxzip.core.graph import export_model
from onnxzip.pruning.groups import analyze_channels
from onnxzip.pruning.importance import group_importance, select_channels
from onnxzip.pruning.surgery import prune_channels
from onnxzip.core.runtime import make_session, run_samples

log = logging.getLogger(__name__)


@dataclass
class RewardTask:
    """What a measurement needs; plain data, so it pickles into Ray's object store."""

    model: bytes
    shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    compensation_feeds: dict[str, np.ndarray] | None
    selection: dict[str, Any] = field(default_factory=dict)  # importance, aggregate, min_channels, round_to, compensate
    batch_size: int = 256
    # reward_cost=latency: batch-1 inputs each pruned model is timed on against the original
    # (None: not timed), and an optional model timer (ms of a model; tests inject one)
    latency_feeds: dict[str, np.ndarray] | None = None
    model_timer: Any = None


@dataclass
class Measurement:
    accuracy: float
    original_accuracy: float
    latency_kept: float | None = None  # the pruned model's batch-1 time / the original's (when timed)


class Measurer:
    """Prunes the task's model by per-group ratios and measures top-1 accuracy (or agreement)."""

    def __init__(self, task: RewardTask, threads: int | None = None) -> None:
        self.task, self.threads = task, threads
        self.model = onnx.load_from_string(task.model)
        analysis = analyze_channels(self.model, shapes=task.shapes)
        selection = task.selection
        self.importances = {
            g.id: group_importance(g, selection.get("importance", "auto"), selection.get("aggregate", "mean")).values
            for g in analysis.groups if g.prunable
        }
        self.reference = self._predict(make_session(task.model, "cpu", intra_op_threads=threads))
        self.original_accuracy = self._score(self.reference)

    def _predict(self, session: Any) -> np.ndarray:
        outputs, axes = run_samples(session, self.task.inputs, self.task.batch_size)
        name = next(iter(outputs))
        scores = outputs[name] if axes[name] in (None, 0) else np.moveaxis(outputs[name], axes[name], 0)
        return scores.argmax(axis=-1)

    def _score(self, predicted: np.ndarray) -> float:
        target = self.task.labels if self.task.labels is not None else self.reference
        return float((predicted == target).mean())

    def pruned_model(self, ratios: dict[str, float]) -> onnx.ModelProto:
        selection = self.task.selection
        analysis = analyze_channels(self.model, shapes=self.task.shapes)
        keep = select_channels({g: v for g, v in self.importances.items() if g in ratios}, layer_ratios=ratios,
                               min_channels=selection.get("min_channels", 1), round_to=selection.get("round_to", 1))
        keep = {g: k for g, k in keep.items() if len(k) < len(self.importances[g])}
        if not keep:
            return self.model
        prune_channels(self.model, analysis, keep, self.task.compensation_feeds,
                       compensate=selection.get("compensate", True))
        return export_model(analysis.graph, self.model)

    def measure(self, ratios: dict[str, float]) -> Measurement:
        pruned = self.pruned_model(ratios)
        session = make_session(pruned, "cpu", intra_op_threads=self.threads)
        measurement = Measurement(self._score(self._predict(session)), self.original_accuracy)
        if self.task.latency_feeds is not None:
            from onnxzip.measure.latency import Timing

            timing = Timing(feeds=self.task.latency_feeds, model_timer=self.task.model_timer)
            before, after = timing.compare(self.model, pruned, rounds=1)
            measurement.latency_kept = after / before if before > 0 else 1.0
        return measurement


class LocalEvaluator:
    """Measurements one after the other in this process (one onnxruntime thread, like a worker)."""

    def __init__(self, task: RewardTask) -> None:
        self.measurer = Measurer(task, threads=1)

    def map(self, candidates: list[dict[str, float]]) -> list[Measurement]:
        return [self.measurer.measure(c) for c in candidates]

    def close(self) -> None:
        pass


class RayEvaluator:
    """Measurements spread over Ray actors; a local instance of ``workers`` CPUs is started when
    no ``address`` is given (and stopped by :meth:`close`), else the cluster at ``address``."""

    def __init__(self, task: RewardTask, *, workers: int, address: str | None = None) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("Parallel evaluation (workers/ray_address) needs Ray: pip install 'onnxzip[ray]'.") from exc
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                       "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, **options)
        actor = ray.remote(num_cpus=1)(_RayMeasurer)
        task_ref = ray.put(task)
        self.actors = [actor.remote(task_ref) for _ in range(max(1, workers))]

    def map(self, candidates: list[dict[str, float]]) -> list[Measurement]:
        pending = [self.actors[i % len(self.actors)].measure.remote(c) for i, c in enumerate(candidates)]
        return self.ray.get(pending)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


class _RayMeasurer:
    """A Ray actor: one :class:`Measurer`, one onnxruntime thread."""

    def __init__(self, task: RewardTask) -> None:
        self.measurer = Measurer(task, threads=1)

    def measure(self, ratios: dict[str, float]) -> Measurement:
        return self.measurer.measure(ratios)


def make_evaluator(task: RewardTask, *, workers: int = 0, address: str | None = None) -> LocalEvaluator | RayEvaluator:
    """In-process without workers or address, on Ray otherwise."""
    if workers <= 0 and not address:
        return LocalEvaluator(task)
    return RayEvaluator(task, workers=max(workers, 1), address=address)
