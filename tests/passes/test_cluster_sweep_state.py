"""The sensitivity sweep on a streaming model (state output fed back as an input) and with
held-out GPTQ fits, on small hand-built graphs compared with numpy and onnxruntime."""

from __future__ import annotations

import numpy as np
from helpers import init, make_model, tensor
from onnx import helper

from onnxzip.core.inputs import samples_from
from onnxzip.passes import PassContext
from onnxzip.passes.cluster import ClusterPass
from onnxzip.passes.cluster_calibration import SensitivityProbe, feedback_pairs
from onnxzip.core.runtime import make_session, run_samples

RNG = np.random.default_rng(3)
U = (RNG.standard_normal((4, 32)) * 0.2).astype(np.float32)
R = (0.9 * np.linalg.qr(RNG.standard_normal((32, 32)))[0]).astype(np.float32)  # a slow state
V = RNG.standard_normal((32, 3)).astype(np.float32)


def cell() -> object:
    """s_out = tanh(s R + x U), y = s_out V, echo = 2x + 1 (a frame in, a frame out: not a state)."""
    return make_model(
        [
            helper.make_node("MatMul", ["s", "r"], ["sr"]),
            helper.make_node("MatMul", ["x", "u"], ["xu"]),
            helper.make_node("Add", ["sr", "xu"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["s_out"]),
            helper.make_node("MatMul", ["s_out", "v"], ["y"]),
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["echo"]),
        ],
        [tensor("x", ["N", 4]), tensor("s", ["N", 32])],
        [tensor("y", ["N", 3]), tensor("s_out", ["N", 32]), tensor("echo", ["N", 4])],
        [init("r", R), init("u", U), init("v", V), init("two", np.float32(2)), init("one", np.float32(1))],
    )


