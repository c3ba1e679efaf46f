"""Hand-built graphs for the pruning tests: a tiny builder over onnx.helper with named nodes."""
from __future__ import annotations

import numpy as np
import onnx
from helpers import init, make_model, tensor
from onnx import helper


class GraphBuilder:
    """Appends named nodes and random initializers; every method returns its output name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = f"{base}_{len(self.inits)}"
        self.inits.append(init(name, np.asarray(array, np.float32)))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        name = name or self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(self, x: str, cin: int, cout: int, k: int = 3, *, group: int = 1, bias: bool = False, name: str | None = None) -> str:
        inputs = [x, self.const("w", self.rng.standard_normal((cout, cin // group, k, k)) * 0.3)]
        if bias:
            inputs.append(self.const("b", self.rng.standard_normal(cout)))
        return self.node("Conv", inputs, name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, channels: int, *, zero=(), negative_beta: bool = True, name: str | None = None) -> str:
        """BatchNormalization with random statistics; ``zero`` channels get ``γ = 0`` (and a
        negative β when ``negative_beta``, so a following ReLU makes them exactly 0)."""
        gamma = self.rng.uniform(0.5, 1.5, channels)
        beta = self.rng.uniform(0.1, 0.5, channels)
        gamma[list(zero)] = 0
        if negative_beta:
            beta[list(zero)] *= -1
        mean, var = self.rng.standard_normal(channels) * 0.1, self.rng.uniform(0.5, 1.5, channels)
        return self.node("BatchNormalization", [x, *(self.const(p, v) for p, v in
                         (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)))], name)

    def gemm(self, x: str, cin: int, cout: int, name: str | None = None) -> str:
        return self.node("Gemm", [x, self.const("fc", self.rng.standard_normal((cout, cin)) * 0.3),
                                  self.const("fcb", self.rng.standard_normal(cout))], name, transB=1)

    def head(self, x: str, channels: int, classes: int = 5) -> str:
        """GlobalAveragePool → Flatten → Gemm."""
        return self.gemm(self.node("Flatten", [self.node("GlobalAveragePool", [x])]), channels, classes, name="fc")

    def model(self, output: str, out_shape=("N", 5), in_shape=("N", 3, 8, 8), opset: int = 17) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["y"], name="output"))
        return make_model(self.nodes, [tensor("x", list(in_shape))], [tensor("y", list(out_shape))], self.inits, opset=opset)


def zero_bn_channels(model: onnx.ModelProto, picks: dict[str, list[int]]) -> onnx.ModelProto:
    """Copy of ``model`` where BatchNorm ``name`` has ``γ = 0`` and ``β < 0`` on ``picks[name]``
    (what sparsity training leaves behind: the channel is a constant that ReLU turns into 0)."""
    from onnx import numpy_helper

    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    inits = {t.name: t for t in edited.graph.initializer}
    for node in edited.graph.node:
        if node.name in picks:
            gamma = numpy_helper.to_array(inits[node.input[1]]).copy()
            beta = numpy_helper.to_array(inits[node.input[2]]).copy()
            gamma[picks[node.name]] = 0
            beta[picks[node.name]] = -np.abs(beta[picks[node.name]]) - 0.1
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(gamma, node.input[1]))
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(beta, node.input[2]))
    return edited


def bn_names(model: onnx.ModelProto, contains: str = "") -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "BatchNormalization" and contains in n.name]
