from __future__ import annotations

import numpy as np
from onnxzip.core.compat import iter_graphs
from helpers import assert_same_outputs, init, make_model, tensor
from onnx import TensorProto, helper, numpy_helper

from onnxzip.api import prepare_model
from onnxzip.core.graph import import_graph
from onnxzip.core.weights import discover_weights

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 4)).astype(np.float32)


def _chain_model():
    """Weights in every place real files keep them: initializer, Constant node, a
    Transpose∘Slice∘Concat chain, shared by two nodes, and inside an If branch."""
    constant = helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(W[:4, :4].copy(), "wc"))
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_then"], ["t_out"], name="mm_then")],
        "then", [], [tensor("t_out", ["N", 4])], [init("w_then", W[:4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wc"], ["e_out"], name="mm_else")],
        "else", [], [tensor("e_out", ["N", 4])],
    )
    nodes = [
        constant,
        helper.make_node("Concat", ["wa", "wb"], ["wcat"], axis=0),
        helper.make_node("Slice", ["wcat", "starts", "ends", "axes"], ["wsl"]),
        helper.make_node("Transpose", ["wsl"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["a"], name="mm_chain"),
        helper.make_node("MatMul", ["x", "shared"], ["b"], name="mm_shared1"),
        helper.make_node("MatMul", ["x", "shared"], ["c"], name="mm_shared2"),
        helper.make_node("If", ["cond"], ["d"], name="branch", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Sum", ["a", "b", "c", "d"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor("x", ["N", 4]), tensor("cond", [], TensorProto.BOOL)],
        [tensor("y", ["N", 4])],
        [
            init("wa", W[:, :2].T.copy()), init("wb", W[:, 2:].T.copy()),
            init("starts", np.array([0], np.int64)), init("ends", np.array([4], np.int64)), init("axes", np.array([1], np.int64)),
            init("shared", W[:4]),
        ],
    )


def test_discovers_weights_wherever_they_live():
    table = discover_weights(import_graph(_chain_model()))
    by_name = table.by_name()
    assert by_name["shared"].origin == "initializer shared"
    assert [u.node for u in by_name["shared"].uses] == ["mm_shared1", "mm_shared2"]
    assert by_name["wt"].origin.startswith("Transpose ← Slice ← Concat")
    assert by_name["wt"].shape == (4, 4)
    assert by_name["w_then"].graph_path == "branch/then_branch"
    assert by_name["wc"].origin.startswith("Constant node")
    assert by_name["wc"].uses[0].graph_path == "branch/else_branch"
    assert {w.name for w in table.float_weights()} == {"shared", "wt", "w_then", "wc"}


def test_materialized_model_is_numerically_identical():
    model = _chain_model()
    prepared, notes = prepare_model(model)
    table = discover_weights(import_graph(prepared))
    assert all(w.origin.startswith("initializer") for w in table.weights)
    assert len([n for n in notes if "folded" in n]) == 2  # the Transpose chain and the Constant node
    # shared, w_then (then branch), wc and the folded chain hold the same 4x4 values: stored once
    assert notes[-1].startswith("stored 3 duplicate weights once")
    assert sum(len(g.initializer) for g in iter_graphs(prepared.graph)) == 1 + len(
        [t for t in prepared.graph.initializer if t.data_type != TensorProto.FLOAT])
    assert not any(n.op_type in ("Transpose", "Concat", "Slice", "Constant") for n in prepared.graph.node)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, prepared, {"x": x, "cond": np.array(cond)})


def test_a_tied_embedding_is_stored_once_and_compressed_once():
    """Gather(E) and MatMul(h, Transpose(E)) read one embedding: folding the Transpose into an
    initializer would store E twice (the output grew 1.8x on a torch export); it stays a chain,
    and clustering E serves both readers."""
    from onnxzip.api import compress

    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((500, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
         helper.make_node("Tanh", ["h"], ["t"]),
         helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tie"),
         helper.make_node("MatMul", ["t", "Et"], ["logits"], name="lm_head")],
        [tensor("ids", ["N", 6], TensorProto.INT64)], [tensor("logits", ["N", 6, 500])], [init("E", embedding)])
    prepared, notes = prepare_model(model)
    assert prepared.ByteSize() < 1.01 * model.ByteSize()
    assert any(n.startswith("Et: left as Transpose ← initializer E") and "stored twice" in n for n in notes)
    result = compress(model, data={"ids": rng.integers(0, 500, (16, 6))}, cluster={"bits": 4})
    assert model.ByteSize() / result.model.ByteSize() > 6
    assert [n.op_type for n in result.model.graph.node].count("Transpose") == 1


def test_quantized_weights_are_recognised_and_left_alone():
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["wdq"]),
            helper.make_node("MatMul", ["x", "wdq"], ["a"]),
            helper.make_node("MatMulInteger", ["xq", "wq2"], ["y_int"]),
        ],
        [tensor("x", ["N", 4]), tensor("xq", ["N", 4], TensorProto.UINT8)],
        [tensor("a", ["N", 4]), tensor("y_int", ["N", 4], TensorProto.INT32)],
        [
            init("wq", RNG.integers(-128, 127, (4, 4)).astype(np.int8)),
            init("scale", np.float32(0.1)), init("zp", np.int8(0)),
            init("wq2", RNG.integers(0, 255, (4, 4)).astype(np.uint8)),
        ],
    )
    table = discover_weights(import_graph(model))
    assert {w.name for w in table.weights if w.quantized} == {"wq", "wq2"}
    assert table.float_weights() == []
    assert any("already-quantized" in note for note in table.notes)
