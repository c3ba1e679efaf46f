"""The svd pass: exact full-rank rewrites of MatMul/Gemm/Conv/LSTM, rank rules and budgets,
plans, bad inputs, subgraphs and the reference models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxzip.passes.svd  # noqa: F401 - registers the pass
from onnxzip.api import compress
from onnxzip.errors import ConfigError
from onnxzip.passes import PassContext, Plan, get_pass
from onnxzip.passes.svd import SvdPass
from onnxzip.core.runtime import make_session, run_session
from onnxzip.core.schema import parse_flag_value
from onnxzip.svd import Spectrum, conv_spectrum

RNG = np.random.default_rng(0)


def weights(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_session(make_session(model, "cpu"), feeds)


def relative_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds) -> float:
    """max |Δ| / max |y| over every output."""
    expected, actual = outputs(reference, feeds), outputs(candidate, feeds)
    return max(
        float(
            np.max(np.abs(actual[k].astype(np.float64) - expected[k])) / np.max(np.abs(expected[k]))
        )
        for k in expected
    )


def run_svd(model: onnx.ModelProto, **options):
    return SvdPass(**{"min_size": 1, **options}).run(model, PassContext())


def changes(report) -> dict[str, object]:
    return {c.layer: c for c in report.changes}


def full_rank(model, feeds, **options) -> float:
    """Factorize every layer at full rank (above break-even, so forced) and return the error."""
    result = run_svd(model, rank=10_000, allow_unprofitable=True, **options)
    assert all(not c.skipped for c in result.report.changes), result.report.table()
    return relative_error(model, result.model, feeds)


# ---------------------------------------------------------------- MatMul


def matmul_model(weight_on_left: bool = False) -> onnx.ModelProto:
    """y = x[N,5,24]·W(24×16), or y = W(16×24)·x[N,24,5]."""
    if weight_on_left:
        node = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")
        return make_model(
            [node],
            [tensor("x", ["N", 24, 5])],
            [tensor("y", ["N", 16, 5])],
            [init("w", weights(16, 24))],
        )
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model(
        [node],
        [tensor("x", ["N", 5, 24])],
        [tensor("y", ["N", 5, 16])],
        [init("w", weights(24, 16))],
    )


@pytest.mark.parametrize("weight_on_left", [False, True])
def test_matmul_full_rank_is_exact_and_error_falls_with_rank(weight_on_left):
    model = matmul_model(weight_on_left)
    shape = (3, 24, 5) if weight_on_left else (3, 5, 24)
    feeds = {"x": weights(*shape)}
    assert full_rank(model, feeds) <= 1e-4
    errors = [
        relative_error(model, run_svd(model, rank=r, allow_unprofitable=True).model, feeds)
        for r in (2, 6, 12)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    result = run_svd(model, rank=4)
    assert [n.name for n in result.model.graph.node] == ["mm/svd_in", "mm"]
    initializers = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert initializers == (
        {"w_svd_in": (4, 24), "w_svd_out": (16, 4)}
        if weight_on_left
        else {"w_svd_in": (24, 4), "w_svd_out": (4, 16)}
    )
    change = changes(result.report)["mm"]
    assert change.decision == "matmul rank 4" and change.params_after == 4 * 40
    assert change.flops_before == 2 * 5 * 24 * 16 and change.flops_after == 2 * 5 * 4 * 40
    assert result.report.flops_after == change.flops_after  # the model totals agree
    details = change.details
    assert details["break_even_rank"] == pytest.approx(24 * 16 / 40)
    assert details["energy_kept"] == pytest.approx(
        Spectrum.of(weights_of(model)["w"]).energy_kept(4)
    )
    assert len(details["spectrum"]["singular_values"]) == 16


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def test_break_even_skip_is_reported():
    result = run_svd(matmul_model(), rank=10)  # break-even 24·16/40 = 9.6
    change = changes(result.report)["mm"]
    assert change.skipped and change.reason == "rank 10 ≥ break-even 9.6"
    assert not result.report.modified and len(result.model.graph.node) == 1
    assert change.details["spectrum"]["full_rank"] == 16  # the spectrum is reported anyway


# ---------------------------------------------------------------- Gemm


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "matrix"])
def test_gemm_full_rank_is_exact_for_every_layout(trans_a, trans_b, bias):
    a_shape = [20, "N"] if trans_a else ["N", 20]
    b = weights(12, 20) if trans_b else weights(20, 12)
    inputs, initializers = ["a", "b"], [init("b", b)]
    if bias != "none":
        inputs.append("c")
        initializers.append(init("c", weights(12) if bias == "vector" else weights(4, 12)))
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3
    )
    model = make_model([node], [tensor("a", a_shape)], [tensor("y", [4, 12])], initializers)
    feeds = {"a": weights(20, 4) if trans_a else weights(4, 20)}
    assert full_rank(model, feeds) <= 1e-4
    result = run_svd(model, rank=3)
    first, second = result.model.graph.node
    assert first.name == "fc/svd_in" and list(second.input[2:]) == (["c"] if bias != "none" else [])
    assert relative_error(model, result.model, feeds) > 1e-3  # truncated: lossy


def test_gemm_below_opset_11_gets_a_zero_bias():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transB=1)
    model = make_model(
        [node],
        [tensor("a", [4, 20])],
        [tensor("y", [4, 12])],
        [init("b", weights(12, 20)), init("c", weights(12))],
        opset=9,
    )
    assert full_rank(model, {"a": weights(4, 20)}) <= 1e-4


# ---------------------------------------------------------------- Conv

CONV_CASES = {
    "3x3": {"kernel": (3, 3), "pads": [1, 1, 1, 1]},
    "3x3 stride 2 asymmetric pads": {"kernel": (3, 3), "strides": [2, 2], "pads": [0, 1, 2, 1]},
    "3x3 dilation 2": {"kernel": (3, 3), "dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "5x5 stride (2,1)": {"kernel": (5, 5), "strides": [2, 1], "pads": [2, 1, 2, 3]},
    "3x1": {"kernel": (3, 1), "pads": [1, 0, 1, 0]},
    "auto_pad SAME_LOWER": {"kernel": (4, 3), "auto_pad": "SAME_LOWER"},
    "auto_pad VALID": {"kernel": (3, 3), "auto_pad": "VALID"},
}


def conv_model(kernel, bias: bool = True, group: int = 1, cin: int = 6, **attrs) -> onnx.ModelProto:
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    initializers = [init("w", weights(8, cin // group, *kernel))]
    if bias:
        initializers.append(init("b", weights(8)))
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, **attrs)
    return make_model(
        [node], [tensor("x", ["N", cin, 11, 10])], [tensor("y", ["N", 8, "H", "W"])], initializers
    )


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_full_rank_is_exact(kind, case):
    model = conv_model(**CONV_CASES[case])
    feeds = {"x": weights(2, 6, 11, 10)}
    assert full_rank(model, feeds, conv=kind) <= 1e-4
    result = run_svd(model, rank=2, conv=kind)
    first, second = result.model.graph.node
    kernel = CONV_CASES[case]["kernel"]
    first_kernel = {"channel": list(kernel), "spatial": [kernel[0], 1]}[kind]
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["kernel_shape"] == first_kernel and "auto_pad" not in attrs
    assert list(second.input) == ["conv/svd_in_output", "w_svd_out", "b"]


def test_conv_auto_picks_the_lower_error_scheme():
    # W(o, c, y, x) = f(o, x)·g(c, y): rank 1 in the spatial arrangement, not in the channel one.
    w = np.einsum("ox,cy->ocyx", weights(8, 3), weights(6, 3))
    model = conv_model((3, 3), pads=[1, 1, 1, 1])
    model.graph.initializer[0].CopyFrom(init("w", w))
    result = run_svd(model, keep_ratio=0.3)
    change = changes(result.report)["conv"]
    assert change.details["kind"] == "spatial" and change.details["rel_error"] < 1e-5
    channel_rank = int(0.3 * w.size) // (8 + 6 * 9)  # what channel SVD affords at that budget
    assert conv_spectrum(w, "channel").tail(channel_rank) > 0.1
    assert relative_error(model, result.model, {"x": weights(2, 6, 11, 10)}) <= 1e-4


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: conv_model((3, 3), group=2), "grouped convolution (group=2)"),
        (
            lambda: conv_model((3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
            "depends on the input size",
        ),
    ],
)
def test_unsupported_convs_are_skipped_with_a_reason(build, reason):
    result = run_svd(build(), rank=1)
    assert reason in changes(result.report)["conv"].reason and not result.report.modified


# ---------------------------------------------------------------- recurrent


def recurrent_model(op: str, direction: str = "forward", layout: int = 0) -> onnx.ModelProto:
    """x → op (hidden 5, input 12) with sequence_lens and an initial state, layout 0 or 1."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    directions = 2 if direction == "bidirectional" else 1
    hidden, size = 5, 12
    inputs = ["x", "w", "r", "bias", "lens", "h0"] + (["c0"] if op == "LSTM" else [])
    outputs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    state = [2, directions, hidden] if layout else [directions, 2, hidden]
    initializers = [
        init("w", weights(directions, gates * hidden, size)),
        init("r", weights(directions, gates * hidden, hidden)),
        init("bias", weights(directions, 2 * gates * hidden)),
        init("lens", np.array([7, 4], np.int32)),
        init("h0", weights(*state)),
    ] + ([init("c0", weights(*state))] if op == "LSTM" else [])
    node = helper.make_node(
        op, inputs, outputs, name="rnn", hidden_size=hidden, direction=direction, layout=layout
    )
    shape = [2, 7, size] if layout else [7, 2, size]
    ranks = {"y": ["a", "b", "c", "d"], "y_h": ["a", "b", "c"], "y_c": ["a", "b", "c"]}
    return make_model(
        [node], [tensor("x", shape)], [tensor(name, ranks[name]) for name in outputs], initializers
    )


