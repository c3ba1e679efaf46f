"""Measurements the cluster pass takes on calibration data, in onnxruntime.

* :func:`input_energies` — activation-aware weights: for a weight W feeding MatMul/Gemm/Conv,
  the energy E[x_j²] of the input channel j each element multiplies (MatMul/Gemm: the input's
  columns, averaged over all other axes; Conv: the input channels, averaged over batch and
  space; grouped Conv maps each output channel to its group's inputs). The layer output error
  of a perturbation δW is Σ_j E[x_j²]·δW_j² to first order when inputs are decorrelated, so
  weighting k-means by it puts the centroids where the output error is smallest.
* :class:`SensitivityProbe` — the output distortion when one weight alone is replaced by its
  quantized value: D = mean over float outputs of ‖y − y₀‖² / ‖y₀‖² on the feeds.

Both run the model through :func:`onnxzip.core.runtime.make_session` on the same feeds
(:func:`run_outputs`, the one place the feeds are run).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxzip.core.inputs import Samples
from onnxzip.core.runtime import make_session, run_batched, run_samples, with_outputs

log = logging.getLogger(__name__)


def run_outputs(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    device: str,
    names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` on the samples in ``feeds`` (in chunks a fixed batch accepts); with
    ``names``, those tensors are made outputs first."""
    if names:
        model = with_outputs(model, names)
    return run_batched(make_session(model, device, optimization="disabled"), feeds)


