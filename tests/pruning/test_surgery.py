"""Compensation: what a removed channel still carries is folded into the next layer's bias."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_outputs
from pruning.graphs import GraphBuilder

import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
from onnxzip.core.inputs import generate_inputs
from onnxzip.passes import PassContext, get_pass
from onnxzip.core.runtime import make_session, run_session


def test_constants_fold_exactly_into_pointwise_conv_and_gemm_after_pooling():
    b = GraphBuilder(4)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="c1"), 8, zero=[2, 5], negative_beta=False)])
    h = b.node("Relu", [b.bn(b.conv(h, 8, 6, 1, bias=True, name="pw"), 6, zero=[1], negative_beta=False)])
    model = b.model(b.head(h, 6))
    result = get_pass("prune-channels")(threshold=1e-6).run(model, PassContext())
    assert {g: len(d["keep"]) for g, d in result.plan.layers.items()} == {"c1": 6, "pw": 5}
    assert_same_outputs(model, result.model, atol=1e-5)
    without = get_pass("prune-channels")(threshold=1e-6, compensate=False).run(model, PassContext()).model
    with pytest.raises(AssertionError):
        assert_same_outputs(model, without, atol=1e-3)


def test_padded_conv_consumer_is_exact_away_from_the_border():
    b = GraphBuilder(5)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 8, name="c1"), 8, zero=[3], negative_beta=False)])
    model = b.model(b.conv(h, 8, 4, name="c2"), out_shape=("N", 4, 8, 8))
    pruned = get_pass("prune-channels")(threshold=1e-6).run(model, PassContext()).model
    feeds = generate_inputs(model, batch=2, seed=3)
    expected = run_session(make_session(model, "cpu"), feeds)["y"]
    actual = run_session(make_session(pruned, "cpu"), feeds)["y"]
    np.testing.assert_allclose(actual[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-5)
    assert not np.allclose(actual[:, :, 0], expected[:, :, 0], atol=1e-5)


def test_channel_medians_take_one_sample_along_each_inputs_sample_axis():
    """A state [2, batch, 8] holds its samples on axis 1: the one-sample run that measures the
    removed channels' values cuts it there (cutting axis 0 fed a [1, N, 8] state that the model
    refuses, and exited 3 on silero-vad)."""
    import onnx
    from helpers import load_fuzz

    from onnxzip.core.inputs import samples_from
    from onnxzip.pruning.surgery import channel_medians

    model = onnx.load_from_string(load_fuzz().stateful(1))  # a fixed batch of 1, as streaming files are
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((5, 8)).astype(np.float32),
            "state": rng.standard_normal((2, 5, 8)).astype(np.float32), "sr": np.array(16000, np.int64)}
    medians = channel_medians(model, {}, {"xs": 1, "state_out": 2}, samples_from(model, data))
    xs = data["x"][0] + data["state"][:, 0].sum(0)
    np.testing.assert_allclose(medians["xs"], xs, rtol=1e-5)
    state_out = data["state"][:, 0] / 2 + data["x"][0]
    np.testing.assert_allclose(medians["state_out"], np.median(state_out, axis=0), rtol=1e-5)
