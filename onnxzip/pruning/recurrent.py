"""Importance of recurrent hidden units (LSTM/GRU/RNN), where no BatchNorm scale exists.

Pruning unit ``j`` makes ``h_j`` zero everywhere it is read, so what it costs is what the
layers reading it lose: its activation energy ``E_j = mean h_j²`` on the calibration data
(measured in onnxruntime on the hidden sequence ``Y``, else ``Y_h``) times the squared norm of
every weight that reads it — the recurrent column ``R[:, :, j]`` of its own layer (every gate,
every direction), the rows of the consumers' weights for each position that carries it
(MatMul/Gemm rows, Conv input channels, a stacked recurrent layer's ``W`` columns) and 1 for
each position of a graph output restored at full width (the output itself reads it):

    importance_j = (Σ_sources E_j) · (Σ_readers ‖w_j‖²)

A unit that is always zero, or read by nothing, scores exactly 0.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxzip.pruning.groups import RECURRENT, ChannelAnalysis, ChannelGroup

log = logging.getLogger(__name__)

MAX_SAMPLES = 256  # calibration samples the energies are measured on


def recurrent_groups(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """The groups made of recurrent hidden units only."""
    return [g for g in groups if g.sources and all(s.recurrent for s in g.sources)]


def reader_norms(node: gs.Node, channels: int) -> np.ndarray | None:
    """Squared norm of ``node``'s weight per channel of its data input (None: not a weighted
    reader this rule knows)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    weight = np.asarray(node.inputs[1].values, dtype=np.float64) ** 2
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and weight.shape[1] == channels:
        return weight.sum(axis=tuple(i for i in range(weight.ndim) if i != 1))
    if node.op == "Gemm" and weight.ndim == 2 and not node.attrs.get("transA", 0):
        return weight.sum(axis=0) if node.attrs.get("transB", 0) else weight.sum(axis=1)
    if node.op == "MatMul" and weight.ndim == 2 and weight.shape[0] == channels:
        return weight.sum(axis=1)
    if node.op in RECURRENT and weight.ndim == 3 and weight.shape[2] == channels:
        return weight.sum(axis=(0, 1))
    return None


def unit_readers(analysis: ChannelAnalysis, group: ChannelGroup) -> np.ndarray:
    """``Σ ‖w_j‖²`` over every weight reading unit ``j`` of ``group`` (see the module docstring)."""
    spaces = set(group.spaces)
    total = np.zeros(group.size)
    widened = analysis.widened()
    for node in analysis.graph.nodes:
        if node.op in RECURRENT and node.name in analysis.units and analysis.units[node.name][0][0] in spaces:
            recurrent = np.asarray(node.inputs[2].values, dtype=np.float64) ** 2
            total += recurrent.sum(axis=(0, 1))
        if not node.inputs or not node.inputs[0].name or (node.inputs[0].name, node.name) in widened:
            continue
        cmap = analysis.maps.get(node.inputs[0].name)
        if cmap is None:
            continue
        norms = reader_norms(node, len(cmap.positions))
        if norms is None:
            continue
        for position, value in zip(cmap.positions, norms):
            if position is not None and position[0] in spaces:
                total[position[1]] += value
    for tensor, consumer, _ in analysis.widen:
        if consumer is None:
            for position in analysis.maps[tensor].positions:
                if position is not None and position[0] in spaces:
                    total[position[1]] += 1.0
    return total


def unit_energies(model: onnx.ModelProto, analysis: ChannelAnalysis, groups: list[ChannelGroup],
                  feeds: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``Σ_sources mean h_j²`` per group, from one onnxruntime pass over (at most
    ``MAX_SAMPLES`` of) ``feeds`` (generated inputs when None)."""
    from onnxzip.core.inputs import first_samples
    from onnxzip.core.runtime import make_session, run_samples, with_outputs
    from onnxzip.core.shapes import generated_feeds

    watched: dict[str, tuple[str, int]] = {}  # tensor → (group id, hidden axis)
    for group in groups:
        for source in group.sources:
            node = source.node
            outputs = [(t.name, axis) for t, axis in zip(node.outputs, (3, 2)) if t.name]
            if outputs:
                watched[outputs[0][0]] = (group.id, outputs[0][1])
    if not watched:
        return {}
    probe = with_outputs(model, list(watched))
    if feeds:
        samples = first_samples(feeds, MAX_SAMPLES, model)
    else:
        samples = generated_feeds(model, batch=1, seed=0)[0]
    values, _ = run_samples(make_session(probe, "cpu", optimization="disabled"), samples)
    energies: dict[str, np.ndarray] = {}
    for name, (gid, axis) in watched.items():
        value = np.moveaxis(np.asarray(values[name], dtype=np.float64), axis, -1)
        energy = (value.reshape(-1, value.shape[-1]) ** 2).mean(axis=0)
        energies[gid] = energies.get(gid, 0.0) + energy
    return energies


def unit_importance(model: onnx.ModelProto, analysis: ChannelAnalysis, groups: list[ChannelGroup],
                    feeds: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Consumer-weighted activation energy of every unit of the recurrent ``groups``."""
    groups = recurrent_groups(groups)
    energies = unit_energies(model, analysis, groups, feeds)
    return {g.id: energies[g.id] * unit_readers(analysis, g) for g in groups if g.id in energies}


def tensor_rows(model: onnx.ModelProto, analysis: ChannelAnalysis, tensors: list[str],
                feeds: Mapping[str, np.ndarray] | None, limit: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows [N, C] (channel axis last, at most ``limit``, a fixed random subset) of each of
    ``tensors`` in ``model`` over (at most ``MAX_SAMPLES`` of) ``feeds``; {} without feeds."""
    from onnxzip.core.inputs import first_samples
    from onnxzip.core.runtime import make_session, run_samples, with_outputs

    if not feeds or not tensors:
        return {}
    probe = with_outputs(model, tensors)
    values, _ = run_samples(make_session(probe, "cpu", optimization="disabled"), first_samples(feeds, MAX_SAMPLES, model))
    rng = np.random.default_rng(seed)
    rows = {}
    for name in tensors:
        value = np.moveaxis(np.asarray(values[name], dtype=np.float64), analysis.maps[name].axis, -1)
        flat = value.reshape(-1, value.shape[-1])
        rows[name] = flat[np.sort(rng.choice(len(flat), limit, replace=False))] if len(flat) > limit else flat
    return rows
