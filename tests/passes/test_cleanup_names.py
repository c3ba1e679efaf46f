"""cleanup short_names: shorter files with the same outputs in onnxruntime, the graph's inputs and
outputs untouched, outer-scope references inside If branches renamed with their tensor."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxzip.passes import PassContext, get_pass
from onnxzip.core.runtime import make_session, run_session

LONG = "/model/encoder/layers.0/self_attention/very_long_exported_name"


def branchy_model() -> onnx.ModelProto:
    """x → MatMul(W) → Relu → h; If(flag): then h·2, else h + W's row sum (outer-scope reads of h
    and of an initializer) → y."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), f"{LONG}/weight")
    two = numpy_helper.from_array(np.float32(2.0), f"{LONG}/two")
    bias = numpy_helper.from_array(np.ones(4, np.float32), f"{LONG}/bias")
    then = helper.make_graph([helper.make_node("Mul", [f"{LONG}/relu_out", f"{LONG}/two"], ["then_y"],
                                               name=f"{LONG}/then_mul")],
                             "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Add", [f"{LONG}/relu_out", f"{LONG}/bias"], ["else_y"],
                                                name=f"{LONG}/else_add")],
                              "else", [], [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", f"{LONG}/weight"], [f"{LONG}/matmul_out"], name=f"{LONG}/MatMul"),
             helper.make_node("Relu", [f"{LONG}/matmul_out"], [f"{LONG}/relu_out"], name=f"{LONG}/Relu"),
             helper.make_node("If", ["flag"], ["y"], name=f"{LONG}/If", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [weight, two, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_short_names_keep_outputs_and_interface_and_shrink_the_file():
    model = branchy_model()
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    context = PassContext(feeds={"x": x, "flag": np.array(True)})
    plain = get_pass("cleanup")().run(model, context)
    short = get_pass("cleanup")({"short_names": True}).run(model, context)
    onnx.checker.check_model(short.model, full_check=True)
    assert [i.name for i in short.model.graph.input] == ["x", "flag"]
    assert [o.name for o in short.model.graph.output] == ["y"]
    text = short.model.SerializeToString()
    assert LONG.encode() not in text
    assert len(text) < len(plain.model.SerializeToString()) - 10 * len(LONG)
    assert any("names shortened" in note for note in short.report.notes)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        want = run_session(make_session(model, "cpu"), feeds)["y"]
        got = run_session(make_session(short.model, "cpu"), feeds)["y"]
        np.testing.assert_array_equal(got, want)


def test_short_names_are_off_by_default():
    model = branchy_model()
    result = get_pass("cleanup")().run(model, PassContext(feeds={"x": np.zeros((1, 6), np.float32),
                                                               "flag": np.array(True)}))
    assert LONG.encode() in result.model.SerializeToString()

