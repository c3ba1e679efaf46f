"""Measured latency of single layers and whole models: what ``latency_budget`` plans with.

FLOPs say little about time on a real CPU: a rank-40 factor pair can run slower than the
dense layer it replaces (two GEMM calls, a narrow inner dimension), and 61 channels can take
as long as 64. So the structured passes (``svd``, ``prune-channels``) time the forms they
consider instead of counting them.

A :class:`LayerForm` describes one layer as onnxruntime runs it: the op (MatMul, Gemm, Conv,
or a recurrent LSTM/GRU/RNN over the whole sequence), the real input shape at batch 1 (from the observed shapes of the model on the context's
inputs) and the chain of weights applied one after the other — one weight for the original
layer, two for a factor pair, a narrower weight for a pruned conv; a recurrent form has one
``W`` ``(directions, gates·hidden, input)`` and its attributes, so a pruned hidden size or
input is timed like the node it would become. :meth:`LayerForm.model`
builds that chain as a tiny ONNX model, and :class:`Timing` times it in onnxruntime on **one
intra-op thread** (the deployment case the budget speaks of, and the least noisy), a few
repeats after a warm-up, the least (load only adds time), each run with cold caches (a buffer larger than the
last-level cache is written before it: in the model, the other layers evict this one's
weight); each form is timed once (cached per op and shapes).
Whole models are timed the same way at batch 1 (:meth:`Timing.model`), and
:meth:`Timing.compare` times two models taking turns, so background load hits both alike.

Every time is the **CPU time of the calling thread** during ``session.run``, not wall time: with
one intra-op thread onnxruntime runs every kernel on the thread that calls ``run``, so that
thread's CPU time is the work the model does, and the time other processes hold the CPU is not
in it. On two cores with three busy processes beside it, a 1.8 ms model's wall median rose to
16 ms while its CPU-time median stayed at 2.0 ms: the plans no longer depend on how busy the
machine is (only cache sharing still adds a little).

Both timers can be injected (``Timing(layer_timer=..., model_timer=...)``): a function of a
:class:`LayerForm` (or of a model) returning milliseconds. Tests use that to make decisions
deterministic; the passes take a :class:`Timing` from ``PassContext.timing``.

:func:`useful_candidates` keeps the candidate forms of one layer that are worth having: those
that save at least ``MIN_GAIN`` of the layer's original time and run faster than every
candidate with less error (so a rank or channel count is rounded to one that times better).
:func:`allocate_latency` then spends the saving a budget asks for at the least added error,
greedily by error added per millisecond saved.
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_GAIN = 0.1  # a candidate must save at least this fraction of its layer's original time
MIN_SAVING_MS = 0.002  # and at least this much (below, the timer's noise decides)
NOISE = 0.03  # a measured model within this fraction above its target counts as on target
LAYER_REPEATS = 9
MODEL_REPEATS = 15
COMPARE_ROUNDS = 3  # Timing.compare: rounds of fresh sessions, the least per-round median kept
WARMUP = 2
MAX_SECONDS = 1.5  # per timed form or model (at least 3 repeats are always taken)
FLUSH_BYTES = 48 * 2**20  # written before each timed layer run: more than a server CPU's last-level cache


@dataclass(frozen=True)
class Factor:
    """One node of a layer form. MatMul/Gemm: weight ``(k, n)`` applied as ``x·W`` (or, with
    ``LayerForm.weight_on_left``, ``(n, k)`` applied as ``W·x``). Conv: weight
    ``(c_out, c_in / group, kh, kw)`` with its geometry."""

    shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1


@dataclass(frozen=True)
class LayerForm:
    """A layer as onnxruntime would run it: ``op`` on an input of ``input_shape`` through
    ``factors`` one after the other (a bias is added after the last one)."""

    op: str
    input_shape: tuple[int, ...]
    factors: tuple[Factor, ...]
    weight_on_left: bool = False
    attrs: tuple[tuple[str, Any], ...] = ()  # LSTM/GRU/RNN: hidden_size, direction, linear_before_reset

    def _recurrent(self, rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
        """One LSTM/GRU/RNN node (layout 0, input ``[T, B, I]``) with random ``W``, ``R``, ``B``."""
        attrs = dict(self.attrs)
        hidden = int(attrs["hidden_size"])
        directions, rows, inputs = self.factors[0].shape
        weights = {"W": (directions, rows, inputs), "R": (directions, rows, hidden), "B": (directions, 2 * rows)}
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.05, name)
                 for name, shape in weights.items()]
        node = helper.make_node(self.op, ["x", "W", "R", "B"], ["y"], **attrs)
        return [node], inits, "y"

    def model(self, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The form as a tiny ONNX model (random weights) and a batch-1 input for it."""
        rng = np.random.default_rng(seed)
        nodes, inits = [], []
        current = "x"
        if self.op in ("LSTM", "GRU", "RNN"):
            nodes, inits, current = self._recurrent(rng)
        for index, factor in enumerate(self.factors if not nodes else ()):
            weight = f"w{index}"
            out = f"y{index}"
            inits.append(numpy_helper.from_array(rng.standard_normal(factor.shape).astype(np.float32) * 0.05, weight))
            last = index == len(self.factors) - 1
            if self.op == "Conv":
                inputs = [current, weight]
                if last:
                    inits.append(numpy_helper.from_array(np.zeros(factor.shape[0], np.float32), "bias"))
                    inputs.append("bias")
                attrs = {"group": factor.group}
                if factor.strides:
                    attrs.update(strides=list(factor.strides), pads=list(factor.pads), dilations=list(factor.dilations))
                nodes.append(helper.make_node("Conv", inputs, [out], **attrs))
            elif self.op == "Gemm":
                inputs = [current, weight]
                if last:
                    inits.append(numpy_helper.from_array(np.zeros(factor.shape[-1], np.float32), "bias"))
                    inputs.append("bias")
                nodes.append(helper.make_node("Gemm", inputs, [out]))
            else:
                inputs = [weight, current] if self.weight_on_left else [current, weight]
                nodes.append(helper.make_node("MatMul", inputs, [out]))
            current = out
        graph = helper.make_graph(
            nodes,
            "layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 7
        return model, {"x": rng.standard_normal(self.input_shape).astype(np.float32)}


LayerTimer = Callable[[LayerForm], float]
ModelTimer = Callable[[onnx.ModelProto], float]


def time_session(session: Any, feeds: Mapping[str, np.ndarray], repeats: int, warmup: int = WARMUP,
                 max_seconds: float = MAX_SECONDS, flush: np.ndarray | None = None) -> list[float]:
    """Times (ms) of ``repeats`` runs of ``session`` after ``warmup`` (fewer, but at least 3,
    when ``max_seconds`` of wall time run out): the calling thread's CPU time of each run (see the
    module docstring: ``session`` runs on one intra-op thread); ``flush``: an array written
    before each timed run, so every run starts with cold caches."""
    for _ in range(warmup):
        session.run(None, dict(feeds))
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        if flush is not None:
            flush += 1.0
        start = time.thread_time_ns()
        session.run(None, dict(feeds))
        times.append((time.thread_time_ns() - start) / 1e6)
    return times


def _session(model: onnx.ModelProto) -> Any:
    from onnxzip.core.runtime import make_session

    return make_session(model, "cpu", intra_op_threads=1)


_FLUSH: list[np.ndarray] = []


def ort_layer_time(form: LayerForm, repeats: int = LAYER_REPEATS) -> float:
    """Least ms of ``form`` in onnxruntime (CPU, one intra-op thread; other processes only ever
    add time, and the forms of a model are timed minutes apart, so the median of one form can
    hold load another's does not), each run with cold
    caches: inside a model the other layers' weights and activations evict this layer's, and
    at batch 1 reading the weight is much of a layer's time (timed warm, a GEMV whose weight
    stays cached looks several times faster than it runs in the model)."""
    if not _FLUSH:
        _FLUSH.append(np.zeros(FLUSH_BYTES // 8))
    model, feeds = form.model()
    return float(np.min(time_session(_session(model), feeds, repeats, flush=_FLUSH[0])))


@dataclass
class Timing:
    """Layer and model timers with a cache per layer form. ``feeds``: the batch-1 inputs whole
    models are timed on."""

    feeds: Mapping[str, np.ndarray] | None = None
    layer_timer: LayerTimer | None = None
    model_timer: ModelTimer | None = None
    repeats: int = MODEL_REPEATS
    _layers: dict[LayerForm, float] = field(default_factory=dict, repr=False)

    def layer(self, form: LayerForm) -> float:
        """Milliseconds of one layer form (measured once, then cached)."""
        if form not in self._layers:
            self._layers[form] = float((self.layer_timer or ort_layer_time)(form))
        return self._layers[form]

    def model(self, model: onnx.ModelProto) -> float:
        """Median milliseconds of one batch-1 run of ``model``."""
        if self.model_timer is not None:
            return float(self.model_timer(model))
        return float(np.median(time_session(_session(model), self._feeds(model), self.repeats)))

    def compare(self, first: onnx.ModelProto, second: onnx.ModelProto, rounds: int = COMPARE_ROUNDS) -> tuple[float, float]:
        """Milliseconds of two models timed taking turns (so load hits both alike), in
        ``rounds`` rounds of fresh sessions: the least of the per-round medians (a shared CPU
        slows whole rounds, so one median is not enough)."""
        if self.model_timer is not None:
            return float(self.model_timer(first)), float(self.model_timer(second))
        feeds = [self._feeds(first), self._feeds(second)]
        best = [math.inf, math.inf]
        for _round in range(max(1, rounds)):
            sessions = [_session(first), _session(second)]
            times: list[list[float]] = [[], []]
            for index in (0, 1):
                time_session(sessions[index], feeds[index], 0)
            for _ in range(self.repeats):
                for index in (0, 1):
                    times[index] += time_session(sessions[index], feeds[index], 1, warmup=0)
            best = [min(b, float(np.median(t))) for b, t in zip(best, times)]
        return best[0], best[1]

    def feeds_for(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The batch-1 inputs ``model`` is timed on (generated from its signature without feeds)."""
        return self._feeds(model)

    def _feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        if self.feeds is not None:
            names = {i.name for i in model.graph.input}
            return {k: v for k, v in self.feeds.items() if k in names}
        from onnxzip.core.shapes import generated_feeds

        return generated_feeds(model, batch=1, seed=0, probe=False)[0]


@dataclass(frozen=True)
class Candidate:
    """One form a layer may take: its decision (a rank, a channel count; None = original),
    measured milliseconds and the error it adds."""

    choice: Any
    ms: float
    error: float


def useful_candidates(original_ms: float, candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """(kept, rejected): the candidates that save at least ``MIN_GAIN`` of ``original_ms``
    (and ``MIN_SAVING_MS``) and are faster than every candidate of smaller error, sorted from
    the least error; the rest are rejected."""
    limit = min(original_ms * (1.0 - MIN_GAIN), original_ms - MIN_SAVING_MS)
    kept, rejected = [], []
    fastest = limit
    for candidate in sorted(candidates, key=lambda c: (c.error, c.ms)):
        if candidate.ms < fastest:
            kept.append(candidate)
            fastest = candidate.ms
        else:
            rejected.append(candidate)
    return kept, rejected


def _hull(original_ms: float, kept: Sequence[Candidate]) -> list[Candidate]:
    """The lower convex hull of (saved ms, error) from the original (0, 0) through ``kept``:
    the moves whose error per saved ms never decreases, so greedy order is optimal."""
    points = [Candidate(None, original_ms, 0.0), *sorted(kept, key=lambda c: c.ms, reverse=True)]
    hull: list[Candidate] = []
    for point in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # slope a→b must stay below slope a→point; else b is above the hull
            if (b.error - a.error) * (a.ms - point.ms) >= (point.error - a.error) * (a.ms - b.ms):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull[1:]


def allocate_latency(
    layers: Mapping[str, tuple[float, Sequence[Candidate]]],
    saving: float,
    start: Mapping[str, Candidate | None] | None = None,
) -> tuple[dict[str, Candidate | None], float]:
    """Choose per layer a candidate (None: original) saving at least ``saving`` ms in total at
    the least total error: greedy over each layer's convex hull by added error per saved ms;
    the move that crosses the target is replaced by the least-error candidate of that layer
    that still reaches it. ``layers`` maps a name to (original ms, useful candidates);
    ``start`` continues from earlier choices. Returns the choices and the predicted saving
    (short of ``saving`` when every layer is at its fastest form)."""
    chosen: dict[str, Candidate | None] = {name: None for name in layers}
    chosen.update(start or {})
    saved = sum(layers[name][0] - c.ms for name, c in chosen.items() if c is not None)
    hulls = {name: _hull(original, kept) for name, (original, kept) in layers.items()}
    heap: list[tuple[float, int, str, int]] = []
    order = {name: index for index, name in enumerate(layers)}

    def push(name: str) -> None:
        current = chosen[name]
        ms = layers[name][0] if current is None else current.ms
        error = 0.0 if current is None else current.error
        for step, target in enumerate(hulls[name]):
            if target.ms < ms and target.error >= error:
                slope = (target.error - error) / (ms - target.ms)
                heapq.heappush(heap, (slope, order[name], name, step))
                return

    for name in layers:
        push(name)
    while saved < saving and heap:
        _, _, name, step = heapq.heappop(heap)
        current = chosen[name]
        ms = layers[name][0] if current is None else current.ms
        target = hulls[name][step]
        if saved + (ms - target.ms) >= saving:  # overshoot: the least error that still reaches it
            enough = [c for c in layers[name][1] if saved + (ms - c.ms) >= saving and c.ms < ms]
            target = min(enough, key=lambda c: (c.error, -c.ms))
        saved += ms - target.ms
        chosen[name] = target
        push(name)
    return chosen, saved


@dataclass
class BudgetOutcome:
    """What :func:`meet_budget` settled on: the choices, the model measured with them (ms,
    before and after, timed taking turns), whether the budget holds, and one note per round."""

    chosen: dict[str, Candidate | None]
    before_ms: float
    after_ms: float
    reached: bool
    notes: list[str]


def meet_budget(
    options: Mapping[str, tuple[float, Sequence[Candidate]]],
    budget: float,
    original: onnx.ModelProto,
    original_ms: float,
    build: Callable[[dict[str, Candidate | None]], onnx.ModelProto],
    timing: Timing,
    rounds: int = 4,
) -> BudgetOutcome:
    """Choose candidates so that the built model runs in at most ``budget`` × the original's
    time, measured (original and result taking turns, so the fraction is of one moment's load).

    Per-layer times miss what the model adds or hides (elementwise ops, fused kernels, weights
    that start to fit a cache), so the saving asked of the layers is searched on the measured
    model for at most ``rounds`` rounds: rescaled by how much of the predicted saving the model
    showed until one saving that reaches the budget and one that does not bracket it, then
    bisected. The least-error choice that met the budget wins (one more than ``NOISE`` under
    it is not needed: the search goes on toward less saving); else the fastest one measured, and
    none at all (every layer kept whole) when no try measured faster than the original by more
    than :data:`NOISE`: a change that does not save time is not worth its error."""
    wanted = (1.0 - budget) * original_ms
    best: tuple[float, BudgetOutcome] | None = None
    fastest: tuple[float, BudgetOutcome] | None = None
    notes: list[str] = []
    tried: set[tuple[Any, ...]] = set()
    low, high = 0.0, math.inf  # savings asked: known to fall short / known to reach
    for round_ in range(rounds):
        chosen, predicted = allocate_latency(options, wanted)
        key = tuple(sorted((name, c.choice if c else None) for name, c in chosen.items()))
        if key in tried:
            break
        tried.add(key)
        before, after = timing.compare(original, build(chosen))
        fraction = after / before
        reached = fraction <= budget * (1.0 + NOISE)
        notes.append(
            f"latency_budget round {round_ + 1}: layers predicted to save {predicted:.3g} of "
            f"{original_ms:.3g} ms; model measured {before:.3g} → {after:.3g} ms ({fraction:.2f})"
        )
        last = BudgetOutcome(chosen, before, after, reached, notes)
        if fastest is None or fraction < fastest[0]:
            fastest = (fraction, last)
        if reached:
            high = min(high, predicted)
            if best is None or predicted < best[0]:
                best = (predicted, last)
            if fraction >= budget - NOISE:
                break
        else:
            if predicted < wanted:
                break  # every layer at its fastest form already
            low = max(low, predicted)
        if math.isfinite(high) and low > 0:
            wanted = (low + high) / 2
        else:
            achieved = 1.0 - fraction
            ratio = 4.0 if achieved <= 0 else (predicted / original_ms) / achieved
            wanted = (1.0 - budget) * original_ms * float(np.clip(ratio, 0.25, 4.0))
            wanted = min(max(wanted, low * 1.05), high * 0.95)
    assert fastest is not None
    result = best[1] if best else fastest[1]
    if best is None and fastest[0] > 1.0 - NOISE:
        result = BudgetOutcome({name: None for name in options}, result.before_ms, result.before_ms, False, notes)
        notes.append(f"no try measured faster than the original by {NOISE:.0%}: every layer is kept whole")
    result.notes = notes
    return result


def report_latency(
    report: Any,
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    timer: Callable[[], Timing],
    budget: float,
    measured: tuple[float, float] | None = None,
) -> None:
    """A latency-budgeted pass's report gets the measured batch-1 latency of the model before
    and after (timed taking turns by ``timer()``, or ``measured`` when the plan's last round timed
    them already), as a note and in its details. Nothing when the pass changed nothing."""
    if not report.modified:
        return
    before_ms, after_ms = measured or timer().compare(before, after)
    report.details["latency_ms"] = {"before": round(before_ms, 4), "after": round(after_ms, 4)}
    report.notes.append(
        f"latency (batch 1, one thread, measured CPU time): {before_ms:.3g} ms → {after_ms:.3g} ms "
        f"({after_ms / before_ms:.2f} of the original; latency_budget {budget:g})"
    )
