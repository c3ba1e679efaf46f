"""More signal per sample in label-free fine-tuning: match=auto (the compressed layers' outputs,
every term relative to the teacher's variance), batch_size=auto (enough steps per epoch), and
LSTM/GRU whose sequence_lens / clip change nothing on the data."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import init, make_model, tensor
from onnxzip.core.runtime import make_session, run_session
from onnxzip.train import finetune
from onnxzip.train.availability import training_available

pytestmark = pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")
f32 = np.float32


def _three_layers(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,8] → MatMul w1 → h1 → Relu → MatMul w2 → h2 → Relu → MatMul w3 → h3 → + b3 → y[N,4]."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"),
            helper.make_node("Add", ["h3", "b3"], ["y"]),
        ],
        [tensor("x", ["N", 8])],
        [tensor("y", ["N", 4])],
        [init("w1", rng.standard_normal((8, 16)).astype(f32)), init("w2", (rng.standard_normal((16, 16)) * 0.3).astype(f32)),
         init("w3", (rng.standard_normal((16, 4)) * 0.3).astype(f32)), init("b3", rng.standard_normal(4).astype(f32))],
    )


def _compressed(teacher: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """The teacher with w1 as a 4-entry codebook decoded in the graph and w3 perturbed; w2 as it was."""
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    values = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    w1 = values["w1"].ravel()
    codebook = np.quantile(w1, [0.125, 0.375, 0.625, 0.875]).astype(f32)
    indices = np.abs(w1[:, None] - codebook[None]).argmin(1).astype(np.int64)
    w3 = values["w3"] + 0.2 * rng.standard_normal(values["w3"].shape).astype(f32)
    kept = [t for t in student.graph.initializer if t.name not in ("w1", "w3")]
    del student.graph.initializer[:]
    student.graph.initializer.extend([*kept, init("codebook", codebook), init("idx", indices),
                                      init("shape", np.array([8, 16], np.int64)), init("w3", w3)])
    decode = [helper.make_node("Gather", ["codebook", "idx"], ["flat"], name="decode"),
              helper.make_node("Reshape", ["flat", "shape"], ["w1_decoded"])]
    student.graph.node[0].input[1] = "w1_decoded"
    nodes = [*decode, *student.graph.node]
    del student.graph.node[:]
    student.graph.node.extend(nodes)
    return student


def _activations(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                              if n not in {o.name for o in probe.graph.output})
    return run_session(make_session(probe, "cpu"), {"x": x})


def test_match_auto_adds_the_compressed_layers_outputs_relative_to_the_teachers_variance():
    rng = np.random.default_rng(0)
    teacher = _three_layers(rng)
    student = _compressed(teacher, rng)
    x = rng.standard_normal((80, 8)).astype(f32)
    config = {"epochs": 1, "lr": 1e-3, "patience": 0}
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False, config=config)
    # fc1 (decoded codebook) and fc3 (another w3); fc2 is unchanged, y is an output already
    assert result.matched == ["h1", "h3"]
    assert result.losses == ["mse(y)/var", "1·mean of mse/var over 2 compressed-layer outputs"]
    assert any("matched the outputs of 2 compressed layers (h1, h3)" in note for note in result.notes)
    # The held-back loss of the input (epoch 0), computed by onnxruntime, is the relative MSE of y
    # plus the mean relative MSE of h1 and h3, each scaled by its variance on the training part.
    order = np.random.default_rng(0).permutation(80)
    held, train = np.sort(order[:16]), np.sort(order[16:])
    names = ["y", "h1", "h3"]
    t_train, t_held = _activations(teacher, names, x[train]), _activations(teacher, names, x[held])
    s_held = _activations(student, names, x[held])
    rel = {n: np.mean((s_held[n] - t_held[n]) ** 2) / np.var(t_train[n].astype(np.float64)) for n in names}
    expected = rel["y"] + 0.5 * (rel["h1"] + rel["h3"])
    assert result.history[0]["epoch"] == 0
    np.testing.assert_allclose(result.history[0]["val_loss"], expected, rtol=1e-4)
    # The epoch is selected on the outputs' term alone, the student run in onnxruntime.
    np.testing.assert_allclose(result.history[0]["val_output_loss"], rel["y"], rtol=1e-4)
    trained = _activations(result.model, ["y"], x[held])["y"]
    kept = next(row for row in result.history if row["epoch"] == result.best_epoch)
    np.testing.assert_allclose(kept["val_output_loss"], np.mean((trained - t_held["y"]) ** 2)
                               / np.var(t_train["y"].astype(np.float64)), rtol=1e-4)
    # match=none: the plain MSE on the outputs only
    plain = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                     config={**config, "match": ["none"]})
    assert plain.matched == [] and plain.losses == ["mse(y)"]
    np.testing.assert_allclose(plain.history[0]["val_loss"], np.mean((s_held["y"] - t_held["y"]) ** 2), rtol=1e-4)
    # With many samples match=auto is off.
    many = np.random.default_rng(1).standard_normal((1400, 8)).astype(f32)
    large = finetune(student, {"x": many}, teacher=teacher, device="cpu", progress=False, config=config)
    assert large.matched == [] and large.losses == ["mse(y)"]


def test_default_batch_gives_an_epoch_at_least_eight_steps_and_lr_auto_follows_what_trains():
    rng = np.random.default_rng(1)
    teacher = _three_layers(rng)
    student = _compressed(teacher, rng)
    x = rng.standard_normal((40, 8)).astype(f32)  # 8 held back, 32 train
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={"epochs": 2, "patience": 0, "keep": "best"})
    rows = [row for row in result.history if row["epoch"] > 0]
    assert rows and all(row["steps"] >= 8 for row in rows)
    assert any("batch size 4 (auto: at least 8 steps per epoch on 32 samples)" in n for n in result.notes)
    assert any("learning rate 0.0003 (auto: 1 codebooks train)" in n for n in result.notes)
    # a batch given by the user wins: 32 samples in one step
    given = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                     config={"epochs": 1, "patience": 0, "batch_size": 32, "lr": 1e-3})
    assert [row["steps"] for row in given.history if row["epoch"] > 0] == [1]
    assert not any("learning rate" in n for n in given.notes)


def _recurrent(op: str, rng: np.random.Generator, *, lens: bool = False, clip: float | None = None) -> onnx.ModelProto:
    hidden, features, gates = 6, 4, 4 if op == "LSTM" else 3
    inputs = ["xt", "W", "R", "B"] + (["lens"] if lens else [])
    attributes = {"hidden_size": hidden, **({"clip": clip} if clip is not None else {})}
    return make_model(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
         helper.make_node(op, inputs, ["", "h"], name="rnn", **attributes),
         helper.make_node("Squeeze", ["h", "axis0"], ["hs"]),
         helper.make_node("MatMul", ["hs", "wo"], ["y"], name="head")],
        [tensor("x", ["N", 5, features])] + ([tensor("lens", ["N"], TensorProto.INT32)] if lens else []),
        [tensor("y", ["N", 3])],
        [init("W", (rng.standard_normal((1, gates * hidden, features)) * 0.3).astype(f32)),
         init("R", (rng.standard_normal((1, gates * hidden, hidden)) * 0.3).astype(f32)),
         init("B", np.zeros((1, 2 * gates * hidden), f32)), init("axis0", np.array([0], np.int64)),
         init("wo", (rng.standard_normal((hidden, 3)) * 0.3).astype(f32))],
        opset=13,
    )


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_sequence_lens_and_clip_that_change_nothing_on_the_data_train_and_stay_in_the_file(op):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((48, 5, 4)).astype(f32)
    references = rng.standard_normal((48, 3)).astype(f32)
    config = {"epochs": 2, "lr": 0.02, "patience": 0, "keep": "last"}
    for kind, model, feeds in [
        ("sequence_lens", _recurrent(op, rng, lens=True), {"x": x, "lens": np.full(48, 5, np.int32)}),
        ("clip", _recurrent(op, rng, clip=50.0), {"x": x}),
    ]:
        result = finetune(model, {**feeds, "references": references}, device="cpu", progress=False, config=config)
        assert set(result.trained) == {"W", "R", "B", "wo"}, kind
        assert any(f"{op} 'rnn': its {kind} changes nothing on the training data" in n for n in result.notes)
        err = lambda m: float(np.mean((run_session(make_session(m, "cpu"), feeds)["y"] - references) ** 2))  # noqa: B023,E731
        assert err(result.model) < err(model)
        assert list(result.model.graph.node[1].input) == list(model.graph.node[1].input)  # the file keeps them
        assert [a.name for a in result.model.graph.node[1].attribute] == [a.name for a in model.graph.node[1].attribute]
    # Lengths that shorten sequences of the data, a clip that binds: frozen, saying why.
    lens = np.where(np.arange(48) % 2 == 0, 5, 3).astype(np.int32)
    short = finetune(_recurrent(op, rng, lens=True), {"x": x, "lens": lens, "references": references},
                     device="cpu", progress=False, config=config)
    assert "W" in short.frozen and "sequence_lens shortens sequences of the training data" in short.frozen["W"]
    binding = finetune(_recurrent(op, rng, clip=0.05), {"x": x, "references": references}, device="cpu",
                       progress=False, config=config)
    assert "W" in binding.frozen and "clip binds on the training data" in binding.frozen["W"]


def test_an_epoch_whose_held_out_gain_is_within_its_noise_is_not_kept():
    from onnxzip.train.engine import _within_noise

    best = np.array([1.0, 2.0, 3.0, 4.0])
    assert _within_noise(best, best - 0.1) is None  # every held-out loss lower: kept
    noisy = best + np.array([-0.5, 0.45, -0.5, 0.5]) - 0.01  # lower on average, by less than its spread
    assert noisy.mean() < best.mean()
    why = _within_noise(best, noisy)
    assert why.startswith("lowered the held-out loss by 0.9%, within its noise") and "over 4 paired" in why
    assert _within_noise(None, best) is None and _within_noise(best[:1], best[:1] - 1) is None


def test_match_auto_leaves_out_a_layer_whose_rows_mix_samples():
    """fc2 runs on rows [4·N, 4] (each sample's 16 features cut into 4 rows, as attention merges
    the batch into its heads): no axis of h2 follows the samples, so it cannot be cut into
    per-sample targets. match=auto leaves it out (the teacher's run of it in uneven chunks
    stopped fine-tuning with an internal error before) and matches h1 and h3."""
    rng = np.random.default_rng(4)
    teacher = _three_layers(rng)
    teacher.graph.initializer.extend([init("rows", np.array([-1, 4], np.int64)), init("back", np.array([-1, 16], np.int64))])
    teacher.graph.initializer.remove(next(t for t in teacher.graph.initializer if t.name == "w2"))
    teacher.graph.initializer.append(init("w2", (rng.standard_normal((4, 4)) * 0.5).astype(f32)))
    nodes = list(teacher.graph.node)
    fc2 = next(n for n in nodes if n.name == "fc2")
    fc2.input[0], fc2.output[0] = "r1_rows", "h2"
    at = nodes.index(fc2)
    nodes[at:at + 1] = [helper.make_node("Reshape", ["r1", "rows"], ["r1_rows"], name="to_rows"), fc2,
                        helper.make_node("Reshape", ["h2", "back"], ["h2_back"], name="to_samples")]
    next(n for n in nodes if n.op_type == "Relu" and n.input[0] == "h2").input[0] = "h2_back"
    del teacher.graph.node[:]
    teacher.graph.node.extend(nodes)
    onnx.checker.check_model(teacher)
    student = _compressed(teacher, rng)
    w2 = next(t for t in student.graph.initializer if t.name == "w2")
    w2.CopyFrom(init("w2", numpy_helper.to_array(w2) + 0.1))
    x = rng.standard_normal((80, 8)).astype(f32)
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={"epochs": 1, "batch_size": 5, "patience": 0})
    assert result.matched == ["h1", "h3"]
    assert len(result.history) == 2


def test_finetune_feeds_a_model_that_runs_one_sample_one_at_a_time():
    """The finetune command on a model whose export traced batch 1 (exit 2 before): it trains
    one sample at a time, says so, and the written model declares its input as the user's did."""
    from helpers import traced_batch_one

    rng = np.random.default_rng(6)
    model = traced_batch_one(rng)
    student = onnx.ModelProto()
    student.CopyFrom(model)
    w = next(t for t in student.graph.initializer if t.name == "w")
    w.CopyFrom(init("w", numpy_helper.to_array(w) + 0.3 * rng.standard_normal((6, 8)).astype(f32)))
    x = rng.standard_normal((40, 4, 6)).astype(f32)
    result = finetune(student, {"x": x}, teacher=model, device="cpu", progress=False, config={"epochs": 2})
    assert result.notes[0].startswith("the model declares a symbolic batch (x[0] 'N') but runs only one sample")
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert result.trained == ["w"] and result.best_epoch > 0  # the perturbed weight moved back toward the teacher