def step(x: np.ndarray, s: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    new = np.tanh(s.astype(np.float64) @ r + x @ U.astype(np.float64))
    return {"y": new @ V, "s_out": new, "echo": 2.0 * x + 1.0}


def streamed(count: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """Items of one stream, as a real pipeline records them: the input and the state it carried."""
    xs = np.random.default_rng(seed).standard_normal((count + 30, 4)).astype(np.float32)
    s = np.zeros((1, 32), np.float32)
    rows = []
    for t, x in enumerate(xs):
        if t >= 30:
            rows.append((x, s[0].copy()))
        s = np.tanh(s @ R + x[None] @ U).astype(np.float32)
    return {"x": np.stack([r[0] for r in rows]), "s": np.stack([r[1] for r in rows])}


def rolled(data: dict[str, np.ndarray], r: np.ndarray, steps: int) -> list[dict[str, np.ndarray]]:
    count = len(data["x"])
    out = step(data["x"].astype(np.float64), data["s"], r)
    trajectory = [out]
    for t in range(1, steps):
        out = step(data["x"][(np.arange(count) + t) % count].astype(np.float64), out["s_out"], r)
        trajectory.append(out)
    return trajectory


def distortion(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> float:
    return float(np.mean([np.sum((got[k] - ref[k]) ** 2) / np.sum(ref[k] ** 2) for k in ref if k not in skip]))


def test_feedback_pairs_finds_the_state_and_not_a_frame_of_the_same_shape():
    model = cell()
    feeds = samples_from(model, streamed())
    outputs, axes = run_samples(make_session(model, "cpu"), feeds)
    assert feedback_pairs(feeds, outputs, axes) == {"s": "s_out"}
    # the same shapes on data that is not a stream (states drawn at random) pair nothing
    states = np.random.default_rng(1).uniform(-3, 3, feeds["s"].shape).astype(np.float32)
    shuffled = samples_from(model, {"x": feeds["x"], "s": states})
    outputs, axes = run_samples(make_session(model, "cpu"), shuffled)
    assert feedback_pairs(shuffled, outputs, axes) == {}


def test_probe_rolls_the_state_forward_and_matches_numpy():
    model = cell()
    data = streamed()
    feeds = samples_from(model, data)
    noisy = (R + 0.05 * np.random.default_rng(2).standard_normal(R.shape)).astype(np.float32)
    one = SensitivityProbe(model, feeds, "cpu", ["r"])
    five = SensitivityProbe(model, feeds, "cpu", ["r"], state_steps=5)
    assert one.steps == 1 and five.steps == 5 and five.pairs == {"s": "s_out"}
    # the fed-back state is not scored itself: its error surfaces in the later calls' y and echo
    expected = float(np.mean([distortion(g, r, skip=("s_out",))
                              for g, r in zip(rolled(data, noisy, 5), rolled(data, R, 5))]))
    assert np.isclose(five.distortion("r", noisy), expected, rtol=1e-3)
    single = distortion(rolled(data, noisy, 1)[0], rolled(data, R, 1)[0])
    assert np.isclose(one.distortion("r", noisy), single, rtol=1e-3)
    first_call = distortion(rolled(data, noisy, 1)[0], rolled(data, R, 1)[0], skip=("s_out",))
    assert five.distortion("r", noisy) > 1.2 * first_call  # the recurrent error accumulates over calls


def test_cluster_sweep_notes_the_state_rollout():
    model = cell()
    context = PassContext(feeds=samples_from(model, streamed()))
    result = ClusterPass(avg_bits=3.0, sweep_state_steps=4).run(model, context)
    assert any("4 calls each feeding back the state (s_out → s)" in n for n in result.report.notes), result.report.notes
    plain = ClusterPass(avg_bits=3.0).run(model, context)
    assert not any("feeding back" in n for n in plain.report.notes)


def test_heldout_sweep_fits_on_the_items_the_probe_does_not_run():
    """Inputs in a 4-dimensional subspace of 48 on the fitted items: an in-sample GPTQ fit is
    near exact there, a held-out sweep sees the error it moved to the other directions."""
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((4, 48))
    x = (rng.standard_normal((64, 4)) @ basis + 0.3 * rng.standard_normal((64, 48))).astype(np.float32)
    w1 = rng.standard_normal((48, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 10)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [tensor("x", ["N", 48])], [tensor("y", ["N", 10])], [init("w1", w1), init("w2", w2)])
    context = PassContext(feeds={"x": x})
    options = dict(avg_bits=2.0, method="gptq", sweep_samples=16)
    inside = ClusterPass(**options).run(model, context)
    held = ClusterPass(**options, sweep_heldout=True).run(model, context)
    assert any("fitted on the 48 data items the sweep does not run" in n for n in held.report.notes)
    curve_in = {int(b): d for b, d in inside.plan.layers["w1"]["sensitivity"].items()}
    curve_out = {int(b): d for b, d in held.plan.layers["w1"]["sensitivity"].items()}
    # the held-out curve scores fits that never saw the probed items: never the in-sample optimum
    assert all(curve_out[b] > curve_in[b] for b in (1, 2, 3))


def test_damp_auto_picks_the_damping_that_generalises():
    """32 data items for a layer of 48 inputs: damp=0.01 fits the seen rows almost exactly and
    errs on new ones; damp=auto compares the dampings on held-back items and errs less on new data."""
    rng = np.random.default_rng(9)
    mixing = np.eye(48) + 0.5 * rng.standard_normal((48, 48))
    x = (rng.standard_normal((32, 48)) @ mixing).astype(np.float32)
    fresh = (rng.standard_normal((512, 48)) @ mixing).astype(np.float32)
    w = rng.standard_normal((48, 24)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 48])],
                       [tensor("y", ["N", 24])], [init("w", w)])
    context = PassContext(feeds={"x": x})
    errors = {}
    for damp in (0.01, "auto"):
        result = ClusterPass(bits=2, method="gptq", damp=damp).run(model, context)
        y = run_samples(make_session(result.model, "cpu"), {"x": fresh})[0]["y"]
        y0 = fresh.astype(np.float64) @ w
        errors[damp] = float(np.sum((y - y0) ** 2) / np.sum(y0 ** 2))
    assert errors["auto"] < 0.9 * errors[0.01]
