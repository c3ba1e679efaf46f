"""Structured pruning: channel dependency analysis (:mod:`.groups`), importance and selection
(:mod:`.importance`), per-op channel surgery (:mod:`.surgery`) and residual blocks
(:mod:`.blocks`), kept apart so each can change without the others."""
from __future__ import annotations

from onnxzip.pruning.groups import ChannelAnalysis, ChannelGroup, ChannelMap, analyze_channels
from onnxzip.pruning.importance import group_importance, select_channels
from onnxzip.pruning.surgery import PRUNE_FUNCTIONS, prune_channels

__all__ = [
    "PRUNE_FUNCTIONS",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelMap",
    "analyze_channels",
    "group_importance",
    "prune_channels",
    "select_channels",
]
