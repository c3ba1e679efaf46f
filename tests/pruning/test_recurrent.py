"""Pruning LSTM/GRU/RNN hidden units: the interface keeps its shapes (state inputs read at the
kept units, state and sequence outputs restored with zeros), dead units pruned change no output
(onnxruntime), the energy importance finds them, latency forms of recurrent layers, and the
reconstruct step refits the consumer of a pruned GRU."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper
from rnn_graphs import bidirectional, crnn_views, dead_state, linear_units, recurrent_weights, stacked_lstm

import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
from onnxzip.api import compress
from onnxzip.measure.latency import Factor, LayerForm, Timing
from onnxzip.passes import PassContext, Plan, get_pass
from onnxzip.pruning.groups import analyze_channels
from onnxzip.core.runtime import make_session, run_session


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_session(make_session(model, "cpu"), feeds)


def _hidden_sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "hidden_size"))
            for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")}


def _stacked_feeds(rng: np.random.Generator, steps: int = 7) -> dict[str, np.ndarray]:
    state = rng.standard_normal((1, 2, 8, 2)).astype(np.float32)
    state[0, 0, [1, 5]] = 0  # the dead units of layer 0, 1 start from a zero state
    state[0, 1, [2, 6]] = 0
    return {"x": rng.standard_normal((1, steps, 6)).astype(np.float32), "state": state}


def test_stacked_lstm_with_state_keeps_its_interface_and_outputs():
    rng = np.random.default_rng(1)
    model = stacked_lstm()
    feeds = _stacked_feeds(rng)
    result = get_pass("prune-channels")(ratio=0.25, scope="layer").run(model, PassContext(feeds=feeds))
    assert _hidden_sizes(result.model) == {"lstm0": 6, "lstm1": 6}
    kept = {gid: entry["keep"] for gid, entry in result.plan.layers.items()}
    assert kept == {"lstm0": [0, 2, 3, 4, 6, 7], "lstm1": [0, 1, 3, 4, 5, 7]}  # the dead units go
    assert {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input} == \
        {"x": [1, "T", 6], "state": [1, 2, 8, 2]}
    other = _stacked_feeds(np.random.default_rng(7), steps=11)  # samples the pass never saw
    before, after = _run(model, other), _run(result.model, other)
    assert after["state_out"].shape == (1, 2, 8, 2) and after["y"].shape == (1, 11, 3)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-5)
    notes = " ".join(result.report.notes)
    assert "pruned units zero" in notes and "activation energy" in notes
    # a streaming caller feeds the state back: the pruned units stay zero, the outputs agree
    step = {"x": other["x"][:, :1], "state": after["state_out"]}
    np.testing.assert_allclose(_run(result.model, step)["y"], _run(model, step)["y"], atol=1e-5)


@pytest.mark.parametrize("op", ["GRU", "LSTM", "RNN"])
def test_bidirectional_sequence_and_state_outputs_keep_full_width(op):
    """restore=zeros: the pruned (dead) units come back as zeros."""
    rng = np.random.default_rng(2)
    dead = [0, 3, 9, 12, 17, 20, 26, 30]
    model = bidirectional(op, dead=dead, hidden=32)
    feeds = {"x": rng.standard_normal((3, 7, 5)).astype(np.float32), "h0": dead_state((3, 2, 32), 2, dead, rng)}
    result = get_pass("prune-channels")(ratio=0.25, scope="layer", restore="zeros").run(model, PassContext(feeds=feeds))
    assert _hidden_sizes(result.model) == {"rnn": 24}
    assert result.plan.layers["rnn"]["keep"] == [u for u in range(32) if u not in dead]
    weights = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    assert weights["W"] == (2, gates * 24, 5) and weights["R"] == (2, gates * 24, 24)
    assert weights["B"] == (2, 2 * gates * 24)
    assert weights["dense"] == (48, 4)  # the merged [T, N, 2H] sequence: both directions' units go
    held = {"x": rng.standard_normal((2, 9, 5)).astype(np.float32), "h0": dead_state((2, 2, 32), 2, dead, rng)}
    before, after = _run(model, held), _run(result.model, held)
    assert after["seq"].shape == (9, 2, 64) and after["h_out"].shape == (2, 2, 32)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-5)


def test_views_computed_from_shapes_follow_the_pruned_units_or_read_them_at_full_width():
    """A view that keeps the unit axis whole is followed (its computed target gets the kept
    count), one that merges it reads the sequence restored to full width; the Shape both read
    reports the original size, so both targets fit (onnxruntime refused the model before)."""
    rng = np.random.default_rng(5)
    dead = [1, 4]
    model = crnn_views(dead)
    feeds = {"x": rng.standard_normal((6, 2, 5)).astype(np.float32)}
    result = get_pass("prune-channels")(ratio=0.25, scope="layer", restore="zeros").run(model, PassContext(feeds=feeds))
    assert _hidden_sizes(result.model) == {"lstm": 6}
    assert result.plan.layers["lstm"]["keep"] == [0, 2, 3, 5, 6, 7]
    fc = next(i for i in result.model.graph.initializer if i.name == "fc")
    assert tuple(fc.dims) == (6, 12)  # the Gemm after the followed view lost the pruned units' columns
    assert any("restored to full width" in note and "'flat'" in note for note in result.report.notes)
    held = {"x": rng.standard_normal((9, 3, 5)).astype(np.float32)}
    before, after = _run(model, held), _run(result.model, held)
    assert after["y"].shape == (9, 3, 6) and after["energy"].shape == (9,)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-5)


def test_energy_importance_weighs_activations_by_the_weights_reading_them():
    rng = np.random.default_rng(3)
    model = bidirectional("GRU", dead=[])
    feeds = {"x": rng.standard_normal((4, 6, 5)).astype(np.float32), "h0": np.zeros((4, 2, 8), np.float32)}
    dense = next(i for i in model.graph.initializer if i.name == "dense")
    weight = onnx.numpy_helper.to_array(dense).copy()
    weight[[2, 8 + 2]] *= 100.0  # unit 2 (both directions' columns) read with much larger weights
    dense.CopyFrom(onnx.numpy_helper.from_array(weight, "dense"))
    result = get_pass("prune-channels")(ratio=0.5, scope="layer").run(model, PassContext(feeds=feeds))
    change = next(c for c in result.report.changes if c.layer == "rnn" and c.op_type == "channel group")
    assert change.details["importance"]["kind"] == "energy"
    assert 2 in result.plan.layers["rnn"]["keep"]
    assert len(result.plan.layers["rnn"]["keep"]) == 4


def test_unfollowed_recurrent_channels_are_widened_not_blocked_and_other_channels_still_block():
    model = stacked_lstm()
    analysis = analyze_channels(model, _stacked_feeds(np.random.default_rng(4)))
    groups = analysis.by_id()
    assert groups["lstm0"].prunable and groups["lstm1"].prunable
    assert "reaches the graph output 'y'" in groups["dense"].reasons[0]
    assert {consumer for _, consumer, _ in analysis.widen} == {"stack_layers"}
    assert all("stacks different recurrent layers" in why for *_, why in analysis.widen)


@pytest.mark.parametrize("op, attrs", [("LSTM", {}), ("GRU", {"linear_before_reset": 1}), ("RNN", {})])
def test_recurrent_layer_form_runs_at_its_hidden_size(op, attrs):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    form = LayerForm(op, (5, 1, 7), (Factor((2, gates * 3, 7)),),
                     attrs=tuple(sorted({"hidden_size": 3, "direction": "bidirectional", **attrs}.items())))
    model, feeds = form.model()
    assert _run(model, feeds)["y"].shape == (5, 2, 1, 3)


def _gru_model(hidden: int = 16, inputs: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x [N, T, I] → Transpose → GRU → Squeeze → MatMul (+ bias Add) → y [T, N, 4]."""
    rng = np.random.default_rng(seed)
    w, r, b = recurrent_weights("GRU", inputs, hidden, 1, [], rng)
    return make_model([
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time"),
        helper.make_node("GRU", ["xt", "W", "R", "B"], ["Y", ""], name="gru", hidden_size=hidden, linear_before_reset=1),
        helper.make_node("Squeeze", ["Y", "axis1"], ["seq"], name="squeeze"),
        helper.make_node("MatMul", ["seq", "dense"], ["proj"], name="dense"),
        helper.make_node("Add", ["proj", "bias"], ["y"], name="bias"),
    ], [tensor("x", ["N", "T", inputs])], [tensor("y", ["T", "N", 4])], [
        init("W", w), init("R", r), init("B", b), init("axis1", np.array([1], np.int64)),
        init("dense", (rng.standard_normal((hidden, 4)) / 4).astype(np.float32)),
        init("bias", (rng.standard_normal(4) * 0.1).astype(np.float32)),
    ], opset=13)


