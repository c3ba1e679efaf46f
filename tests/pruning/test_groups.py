"""Channel dependency analysis on hand-built graphs: coupled channels are grouped, patterns the
analysis does not follow are skipped with a reason, and removing zero-γ channels changes nothing."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, init, make_model, tensor
from onnx import helper, numpy_helper
from pruning.graphs import GraphBuilder

import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
from onnxzip.passes import PassContext, get_pass
from onnxzip.pruning import analyze_channels


def _prune(model: onnx.ModelProto, **options):
    return get_pass("prune-channels")(**options).run(model, PassContext())


def _initializer(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[index]))


def residual_concat_depthwise_se() -> onnx.ModelProto:
    """stem → depthwise → SE Mul → Concat with a side branch → mix Conv → Add(stem) → GAP → Gemm."""
    b = GraphBuilder()
    stem = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="stem"), 8, zero=[1], name="stem_bn")])
    dw = b.node("Relu", [b.bn(b.conv(stem, 8, 8, group=8, name="dw"), 8, zero=[1], name="dw_bn")])
    squeeze = b.node("Relu", [b.conv(b.node("GlobalAveragePool", [dw]), 8, 4, 1, bias=True, name="se1")])
    excite = b.node("Sigmoid", [b.conv(squeeze, 4, 8, 1, bias=True, name="se2")])
    scaled = b.node("Mul", [dw, excite])
    side = b.node("Relu", [b.bn(b.conv(stem, 8, 6, name="side"), 6, zero=[0, 3], name="side_bn")])
    joined = b.node("Concat", [scaled, side], axis=1)
    mix = b.node("Relu", [b.bn(b.conv(joined, 14, 8, name="mix"), 8, zero=[1], name="mix_bn")])
    out = b.node("Relu", [b.node("Add", [mix, stem])])
    return b.model(b.head(out, 8))


def test_groups_follow_residual_concat_depthwise_and_se():
    analysis = analyze_channels(residual_concat_depthwise_se())
    groups = {g.id: g for g in analysis.groups}
    assert set(groups["stem"].source_names) == {"stem", "se2", "mix"}
    assert [name for name, _ in groups["stem"].bn_scales] == ["stem_bn", "dw_bn", "mix_bn"]
    assert groups["se1"].size == 4 and groups["side"].size == 6
    assert all(groups[g].prunable for g in ("stem", "se1", "side"))
    assert groups["fc"].reasons == ["reaches the graph output 'y'"]
    concat = next(m for name, m in analysis.maps.items() if name.startswith("concat"))
    assert len(concat.positions) == 14 and concat.positions[8] == (groups["side"].spaces[0], 0)


def test_zero_gamma_channels_are_removed_without_changing_outputs():
    model = residual_concat_depthwise_se()
    result = _prune(model, threshold=1e-6)
    assert result.plan.layers["stem"]["keep"] == [0, 2, 3, 4, 5, 6, 7]
    assert result.plan.layers["side"]["keep"] == [1, 2, 4, 5]
    assert result.plan.layers["se1"]["keep"] == [0, 1, 2, 3]
    pruned = result.model
    assert _initializer(pruned, "dw").shape == (7, 1, 3, 3)
    assert next(a.i for n in pruned.graph.node if n.name == "dw" for a in n.attribute if a.name == "group") == 7
    assert _initializer(pruned, "mix").shape == (7, 11, 3, 3)
    assert _initializer(pruned, "se2").shape == (7, 4, 1, 1)
    assert _initializer(pruned, "fc").shape == (5, 7)
    assert result.report.params_after < result.report.params_before
    assert_same_outputs(model, pruned, atol=1e-5)


def test_unsupported_patterns_are_skipped_with_reasons():
    b = GraphBuilder(1)
    pooled = []
    grouped = b.conv(b.node("Relu", [b.bn(b.conv("x", 3, 8, name="a"), 8, zero=[0])]), 8, 8, group=2, name="grouped")
    soft = b.node("Softmax", [b.conv("x", 3, 8, name="s")], axis=1)
    lrn = b.node("LRN", [b.conv("x", 3, 8, name="l")], size=3)
    for branch in (grouped, soft, lrn):
        pooled.append(b.node("Flatten", [b.node("GlobalAveragePool", [branch])]))
    b.inits.append(init("split_shape", np.array([0, 2, 4, -1], np.int64)))
    reshaped = b.node("Reshape", [b.conv("x", 3, 8, name="r"), "split_shape"])
    pooled.append(b.node("Flatten", [b.node("ReduceMean", [reshaped], axes=[3], keepdims=0)]))
    good = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="good"), 8, zero=[0, 5], name="good_bn")])
    pooled.append(b.node("Flatten", [b.node("GlobalAveragePool", [good])]))
    model = b.model(b.gemm(b.node("Concat", pooled, axis=1), 40, 5, name="fc"))
    result = _prune(model, threshold=1e-6)
    reasons = {c.layer: c.reason for c in result.report.changes if c.skipped}
    assert "grouped convolution (group=2)" in reasons["a"] and "grouped convolution" in reasons["grouped"]
    assert "normalizes over the channel axis" in reasons["s"]
    assert "LRN" in reasons["l"] and "not supported" in reasons["l"]
    assert "splits or mixes the channel axis" in reasons["r"]
    assert set(result.plan.layers) == {"good"}
    assert _initializer(result.model, "fc").shape == (5, 38)
    assert_same_outputs(model, result.model)


def transformer_ffn(opset: int = 17) -> onnx.ModelProto:
    """x[N,T,16] → LayerNorm → MatMul(16→32) + b1 → Relu → MatMul(32→16) + b2 → + x."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    b1 = rng.uniform(0.1, 0.5, 32).astype(np.float32)
    w1[:, [3, 7, 20]] = 0  # dead hidden neurons: 3 and 20 carry relu(b1) > 0, 7 carries 0
    b1[7] = -0.2
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
        helper.make_node("Add", ["ob", "x"], ["y"], name="residual"),
    ]
    inits = [init("ln_s", np.ones(16, np.float32)), init("ln_b", np.zeros(16, np.float32)), init("w1", w1),
             init("b1", b1), init("w2", rng.standard_normal((32, 16)).astype(np.float32) * 0.3),
             init("b2", rng.standard_normal(16).astype(np.float32))]
    return make_model(nodes, [tensor("x", ["N", 5, 16])], [tensor("y", ["N", 5, 16])], inits, opset=opset)