def _energy_use(node: gs.Node, slot: int, shape: tuple[int, ...]) -> tuple[gs.Tensor, Any] | None:
    """(activation tensor, f(activation) → per-element weight broadcastable to ``shape``) of one
    use of a weight, or None when no input channel layout is known. The activation may carry
    leading axes the op does not see: an intermediate without a sample axis comes back from
    :func:`~onnxzip.core.runtime.run_samples` stacked per chunk (ddddocr's ``[seq, 1024]`` Gemm
    input of a batch-1 model as ``[N, seq, 1024]``)."""
    ndim = len(shape)
    if node.op == "MatMul" and slot == 1 and ndim >= 2:
        def matmul(x: np.ndarray) -> np.ndarray:
            energy = np.mean(np.square(x, dtype=np.float64).reshape(-1, x.shape[-1]), axis=0)
            return energy.reshape([1] * (ndim - 2) + [-1, 1])

        return node.inputs[0], matmul
    if node.op == "Gemm" and slot == 1 and ndim == 2:
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))

        def gemm(x: np.ndarray) -> np.ndarray:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])  # [stacked, rows, columns]
            energy = np.mean(np.square(x, dtype=np.float64), axis=(0, 2) if trans_a else (0, 1))
            return energy.reshape(1, -1) if trans_b else energy.reshape(-1, 1)

        return node.inputs[0], gemm
    if node.op == "Conv" and slot == 1 and ndim >= 3:
        group = int(node.attrs.get("group", 1))

        def conv(x: np.ndarray) -> np.ndarray:
            x = x.reshape(-1, *x.shape[x.ndim - ndim + 1:])  # [N, C_in, spatial...]
            axes = (0, *range(2, x.ndim))
            energy = np.mean(np.square(x, dtype=np.float64), axis=axes)  # [C_in]
            out, per_group = shape[0], shape[1]
            rows = energy.reshape(group, per_group)[np.arange(out) // (out // group)]
            return rows.reshape(out, per_group, *([1] * (ndim - 2)))

        return node.inputs[0], conv
    return None


def input_energies(
    model: onnx.ModelProto,
    uses: dict[str, tuple[gs.Constant, list[tuple[gs.Node, gs.Graph]]]],
    names: list[str],
    feeds: dict[str, np.ndarray],
    device: str,
) -> dict[str, np.ndarray]:
    """Per-element importance weights (broadcastable to each weight's shape) of the weights in
    ``names`` that feed MatMul/Gemm/Conv in the main graph; summed over their uses. Weights with
    any other use are absent (clustered unweighted)."""
    plans: dict[str, list[tuple[str, Any]]] = {}
    for name in names:
        constant, consumers = uses[name]
        shape = tuple(int(d) for d in constant.shape)
        found = [
            _energy_use(node, slot, shape)
            for node, _owner in consumers
            for slot, tensor in enumerate(node.inputs)
            if tensor is constant
        ]
        if found and all(u is not None and not isinstance(u[0], gs.Constant) for u in found):
            plans[name] = [(u[0].name, u[1]) for u in found]
    main = {t.name for t in _main_tensors(model)}
    plans = {n: p for n, p in plans.items() if all(a in main for a, _ in p)}
    if not plans:
        return {}
    wanted = sorted({a for p in plans.values() for a, _ in p} - set(feeds))
    try:
        values = {**feeds, **run_outputs(model, feeds, device, wanted)}
    except Exception:  # noqa: BLE001 - calibration is an improvement, never a requirement
        log.warning("could not run the model to measure input energies; clustering unweighted",
                    exc_info=True)
        return {}
    energies = {}
    for name, found in plans.items():
        with np.errstate(over="ignore", invalid="ignore"):
            total = sum(weight(np.asarray(values[act], dtype=np.float64)) for act, weight in found)
            scaled = np.asarray(total / max(float(np.max(total)), np.finfo(np.float64).tiny), dtype=np.float32)
        if not np.all(np.isfinite(scaled)) or np.any(scaled < 0):
            log.info("input energies of %s are not finite; clustering it unweighted", name)
            continue
        energies[name] = scaled  # relative weights: only their ratios matter to weighted k-means
    return energies


def _main_tensors(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Named tensors of the main graph: inputs and node outputs."""
    outputs = [onnx.ValueInfoProto(name=o) for node in model.graph.node for o in node.output]
    return list(model.graph.input) + outputs


STATE_MATCH = 0.05  # feedback detection: per-element mean and std of a state output vs its input,
STATE_NOISE = 0.25  # ... plus this / √items for the sampling noise of the estimates


class SensitivityProbe:
    """Output distortion of ``model`` on ``feeds`` when one main-graph initializer is replaced.

    The probed initializers become graph inputs of one session, fed their original values, so
    a probe is one run (no session per probe): a sweep of L weights × 8 widths stays seconds.

    A streaming model that carries recurrent state (an output fed back as an input at the next
    call, found by :func:`feedback_pairs`) is measured over ``state_steps`` calls: from the
    calibrated states, each call feeds back the state the same model returned at the previous
    one (the other inputs taken from the next data items), and the distortion is the mean over
    the calls against the original model's own trajectory, of the outputs that are not fed back
    (a state's error is counted where it surfaces: in the next calls' outputs). One call would miss the error a
    recurrent weight adds to the state every step, which the stream accumulates."""

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: dict[str, np.ndarray],
        device: str,
        names: list[str],
        state_steps: int = 1,
    ) -> None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.branches: dict[str, bool | None] = {}  # If → the branch its condition always takes (None: varies)
        weights = set(names)
        try:
            inline_fixed_branches(probe, lambda node: _holds_weights(node, weights), device, [feeds], self.branches)
        except Exception as exc:  # noqa: BLE001 - a condition that cannot be read alone: measured as before
            log.info("If conditions not read (%s): weights in their branches are not probed", exc)
        graph = probe.graph
        inputs = {i.name for i in graph.input}
        wanted = set(names) - inputs
        self.values: dict[str, np.ndarray] = {}
        kept = []
        for tensor in graph.initializer:
            if tensor.name in wanted:
                self.values[tensor.name] = numpy_helper.to_array(tensor)
                graph.input.append(onnx.helper.make_tensor_value_info(
                    tensor.name, tensor.data_type, list(tensor.dims)))
            else:
                kept.append(tensor)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        self.session = make_session(probe, device)
        self.feeds = feeds
        self.steps = 1
        self.pairs: dict[str, str] = {}
        first, axes = self._run_step(self.values, feeds)
        if state_steps > 1 and isinstance(feeds, Samples) and feeds.count > 1:
            self.pairs = feedback_pairs(feeds, first, axes)
            self.steps = state_steps if self.pairs else 1
        self.out_axes = axes
        self.reference = self._trajectory(self.values, first)

    def _run_step(self, weights: dict[str, np.ndarray], feeds: Any) -> tuple[dict[str, np.ndarray], dict]:
        if isinstance(feeds, Samples):
            outputs, axes = run_samples(self.session, feeds.with_shared(weights))
        else:
            outputs, axes = run_samples(self.session, {**feeds, **weights}, sample_axes=dict.fromkeys(weights))
        return outputs, axes

    def _trajectory(self, weights: dict[str, np.ndarray],
                    first: dict[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """The float outputs of each call (one without feedback pairs)."""
        outputs = first if first is not None else self._run_step(weights, self.feeds)[0]
        fed_back = set(self.pairs.values())  # their error shows in the later calls' other outputs

        def scored(results: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            kept = float_outputs({k: v for k, v in results.items() if k not in fed_back})
            return kept or float_outputs(results)

        steps = [scored(outputs)]
        for step in range(1, self.steps):
            count = self.feeds.count
            following = self.feeds.take((np.arange(count) + step) % count)  # the next items' inputs
            arrays = {name: following[name] for name in following}
            for state, output in self.pairs.items():
                arrays[state] = _to_axis(outputs[output], self.out_axes[output], self.feeds.axes[state])
            outputs = self._run_step(weights, Samples(arrays, self.feeds.axes, count))[0]
            steps.append(scored(outputs))
        return steps

    def covers(self, name: str) -> bool:
        return name in self.values

    def distortion(self, name: str, value: np.ndarray) -> float:
        """mean over float outputs (and over the calls of a stateful model's trajectory) of
        ‖y − y₀‖² / ‖y₀‖² with initializer ``name`` = ``value``."""
        value = value.astype(self.values[name].dtype)
        got = self._trajectory({**self.values, name: value})
        return float(np.mean([output_distortion(g, r) for g, r in zip(got, self.reference)]))


def feedback_pairs(feeds: Samples, outputs: dict[str, np.ndarray],
                   axes: dict[str, int | None]) -> dict[str, str]:
    """Recurrent state a caller feeds back: input → the output of the same per-sample shape whose
    per-element mean and standard deviation over the data match the input's (within
    :data:`STATE_MATCH` + :data:`STATE_NOISE`/√items of the input's RMS). The calibrated state of a streaming model is what an
    earlier call returned, so the two follow one distribution, element by element; a data input
    and an output of the same shape (a frame in, a frame out) do not. An input with more than one
    such output, or an output matched by several inputs, is left out."""
    found: dict[str, list[str]] = {}
    tolerance = STATE_MATCH + STATE_NOISE / np.sqrt(feeds.count)
    for name in feeds:
        axis = feeds.axes.get(name)
        values = np.asarray(feeds[name])
        if axis is None or not np.issubdtype(values.dtype, np.floating):
            continue
        given = np.moveaxis(values, axis, 0).reshape(feeds.count, -1).astype(np.float64)
        rms = float(np.sqrt(np.mean(given * given)))
        if rms == 0:
            continue
        for out, result in outputs.items():
            out_axis = axes.get(out)
            result = np.asarray(result)
            if out_axis is None or not np.issubdtype(result.dtype, np.floating):
                continue
            moved = np.moveaxis(result, out_axis, 0)
            if moved.shape != np.moveaxis(values, axis, 0).shape:
                continue
            moved = moved.reshape(feeds.count, -1).astype(np.float64)
            mean_gap = np.sqrt(np.mean((given.mean(0) - moved.mean(0)) ** 2)) / rms
            std_gap = np.sqrt(np.mean((given.std(0) - moved.std(0)) ** 2)) / rms
            if mean_gap <= tolerance and std_gap <= tolerance:
                found.setdefault(name, []).append(out)
    chosen = {name: outs[0] for name, outs in found.items() if len(outs) == 1}
    targets = [out for out in chosen.values()]
    return {name: out for name, out in chosen.items() if targets.count(out) == 1}


def _to_axis(values: np.ndarray, source: int | None, target: int | None) -> np.ndarray:
    if source is None or target is None or source == target:
        return values
    return np.moveaxis(values, source, target)


def float_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The floating-point outputs of a run, as float64 (what distortions compare)."""
    return {k: np.asarray(v, np.float64) for k, v in outputs.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating)}


def output_distortion(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Mean over the reference's outputs of ‖y − y₀‖² / ‖y₀‖² (``reference`` from
    :func:`float_outputs`): the model-output distortion sweeps and gates compare."""
    errors = []
    for key, ref in reference.items():
        diff = np.asarray(outputs[key], np.float64) - ref
        errors.append(float(np.sum(diff * diff) / max(float(np.sum(ref * ref)), 1e-30)))
    return float(np.mean(errors)) if errors else 0.0


# --------------------------------------------------------------------------------------------
# Layer input statistics for second-order codebook fitting (method=gptq, the reconstruct step)

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
HELD_ROWS = 4096  # held-back rows kept per weight to score the fit
STATE_INPUT = 5  # initial_h of LSTM/GRU/RNN


def layer_key(node: gs.Node | onnx.NodeProto) -> str:
    """A layer's identity across models: its first named output (passes keep activations)."""
    outputs = node.outputs if isinstance(node, gs.Node) else node.output
    names = [o.name if isinstance(o, gs.Tensor) else o for o in outputs]
    return next((n for n in names if n), "")


@dataclass
class LayerSite:
    """One use of a weight by a linear layer: the view [G, m, n] of the weight with y = W_g x per
    block g, and how a run's tensors ``sources`` become input rows x ∈ Rⁿ (``rows``)."""

    key: str
    op: str
    slot: int
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    state: np.ndarray | None = None  # a constant initial_h (recurrent weight R)

    @property
    def blocks(self) -> int:
        if self.op == "Conv":
            return int(self.attrs.get("group", 1))
        return self.shape[0] if self.op in RECURRENT_OPS else 1

    def view(self, array: np.ndarray) -> np.ndarray:
        """The weight (or anything of its shape) as [G, m, n]."""
        if self.op == "MatMul" or (self.op == "Gemm" and not self.attrs.get("transB", 0)):
            return array.T[None]
        if self.op == "Gemm":
            return array[None]
        return array.reshape(self.blocks, self.shape[0] // self.blocks if self.op == "Conv" else self.shape[1], -1)

    def unview(self, view: np.ndarray) -> np.ndarray:
        if self.op == "MatMul" or (self.op == "Gemm" and not self.attrs.get("transB", 0)):
            return view[0].T
        return view.reshape(self.shape)

    def rows(self, values: dict[str, np.ndarray], seed: int, limit: int) -> np.ndarray:
        """Input rows [R, G or 1, n] of one run (at most ``limit``, drawn with ``seed`` so the
        original and the compressed model give the same positions)."""
        rng = np.random.default_rng(seed)
        x = np.asarray(values[self.sources[0]], dtype=np.float32)
        if self.op == "Conv":
            return conv_patches(x, self.shape, self.attrs, rng, limit)
        if self.op in RECURRENT_OPS and self.slot == 2:
            rows = previous_states(x, self._initial(values, x), self.attrs)
        elif self.op in RECURRENT_OPS:
            rows = x.reshape(-1, 1, x.shape[-1])
        elif self.op == "Gemm":
            a = x.T if self.attrs.get("transA", 0) else x
            rows = (a * np.float32(self.attrs.get("alpha", 1.0)))[:, None, :]
        else:
            rows = x.reshape(-1, 1, x.shape[-1])
        if rows.shape[0] > limit:
            rows = rows[np.sort(rng.choice(rows.shape[0], limit, replace=False))]
        return rows

    def _initial(self, values: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
        if self.state is not None:
            return self.state
        if len(self.sources) > 1:
            return np.asarray(values[self.sources[1]], dtype=np.float32)
        layout = int(self.attrs.get("layout", 0))
        batch = y.shape[0] if layout else y.shape[2]
        directions, hidden = y.shape[-2 if layout else 1], y.shape[-1]
        return np.zeros((batch, directions, hidden) if layout else (directions, batch, hidden), np.float32)


def layer_site(node: gs.Node, slot: int, shape: tuple[int, ...]) -> LayerSite | str:
    """The site of a weight of ``shape`` at input ``slot`` of ``node``, or why there is none."""
    op, ndim = node.op, len(shape)
    attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, gs.Graph)}
    key = layer_key(node)
    source = node.inputs[0] if node.inputs else None
    if source is None or isinstance(source, gs.Constant) or not key:
        return f"{op} input is not an activation"
    if op == "MatMul" and slot == 1 and ndim == 2:
        return LayerSite(key, op, slot, attrs, shape, (source.name,))
    if op == "Gemm" and slot == 1 and ndim == 2:
        return LayerSite(key, op, slot, attrs, shape, (source.name,))
    if op == "Conv" and slot == 1 and ndim >= 3:
        return LayerSite(key, op, slot, attrs, shape, (source.name,))
    if op in RECURRENT_OPS and slot == 1 and ndim == 3:
        return LayerSite(key, op, slot, attrs, shape, (source.name,))
    if op in RECURRENT_OPS and slot == 2 and ndim == 3:
        outputs = [o.name for o in node.outputs]
        y = outputs[0] if outputs and outputs[0] else f"{key}__all_states"
        initial = node.inputs[STATE_INPUT] if len(node.inputs) > STATE_INPUT else None
        if initial is None or not initial.name:
            return LayerSite(key, op, slot, attrs, shape, (y,))
        if isinstance(initial, gs.Constant):
            return LayerSite(key, op, slot, attrs, shape, (y,), np.asarray(initial.values, np.float32))
        return LayerSite(key, op, slot, attrs, shape, (y, initial.name))
    return f"{op} input {slot} (only MatMul/Gemm B, Conv W and LSTM/GRU/RNN W, R have known input rows)"


def conv_patches(
    x: np.ndarray, shape: tuple[int, ...], attrs: dict[str, Any], rng: np.random.Generator, limit: int
) -> np.ndarray:
    """im2col rows [R, G, C/G·Πk] of a Conv input x [N, C, *S] at ≤ ``limit`` random output
    positions, in the order of the weight's flattened [C/G, *k] (strides, dilations, pads and
    auto_pad as in ONNX)."""
    kernel = shape[2:]
    spatial = x.shape[2:]
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for axis, size in enumerate(spatial):
            span = (kernel[axis] - 1) * dilations[axis] + 1
            total = max((-(-size // strides[axis]) - 1) * strides[axis] + span - size, 0)
            small, large = total // 2, total - total // 2
            pads[axis], pads[axis + len(kernel)] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * 2 * len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:len(kernel)], pads[len(kernel):])])
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    axes = tuple(range(2, x.ndim))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    index = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
             *(slice(None, None, d) for d in dilations))
    windows = windows[index]  # [N, C, *S_out, *k]
    outer = (windows.shape[0], *windows.shape[2:2 + len(kernel)])
    count = int(np.prod(outer))
    chosen = np.arange(count) if count <= limit else np.sort(rng.choice(count, limit, replace=False))
    position = np.unravel_index(chosen, outer)
    patches = windows[(position[0], slice(None), *position[1:])]  # [R, C, *k]
    group = int(attrs.get("group", 1))
    return patches.reshape(patches.shape[0], group, -1)


