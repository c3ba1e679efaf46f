"""Search over pass options, above passes and evaluators (passes never import it).

:mod:`.env` the channel-pruning environment and its budget wall, :mod:`.ddpg` the agent
(ask/tell), :mod:`.evaluate` reward measurements in onnxruntime (in-process or on Ray),
:mod:`.policy` the ``policy=ddpg`` option of the prune-channels pass; :mod:`.loops` the staged
loops that compress until the quality limit (``--recipe method1|method2``).
"""
from __future__ import annotations

from onnxzip.search.ddpg import DdpgAgent, DdpgConfig
from onnxzip.search.env import Budget, CostModel, PruningEnv
from onnxzip.search.evaluate import LocalEvaluator, RayEvaluator, RewardTask, make_evaluator
from onnxzip.search.policy import Search, SearchResult, resolve_step

__all__ = [
    "Budget", "CostModel", "DdpgAgent", "DdpgConfig", "LocalEvaluator", "PruningEnv", "RayEvaluator",
    "RewardTask", "Search", "SearchResult", "make_evaluator", "resolve_step",
]
