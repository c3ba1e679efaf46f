"""Loss subgraphs appended to the training copy of a model.

The loss is built into the graph as one scalar output, ``onnxzip_loss``, and handed to
onnxruntime-training by name (``loss_input_names``): every graph output would otherwise be passed
to the loss positionally. Terms (summed):

* ``mse``: mean((y − t)²); ``l1``: mean(|y − t|) against a teacher's outputs or ``references``;
* ``kl``: −Σ_c p_c · log softmax(y)_c averaged over rows, with p = softmax(teacher logits), i.e. the
  KL divergence to the teacher's class distribution up to the teacher's (constant) entropy;
* ``cross_entropy``: SoftmaxCrossEntropyLoss against int64 ``labels``.

A term may carry a weight; intermediate-activation matching adds ``mse`` terms on inner tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOSS_NAME = "onnxzip_loss"
KINDS = ("mse", "l1", "kl", "cross_entropy")


@dataclass(frozen=True)
class LossTerm:
    """One term: model output ``output`` against the extra graph input ``target``."""

    output: str
    kind: str
    target: str
    weight: float = 1.0


def _mean(nodes: list[onnx.NodeProto], source: str, name: str) -> str:
    nodes.append(helper.make_node("ReduceMean", [source], [name], keepdims=0))
    return name


def add_loss(
    model: onnx.ModelProto, terms: list[LossTerm], target_shapes: dict[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """``model`` (modified in place and returned) with the loss terms as its only output.
    ``target_shapes`` gives each target's per-item shape (the batch axis is symbolic)."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    parts: list[str] = []
    for index, term in enumerate(terms):
        tag = f"{LOSS_NAME}/{index}"
        elem = TensorProto.INT64 if term.kind == "cross_entropy" else TensorProto.FLOAT
        graph.input.append(helper.make_tensor_value_info(term.target, elem, ["N", *target_shapes[term.target]]))
        if term.kind in ("mse", "l1"):
            nodes.append(helper.make_node("Sub", [term.output, term.target], [f"{tag}/diff"]))
            if term.kind == "mse":
                nodes.append(helper.make_node("Mul", [f"{tag}/diff", f"{tag}/diff"], [f"{tag}/err"]))
            else:
                nodes.append(helper.make_node("Abs", [f"{tag}/diff"], [f"{tag}/err"]))
            parts.append(_mean(nodes, f"{tag}/err", f"{tag}/value"))
        elif term.kind == "kl":
            classes = target_shapes[term.target][-1]
            graph.initializer.append(numpy_helper.from_array(np.float32(-classes), f"{tag}/scale"))
            nodes.append(helper.make_node("LogSoftmax", [term.output], [f"{tag}/logp"], axis=-1))
            nodes.append(helper.make_node("Mul", [term.target, f"{tag}/logp"], [f"{tag}/plogp"]))
            _mean(nodes, f"{tag}/plogp", f"{tag}/mean")
            nodes.append(helper.make_node("Mul", [f"{tag}/mean", f"{tag}/scale"], [f"{tag}/value"]))
            parts.append(f"{tag}/value")
        elif term.kind == "cross_entropy":
            nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", [term.output, term.target],
                                          [f"{tag}/value", f"{tag}/log_prob"], reduction="mean"))
            parts.append(f"{tag}/value")
        else:
            raise ValueError(f"unknown loss kind {term.kind!r}")
        if term.weight != 1.0:
            graph.initializer.append(numpy_helper.from_array(np.float32(term.weight), f"{tag}/weight"))
            nodes.append(helper.make_node("Mul", [parts[-1], f"{tag}/weight"], [f"{tag}/weighted"]))
            parts[-1] = f"{tag}/weighted"
    total = parts[0]
    for index, part in enumerate(parts[1:]):
        nodes.append(helper.make_node("Add", [total, part], [f"{LOSS_NAME}/sum{index}"]))
        total = f"{LOSS_NAME}/sum{index}"
    nodes.append(helper.make_node("Identity", [total], [LOSS_NAME]))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS_NAME, TensorProto.FLOAT, []))
    return model
