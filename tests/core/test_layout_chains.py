"""Chains of layout-only nodes collapse into one Reshape or none (onnxzip.core.layout), exactly; and
import keeps the declared shapes of graph inputs and outputs.

The graphs copy dtln_stage1's state plumbing: a ``[1, 2, 4, 2]`` state sliced, squeezed and
unsqueezed into an op's layout and stacked back, at a fixed batch of 1."""
from __future__ import annotations

import numpy as np
import onnx
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.core.layout import collapse_layout_chains
from onnxzip.core.runtime import make_session, run_session
from onnxzip.measure.cost import observed_shapes
from onnxzip.passes import PassContext, get_pass

RNG = np.random.default_rng(5)


def _state_model(batch="1") -> onnx.ModelProto:
    """x [B,1,8] → Transpose(1,0,2) → MatMul → Squeeze(0) → Unsqueeze(1) → y [B,1,3] (a layout
    round trip at batch 1); s [1,2,4,2] → Slice → Squeeze(1,3) → Unsqueeze(0) → Add → Squeeze(0)
    → Unsqueeze(1) → Concat → t; a Transpose that swaps two axes of size > 1 → u."""
    b = 1 if batch == "1" else batch
    ints = lambda *v: np.asarray(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["xt", "w"], ["m"]),
        helper.make_node("Squeeze", ["m", "ax0"], ["m_s"]),
        helper.make_node("Unsqueeze", ["m_s", "ax1"], ["y"]),
        helper.make_node("Slice", ["s", "st", "en", "axs"], ["s0"]),
        helper.make_node("Squeeze", ["s0", "ax13"], ["s1"]),
        helper.make_node("Unsqueeze", ["s1", "ax0"], ["s2"]),
        helper.make_node("Add", ["s2", "bias"], ["s3"]),
        helper.make_node("Squeeze", ["s3", "ax0"], ["s4"]),
        helper.make_node("Unsqueeze", ["s4", "ax1"], ["s5"]),
        helper.make_node("Concat", ["s5", "s5"], ["t"], axis=1),
        helper.make_node("Transpose", ["s"], ["u"], perm=[0, 2, 1, 3]),
    ]
    inits = [init("w", RNG.standard_normal((8, 3)).astype(np.float32)), init("ax0", ints(0)), init("ax1", ints(1)),
             init("ax13", ints(1, 3)), init("st", ints(0, 1)), init("en", ints(1, 2)), init("axs", ints(1, 3)),
             init("bias", RNG.standard_normal(4).astype(np.float32))]
    return make_model(nodes, [tensor("x", [b, 1, 8]), tensor("s", [1, 2, 4, 2])],
                      [tensor("y", [b, 1, 3]), tensor("t", [1, 2, 4]), tensor("u", [1, 4, 2, 2])], inits)


def _feeds(batch=1):
    return {"x": RNG.standard_normal((batch, 1, 8)).astype(np.float32),
            "s": RNG.standard_normal((1, 2, 4, 2)).astype(np.float32)}


def _run(model, feeds):
    return run_session(make_session(model, "cpu"), feeds)


def test_static_chains_collapse_to_one_reshape_or_none_with_the_same_outputs_bit_for_bit():
    model = _state_model()
    feeds = _feeds()
    collapsed = onnx.ModelProto()
    collapsed.CopyFrom(model)
    chains, removed = collapse_layout_chains(collapsed, observed_shapes(model, feeds))
    onnx.checker.check_model(collapsed, full_check=True)
    ops = [n.op_type for n in collapsed.graph.node]
    # x's Transpose (same shape) and y's Squeeze/Unsqueeze go; the state's Squeeze/Unsqueeze pairs become
    # one Reshape before the Add and nothing after it; the Transpose of two big axes stays
    assert ops.count("Squeeze") == 0 and ops.count("Unsqueeze") == 0
    assert ops.count("Identity") == 1  # y is a graph output: one node keeps its name
    assert ops.count("Reshape") == 1 and ops.count("Transpose") == 1
    assert (chains, removed) == (4, 5) and len(collapsed.graph.node) == len(model.graph.node) - 5
    names = {i.name for i in collapsed.graph.initializer}
    assert not {"ax0", "ax1", "ax13"} & names and {"st", "en", "w"} <= names  # axes dropped with their nodes
    before, after = _run(model, feeds), _run(collapsed, feeds)
    assert [o.name for o in collapsed.graph.output] == ["y", "t", "u"]
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_a_dynamic_batch_is_never_baked_into_a_reshape():
    # observed at batch 1, x's Transpose and the Squeeze/Unsqueeze of m look like layout no-ops; with a
    # symbolic batch they are not, so they stay and batch 3 still runs to the same values
    model = _state_model(batch="N")
    collapsed = onnx.ModelProto()
    collapsed.CopyFrom(model)
    collapse_layout_chains(collapsed, observed_shapes(model, _feeds(1)))
    kept = [(n.op_type, n.output[0]) for n in collapsed.graph.node]
    assert ("Transpose", "xt") in kept and ("Squeeze", "m_s") in kept and ("Unsqueeze", "y") in kept
    feeds = _feeds(3)
    before, after = _run(model, feeds), _run(collapsed, feeds)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_cleanup_collapses_by_default_says_so_and_can_be_turned_off():
    model = _state_model()
    context = PassContext(feeds=_feeds())
    result = get_pass("cleanup")().run(model, context)
    assert len(result.model.graph.node) == len(model.graph.node) - 5
    assert any(note.startswith("collapse_layout: 4 chains") for note in result.report.notes)
    off = get_pass("cleanup")({"collapse_layout": False}).run(model, context)
    assert len(off.model.graph.node) == len(model.graph.node)


def test_a_shapeless_value_info_repeating_a_graph_output_keeps_the_declared_shape():
    # onnx.quantize writes value_info entries with a type and no shape for the graph's outputs
    # (ddddocr's common_old.onnx); they replaced the declared shape on import, and every pass's
    # output then failed the checker ("Field 'shape' of 'type' is required but missing": exit 3)
    model = _state_model()
    model.graph.value_info.extend([helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, None)])
    onnx.checker.check_model(model)
    result = get_pass("cleanup")({"collapse_layout": False}).run(model, PassContext(feeds=_feeds()))
    onnx.checker.check_model(result.model)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in result.model.graph.output}
    assert shapes["y"] == [1, 1, 3]
