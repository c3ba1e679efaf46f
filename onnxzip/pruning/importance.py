"""Channel importance and selection, apart from the graph analysis and the surgery.

Importance of channel ``k`` of a group is an aggregate over the group's scorers:

* ``bn``: ``|γ_k|`` of every BatchNormalization covering one of the group's spaces (network
  slimming, method 2);
* ``l1`` / ``l2``: the norm of every source layer's filter ``k``: ``Σ|W_k|`` or ``√Σ W_k²``
  (for deployment files whose BatchNorm is folded into the Conv);
* ``energy``: for groups of recurrent hidden units (LSTM/GRU/RNN), the consumer-weighted
  activation energy measured on the calibration data (:mod:`onnxzip.pruning.recurrent`);
  other groups fall back to ``auto``;
* ``auto``: ``energy`` for recurrent units, ``bn`` when the group has a BatchNormalization,
  else ``l1``.

The scorers' vectors are combined by ``sum``, ``mean`` or ``max``. Selection then decides which
channels to keep: below a threshold, the lowest ``ratio`` of all candidate channels ranked
together (``global``) or within each group (``layer``), or a per-group ratio. Every group keeps
at least ``min_channels`` and a multiple of ``round_to`` channels (capped at its size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxzip.pruning.groups import ChannelGroup

ImportanceKind = Literal["auto", "bn", "l1", "l2", "energy"]
Aggregate = Literal["mean", "sum", "max"]


@dataclass
class GroupImportance:
    """Per-channel importance of one group and the scorers it came from."""

    values: np.ndarray
    kind: str
    scorers: list[str]

    def summary(self) -> dict[str, float | str | list[str]]:
        return {
            "kind": self.kind,
            "scorers": self.scorers,
            "min": float(self.values.min()),
            "median": float(np.median(self.values)),
            "max": float(self.values.max()),
        }


def filter_norms(weight: np.ndarray, out_axis: int, order: int) -> np.ndarray:
    """``‖W_k‖_order`` of every output slice ``k`` of ``weight`` along ``out_axis``."""
    rows = np.moveaxis(np.asarray(weight, dtype=np.float64), out_axis, 0).reshape(weight.shape[out_axis], -1)
    return np.linalg.norm(rows, ord=order, axis=1)


def group_importance(group: ChannelGroup, kind: ImportanceKind, aggregate: Aggregate,
                     energy: np.ndarray | None = None) -> GroupImportance:
    """Aggregate the group's per-channel scores (see the module docstring); ``energy``: the
    group's measured unit importance when it is made of recurrent units."""
    if kind in ("auto", "energy") and energy is not None:
        return GroupImportance(np.asarray(energy, dtype=np.float64), "energy", group.source_names)
    if kind in ("auto", "energy"):
        kind = "bn" if group.bn_scales else "l1"
    if kind == "bn" and group.bn_scales:
        scorers = [name for name, _ in group.bn_scales]
        stacked = np.stack([gamma for _, gamma in group.bn_scales])
    else:
        kind = "l1" if kind == "bn" else kind
        order = 1 if kind == "l1" else 2
        scorers = group.source_names
        stacked = np.stack([filter_norms(s.weight, s.out_axis, order) for s in group.sources])
    values = {"mean": stacked.mean, "sum": stacked.sum, "max": stacked.max}[aggregate](axis=0)
    return GroupImportance(values, kind, scorers)


def keep_count(size: int, remove: int, min_channels: int, round_to: int) -> int:
    """Channels kept when ``remove`` are asked for: at least ``min_channels``, rounded up to a
    multiple of ``round_to``, never more than ``size``."""
    kept = max(size - remove, min(min_channels, size))
    return min(size, math.ceil(kept / round_to) * round_to)


def top_channels(values: np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` most important channels, ascending (ties keep lower indices)."""
    order = sorted(range(len(values)), key=lambda k: (-values[k], k))
    return sorted(order[:count])


def select_channels(
    importances: dict[str, np.ndarray],
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    scope: Literal["global", "layer"] = "global",
    layer_ratios: dict[str, float] | None = None,
    min_channels: int = 1,
    round_to: int = 1,
) -> dict[str, list[int]]:
    """Channels to keep per group.

    ``layer_ratios`` (group id → fraction removed) wins for its groups; the others follow
    ``threshold`` (remove ``importance < threshold``) or ``ratio`` (remove the lowest
    ``⌊ratio·N⌋`` of the ``N`` candidate channels, ranked across groups when ``scope`` is
    ``global``, within each group when it is ``layer``).
    """
    layer_ratios = layer_ratios or {}
    remove: dict[str, int] = {gid: 0 for gid in importances}
    for gid, fraction in layer_ratios.items():
        remove[gid] = math.floor(fraction * len(importances[gid]))
    rest = {gid: values for gid, values in importances.items() if gid not in layer_ratios}
    if threshold is not None:
        remove.update({gid: int((values < threshold).sum()) for gid, values in rest.items()})
    elif ratio is not None and scope == "layer":
        remove.update({gid: math.floor(ratio * len(values)) for gid, values in rest.items()})
    elif ratio is not None and rest:
        ranked = sorted((float(v), gid, k) for gid, values in rest.items() for k, v in enumerate(values))
        for _, gid, _ in ranked[: math.floor(ratio * len(ranked))]:
            remove[gid] += 1
    return {
        gid: top_channels(values, keep_count(len(values), remove[gid], min_channels, round_to))
        for gid, values in importances.items()
    }
