"""The prune-channels pass end to end on the reference CNN: exactness on zero-γ channels,
a ratio-pruned model that runs, folded-BN files with L1 importance, plans, CLI and options."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs
from onnx import numpy_helper
from pruning.graphs import bn_names, zero_bn_channels

import onnxzip.passes.prune_blocks  # registers prune-blocks for the CLI test
import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
from onnxzip.api import compress
from onnxzip.cli import main
from onnxzip.errors import ConfigError
from onnxzip.models.zoo import get_reference_model
from onnxzip.passes import PassContext, get_pass

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def reference():
    return get_reference_model("cnn")


@pytest.fixture(scope="module")
def context(reference):
    return PassContext(feeds={reference.input_name: reference.test_inputs[:8]})


def _weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))


def test_zero_gamma_channels_of_reference_cnn_are_removed_exactly(reference, context):
    original = onnx.load(reference.onnx_path)
    rng = np.random.default_rng(0)
    picks = {}
    for name in bn_names(original):
        channels = len(numpy_helper.to_array(next(
            t for t in original.graph.initializer
            if t.name == next(n for n in original.graph.node if n.name == name).input[1])))
        picks[name] = sorted(rng.choice(channels, channels // 4, replace=False).tolist())
    model = zero_bn_channels(original, picks)
    result = get_pass("prune-channels")(threshold=1e-6).run(model, context)
    groups = [c for c in result.report.changes if c.op_type == "channel group"]
    assert sum(not c.skipped for c in groups) >= 6
    assert any(c.skipped and "graph output" in c.reason for c in groups)
    assert result.report.params_after < 0.9 * result.report.params_before
    assert result.report.flops_after < 0.9 * result.report.flops_before
    assert_same_outputs(model, result.model, {reference.input_name: reference.test_inputs[:32]}, atol=1e-4)


def test_ratio_pruned_reference_cnn_is_valid_runs_and_is_smaller(reference, context):
    result = get_pass("prune-channels")(ratio=0.3).run(onnx.load(reference.onnx_path), context)
    onnx.checker.check_model(result.model)
    accuracy = reference.accuracy(result.model, device="cpu")
    log.info("reference CNN pruned 30%% without fine-tuning: accuracy %.3f (original %.3f)",
             accuracy, reference.accuracy(reference.onnx_path, device="cpu"))
    assert 0.0 <= accuracy <= 1.0
    assert result.report.params_after < 0.8 * result.report.params_before
    kept = [c.details["channels_after"] for c in result.report.changes if c.op_type == "channel group" and not c.skipped]
    assert min(kept) >= 1


def test_folded_cnn_prunes_with_filter_norms(reference, context):
    folded = get_reference_model("cnn", folded=True)
    model = onnx.load(folded.onnx_path)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    result = get_pass("prune-channels")(ratio=0.2, round_to=4).run(model, context)
    groups = [c for c in result.report.changes if c.op_type == "channel group" and not c.skipped]
    assert groups and all(c.details["importance"]["kind"] == "l1" for c in groups)
    assert all(c.details["channels_after"] % 4 == 0 for c in groups)
    assert result.report.params_after < result.report.params_before


def test_plan_save_edit_replay(reference, tmp_path):
    model = onnx.load(reference.onnx_path)
    first = compress(model, prune_channels={"ratio": 0.2}, allow_gate_failure=True)
    path = tmp_path / "plan.json"
    first.plan.save(path)
    data = json.loads(path.read_text())
    step = data["steps"][0]
    assert step["pass"] == "prune-channels"
    group = "/blocks/blocks.0/conv1/conv1.0/Conv"
    step["layers"][group]["keep"] = [0, 5, 9]
    path.write_text(json.dumps(data))
    replayed = compress(model, plan=str(path), allow_gate_failure=True)
    assert _weight(replayed.model, group).shape[0] == 3
    expected = _weight(model, "/blocks/blocks.0/conv2/conv2.0/Conv")
    kept_out = data["steps"][0]["layers"]["/stem/stem.0/stem.0.0/Conv"]["keep"]
    np.testing.assert_array_equal(
        _weight(replayed.model, "/blocks/blocks.0/conv2/conv2.0/Conv"), expected[kept_out][:, [0, 5, 9]])
    step["layers"][group]["keep"] = [0, 0]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="distinct channel indices"):
        compress(model, plan=str(path))


def test_cli_prunes_channels_and_blocks(reference, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    assert main(["compress", str(reference.onnx_path), "-o", str(out), "--prune-channels", "ratio=0.5",
                 "--prune-blocks", "2", "--force", "-q", "--report", str(report)]) == 0
    passes = json.loads(report.read_text())["passes"]
    assert [p["pass_name"] for p in passes] == ["prune-channels", "prune-blocks", "cleanup"]
    assert sum(c["decision"] == "removed" for c in passes[1]["changes"]) == 2
    onnx.checker.check_model(onnx.load(out))


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "needs ratio, threshold, layer_ratios or latency_budget"),
        ({"ratio": 0.3, "threshold": 0.1}, "ratio or threshold, not both"),
        ({"ratio": 1.5}, r"in \[0, 1\)"),
        ({"ratio": 0.3, "round_to": 0}, "at least 1"),
    ],
)
def test_bad_options_raise_config_error(options, message):
    from helpers import mlp

    with pytest.raises(ConfigError, match=message):
        get_pass("prune-channels")(**options).run(mlp(), PassContext())
