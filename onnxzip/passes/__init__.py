"""Graph passes. Importing this package registers the built-in passes in :data:`PASSES`."""
from __future__ import annotations

from onnxzip.passes import cleanup, cluster, identity, prune_blocks, prune_channels, svd  # noqa: F401,E402 - registration
from onnxzip.passes.base import (
    PASSES,
    Pass,
    PassContext,
    PassError,
    PassResult,
    PipelinePlan,
    Plan,
    get_pass,
    register_pass,
)

__all__ = [
    "PASSES",
    "Pass",
    "PassContext",
    "PassError",
    "PassResult",
    "PipelinePlan",
    "Plan",
    "get_pass",
    "register_pass",
]
