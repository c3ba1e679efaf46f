"""Residual blocks: find them, score them by BatchNorm scale, remove their branch.

A residual block is an ``Add(x, F(x))`` whose one input is the block input ``x`` and whose
other input comes from a *branch* ``F``: nodes that read only ``x``, constants and each other,
whose tensors nobody outside uses, with at least one Conv, and with ``F(x)`` shaped like ``x``
(identity skip; projection shortcuts never qualify).

Method 2 judges a block by the BatchNorm scales after its k×k (k > 1) convolutions: the score is
the mean (or min/max) of their ``|γ|`` (every BatchNorm of the branch when none follows a k×k
Conv). Removing a block keeps what its branch still adds when those scales are zero: ``F(x)``
then no longer depends on ``x`` and equals a per-channel constant ``c`` (measured in one
onnxruntime run, median over the spatial axes), so ``Add(x, F(x))`` becomes ``Add(x, c)``, or
just ``x`` when ``c = 0``. This is exact when every path through the branch passes one of the
zeroed BatchNorms and the last one is right before the Add.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

CONV_OPS = frozenset({"Conv", "ConvTranspose"})


@dataclass
class ResidualBlock:
    """An identity-skip residual block; ``id`` is its Add node's name."""

    add: gs.Node
    skip: gs.Tensor
    branch_output: gs.Tensor
    nodes: list[gs.Node]
    scorers: list[gs.Node]

    @property
    def id(self) -> str:
        return self.add.name

    def gammas(self) -> np.ndarray:
        return np.concatenate([np.abs(np.asarray(bn.inputs[1].values, dtype=np.float64)) for bn in self.scorers])


def _branch(skip: gs.Tensor, output: gs.Tensor) -> list[gs.Node] | None:
    """Nodes computing ``output`` from ``skip`` and constants alone, or None."""
    found: dict[int, gs.Node] = {}
    stack = [output]
    while stack:
        tensor = stack.pop()
        if tensor is skip or isinstance(tensor, gs.Constant) or not tensor.name:
            continue
        if not tensor.inputs:
            return None
        producer = tensor.inputs[0]
        if id(producer) not in found:
            found[id(producer)] = producer
            stack.extend(producer.inputs)
    return list(found.values())


def _scorers(nodes: list[gs.Node]) -> list[gs.Node]:
    norms = [n for n in nodes if n.op == "BatchNormalization" and isinstance(n.inputs[1], gs.Constant)]
    after_kxk = [
        bn for bn in norms
        if bn.inputs[0].inputs and bn.inputs[0].inputs[0].op in CONV_OPS
        and isinstance(bn.inputs[0].inputs[0].inputs[1], gs.Constant)
        and np.prod(bn.inputs[0].inputs[0].inputs[1].shape[2:], dtype=np.int64) > 1
    ]
    return after_kxk or norms


def find_blocks(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> tuple[list[ResidualBlock], list[tuple[gs.Node, str]]]:
    """Identity-skip residual blocks of ``graph`` and, for every other Add of two computed
    tensors, the reason it is not one."""
    blocks, skipped = [], []
    outputs = {t.name for t in graph.outputs}
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(isinstance(t, gs.Constant) for t in add.inputs):
            continue
        reason = "neither input is the block input of a branch from the other (projection shortcut or not a residual block)"
        block = None
        for skip, branch_output in (add.inputs, add.inputs[::-1]):
            nodes = _branch(skip, branch_output)
            if not nodes or not any(n.op in CONV_OPS for n in nodes):
                continue
            members = {id(n) for n in nodes} | {id(add)}
            internal = [t for n in nodes for t in n.outputs]
            if any(t.name in outputs or any(id(c) not in members for c in t.outputs) for t in internal):
                reason = "a tensor inside the branch is used outside it"
                continue
            if shapes.get(skip.name) is None or shapes.get(skip.name) != shapes.get(add.outputs[0].name):
                reason = "the branch changes the shape"
                continue
            scorers = _scorers(nodes)
            if not scorers:
                reason = "the branch has no BatchNormalization to score it"
                continue
            block = ResidualBlock(add, skip, branch_output, nodes, scorers)
            break
        if block is None:
            skipped.append((add, reason))
        else:
            blocks.append(block)
    return blocks, skipped


def remove_block(graph: gs.Graph, block: ResidualBlock, constant: np.ndarray, rank: int, name: str) -> bool:
    """Replace the block's Add by ``Add(skip, constant)`` (``constant`` per channel on axis 1 of
    a rank-``rank`` tensor), or by the skip itself when ``constant`` is zero; returns whether an
    Add remains. The dead branch is left for ``graph.cleanup()``."""
    output = block.add.outputs[0]
    if np.any(constant):
        shape = (len(constant), *([1] * (rank - 2)))
        block.add.inputs[block.add.inputs.index(block.branch_output)] = gs.Constant(name, constant.reshape(shape))
        return True
    if output in graph.outputs:
        block.add.op, block.add.inputs = "Identity", [block.skip]
        return False
    for consumer in list(output.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is output:
                consumer.inputs[index] = block.skip
    block.add.outputs.clear()
    return False