@pytest.mark.parametrize(
    "op, direction, layout",
    [
        ("LSTM", "forward", 0),
        ("LSTM", "bidirectional", 0),
        ("LSTM", "reverse", 1),
        ("GRU", "bidirectional", 1),
        ("RNN", "forward", 0),
    ],
)
def test_recurrent_input_full_rank_is_exact(op, direction, layout):
    model = recurrent_model(op, direction, layout)
    if layout:  # onnxruntime has no batch-first recurrent kernels: compare in the ONNX reference
        x = weights(2, 7, 12)
        forced = run_svd(model, rank=10_000, allow_unprofitable=True).model
        expected, actual = (ReferenceEvaluator(m).run(None, {"x": x}) for m in (model, forced))
        for a, b in zip(expected, actual):
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a))
    else:
        assert full_rank(model, {"x": weights(7, 2, 12)}) <= 1e-4
    # A 5-unit RNN is so small that the extra node outweighs the saved bytes: opt in.
    result = run_svd(model, rank=2, allow_unprofitable=True)
    projection, rnn = result.model.graph.node
    assert projection.op_type == "MatMul" and list(projection.input) == ["x", "w_svd_in"]
    assert rnn.input[0] == "rnn/svd_in_output" and rnn.input[1] == "w_svd_out"
    assert list(rnn.input[2:]) == list(model.graph.node[0].input[2:])  # R, B, lens, states stay
    details = changes(result.report)["rnn"].details
    assert details["kind"] == "lstm_input" and details["matrix_shape"][1] == 12


