"""Gradient definitions onnxruntime-training 1.19 lacks, registered before generating artifacts.

Sign, Floor, Ceil and Round are piecewise constant: their gradient is zero almost everywhere, so a
weight upstream of them gets no signal through that path (and the rest of the graph still trains)
instead of the whole training graph being refused. Registration is per process: the artifact
generator (:mod:`onnxzip.train._artifacts`) calls :func:`register` in its child process.
"""
from __future__ import annotations

ZERO_GRADIENT = ("Sign", "Floor", "Ceil", "Round")


def _zero_definition() -> list:
    """GI(0) = 0 · GO(0), in onnxruntime's GradientNodeDefinition form."""
    from onnxruntime.capi import _pybind_state as C

    zero, times = C.GradientNodeDefinition(), C.GradientNodeDefinition()
    zero.op_type, zero.domain, zero.inputs, zero.outputs = "Constant", "", [], ["zero"]
    value = C.GradientNodeAttributeDefinition()
    value.name, value.value_json, value.dtype, value.is_tensor = "value", "0.0", "IElemType(0)", True
    zero.attributes = [value]
    times.op_type, times.domain, times.inputs, times.outputs = "Mul", "", ["GO(0)", "zero"], ["GI(0)"]
    times.attributes = []
    return [zero, times]


def register() -> None:
    """Register the zero gradients of :data:`ZERO_GRADIENT` in this process."""
    from onnxruntime.capi import _pybind_state as C

    for op_type in ZERO_GRADIENT:
        C.register_gradient_definition(f"::{op_type}", _zero_definition())
