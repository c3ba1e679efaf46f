"""Activation-aware clustering, per-layer widths from measured sensitivity (avg_bits, bits=search),
plan replay and the CLI flags, on small hand-built graphs compared in onnxruntime."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper

import onnxzip
from onnxzip.cli import main
from onnxzip.cluster import allocate_bits
from onnxzip.errors import ConfigError
from onnxzip.passes import PassContext, PipelinePlan
from onnxzip.passes.cluster import ClusterPass
from onnxzip.core.runtime import make_session, run_session

RNG = np.random.default_rng(7)
SCALES = np.geomspace(0.02, 20, 48).astype(np.float32)  # input channel energies differ 10^6-fold


def mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x[N,48] → MatMul(48×64) → Relu → MatMul(64×10) → y."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 48])],
        [tensor("y", ["N", 10])],
        [init("w1", w1), init("w2", w2)],
    )


W1 = (RNG.standard_normal((48, 64)) / 8).astype(np.float32)
W2 = (RNG.standard_normal((64, 10)) / 8).astype(np.float32)
X = (RNG.standard_normal((96, 48)) * SCALES).astype(np.float32)


def outputs(model: onnx.ModelProto, x: np.ndarray = X) -> np.ndarray:
    return run_session(make_session(model, "cpu"), {"x": x})["y"]


def rel_error(model: onnx.ModelProto, reference: onnx.ModelProto) -> float:
    y, y0 = outputs(model), outputs(reference)
    return float(np.linalg.norm(y - y0) / np.linalg.norm(y0))


def test_activation_aware_clustering_lowers_the_output_error():
    # as trained layers often do, rows that multiply large inputs hold small weights: plain
    # k-means spends its centroids on the large (unimportant) values
    model = mlp(W1 / SCALES[:, None], W2)
    context = PassContext(feeds={"x": X[:48]})
    aware = ClusterPass(k=4, include=["w1"]).run(model, context)
    plain = ClusterPass(k=4, include=["w1"], activation_aware=False).run(model, context)
    assert aware.report.changes[0].details["activation_aware"] is True
    assert plain.report.changes[0].details["activation_aware"] is False
    # same K and file size; measured on held-out rows
    assert aware.report.changes[0].details["k"] == plain.report.changes[0].details["k"] == 4
    assert rel_error(aware.model, model) < 0.7 * rel_error(plain.model, model)
    # without data there is nothing to weight by
    blind = ClusterPass(k=4, include=["w1"]).run(model, PassContext())
    assert blind.report.changes[0].details["activation_aware"] is False


def test_allocator_meets_the_budget_and_matches_brute_force():
    curves = {
        "a": {1: 9.0, 2: 4.0, 3: 1.0, 4: 0.5, 5: 0.1},
        "b": {1: 1.0, 2: 0.6, 3: 0.5, 4: 0.45, 5: 0.4},
        "c": {1: 5.0, 2: 4.9, 3: 0.2, 4: 0.1, 5: 0.05},  # non-convex: 2 bits barely help
    }
    sizes = {"a": 100, "b": 300, "c": 200}
    for avg in (1.0, 2.0, 2.5, 3.0, 4.0):
        chosen = allocate_bits(curves, sizes, avg)
        assert sum(sizes[n] * b for n, b in chosen.items()) <= avg * 600 + 1e-6
        best = min(
            sum(curves[n][b] for n, b in zip(curves, combo))
            for combo in itertools.product(range(1, 6), repeat=3)
            if sum(sizes[n] * b for n, b in zip(curves, combo)) <= avg * 600
        )
        assert sum(curves[n][b] for n, b in chosen.items()) <= best * 1.25 + 1e-9
    with pytest.raises(ConfigError, match="below the narrowest width"):
        allocate_bits({"a": {2: 1.0}}, {"a": 10}, 1.5)


def test_avg_bits_gives_sensitive_layers_more_bits_and_replays(tmp_path):
    # w2 sees 6x larger activations than w1's outputs would suggest: make w1 cheap, w2 dear
    model = mlp(W1 / 4, W2 * 4)
    context = PassContext(feeds={"x": X[:48]})
    result = ClusterPass(avg_bits=3.0).run(model, context)
    layers = result.plan.layers
    assert set(layers) == {"w1", "w2"}
    sizes = {"w1": W1.size, "w2": W2.size}
    assert sum(sizes[n] * e["bits"] for n, e in layers.items()) <= 3.0 * sum(sizes.values())
    for name, entry in layers.items():
        curve = {int(b): d for b, d in entry["sensitivity"].items()}
        assert entry["k"] == 2 ** entry["bits"] and entry["bits"] in curve
        widths = sorted(curve)
        assert curve[widths[0]] > curve[widths[-1]]  # measured: wider is more accurate
    details = {c.layer: c.details for c in result.report.changes if not c.skipped}
    assert {d["bits"] for d in details.values()} == {e["bits"] for e in layers.values()}
    # the allocation is no worse than the uniform 3-bit model of the same size
    uniform = ClusterPass(bits=3).run(model, context).model
    assert rel_error(result.model, model) <= rel_error(uniform, model) * 1.05
    # replay: the saved plan reproduces the model exactly, without a sweep
    plan_path = tmp_path / "plan.json"
    PipelinePlan([result.plan]).save(plan_path)
    replayed = ClusterPass(result.plan.config).run(
        model, context, plan=PipelinePlan.load(plan_path).steps[0]
    )
    np.testing.assert_array_equal(outputs(replayed.model), outputs(result.model))


def test_sweep_budget_cuts_data_items_not_widths_and_extrapolates_wide_widths():
    # mlp runs 2·(48·64 + 64·10) = 7424 FLOPs per item; 2 weights × 5 measured widths
    model = mlp(W1 / 4, W2 * 4)
    context = PassContext(feeds={"x": X})
    full = ClusterPass(avg_bits=3.0, sweep_samples=64).run(model, context)
    assert any("sweep on 64 data items" in note for note in full.report.notes)
    tight = ClusterPass(avg_bits=3.0, sweep_samples=64, sweep_flops=2 * 5 * 7424 * 12).run(model, context)
    assert any("sweep on 12 data items" in note for note in tight.report.notes)
    floor = ClusterPass(avg_bits=3.0, sweep_samples=64, sweep_flops=1).run(model, context)
    assert any("sweep on 8 data items" in note for note in floor.report.notes)  # never under 8
    for entry in full.plan.layers.values():
        curve = {int(b): d for b, d in entry["sensitivity"].items() if int(b) <= 8}
        measured, extrapolated = [curve[b] for b in range(1, 6)], [curve[b] for b in range(5, 9)]
        assert measured[0] > measured[-1] > 0  # run in onnxruntime: wider is more accurate
        ratios = np.array(extrapolated[1:]) / np.array(extrapolated[:-1])
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # a steady factor per bit ...
        assert 1 / 16 - 1e-9 <= ratios[0] <= 1 / 2 + 1e-9  # ... held within [1/16, 1/2]
    # the budget changes how many items are run, not which widths a clear-cut case gets
    assert {n: e["bits"] for n, e in tight.plan.layers.items()} == {n: e["bits"] for n, e in full.plan.layers.items()}
    with pytest.raises(ConfigError, match="sweep_flops"):
        ClusterPass(avg_bits=3.0, sweep_flops=-1)


def _classifier_files(tmp_path):
    model = mlp(W1, W2)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    labels = outputs(model).argmax(axis=1)
    data = tmp_path / "data.npz"
    np.savez(data, x=X, labels=labels)
    return model, path, data


def test_cli_avg_bits_and_bits_search_with_a_metric(tmp_path):
    model, path, data = _classifier_files(tmp_path)
    out, report_path = tmp_path / "avg.onnx", tmp_path / "avg.json"
    code = main(["compress", str(path), "-o", str(out), "--cluster", "avg_bits=3.5",
                 "--data", str(data), "--force", "--report", str(report_path), "-q"])
    assert code == 0
    passes = json.loads(report_path.read_text())["passes"]
    rows = [c for c in passes[0]["changes"] if c["decision"] != "skipped"]
    assert {r["layer"] for r in rows} == {"w1", "w2"} and all("sensitivity" in r["details"] for r in rows)
    out, report_path, plan_path = tmp_path / "s.onnx", tmp_path / "s.json", tmp_path / "plan.json"
    code = main(["compress", str(path), "-o", str(out), "--cluster", "bits=search",
                 "--data", str(data), "--metric", "accuracy:max_drop=0.03", "--min-cosine", "0",
                 "--report", str(report_path), "--save-plan", str(plan_path), "-q"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["quality"]["passed"]
    searched = onnx.load(out)
    assert searched.ByteSize() < model.ByteSize() / 2  # 3.5 KB of unpack tables in 15 KB
    accuracy = (outputs(searched).argmax(1) == outputs(model).argmax(1)).mean()
    assert accuracy >= 0.97
    layers = json.loads(plan_path.read_text())["steps"][0]["layers"]
    assert all(1 <= e["bits"] <= 8 for e in layers.values())
    # a search without metric conditions is refused in one sentence (exit 2)
    assert main(["compress", str(path), "-o", str(tmp_path / "x.onnx"), "--cluster", "bits=search",
                 "--data", str(data), "-q"]) == 2


def test_api_avg_bits_and_bad_options():
    model = mlp(W1, W2)
    result = onnxzip.compress(model, cluster={"avg_bits": 4}, data={"x": X}, gate={"min_cosine": 0, "min_argmax_agreement": None})
    assert result.report.passes[0].notes[0].startswith("mean index width")
    with pytest.raises(ConfigError, match="give one of k, bits and avg_bits"):
        ClusterPass(k=4, avg_bits=3)
    with pytest.raises(ConfigError, match="avg_bits must be from 1"):
        ClusterPass(avg_bits=0.5)


def test_avg_bits_with_gptq_measures_each_width_as_gptq_stores_it():
    # correlated inputs (H far from diagonal): GPTQ's error feedback lowers the output error a lot,
    # so curves measured on plain k-means codebooks would misstate what apply stores
    rng = np.random.default_rng(11)
    mixing = np.eye(48) + 0.6 * rng.standard_normal((48, 48))
    x = (rng.standard_normal((64, 48)) @ mixing).astype(np.float32)
    model = mlp(W1, W2)
    context = PassContext(feeds={"x": x})
    gptq = ClusterPass(avg_bits=3.0, method="gptq").run(model, context)
    plain = ClusterPass(avg_bits=3.0).run(model, context)
    assert any("GPTQ-fitted" in note for note in gptq.report.notes)
    assert not any("GPTQ-fitted" in note for note in plain.report.notes)
    unfitted = ClusterPass(avg_bits=3.0, method="gptq", sweep_gptq=False).run(model, context)
    assert not any("GPTQ-fitted" in note for note in unfitted.report.notes)
    assert unfitted.plan.layers["w1"]["sensitivity"] == plain.plan.layers["w1"]["sensitivity"]
    curve = {int(b): d for b, d in gptq.plan.layers["w1"]["sensitivity"].items()}
    kmeans = {int(b): d for b, d in plain.plan.layers["w1"]["sensitivity"].items()}
    y0 = outputs(model, x)
    for bits in (2, 3):
        assert curve[bits] < 0.8 * kmeans[bits]
        # the curve is the output distortion of w1 alone stored by apply at that width (apply runs
        # more GPTQ rounds than the sweep; k-means' curve is far off)
        alone = ClusterPass(bits=bits, method="gptq", include=["w1"]).run(model, context).model
        y = outputs(alone, x)
        measured = float(np.sum((y - y0) ** 2) / np.sum(y0 ** 2))
        assert curve[bits] / 1.3 <= measured <= curve[bits] * 1.3 < kmeans[bits]


def test_sweep_gptq_flops_fits_the_cheapest_weights_and_says_which_were_left():
    """The GPTQ-fitted sweep is bounded in estimated arithmetic (5·m·n² + n³ per weight, no
    seconds): with a budget that affords only w2 (10 outputs × 64 inputs) the costlier w1 (64 × 48)
    is measured on its plain k-means codebooks, and the report says so."""
    rng = np.random.default_rng(11)
    mixing = np.eye(48) + 0.6 * rng.standard_normal((48, 48))
    x = (rng.standard_normal((64, 48)) @ mixing).astype(np.float32)
    model = mlp(W1, W2)
    context = PassContext(feeds={"x": x})
    cost_w2 = 5 * 10 * 64**2 + 64**3
    cost_w1 = 5 * 64 * 48**2 + 48**3
    assert cost_w2 < cost_w1
    bounded = ClusterPass(avg_bits=3.0, method="gptq", sweep_gptq_flops=cost_w2).run(model, context)
    fitted = ClusterPass(avg_bits=3.0, method="gptq").run(model, context)
    plain = ClusterPass(avg_bits=3.0).run(model, context)
    assert any("1 of 2 weights, the costliest, on k-means codebooks" in n for n in bounded.report.notes)
    sensitivity = {run: {name: entry["sensitivity"] for name, entry in r.plan.layers.items()}
                   for run, r in (("bounded", bounded), ("fitted", fitted), ("plain", plain))}
    assert sensitivity["bounded"]["w1"] == sensitivity["plain"]["w1"] != sensitivity["fitted"]["w1"]
    assert sensitivity["bounded"]["w2"] == sensitivity["fitted"]["w2"] != sensitivity["plain"]["w2"]


def _switched() -> onnx.ModelProto:
    """y = If(sr == 16000) then x·A + 0.001·x·B else x·C, with sr a scalar input (silero-vad's
    sample-rate switch): A matters, B hardly, C only at other rates."""
    rng = np.random.default_rng(3)
    f32 = np.float32
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wa"], ["ya"]), helper.make_node("MatMul", ["x", "wb"], ["yb"]),
         helper.make_node("Mul", ["yb", "small"], ["yb2"]), helper.make_node("Add", ["ya", "yb2"], ["y_then"])],
        "then", [], [tensor("y_then", ["N", 32])],
        [init("wa", rng.standard_normal((32, 32)).astype(f32)), init("wb", rng.standard_normal((32, 32)).astype(f32)),
         init("small", np.array(0.001, f32))])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "wc"], ["y_else"])], "else", [],
                                    [tensor("y_else", ["N", 32])],
                                    [init("wc", rng.standard_normal((32, 32)).astype(f32))])
    return make_model(
        [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
         helper.make_node("If", ["is16k"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [tensor("x", ["N", 32]), tensor("sr", [], onnx.TensorProto.INT64)], [tensor("y", ["N", 32])],
        [init("rate", np.array(16000, np.int64))])


def test_avg_bits_measures_weights_in_the_branch_the_data_takes():
    """The sweep inlines an If whose condition is the same on every item: the taken branch's
    weights get measured widths (the sensitive one wider), the other branch's the mean rounded up."""
    model = _switched()
    data = {"x": np.random.default_rng(4).standard_normal((32, 32)).astype(np.float32),
            "sr": np.array(16000, np.int64)}
    result = onnxzip.compress(model, cluster={"avg_bits": 2.5, "min_size": 1}, data=data, sample_axes={"sr": None},
                              gate={"min_cosine": None, "min_argmax_agreement": None})
    layers = result.plan.steps[0].layers
    assert "sensitivity" in layers["wa"] and "sensitivity" in layers["wb"] and "sensitivity" not in layers["wc"]
    assert layers["wa"]["bits"] > layers["wb"]["bits"] and layers["wc"]["bits"] == 3
    notes = " ".join(result.report.passes[0].notes)
    assert "1 If with the same condition on every item" in notes and "1 weights it cannot replace" in notes
    # the written model still switches: the other rate runs the untaken branch's (clustered) weights
    other = {**data, "sr": np.array(8000, np.int64)}
    got = run_session(make_session(result.model, "cpu"), other)["y"]
    assert got.shape == (32, 32) and np.all(np.isfinite(got))
