"""latency_budget of the svd and prune-channels passes: timed candidates, rejection of forms that
are not faster, the budget met by the model's measured latency, filter-norm pruning without BN."""
from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import helper

import onnxzip.passes.prune_channels  # noqa: F401 - registers the pass
import onnxzip.passes.svd  # noqa: F401 - registers the pass
from onnxzip.cli import main
from onnxzip.measure.cost import model_cost
from onnxzip.measure.latency import Factor, LayerForm, Timing, ort_layer_time
from onnxzip.models.zoo import get_reference_model
from onnxzip.passes import PassContext, get_pass
from onnxzip.core.runtime import make_session, run_session


def decaying(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    k = min(m, n)
    scales = np.exp(-5.0 * np.arange(k) / k)
    return ((rng.standard_normal((m, k)) * scales) @ rng.standard_normal((k, n)) / np.sqrt(m * n)).astype(np.float32)


def matmul_stack(d: int, rows: int, layers: int = 3) -> onnx.ModelProto:
    """x[N, rows, d] → (MatMul d×d, Relu) × layers."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for index in range(layers):
        inits.append(init(f"w{index}", decaying(d, d, rng)))
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"h{index}"], name=f"mm{index}"))
        nodes.append(helper.make_node("Relu", [f"h{index}"], [f"r{index}"], name=f"relu{index}"))
        current = f"r{index}"
    return make_model(nodes, [tensor("x", ["N", rows, d])], [tensor(current, ["N", rows, d])], inits)


def form_macs(form: LayerForm) -> float:
    """Multiply-accumulates of a timed layer form, computed from its shapes."""
    shape, total = list(form.input_shape), 0.0
    for factor in form.factors:
        if form.op == "Conv":
            cout, cin_group, *kernel = factor.shape
            spatial = [
                (size + factor.pads[i] + factor.pads[i + len(kernel)] - factor.dilations[i] * (k - 1) - 1)
                // factor.strides[i] + 1
                for i, (size, k) in enumerate(zip(shape[2:], kernel))
            ]
            total += cout * cin_group * np.prod(kernel) * np.prod(spatial)
            shape = [shape[0], cout, *spatial]
        else:
            k, n = factor.shape
            total += np.prod(shape[:-1]) * k * n
            shape = [*shape[:-1], n]
    return float(total)


def odd_sizes_slow(form: LayerForm) -> float:
    """A timer (ms) proportional to MACs, where a factor of a width not a multiple of 8 runs
    2× slower (as narrow GEMM kernels may)."""
    widths = [f.shape[0] if form.op == "Conv" else f.shape[-1] for f in form.factors[:-1]]
    widths.append(form.factors[-1].shape[0] if form.op == "Conv" else form.factors[-1].shape[-1])
    penalty = 2.0 if any(w % 8 for w in widths) else 1.0
    return 1e-6 * form_macs(form) * penalty


def model_macs_ms(model: onnx.ModelProto) -> float:
    return 1e-6 * model_cost(model).flops / 2


def feeds_of(model: onnx.ModelProto, rows: int, d: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, rows, d)).astype(np.float32)}


def test_factor_pairs_slower_than_the_dense_layer_are_rejected(caplog):
    model = matmul_stack(128, 16)

    def pairs_slower(form: LayerForm) -> float:
        return 1.0 if len(form.factors) == 1 else 1.3  # every factor pair loses to the dense MatMul

    timing = Timing(layer_timer=pairs_slower, model_timer=lambda m: sum(n.op_type == "MatMul" for n in m.graph.node))
    context = PassContext(feeds=feeds_of(model, 16, 128), timing=timing)
    with caplog.at_level(logging.WARNING, logger="onnxzip"):
        result = get_pass("svd")(latency_budget=0.8).run(model, context)
    changes = {c.layer: c for c in result.report.changes}
    assert set(changes) == {"mm0", "mm1", "mm2"}
    for change in changes.values():
        assert change.skipped and "no rank saves" in change.reason
        assert change.details["ranks_not_faster"]  # every timed rank was slower
    assert not result.report.modified
    assert any("latency_budget 0.8 not reached" in note for note in result.report.notes)
    assert "latency_budget 0.8 not reached" in caplog.text
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]


def test_svd_latency_budget_met_with_ranks_that_time_well():
    d, rows = 128, 16
    model = matmul_stack(d, rows)
    timing = Timing(layer_timer=odd_sizes_slow, model_timer=model_macs_ms)
    context = PassContext(feeds=feeds_of(model, rows, d), timing=timing)
    result = get_pass("svd")(latency_budget=0.6).run(model, context)
    ranks = [c.details["rank"] for c in result.report.changes if not c.skipped]
    assert ranks and all(rank % 8 == 0 for rank in ranks)  # odd ranks time worse: never chosen
    rejected = [r for c in result.report.changes for r in c.details.get("ranks_not_faster", [])]
    assert rejected and all(r % 8 for r in rejected)
    before, after = timing.compare(model, result.model)
    assert after <= 0.6 * before * 1.03
    assert any(f"{before:.3g} ms → {after:.3g} ms" in note for note in result.report.notes)
    saved = sum(c.details["latency_ms"]["saved"] for c in result.report.changes if not c.skipped)
    assert saved == pytest.approx(before - after, rel=0.05)
    # the layer outputs keep their names (later refits match layers by them)
    produced = {o for n in result.model.graph.node for o in n.output}
    assert {"h0", "h1", "h2"} <= produced
    feeds = feeds_of(model, rows, d)
    expected = run_session(make_session(model, "cpu"), feeds)["r2"]
    actual = run_session(make_session(result.model, "cpu"), feeds)["r2"]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.5


def test_layers_that_time_faster_alone_but_not_in_the_model_are_kept_whole():
    """Per-layer times promise a saving the model does not show (the model measures the same
    whatever the ranks): no try is faster, so nothing is factorized; before, the last try was
    kept, with all its error and none of the speed."""
    model = matmul_stack(128, 16)
    timing = Timing(layer_timer=odd_sizes_slow, model_timer=lambda m: 1.0)
    context = PassContext(feeds=feeds_of(model, 16, 128), timing=timing)
    result = get_pass("svd")(latency_budget=0.6).run(model, context)
    assert not result.report.modified
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    assert any("no try measured faster than the original" in note for note in result.report.notes)


def test_svd_latency_budget_by_measured_onnxruntime_time():
    d, rows = 256, 64  # large enough for the multiply-accumulates, not overheads, to set the time
    model = matmul_stack(d, rows, layers=2)
    feeds = {"x": feeds_of(model, rows, d)["x"][:1]}
    timing = Timing(feeds=feeds, layer_timer=functools.partial(ort_layer_time, repeats=3))
    context = PassContext(feeds=feeds_of(model, rows, d), timing=timing)
    result = get_pass("svd")(latency_budget=0.6).run(model, context)
    assert result.report.modified
    before, after = context.timer().compare(model, result.model)  # onnxruntime, one thread
    assert after < 0.85 * before  # budget 0.6, with a loose margin for a loaded machine
    assert result.report.details["latency_ms"]["after"] < result.report.details["latency_ms"]["before"]


def test_prune_channels_latency_budget_on_a_model_without_batchnorm():
    folded = get_reference_model("cnn", folded=True)
    model = onnx.load(folded.onnx_path)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    timing = Timing(layer_timer=odd_sizes_slow, model_timer=model_macs_ms)
    context = PassContext(feeds={folded.input_name: folded.test_inputs[:4]}, timing=timing)
    result = get_pass("prune-channels")(latency_budget=0.6).run(model, context)
    groups = [c for c in result.report.changes if c.op_type == "channel group" and not c.skipped]
    assert groups and all(c.details["importance"]["kind"] == "l1" for c in groups)
    assert any("filter L1 norm" in note for note in result.report.notes)
    pruned = [c for c in groups if c.details["channels_after"] < c.details["channels_before"]]
    assert pruned and all(c.details["channels_after"] % 8 == 0 for c in pruned)
    assert any(c.details.get("counts_not_faster") for c in groups)
    before, after = timing.compare(model, result.model)
    assert after <= 0.6 * before * 1.03
    outputs = run_session(make_session(result.model, "cpu"), {folded.input_name: folded.test_inputs[:4]})
    assert next(iter(outputs.values())).shape[0] == 4


@pytest.mark.parametrize(
    "flag",
    [
        ["--svd", "latency_budget=0"],
        ["--svd", "latency_budget=1.5"],
        ["--svd", "latency_budget=0.5,budget=0.5"],
        ["--prune-channels", "latency_budget=-0.1"],
        ["--prune-channels", "latency_budget=2"],
        ["--prune-channels", "latency_budget=0.5,ratio=0.2"],
    ],
)
def test_bad_latency_budgets_exit_2(tmp_path, flag, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(matmul_stack(64, 4), path)
    assert main(["compress", str(path), "-o", str(tmp_path / "out.onnx"), "-q", *flag]) == 2
    assert "latency_budget" in capsys.readouterr().err


@pytest.mark.parametrize("strides, pads", [((1, 1), (1, 1, 1, 1)), ((2, 1), (0, 2, 1, 0))])
def test_timed_conv_forms_have_the_layers_output_shape(strides, pads):
    from onnxzip.core.graph import import_graph
    from onnxzip.passes.svd import _find_layers, _layer_form

    rng = np.random.default_rng(0)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 5],
                            strides=list(strides), pads=list(pads))
    model = make_model([conv], [tensor("x", [1, 6, 11, 13])], [tensor("y", None)],
                       [init("w", rng.standard_normal((8, 6, 3, 5)).astype(np.float32)),
                        init("b", np.zeros(8, np.float32))])
    (layer,) = _find_layers(import_graph(model))
    node = layer.uses[0][0]
    shapes = set()
    for kind, rank in ((None, None), ("channel", 3), ("spatial", 4)):
        form_model, feeds = _layer_form(layer, node, (1, 6, 11, 13), kind, rank).model()
        (output,) = make_session(form_model, "cpu").run(None, feeds)
        shapes.add(output.shape)
    expected = run_session(make_session(model, "cpu"), {"x": np.zeros((1, 6, 11, 13), np.float32)})["y"].shape
    assert shapes == {expected}


def test_each_layer_form_is_timed_once():
    calls = []
    timing = Timing(layer_timer=lambda form: calls.append(form) or 1.0)
    dense = LayerForm("MatMul", (1, 4, 32), (Factor((32, 16)),))
    timing.layer(dense)
    timing.layer(LayerForm("MatMul", (1, 4, 32), (Factor((32, 16)),)))
    timing.layer(LayerForm("MatMul", (1, 8, 32), (Factor((32, 16)),)))
    assert len(calls) == 2


def test_time_session_counts_the_calling_threads_cpu_time_not_waiting():
    """The planner's times are CPU time of the thread that runs the session: time another
    process holds the CPU (here: a sleep) is not counted, work is."""
    import time

    from onnxzip.measure.latency import time_session

    class Waits:
        def run(self, _outputs, _feeds):
            time.sleep(0.02)

    class Works:
        def run(self, _outputs, _feeds):
            start = time.thread_time()
            while time.thread_time() - start < 0.01:
                pass

    waited = time_session(Waits(), {}, repeats=3, warmup=0)
    worked = time_session(Works(), {}, repeats=3, warmup=0)
    assert max(waited) < 5.0  # 20 ms of wall time each, almost no CPU
    assert min(worked) >= 9.0

    form = LayerForm("MatMul", (1, 256), (Factor((256, 256)),))
    model, feeds = form.model()
    session = make_session(model, "cpu", intra_op_threads=1)
    began = time.perf_counter()
    times = time_session(session, feeds, repeats=5, warmup=1)
    wall_ms = (time.perf_counter() - began) * 1000.0
    assert 0.0 < sum(times) <= wall_ms
