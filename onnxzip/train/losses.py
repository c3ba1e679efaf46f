"""Loss subgraphs appended to the training copy of a model.

The loss is built into the graph as one scalar output, ``onnxzip_loss``, and handed to
onnxruntime-training by name (``loss_input_names``): every graph output would otherwise be passed
to the loss positionally. Terms (summed):

* ``mse``: mean((y − t)²); ``l1``: mean(|y − t|) against a teacher's outputs or ``references``;
* ``kl``: −Σ_c p_c · log softmax(y)_c averaged over rows, with p = softmax(teacher logits), i.e. the
  KL divergence to the teacher's class distribution up to the teacher's (constant) entropy;
* ``cross_entropy``: SoftmaxCrossEntropyLoss against int64 ``labels``;
* ``user``: a user loss model (prediction, target) -> scalar, spliced in with its tensors renamed.

A term may carry a weight; intermediate-activation matching adds ``mse`` terms on inner tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOSS_NAME = "onnxzip_loss"
KINDS = ("mse", "l1", "kl", "cross_entropy", "user")


def load_loss_model(source: str | os.PathLike[str] | onnx.ModelProto, model: onnx.ModelProto) -> onnx.GraphProto:
    """A user loss: an ONNX model with inputs (prediction, target) and one float scalar output,
    whose opsets ``model`` can host; refused with one sentence otherwise."""
    from onnxzip.errors import ConfigError
    from onnxzip.core.io import load_model

    loss = source if isinstance(source, onnx.ModelProto) else load_model(source)
    graph = loss.graph
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    if len(inputs) != 2 or len(graph.output) != 1:
        raise ConfigError(f"The loss model must have 2 inputs (prediction, target) and 1 output, "
                          f"got {len(inputs)} and {len(graph.output)}.")
    if graph.output[0].type.tensor_type.elem_type not in (0, TensorProto.FLOAT):
        raise ConfigError("The loss model's output must be a float scalar.")
    hosts = {o.domain or "": o.version for o in model.opset_import}
    for opset in loss.opset_import:
        domain = opset.domain or ""
        if domain in ("", "ai.onnx") and opset.version > hosts.get("", 0):
            raise ConfigError(f"The loss model uses opset {opset.version}, newer than the model's "
                              f"{hosts.get('', 0)}; export the loss at opset {hosts.get('', 0)} or lower.")
        if domain not in ("", "ai.onnx") and domain not in hosts:
            raise ConfigError(f"The loss model uses operator domain {domain!r}, which the model does not import.")
    if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
        raise ConfigError("The loss model may not contain control flow (If/Loop/Scan).")
    return graph


@dataclass(frozen=True)
class LossTerm:
    """One term: model output ``output`` against the extra graph input ``target``."""

    output: str
    kind: str
    target: str
    weight: float = 1.0
    graph: onnx.GraphProto | None = field(default=None, compare=False, hash=False)  # kind "user"


def _mean(nodes: list[onnx.NodeProto], source: str, name: str) -> str:
    nodes.append(helper.make_node("ReduceMean", [source], [name], keepdims=0))
    return name


def _splice(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], term: LossTerm, tag: str) -> str:
    """The user loss graph's nodes and constants, renamed under ``tag``, fed by the term's output
    and target; returns the name of its scalar."""
    loss = term.graph
    initialized = {t.name for t in loss.initializer}
    prediction, target = [i.name for i in loss.input if i.name not in initialized]
    rename = {prediction: term.output, target: term.target, "": ""}

    def renamed(name: str) -> str:
        return rename.setdefault(name, f"{tag}/user/{name}")

    for tensor in loss.initializer:
        copy = TensorProto()
        copy.CopyFrom(tensor)
        copy.name = renamed(tensor.name)
        graph.initializer.append(copy)
    for node in loss.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{tag}/user/{node.name or node.op_type}"
        copy.input[:] = [renamed(n) for n in node.input]
        copy.output[:] = [renamed(n) for n in node.output]
        nodes.append(copy)
    return renamed(loss.output[0].name)


def add_loss(
    model: onnx.ModelProto, terms: list[LossTerm], target_shapes: dict[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """``model`` (modified in place and returned) with the loss terms as its only output.
    ``target_shapes`` gives each target's shape with its sample axis as the symbol ``N`` (the
    batch is not always axis 0: a sequence output ``[T, N, C]``)."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    parts: list[str] = []
    for index, term in enumerate(terms):
        tag = f"{LOSS_NAME}/{index}"
        elem = TensorProto.INT64 if term.target == "onnxzip_labels" else TensorProto.FLOAT
        graph.input.append(helper.make_tensor_value_info(term.target, elem, list(target_shapes[term.target])))
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
        elif term.kind == "user":
            parts.append(_splice(graph, nodes, term, tag))
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
