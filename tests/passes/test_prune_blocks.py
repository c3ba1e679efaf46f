"""The prune-blocks pass: identity-skip residual blocks found, scored by BatchNorm |γ|, removed
with their constant contribution kept; projection blocks skipped with a reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs
from pruning.graphs import GraphBuilder, bn_names, zero_bn_channels

import onnxzip.passes.prune_blocks  # noqa: F401 - registers the pass
from onnxzip.errors import ConfigError
from onnxzip.models.zoo import get_reference_model
from onnxzip.passes import PassContext, Plan, get_pass


def test_reference_cnn_block_with_zero_gamma_is_removed_exactly():
    reference = get_reference_model("cnn")
    original = onnx.load(reference.onnx_path)
    block_bns = bn_names(original, "/blocks/blocks.3/")
    model = zero_bn_channels(original, {name: list(range(64)) for name in block_bns})
    context = PassContext(feeds={reference.input_name: reference.test_inputs[:8]})
    result = get_pass("prune-blocks")(count=1).run(model, context)
    decisions = {c.layer: c for c in result.report.changes}
    assert decisions["/blocks/blocks.3/Add"].decision == "removed"
    assert decisions["/blocks/blocks.3/Add"].details["score"] == 0.0
    assert sum(c.decision == "kept" for c in result.report.changes) == 3
    assert "projection shortcut" in decisions["/blocks/blocks.2/Add"].reason
    assert not any(n.name.startswith("/blocks/blocks.3/conv") for n in result.model.graph.node)
    assert result.report.params_after < result.report.params_before
    assert_same_outputs(model, result.model, {reference.input_name: reference.test_inputs[:32]}, atol=1e-4)


def _two_blocks(beta_sign: float) -> onnx.ModelProto:
    b = GraphBuilder(6)
    x = b.node("Relu", [b.bn(b.conv("x", 3, 4, name="stem"), 4)])
    for index, zero in enumerate(([0, 1, 2, 3], [])):
        h = b.node("Relu", [b.bn(b.conv(x, 4, 4, name=f"b{index}c1"), 4, zero=zero, name=f"b{index}bn1")])
        h = b.bn(b.conv(h, 4, 4, name=f"b{index}c2"), 4, zero=zero, negative_beta=False, name=f"b{index}bn2")
        x = b.node("Relu", [b.node("Add", [x, h], name=f"b{index}add")])
    model = b.model(b.head(x, 4))
    beta = next(t for t in model.graph.initializer if t.name == next(
        n for n in model.graph.node if n.name == "b0bn2").input[2])
    beta.CopyFrom(onnx.numpy_helper.from_array(beta_sign * np.abs(onnx.numpy_helper.to_array(beta)), beta.name))
    return model


@pytest.mark.parametrize("beta_sign, add_left", [(1.0, True), (0.0, False)])
def test_branch_constant_is_kept_or_the_add_disappears(beta_sign, add_left):
    model = _two_blocks(beta_sign)
    result = get_pass("prune-blocks")(threshold=0.5, score="max").run(model, PassContext())
    assert result.plan.layers["b0add"]["remove"] and not result.plan.layers["b1add"]["remove"]
    names = {n.name for n in result.model.graph.node}
    assert ("b0add" in names) == add_left and "b0c1" not in names and "b1c1" in names
    assert_same_outputs(model, result.model, atol=1e-5)


def test_plan_replay_and_errors():
    model = _two_blocks(1.0)
    plan = Plan("prune-blocks", {}, {"b1add": {"remove": True}})
    result = get_pass("prune-blocks")().run(model, PassContext(), plan=plan)
    assert "b1c1" not in {n.name for n in result.model.graph.node}
    with pytest.raises(ConfigError, match="not a removable residual block"):
        get_pass("prune-blocks")().run(model, PassContext(), plan=Plan("prune-blocks", {}, {"stem": {"remove": True}}))
    with pytest.raises(ConfigError, match="needs count or threshold"):
        get_pass("prune-blocks")().run(model, PassContext())