def previous_states(y: np.ndarray, initial: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Rows [T·B, D, H] of the state h_{t−1} each step's recurrent weight multiplies, from the
    outputs Y ([T, D, B, H]; layout 1: [B, T, D, H]) and initial_h ([D, B, H]; [B, D, H]):
    forward h_{t−1}, reverse h_{t+1}."""
    if int(attrs.get("layout", 0)):
        y, initial = y.transpose(1, 2, 0, 3), initial.transpose(1, 0, 2)
    directions = y.shape[1]
    rows = []
    for d in range(directions):
        reverse = attrs.get("direction", "forward") in ("reverse", b"reverse") or d == 1
        states = y[:, d]
        shifted = (np.concatenate([states[1:], initial[d][None]]) if reverse
                   else np.concatenate([initial[d][None], states[:-1]]))
        rows.append(shifted.reshape(-1, y.shape[-1]))
    return np.stack(rows, axis=1)


@dataclass
class LayerStats:
    """Streaming statistics of one weight's input rows, summed over its sites: H = Σ x̃x̃ᵀ and
    C = Σ x̃xᵀ [G or 1, n, n₀] (n₀ = n unless the layer's input width changed, e.g. pruned
    channels), row sums of x̃ and x, and up to :data:`HELD_ROWS` held-back rows (x̃, x) to score a
    fit on data it did not see."""

    gram: np.ndarray
    cross: np.ndarray | None  # None: x = x̃ (C = H)
    sum_current: np.ndarray
    sum_original: np.ndarray
    count: int = 0
    held_current: list[np.ndarray] = field(default_factory=list)
    held_original: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, blocks: int, n: int, cross: bool, original: int | None = None) -> LayerStats:
        width = n if original is None else original
        return cls(np.zeros((blocks, n, n)), np.zeros((blocks, n, width)) if cross else None,
                   np.zeros((blocks, n)), np.zeros((blocks, width)))

    @property
    def cross_term(self) -> np.ndarray:
        return self.gram if self.cross is None else self.cross

    def add(self, current: np.ndarray, original: np.ndarray) -> None:
        current_t = np.swapaxes(current, 0, 1)  # [G, R, n]; float32 products, float64 sums
        self.gram += np.swapaxes(current_t, 1, 2) @ current_t
        if self.cross is not None:
            self.cross += np.swapaxes(current_t, 1, 2) @ np.swapaxes(original, 0, 1)
        self.sum_current += current.sum(axis=0, dtype=np.float64)
        self.sum_original += original.sum(axis=0, dtype=np.float64)
        self.count += current.shape[0]

    def hold(self, current: np.ndarray, original: np.ndarray) -> None:
        room = HELD_ROWS - sum(h.shape[0] for h in self.held_current)
        if room > 0:
            self.held_current.append(current[:room])
            self.held_original.append(original[:room])

    def held(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.held_current:
            return None
        return np.concatenate(self.held_current), np.concatenate(self.held_original)


def relative_error(
    rows: tuple[np.ndarray, np.ndarray], quantized: np.ndarray, weight: np.ndarray,
    shift: np.ndarray | None = None,
) -> float:
    """Σ‖Q x̃ − W x − shift‖² / Σ‖W x‖² over rows (x̃, x) [R, G or 1, n], Q and W as views."""
    current, original = (np.swapaxes(r.astype(np.float64), 0, 1) for r in rows)
    target = original @ np.swapaxes(weight, 1, 2)
    diff = current @ np.swapaxes(quantized, 1, 2) - target
    if shift is not None:
        diff -= shift[:, None, :]
    return float(np.sum(diff * diff) / max(float(np.sum(target * target)), 1e-30))


def sample_chunks(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` split into runs of ``size`` samples: :class:`~onnxzip.core.inputs.Samples` on each
    input's sample axis; plain arrays on axis 0 (inputs with another axis-0 size ride along whole)."""
    if isinstance(feeds, Samples):
        return [feeds.take(slice(start, start + size)) for start in range(0, feeds.count, size)]
    counts = [np.shape(v)[0] for v in feeds.values() if np.ndim(v)]
    total = max(counts, default=1)
    return [{k: v[start:start + size] if np.ndim(v) and np.shape(v)[0] == total else v
             for k, v in feeds.items()} for start in range(0, total, size)]


class ActivationProbe:
    """A session of ``model`` whose outputs include the sources of ``sites``. ``If`` nodes of
    the main graph whose branches hold a site are inlined when their condition is the same on
    every chunk (found by one run; pass ``branches`` to reuse a previous probe's choice), so
    weights inside a determined branch are measured like main-graph weights."""

    def __init__(
        self, model: onnx.ModelProto, sites: list[LayerSite], device: str,
        chunks: list[dict[str, np.ndarray]], branches: dict[str, bool] | None = None,
    ) -> None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        keys = {s.key for s in sites}
        self.branches = dict(branches or {})
        inline_fixed_branches(probe, lambda node: _holds(node, keys), device, chunks, self.branches)
        main = {o for n in probe.graph.node for o in n.output} | {i.name for i in probe.graph.input}
        for site in sites:
            if site.op in RECURRENT_OPS and site.slot == 2:
                node = next((n for n in probe.graph.node if layer_key(n) == site.key), None)
                if node is not None and not node.output[0]:
                    node.output[0] = site.sources[0]
                    main.add(site.sources[0])
        self.available = {s.key for s in sites if all(src in main for src in s.sources)}
        inputs = {i.name for i in probe.graph.input}
        wanted = sorted({src for s in sites if s.key in self.available for src in s.sources} - inputs)
        # only the wanted tensors are outputs, so onnxruntime runs just the nodes they need
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted)
        self.session = make_session(probe, device) if wanted else None

    def run(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return chunk if self.session is None else {**chunk, **run_batched(self.session, chunk)}


def inline_fixed_branches(model: onnx.ModelProto, holds: Callable[[onnx.NodeProto], bool], device: str,
                          chunks: list[Any], branches: dict[str, bool | None]) -> None:
    """Inline (in place) every ``If`` of the main graph that ``holds`` something wanted and whose
    condition is the same on every chunk (a sample-rate switch), nested ones too: what its taken
    branch holds becomes part of the main graph. ``branches`` (If → the branch taken, None when
    the condition varies) gives the choices already known and receives the new ones."""
    for _depth in range(4):
        pending = [n for n in model.graph.node if n.op_type == "If" and holds(n)]
        unknown = [n for n in pending if layer_key(n) not in branches]
        if unknown:
            branches.update(_conditions(model, unknown, device, chunks))
        inlined = [n for n in pending if branches.get(layer_key(n)) is not None]
        if not inlined:
            break
        for node in inlined:
            _inline_if(model.graph, node, bool(branches[layer_key(node)]))


def _subgraphs_any(node: onnx.NodeProto, test: Callable[[onnx.GraphProto], bool]) -> bool:
    """Whether ``test`` holds for a subgraph of ``node`` at any depth."""
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            if test(graph) or any(_subgraphs_any(n, test) for n in graph.node):
                return True
    return False


def _holds_weights(node: onnx.NodeProto, names: set[str]) -> bool:
    """Whether a subgraph of ``node`` (at any depth) holds an initializer in ``names``."""
    return _subgraphs_any(node, lambda graph: any(t.name in names for t in graph.initializer))


def _holds(node: onnx.NodeProto, keys: set[str]) -> bool:
    """Whether a subgraph of ``node`` (at any depth) holds a layer in ``keys``."""
    return _subgraphs_any(node, lambda graph: any(layer_key(n) in keys for n in graph.node))


def _conditions(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], device: str, chunks: list[dict[str, np.ndarray]]
) -> dict[str, bool | None]:
    """Each If's condition when it is the same on every chunk, else None."""
    names = [n.input[0] for n in nodes]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(set(names)))
    session = make_session(probe, device)
    seen: dict[str, set[bool]] = {n: set() for n in names}
    for chunk in chunks:
        values = {**chunk, **run_batched(session, chunk)}
        for name in names:
            seen[name].update(bool(v) for v in np.asarray(values[name]).reshape(-1))
    return {layer_key(n): next(iter(seen[c])) if len(seen[c]) == 1 else None for n, c in zip(nodes, names)}