# ---------------------------------------------------------------- rules, plans, options


def mlp(width: int = 64) -> onnx.ModelProto:
    """x[N,48] → MatMul(48×width) → Relu → MatMul(width×32)."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 48])],
        [tensor("y", ["N", 32])],
        [init("w1", decaying(48, width)), init("w2", decaying(width, 32))],
    )


def decaying(m: int, n: int) -> np.ndarray:
    """A matrix with singular values 0.8**i (a trained layer's decaying spectrum)."""
    u, _ = np.linalg.qr(RNG.standard_normal((m, m)))
    v, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    k = min(m, n)
    return ((u[:, :k] * 0.8 ** np.arange(k)) @ v[:, :k].T).astype(np.float32)


def test_energy_keep_ratio_and_budget_rules():
    model = mlp()
    spectrum = Spectrum.of(weights_of(model)["w1"])
    energy = changes(run_svd(model, energy=0.99).report)["fc1"].details
    assert energy["rank"] == spectrum.rank_for_energy(0.99) and energy["energy_kept"] >= 0.99
    kept = changes(run_svd(model, keep_ratio=0.5).report)["fc1"]
    assert kept.params_after <= 0.5 * kept.params_before
    result = run_svd(model, budget=0.3)
    after = sum(c.params_after for c in result.report.changes)
    assert after <= 0.3 * (48 * 64 + 64 * 32)
    flops = run_svd(model, flops_budget=0.3).report
    assert sum(c.flops_after for c in flops.changes) <= 0.3 * sum(
        c.flops_before for c in flops.changes
    )
    with pytest.raises(ConfigError, match="below the smallest reachable"):
        run_svd(model, budget=0.01)


def test_verify_relaxes_the_budget_until_the_cosine_holds():
    model = mlp()
    context = PassContext(feeds={"x": weights(16, 48)})
    loose = SvdPass(min_size=1, budget=0.1).run(model, context)
    result = SvdPass(min_size=1, budget=0.1, verify=True, min_cosine=0.9999, verify_step=0.2).run(
        model, context
    )
    assert any("verify: budget=0.1 gives" in note for note in result.report.notes)
    assert result.report.params_after > loose.report.params_after
    expected, actual = outputs(model, context.feeds)["y"], outputs(result.model, context.feeds)["y"]
    cosine = float(np.sum(expected * actual) / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert cosine >= 0.9999 or "not reached" in result.report.notes[-1]


def test_edited_plan_replays_and_bad_entries_are_config_errors():
    model, feeds = mlp(), {"x": weights(4, 48)}
    result = run_svd(model, energy=0.9)
    plan = Plan.from_dict(result.plan.to_dict())
    assert plan.layers["fc1"] == {
        "kind": "matmul",
        "rank": changes(result.report)["fc1"].details["rank"],
        "weight": "w1",
    }
    plan.layers["fc1"]["rank"] = 3
    plan.layers["fc2"]["rank"] = None
    replayed = SvdPass(min_size=1, energy=0.9).run(model, PassContext(), plan=plan)
    assert changes(replayed.report)["fc1"].decision == "matmul rank 3"
    assert changes(replayed.report)["fc2"].reason == "kept dense by the plan"
    assert relative_error(model, replayed.model, feeds) > relative_error(model, result.model, feeds)
    for entry, message in [
        ({"rank": 0}, r"outside \[1, 48\]"),
        ({"rank": 49}, "outside"),
        ({"kind": "channel", "rank": 2}, "does not fit"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SvdPass(min_size=1).run(model, PassContext(), plan=Plan("svd", {}, {"fc1": entry}))


def test_options_filters_and_one_schema():
    model = mlp()
    only = run_svd(model, rank=2, include=["fc2"])
    assert changes(only.report)["fc1"].reason == "not selected by include/exclude"
    assert (
        changes(SvdPass(rank=2).run(model).report)["fc1"].reason == "3072 elements < min_size 4096"
    )
    assert SvdPass(**parse_flag_value("0.9", shorthand="energy", owner="svd")).config.energy == 0.9
    assert SvdPass().config.energy == 0.95  # the default rule
    assert get_pass("svd") is SvdPass
    for options in [
        {"energy": 0.9, "budget": 0.5},
        {"energy": 1.5},
        {"rank": 0},
        {"conv": "depthwise"},
    ]:
        with pytest.raises(ConfigError):
            SvdPass(**options)


# ---------------------------------------------------------------- bad input and special cases


def test_float16_weight_is_factorized_through_float32():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    w = weights(24, 16, dtype=np.float16)
    model = make_model(
        [node],
        [tensor("x", ["N", 24], TensorProto.FLOAT16)],
        [tensor("y", ["N", 16], TensorProto.FLOAT16)],
        [init("w", w)],
    )
    feeds = {"x": weights(3, 24, dtype=np.float16)}
    assert full_rank(model, feeds) <= 2e-3  # float16 rounding of the factors
    result = run_svd(model, rank=4)
    assert {t.name: t.data_type for t in result.model.graph.initializer} == {
        "w_svd_in": TensorProto.FLOAT16,
        "w_svd_out": TensorProto.FLOAT16,
    }


def test_float64_weight_is_skipped():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model(
        [node],
        [tensor("x", ["N", 24], TensorProto.DOUBLE)],
        [tensor("y", ["N", 16], TensorProto.DOUBLE)],
        [init("w", weights(24, 16, dtype=np.float64))],
    )
    assert "float64 weight" in changes(run_svd(model, rank=2).report)["mm"].reason


def test_shared_weight_is_factorized_once_unless_uses_differ():
    w = weights(16, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="fc2"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 16])], [init("w", w)])
    result = run_svd(model, rank=16, allow_unprofitable=True)
    assert list(changes(result.report)) == ["fc1"]
    assert changes(result.report)["fc1"].details["nodes"] == ["fc1", "fc2"]
    assert sorted(t.name for t in result.model.graph.initializer) == ["w_svd_in", "w_svd_out"]
    assert relative_error(model, result.model, {"x": weights(3, 16)}) <= 1e-4
    mixed = make_model(
        [nodes[0], helper.make_node("MatMul", ["w", "h"], ["y"], name="fc2")],
        [tensor("x", ["N", 16])],
        [tensor("y", [16, "N"])],
        [init("w", w)],
    )
    reason = changes(run_svd(mixed, rank=2).report)["fc1"].reason
    assert reason == "shared by nodes needing different rewrites: matmul (left), matmul (right)"
    added = make_model(
        [nodes[0], helper.make_node("Add", ["h", "w"], ["y"], name="add")],
        [tensor("x", [16, 16])],
        [tensor("y", [16, 16])],
        [init("w", w)],
    )
    assert "also read by Add 'add'" in changes(run_svd(added, rank=2).report)["fc1"].reason


def test_weight_inside_an_if_branch_is_rewritten_in_its_branch():
    branch = lambda name, weight: helper.make_graph(
        [helper.make_node("MatMul", ["x", weight], [f"{name}_y"], name=f"{name}_mm")],
        name,
        [],
        [tensor(f"{name}_y", ["N", 16])],
        [init(weight, weights(24, 16))] if weight != "w_main" else [],
    )
    model = make_model(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                name="if",
                then_branch=branch("then", "w_then"),
                else_branch=branch("else", "w_main"),
            )
        ],
        [tensor("x", ["N", 24]), tensor("cond", [], TensorProto.BOOL)],
        [tensor("y", ["N", 16])],
        [init("w_main", weights(24, 16))],
    )
    result = run_svd(model, rank=16, allow_unprofitable=True)
    assert {c.layer for c in result.report.changes if not c.skipped} == {"then_mm", "else_mm"}
    if_node = result.model.graph.node[0]
    then_graph = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [n.name for n in then_graph.node] == ["then_mm/svd_in", "then_mm"]
    for cond in (True, False):
        feeds = {"x": weights(3, 24), "cond": np.array(cond)}
        assert relative_error(model, result.model, feeds) <= 1e-4