def test_latency_budget_times_recurrent_forms_and_rejects_sizes_that_do_not_save_time():
    model = _gru_model()
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 6, 6)).astype(np.float32)}

    def layer_ms(form: LayerForm) -> float:
        if form.op == "GRU":  # below 12 units no faster (a kernel that pads to 12)
            return float(max(dict(form.attrs)["hidden_size"], 12))
        return 0.5

    def model_ms(candidate: onnx.ModelProto) -> float:
        sizes = _hidden_sizes(candidate)
        return float(max(sizes["gru"], 12)) + 0.5 if sizes else 16.5

    timing = Timing(layer_timer=layer_ms, model_timer=model_ms)
    result = get_pass("prune-channels")(latency_budget=0.5).run(model, PassContext(feeds=feeds, timing=timing))
    entry = result.plan.layers["gru"]
    # 16.5 → 12.5 ms: fewer than 12 units would only lose more, so the budget is not reached
    assert len(entry["keep"]) == 12 and entry["latency_ms"] == [16.5, 12.5]
    assert _hidden_sizes(result.model) == {"gru": 12}
    assert any("not reached" in note for note in result.report.notes)


def test_reconstruct_refits_a_pruned_gru_and_its_consumer():
    model = _gru_model()
    rng = np.random.default_rng(6)
    fit = {"x": rng.standard_normal((64, 6, 6)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 6, 6)).astype(np.float32)}
    prune = {"prune-channels": {"ratio": 0.5}}
    pruned = compress(model, {"passes": [prune]}, data=fit, check=False)
    rebuilt = compress(model, {"passes": [prune, {"reconstruct": {}}]}, data=fit, check=False)
    consumer = compress(model, {"passes": [prune, {"reconstruct": {"include": ["dense"]}}]}, data=fit, check=False)
    done = {c.layer: c for c in rebuilt.report.passes[1].changes if not c.skipped}
    assert done["gru"].details["refit"] == "pruned recurrent units" and done["gru"].details["hidden"] == [8, 16]
    assert done["dense"].details["refit"] == "pruned input"
    for change in done.values():
        assert change.details["error_after"] < change.details["error_before"]

    def error(candidate: onnx.ModelProto) -> float:
        reference, output = _run(model, held)["y"], _run(candidate, held)["y"]
        return float(np.sum((output - reference) ** 2) / np.sum(reference ** 2))

    assert error(consumer.model) < 0.8 * error(pruned.model)
    assert error(rebuilt.model) < error(consumer.model)  # the GRU's own refit adds to the consumer's
    assert rebuilt.model.ByteSize() == pruned.model.ByteSize()