def _inline_if(graph: onnx.GraphProto, node: onnx.NodeProto, condition: bool) -> None:
    """Replace ``node`` by the nodes of its taken branch (outputs renamed through Identity)."""
    branch = next(a.g for a in node.attribute if a.name == ("then_branch" if condition else "else_branch"))
    position = list(graph.node).index(node)
    nodes = list(branch.node) + [
        onnx.helper.make_node("Identity", [inner.name], [outer]) for inner, outer in zip(branch.output, node.output)
        if outer
    ]
    graph.initializer.extend(branch.initializer)
    del graph.node[position]
    for offset, inner in enumerate(nodes):
        graph.node.insert(position + offset, inner)


def collect_stats(
    pairs: dict[str, list[tuple[LayerSite, LayerSite]]],
    current: ActivationProbe,
    original: ActivationProbe | None,
    chunks: list[dict[str, np.ndarray]],
    *,
    limit: int,
    holdout: float = 0.0,
) -> dict[str, LayerStats]:
    """:class:`LayerStats` per weight over its (compressed site, original site) pairs. A share
    ``holdout`` of the chunks (every ⌊1/holdout⌋-th, from the second) is held back instead of
    fitted on. Without ``original`` the compressed model is its own reference (x = x̃, C = H)."""
    every = int(1 / holdout) if holdout > 0 else 0
    stats: dict[str, LayerStats] = {}
    for index, chunk in enumerate(chunks):
        values = current.run(chunk)
        reference = values if original is None else original.run(chunk)
        for name, sites in pairs.items():
            for number, (site, source) in enumerate(sites):
                seed = index * 7919 + number
                rows = site.rows(values, seed, limit)
                target = rows if original is None else source.rows(reference, seed, limit)
                entry = stats.get(name)
                if entry is None:
                    entry = stats[name] = LayerStats.empty(rows.shape[1], rows.shape[2], original is not None,
                                                           target.shape[2])
                if every and index % every == min(1, every - 1):
                    entry.hold(rows, target)
                else:
                    entry.add(rows, target)
    return stats


def stat_groups(sizes: list[tuple[str, int]], groups: int, max_bytes: int) -> list[list[str]]:
    """Consecutive groups of weights (in the given order), at most ``groups`` of them unless a
    group's statistics (``sizes``: bytes per weight) would exceed ``max_bytes``."""
    per_group = -(-len(sizes) // max(groups, 1)) if sizes else 1
    out: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not out or len(out[-1]) >= per_group or (out[-1] and used + size > max_bytes):
            out.append([])
            used = 0
        out[-1].append(name)
        used += size
    return out


def stat_bytes(site: LayerSite) -> int:
    """Bytes of one weight's :class:`LayerStats` (H and C in float64)."""
    blocks, m, n = site.view(np.empty(site.shape, np.uint8)).shape
    return 2 * blocks * n * n * 8