# ---------------------------------------------------------------- reference models


@pytest.fixture(scope="module")
def transformer():
    from onnxzip.models.zoo import get_reference_model

    return get_reference_model("transformer")


def test_reference_transformer_energy_passes_the_gate_and_reports_ranks(transformer):
    data = {transformer.input_name: transformer.test_inputs[:64]}
    result = compress(transformer.onnx_path, svd={"energy": 0.95}, data=data)
    report = result.report.passes[0]
    layers = [
        c for c in report.changes if c.op_type == "MatMul" and "min_size" not in (c.reason or "")
    ]
    assert len(layers) == 24 and all("rank" in c.details and c.details["spectrum"] for c in layers)
    assert result.passed


def test_reference_transformer_budget_halves_parameters_and_keeps_accuracy(transformer):
    original = onnx.load(transformer.onnx_path)
    context = PassContext(feeds={transformer.input_name: transformer.test_inputs[:32]})
    result = SvdPass(budget=0.5).run(original, context)
    eligible = [c for c in result.report.changes if c.details]
    assert sum(c.params_after for c in eligible) <= 0.5 * sum(c.params_before for c in eligible)
    assert result.report.flops_after < 0.6 * result.report.flops_before
    assert transformer.accuracy(result.model) >= transformer.accuracy(original) - 0.02