def test_transformer_ffn_groups_hidden_neurons_and_folds_constants():
    model = transformer_ffn()
    groups = {g.id: g for g in analyze_channels(model).groups}
    assert groups["fc1"].prunable and groups["fc1"].size == 32
    assert not groups["fc2"].prunable
    result = _prune(model, threshold=1e-6, importance="l1")
    assert result.plan.layers["fc1"]["keep"] == [k for k in range(32) if k not in (3, 7, 20)]
    assert _initializer(result.model, "fc1").shape == (16, 29)
    assert _initializer(result.model, "fc2").shape == (29, 16)
    assert "Add" in [n.op_type for n in result.model.graph.node if n.name.startswith("fc2_compensation")]
    assert_same_outputs(model, result.model, atol=1e-5)
    uncompensated = _prune(model, threshold=1e-6, importance="l1", compensate=False).model
    with pytest.raises(AssertionError):
        assert_same_outputs(model, uncompensated, atol=1e-5)


@pytest.mark.parametrize("opset", [13, 18])
def test_split_slice_and_flatten_without_pooling(opset):
    b = GraphBuilder(3)
    trunk = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="trunk"), 8, zero=[1, 6], name="trunk_bn")])
    split_attrs = {"num_outputs": 2} if opset >= 18 else {}
    b.nodes.append(helper.make_node("Split", [trunk], ["first", "second"], name="split", axis=1, **split_attrs))
    b.inits += [init(name, np.array(v, np.int64)) for name, v in
                (("starts", [1]), ("ends", [4]), ("axes", [1]))]
    window = b.node("Slice", ["second", "starts", "ends", "axes"], name="window")
    left = b.conv("first", 4, 4, name="left")
    right = b.conv(window, 3, 4, name="right")
    flat = b.node("Flatten", [b.node("Relu", [b.node("Add", [left, right])])])
    model = b.model(b.gemm(flat, 4 * 64, 5, name="fc"), opset=opset)
    result = _prune(model, threshold=1e-6)
    assert result.plan.layers["trunk"]["keep"] == [0, 2, 3, 4, 5, 7]
    assert _initializer(result.model, "left").shape == (4, 3, 3, 3)
    assert _initializer(result.model, "right").shape == (4, 2, 3, 3)
    assert_same_outputs(model, result.model)
    # left/right are one group (Add): pruning it drops 64 Gemm features per channel
    result = _prune(model, layer_ratios={"left": 0.5})
    assert _initializer(result.model, "fc").shape == (5, 2 * 64)
    assert _initializer(result.model, "right").shape == (2, 3, 3, 3)