def _linear_feeds(rng: np.random.Generator, count: int, steps: int, state: bool = False) -> dict[str, np.ndarray]:
    feeds = {"x": rng.standard_normal((count, steps, 32)).astype(np.float32)}
    if state:
        feeds["h0"] = rng.standard_normal((count, 1, 64)).astype(np.float32) * 0.5
    return feeds


def _copies_pruned(restore: str = "linear") -> tuple[object, Plan]:
    """The prune-channels pass and a plan that drops the copies (units 32-63; R reads only 0-31)."""
    return (get_pass("prune-channels")(ratio=0.5, scope="layer", restore=restore),
            Plan("prune-channels", {}, {"rnn": {"channels": 64, "keep": list(range(32))}}))


def test_linear_restore_predicts_pruned_units_that_are_linear_in_the_kept_ones():
    model = linear_units()
    rng = np.random.default_rng(8)
    pass_, plan = _copies_pruned()
    result = pass_.run(model, PassContext(feeds=_linear_feeds(rng, 128, 4)), plan)
    assert _hidden_sizes(result.model) == {"rnn": 32}
    held = _linear_feeds(np.random.default_rng(9), 3, 11)  # samples and a length the pass never saw
    before, after = _run(model, held), _run(result.model, held)
    assert after["seq"].shape == (3, 64, 11)
    for name in ("seq", "h_last"):  # the units axis is not last in seq: moved for the MatMul and back
        np.testing.assert_allclose(after[name], before[name], atol=1e-4)
    zeros_pass, plan = _copies_pruned("zeros")
    zeros = zeros_pass.run(model, PassContext(feeds=held), plan)
    assert np.abs(_run(zeros.model, held)["seq"][:, 32:]).max() == 0  # the other way: zeros
    notes = " ".join(result.report.notes)
    assert "'seq' restored to full width (32 of 64 kept, pruned units predicted linearly" in notes
    assert "'h_last' restored to full width (32 of 64 kept, pruned units predicted linearly" in notes


def test_a_state_fed_back_stays_zero_and_reconstruct_refits_a_restore_from_zeros():
    model = linear_units(initial_state=True)
    rng = np.random.default_rng(10)
    fit = _linear_feeds(rng, 48, 8, state=True)
    pass_, plan = _copies_pruned()
    no_data = pass_.run(model, PassContext(feeds=None), plan)  # nothing to fit on: the restore starts at zeros
    notes = " ".join(no_data.report.notes)
    assert "'seq' restored to full width (32 of 64 kept, pruned units predicted linearly from the kept ones, zero until" in notes
    assert "'h_last' restored to full width (32 of 64 kept, pruned units zero: a state fed back" in notes
    held = _linear_feeds(np.random.default_rng(11), 4, 9, state=True)
    before, start = _run(model, held), _run(no_data.model, held)
    assert np.abs(start["seq"][:, 32:]).max() == 0 and np.abs(start["h_last"][..., 32:]).max() == 0
    reconstruct = get_pass("reconstruct")()
    context = PassContext(feeds=fit, original=model)
    rebuilt = reconstruct.run(no_data.model, context)
    change = next(c for c in rebuilt.report.changes if c.details.get("refit") == "linear restore")
    assert change.details["target"] == "seq" and change.details["error_after"] < 1e-6 < change.details["error_before"]
    after = _run(rebuilt.model, held)
    np.testing.assert_allclose(after["seq"], before["seq"], atol=1e-4)
    np.testing.assert_allclose(after["h_last"][..., :32], before["h_last"][..., :32], atol=1e-5)
    assert np.abs(after["h_last"][..., 32:]).max() == 0
