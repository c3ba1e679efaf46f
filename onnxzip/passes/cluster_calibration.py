"""Measurements the cluster pass takes on calibration data, in onnxruntime.

* :func:`input_energies` — activation-aware weights: for a weight W feeding MatMul/Gemm/Conv,
  the energy E[x_j²] of the input channel j each element multiplies (MatMul/Gemm: the input's
  columns, averaged over all other axes; Conv: the input channels, averaged over batch and
  space; grouped Conv maps each output channel to its group's inputs). The layer output error
  of a perturbation δW is Σ_j E[x_j²]·δW_j² to first order when inputs are decorrelated, so
  weighting k-means by it puts the centroids where the output error is smallest.
* :class:`SensitivityProbe` — the output distortion when one weight alone is replaced by its
  quantized value: D = mean over float outputs of ‖y − y₀‖² / ‖y₀‖² on the feeds.

Both run the model through :func:`onnxzip.runtime.make_session` on the same feeds
(:func:`run_outputs`, the one place the feeds are run).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxzip.inputs import Samples
from onnxzip.runtime import make_session, run_batched

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
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
        model = probe
    return run_batched(make_session(model, device, optimization="disabled"), feeds)


def _energy_use(node: gs.Node, slot: int, shape: tuple[int, ...]) -> tuple[gs.Tensor, Any] | None:
    """(activation tensor, f(activation) → per-element weight broadcastable to ``shape``) of one
    use of a weight, or None when no input channel layout is known."""
    ndim = len(shape)
    if node.op == "MatMul" and slot == 1 and ndim >= 2:
        def matmul(x: np.ndarray) -> np.ndarray:
            energy = np.mean(np.square(x, dtype=np.float64).reshape(-1, x.shape[-1]), axis=0)
            return energy.reshape([1] * (ndim - 2) + [-1, 1])

        return node.inputs[0], matmul
    if node.op == "Gemm" and slot == 1 and ndim == 2:
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))

        def gemm(x: np.ndarray) -> np.ndarray:
            energy = np.mean(np.square(x, dtype=np.float64), axis=1 if trans_a else 0)
            return energy.reshape(1, -1) if trans_b else energy.reshape(-1, 1)

        return node.inputs[0], gemm
    if node.op == "Conv" and slot == 1 and ndim >= 3:
        group = int(node.attrs.get("group", 1))

        def conv(x: np.ndarray) -> np.ndarray:
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


class SensitivityProbe:
    """Output distortion of ``model`` on ``feeds`` when one main-graph initializer is replaced.

    The probed initializers become graph inputs of one session, fed their original values, so
    a probe is one run (no session per probe): a sweep of L weights × 8 widths stays seconds."""

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: dict[str, np.ndarray],
        device: str,
        names: list[str],
    ) -> None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
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
        reference = self._run(self.values)
        self.reference = {
            k: v.astype(np.float64) for k, v in reference.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating)
        }

    def _run(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The probe's outputs with the probed weights fed as inputs shared by every sample."""
        if isinstance(self.feeds, Samples):
            return run_batched(self.session, self.feeds.with_shared(weights))
        return run_batched(self.session, {**self.feeds, **weights}, sample_axes=dict.fromkeys(weights))

    def covers(self, name: str) -> bool:
        return name in self.values

    def distortion(self, name: str, value: np.ndarray) -> float:
        """mean over float outputs of ‖y − y₀‖² / ‖y₀‖² with initializer ``name`` = ``value``."""
        value = value.astype(self.values[name].dtype)
        outputs = self._run({**self.values, name: value})
        errors = []
        for key, ref in self.reference.items():
            diff = outputs[key].astype(np.float64) - ref
            errors.append(float(np.sum(diff * diff) / max(float(np.sum(ref * ref)), 1e-30)))
        return float(np.mean(errors)) if errors else 0.0
