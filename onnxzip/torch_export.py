"""Export a PyTorch module to an ONNX model that onnxzip's passes can work on.

The legacy TorchScript exporter is used on purpose: with ``TrainingMode.PRESERVE`` and the module
in eval mode it keeps ``BatchNormalization`` nodes (inference form, one output), which the
BN-scale pruning passes need. ``TrainingMode.EVAL`` instead fuses BatchNorm into the preceding
Conv, which is what ``keep_batchnorm=False`` asks for (a deployment-style file). Constant folding
runs in both cases: it only folds subgraphs whose inputs are all constant (such as the transposed
weight of a ``Linear``), never a BatchNorm on activations.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch

from onnxzip.core.compat import make_compatible
from onnxzip.errors import ConfigError, UnsupportedModelError
from onnxzip.core.io import write_atomically

log = logging.getLogger(__name__)


def _inline_identity_initializers(model: onnx.ModelProto) -> None:
    """Undo the exporter's initializer de-duplication, in place.

    The exporter replaces an initializer equal to another one by ``Identity(other)`` (an untrained
    BatchNorm's running_var equals its weight, both ones). A pass that rewrites one tensor would
    then silently change the other, so each such Identity becomes its own initializer again.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    kept = []
    for node in graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in initializers
            and node.output[0] not in graph_outputs
        ):
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def _as_tensor_tuple(example_inputs: object) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if (
        not isinstance(inputs, (tuple, list))
        or not inputs
        or not all(isinstance(item, torch.Tensor) for item in inputs)
    ):
        raise ConfigError("example_inputs must be a torch.Tensor or a non-empty tuple of tensors.")
    return tuple(inputs)


def _names(given: Sequence[str] | None, count: int, kind: str) -> list[str]:
    """``given`` checked against ``count``, or the defaults ``kind`` / ``kind_0``, ``kind_1``..."""
    if given is None:
        return [kind] if count == 1 else [f"{kind}_{index}" for index in range(count)]
    if len(given) != count:
        raise ConfigError(
            f"{kind}_names has {len(given)} names but the module has {count} {kind}s."
        )
    return list(given)



def export(
    module: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    keep_batchnorm: bool = True,
    dynamic_batch: bool = True,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[int, str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) to ONNX and return the model; also save it if ``path``.

    ``keep_batchnorm`` keeps BatchNormalization nodes (inference mode, running statistics);
    otherwise BatchNorm is folded into the preceding Conv. ``dynamic_batch`` makes dim 0 of every
    input and output symbolic (``batch``); ``dynamic_axes`` names further symbolic axes shared
    by every input and output (e.g. ``{1: "frames"}`` for sequences). Names default to ``input``/``output`` (``input_0``...
    when there are several). The module's train/eval mode is restored afterwards.
    """
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"export() needs a torch.nn.Module, got {type(module).__name__}.")
    inputs = _as_tensor_tuple(example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            try:
                outputs = module(*inputs)
            except Exception as exc:
                raise ConfigError(f"The module failed on example_inputs: {exc}") from exc
        output_count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        in_names = _names(input_names, len(inputs), "input")
        out_names = _names(output_names, output_count, "output")
        axes = {**({0: "batch"} if dynamic_batch else {}), **dict(dynamic_axes or {})}
        symbolic = {name: axes for name in in_names + out_names} if axes else None
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                # The legacy exporter is deprecated; it is the one that can keep BatchNorm.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                # RNN modules' input-size checks trace as constants, which is what we want.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(
                    module,
                    inputs,
                    buffer,
                    dynamo=False,
                    training=(
                        torch.onnx.TrainingMode.PRESERVE
                        if keep_batchnorm
                        else torch.onnx.TrainingMode.EVAL
                    ),
                    do_constant_folding=True,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=symbolic,
                )
        except Exception as exc:
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise UnsupportedModelError(f"torch.onnx.export failed: {first_line}") from exc
    finally:
        module.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    _inline_identity_initializers(model)
    make_compatible(model)
    if path is not None:
        write_atomically(path, model.SerializeToString())
        log.info("exported %s to %s", type(module).__name__, path)
    return model