def test_reference_cnn_keep_ratio_runs():
    from onnxzip.models.zoo import get_reference_model

    cnn = get_reference_model("cnn")
    original = onnx.load(cnn.onnx_path)
    result = SvdPass(keep_ratio=0.5).run(
        original, PassContext(feeds={cnn.input_name: cnn.test_inputs[:8]})
    )
    rewritten = [c for c in result.report.changes if not c.skipped]
    assert len(rewritten) >= 10 and {c.details["kind"] for c in rewritten} <= {"channel", "spatial"}
    assert result.report.params_after < 0.6 * result.report.params_before
    assert cnn.accuracy(result.model) > 0.3  # runs and still classifies; no fine-tuning


def test_speech_lstm_input_factorization_runs_and_keeps_fidelity():
    from onnxzip.models.speech import build_speech_reference

    path, _dataset = build_speech_reference()
    model = onnx.load(path)
    feeds = {model.graph.input[0].name: np.abs(weights(2, 30, 257))}
    result = SvdPass(keep_ratio=0.5).run(model, PassContext(feeds=feeds))
    lstm = [c for c in result.report.changes if c.op_type == "LSTM" and not c.skipped]
    assert len(lstm) == 2 and all(c.details["kind"] == "lstm_input" for c in lstm)
    expected, actual = outputs(model, feeds), outputs(result.model, feeds)
    for name in expected:
        a, b = expected[name].ravel().astype(np.float64), actual[name].ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9
