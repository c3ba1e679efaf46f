"""Fine-tuning through onnxruntime-training on hand-built graphs (BN, LayerNorm, LSTM, HardSigmoid,
Resize, a codebook Gather, an If with a weight inside) and one reference-model pipeline."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import init, make_model, mlp, tensor
from onnxzip.errors import ConfigError, DataError
from onnxzip.core.inputs import graph_inputs
from onnxzip.core.runtime import make_session, run_session
from onnxzip.train import finetune
from onnxzip.train.availability import training_available

pytestmark = pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")

FAST = {"epochs": 3, "patience": 0, "lr": 0.02, "batch_size": 32}


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_session(make_session(model, "cpu"), feeds)


def _ce(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    logits = next(iter(_outputs(model, {"x": x}).values())).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def _io(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type)) for v in [*graph_inputs(model), *model.graph.output]]


def _bn_cnn(rng: np.random.Generator, channels: int = 4) -> onnx.ModelProto:
    """Conv → BN → HardSigmoid → Resize(nearest ×2) → Conv → GlobalAveragePool → Gemm."""
    f32 = np.float32
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn"),
            helper.make_node("HardSigmoid", ["bn"], ["hs"], name="hs", alpha=0.3),
            helper.make_node("Resize", ["hs", "", "scales"], ["up"], name="up", mode="nearest"),
            helper.make_node("Conv", ["up", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
        ],
        [tensor("x", ["N", 1, 6, 6])],
        [tensor("y", ["N", 3])],
        [
            init("w", rng.standard_normal((channels, 1, 3, 3)).astype(f32)),
            init("b", np.zeros(channels, f32)),
            init("g", np.ones(channels, f32)),
            init("be", np.zeros(channels, f32)),
            init("mu", rng.random(channels).astype(f32)),
            init("var", (rng.random(channels) + 0.5).astype(f32)),
            init("scales", np.array([1, 1, 2, 2], f32)),
            init("w3", (rng.standard_normal((channels, channels, 3, 3)) * 0.3).astype(f32)),
            init("w2", rng.standard_normal((3, channels)).astype(f32)),
            init("b2", np.zeros(3, f32)),
        ],
        opset=17,
    )
    model.doc_string = "bn cnn"
    onnx.helper.set_model_props(model, {"owner": "tests"})
    return model


def _digit_data(rng: np.random.Generator, count: int = 96) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((count, 1, 6, 6)).astype(np.float32)
    labels = (x[:, 0, :3].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 0, 3:].mean(axis=(1, 2)) > 0)
    return x, labels


def test_labels_train_bn_hardsigmoid_resize_and_come_back_unchanged_in_form(tmp_path):
    rng = np.random.default_rng(0)
    model = _bn_cnn(rng)
    x, labels = _digit_data(rng, 320)  # a held-back part large enough to show the gain beyond its noise
    result = finetune(model, {"x": x, "labels": labels}, config={**FAST, "epochs": 4}, device="cpu",
                      progress=False)
    trained = result.model
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in model.graph.node]  # BN is BN again
    assert _io(trained) == _io(model) and trained.doc_string == "bn cnn"
    assert {p.key: p.value for p in trained.metadata_props} == {"owner": "tests"}
    assert trained.ir_version == model.ir_version and trained.opset_import == model.opset_import
    assert result.rewrites == {"BatchNormalization -> affine": 1, "HardSigmoid -> Relu/Min": 1,
                               "Resize -> Expand/MatMul": 1}
    assert set(result.trained) == {"w", "b", "g", "be", "w3", "w2", "b2"}
    assert set(result.frozen) >= {"mu", "var", "scales"}
    values = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(values["mu"], original["mu"])  # running statistics untouched
    np.testing.assert_array_equal(values["var"], original["var"])
    assert not np.allclose(values["g"], original["g"])
    assert _ce(trained, x, labels) < _ce(model, x, labels) - 0.05
    epochs = [row for row in result.history if "loss" in row]  # a held-back part scores the input first (epoch 0)
    assert result.history[0]["epoch"] == 0 and "held back" in result.notes[0]
    assert len({row["epoch"] for row in epochs}) == 4 and epochs[-1]["loss"] < epochs[0]["loss"]


def test_label_free_distillation_recovers_a_perturbed_layernorm_model():
    rng = np.random.default_rng(1)
    f32 = np.float32
    teacher = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["n"], name="ln", axis=-1),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 8])],
        [tensor("y", ["N", 4])],
        [init("w1", rng.standard_normal((8, 16)).astype(f32)), init("ln_g", np.ones(16, f32)),
         init("ln_b", np.zeros(16, f32)), init("w2", rng.standard_normal((16, 4)).astype(f32))],
    )
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for tensor_ in student.graph.initializer:
        value = numpy_helper.to_array(tensor_)
        tensor_.CopyFrom(numpy_helper.from_array((value + 0.3 * rng.standard_normal(value.shape)).astype(f32),
                                                 tensor_.name))
    x = rng.standard_normal((256, 8)).astype(f32)
    val = rng.standard_normal((64, 8)).astype(f32)
    result = finetune(student, {"x": x}, val={"x": val}, teacher=teacher,
                      config={"epochs": 4, "lr": 0.01, "patience": 0}, device="cpu", progress=False)
    # fewer than 1024 samples: match=auto also matches fc1's output (fc2's is the output itself)
    assert result.losses == ["mse(y)/var", "1·mean of mse/var over 1 compressed-layer outputs"]
    assert result.matched == ["h"] and "cosine" in result.history[-1]
    expected = _outputs(teacher, {"x": val})["y"]
    before = np.mean((_outputs(student, {"x": val})["y"] - expected) ** 2)
    after = np.mean((_outputs(result.model, {"x": val})["y"] - expected) ** 2)
    assert after < 0.5 * before
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in teacher.graph.node]
    assert len(result.model.graph.node[1].output) == 1  # the declared LayerNorm outputs are gone again


def test_label_free_without_teacher_is_one_sentence():
    with pytest.raises(ConfigError, match="teacher"):
        finetune(mlp(), {"x": np.zeros((4, 8), np.float32)}, device="cpu", progress=False)
    with pytest.raises(DataError):
        finetune(mlp(), {"x": np.zeros((4, 8), np.float32), "labels": np.zeros(3, np.int64)},
                 device="cpu", progress=False)


def _codebook_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    codebook = np.sort(rng.standard_normal(4)).astype(np.float32)
    indices = rng.integers(0, 4, size=(8 * 3)).astype(np.uint8)
    model = make_model(
        [
            helper.make_node("Cast", ["idx_u8"], ["idx"], to=TensorProto.INT32),
            helper.make_node("Gather", ["codebook", "idx"], ["flat"], name="decode"),
            helper.make_node("Reshape", ["flat", "shape"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
        ],
        [tensor("x", ["N", 8])],
        [tensor("y", ["N", 3])],
        [init("codebook", codebook), init("idx_u8", indices), init("shape", np.array([8, 3], np.int64))],
    )
    return model, codebook, indices


def test_codebook_centroid_gradient_is_the_sum_over_its_weights():
    rng = np.random.default_rng(2)
    model, codebook, indices = _codebook_model(rng)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    references = rng.standard_normal((16, 3)).astype(np.float32)
    lr = 0.1
    result = finetune(model, {"x": x, "references": references}, device="cpu", progress=False,
                      config={"epochs": 1, "optimizer": "sgd", "schedule": "constant", "warmup": 0, "lr": lr,
                              "batch_size": 16, "patience": 0, "keep": "last"})  # no held-back part
    assert result.trained == ["codebook"] and "idx_u8" in result.frozen
    weights = codebook[indices.astype(np.int64)].reshape(8, 3)
    grad_w = 2.0 / references.size * x.T @ (x @ weights - references)  # d mean((xW - r)^2) / dW
    expected_grad = np.array([grad_w.ravel()[indices == k].sum() for k in range(4)])
    trained = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_allclose((codebook - trained["codebook"]) / lr, expected_grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(trained["idx_u8"], indices)
    assert result.model.ByteSize() == model.ByteSize()


def test_lstms_train_in_every_direction_and_what_cannot_train_is_frozen_with_a_reason():
    rng = np.random.default_rng(3)
    f32 = np.float32
    hidden, feat = 6, 4
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["s", "inner_w"], ["branch"])], "then", [], [tensor("branch", ["N", 3])],
        [init("inner_w", np.full(3, 2.0, f32))])
    else_graph = helper.make_graph([helper.make_node("Identity", ["s"], ["branch2"])], "else", [],
                                   [tensor("branch2", ["N", 3])])
    model = make_model(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node("LSTM", ["xt", "W", "R", "B"], ["", "h"], name="lstm", hidden_size=hidden),
            helper.make_node("Squeeze", ["h", "axis0"], ["hs"]),
            helper.make_node("LSTM", ["xt", "Wb", "Rb"], ["", "hb"], name="bilstm", hidden_size=hidden,
                             direction="bidirectional"),
            helper.make_node("ReduceMean", ["hb"], ["hbm"], axes=[0], keepdims=0),
            helper.make_node("Concat", ["hs", "hbm"], ["feat"], axis=1),
            helper.make_node("MatMul", ["feat", "wo"], ["s"], name="head"),
            # a condition that depends on the batch: not fixed by the data
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["flag"]),
            helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
        ],
        [tensor("x", ["N", 5, feat])],
        [tensor("y", ["N", 3])],
        [
            init("W", (rng.standard_normal((1, 4 * hidden, feat)) * 0.3).astype(f32)),
            init("R", (rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(f32)),
            init("B", np.zeros((1, 8 * hidden), f32)),
            init("Wb", (rng.standard_normal((2, 4 * hidden, feat)) * 0.3).astype(f32)),
            init("Rb", (rng.standard_normal((2, 4 * hidden, hidden)) * 0.3).astype(f32)),
            init("axis0", np.array([0], np.int64)),
            init("wo", (rng.standard_normal((2 * hidden, 3)) * 0.3).astype(f32)),
            init("zero", np.array(0.0, f32)),
        ],
        opset=13,
    )
    x = rng.standard_normal((64, 5, feat)).astype(f32)
    references = rng.standard_normal((64, 3)).astype(f32)
    result = finetune(model, {"x": x, "references": references}, device="cpu", progress=False, config=FAST)
    assert "inner_w" in result.frozen and "If/Loop/Scan" in result.frozen["inner_w"]
    assert "If 'branch'" in result.frozen["wo"]  # its gradient would pass through the If
    assert result.trained == [] and result.notes  # nothing left: returned unchanged, no crash
    # Without the If: forward and bidirectional LSTMs train.
    for _ in range(3):
        model.graph.node.pop()
    model.graph.output[0].name = "s"
    # random references: no held-out gain to select on, so the last epoch is kept
    result = finetune(model, {"x": x, "references": references}, device="cpu", progress=False,
                      config={**FAST, "keep": "last"})
    assert set(result.trained) == {"W", "R", "B", "Wb", "Rb", "wo"}
    assert result.rewrites == {"LSTM -> forward-direction LSTM": 2}
    err = lambda m: np.mean((_outputs(m, {"x": x})["s"] - references) ** 2)  # noqa: E731
    assert err(result.model) < err(model)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    assert len(result.model.graph.node[1].input) == 4  # the padding is not exported
    # An LSTM with clip: onnxruntime's training kernel refuses it, even untrained; frozen, saying why.
    model.graph.node[1].attribute.append(helper.make_attribute("clip", 1.0))
    result = finetune(model, {"x": x, "references": references}, device="cpu", progress=False, config=FAST)
    assert result.trained == [] and "LSTM 'lstm'" in result.frozen["W"] and "clip" in result.frozen["W"]


def test_an_op_without_a_gradient_freezes_what_is_upstream_of_it_instead_of_crashing():
    # Shrink has no gradient builder; onnxruntime refuses the training graph; the weight before
    # it is frozen with a reason naming the op, the one after it still trains.
    model = make_model(
        [helper.make_node("Mul", ["x", "w"], ["m"], name="scale"), helper.make_node("Shrink", ["m"], ["s"], name="shrink"),
         helper.make_node("Mul", ["s", "w2"], ["y"], name="after")],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 4])],
        [init("w", np.full(4, 1.5, np.float32)), init("w2", np.full(4, 0.5, np.float32))])
    x = np.ones((8, 4), np.float32)
    result = finetune(model, {"x": x, "references": x}, device="cpu", progress=False, config=FAST)
    assert result.trained == ["w2"] and "Shrink 'shrink'" in result.frozen["w"]
    model.graph.node.pop()
    model.graph.node[-1].output[0] = "y"
    result = finetune(model, {"x": x, "references": x}, device="cpu", progress=False, config=FAST)
    assert result.trained == [] and "Shrink 'shrink'" in result.frozen["w"]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_a_strong_sparsity_drives_gammas_to_zero_where_they_stay():
    rng = np.random.default_rng(4)
    model = _bn_cnn(rng, channels=6)
    x, labels = _digit_data(rng)
    result = finetune(model, {"x": x, "labels": labels}, device="cpu", progress=False,
                      config={**FAST, "lr": 0.05, "sparsity": 10.0, "epochs": 2})
    gamma = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "g")
    assert result.gammas == 6 and result.gammas_below_threshold == int(np.sum(np.abs(gamma) < 1e-2)) >= 4


def _slimmable(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x → MatMul → BN → Relu → MatMul → y with 8 hidden channels, of which the first 3 carry the
    output and the other 5 almost nothing; references are the model's own outputs."""
    f32 = np.float32
    w2 = np.array([[1.0], [0.8], [0.6], [0.003], [0.003], [0.002], [0.002], [0.001]], f32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [tensor("x", ["N", 6])], [tensor("y", ["N", 1])],
        [init("w1", rng.standard_normal((6, 8)).astype(f32)), init("g", np.ones(8, f32)),
         init("be", np.full(8, 0.1, f32)), init("mu", np.zeros(8, f32)), init("var", np.full(8, 6.0, f32)),
         init("w2", w2)])
    x = rng.standard_normal((256, 6)).astype(f32)
    return model, x, _outputs(model, {"x": x})["y"]


def test_sparsity_training_zeroes_unimportant_gammas_and_keeps_the_important_ones():
    # A proximal step of lr·λ after AdamW shrinks every γ alike: at a λ that zeroes the idle
    # channels it zeroes all of them. γ's own Adam step on the L1 subgradient is selective.
    model, x, y = _slimmable(np.random.default_rng(5))
    config = {"epochs": 6, "patience": 0, "lr": 1e-2, "batch_size": 32, "sparsity": 2e-3, "include": ["g"]}
    result = finetune(model, {"x": x, "references": y}, device="cpu", progress=False, config=config)
    gamma = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "g")
    assert np.all(np.abs(gamma[3:]) < 1e-2), gamma  # idle channels: exactly zero or nearly
    assert np.all(np.abs(gamma[:3]) > 0.5), gamma  # working channels keep their scale
    assert result.gammas == 8 and result.gammas_below_threshold == 5
    error = float(np.mean((_outputs(result.model, {"x": x})["y"] - y) ** 2))
    assert error < 0.05 * float(np.mean(y ** 2))


def _inner(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return _outputs(probe, {"x": x})[name]


def test_matching_an_intermediate_activation_pulls_it_towards_the_teachers():
    teacher = mlp(np.random.default_rng(0))
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    w1 = next(t for t in student.graph.initializer if t.name == "w1")
    noisy = numpy_helper.to_array(w1) + 0.5 * np.random.default_rng(9).standard_normal((8, 16)).astype(np.float32)
    w1.CopyFrom(numpy_helper.from_array(noisy, "w1"))
    x = np.random.default_rng(2).standard_normal((256, 8)).astype(np.float32)
    config = {"epochs": 8, "lr": 0.05, "patience": 0, "include": ["w1", "b1"]}
    plain = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                     config={**config, "match": ["none"]})
    matched = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                       config={**config, "match": ["h2"], "match_weight": 1.0})
    assert matched.losses == ["mse(y)", "mse(h2)"]
    error = lambda m: float(np.mean((_inner(m, "h2", x) - _inner(teacher, "h2", x)) ** 2))  # noqa: E731
    assert error(matched.model) < 0.5 * error(plain.model) and error(matched.model) < 0.2 * error(student)
    assert [n.op_type for n in matched.model.graph.node] == [n.op_type for n in student.graph.node]


def test_matching_needs_a_teacher_and_tensors_both_models_compute_alike():
    model = mlp(np.random.default_rng(0))
    x = np.zeros((8, 8), np.float32)
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(model, {"x": x, "references": np.zeros((8, 4), np.float32)}, device="cpu", progress=False,
                 config={"match": ["h2"]})
    with pytest.raises(ConfigError, match="'nope' is not computed in the student"):
        finetune(model, {"x": x}, teacher=model, device="cpu", progress=False, config={"match": ["nope"]})
    narrow = mlp(np.random.default_rng(0))
    for t in narrow.graph.initializer:  # 12 hidden units instead of 16, as channel pruning leaves it
        array = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(array[..., :12] if t.name in ("w1", "b1", "w2") else array, t.name))
    with pytest.raises(ConfigError, match="pruned channels cannot be matched"):
        finetune(narrow, {"x": x}, teacher=model, device="cpu", progress=False, config={"match": ["h2"]})


def test_batchnorm_with_statistics_computed_in_the_graph_trains_in_affine_form():
    # Running statistics behind graph nodes (as a codebook decode leaves them): still rewritten,
    # so the BN uses them rather than batch statistics, and they stay untouched.
    rng = np.random.default_rng(3)
    f32 = np.float32
    mu, var = rng.standard_normal(3).astype(f32), (rng.random(3) + 0.5).astype(f32)  # 3-entry codebooks
    index = np.array([0, 1, 2, 2, 1, 0], np.int64)
    model = make_model(
        [helper.make_node("Gather", ["mu0", "idx"], ["mu"]), helper.make_node("Gather", ["var0", "idx"], ["var"]),
         helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 2])],
        [init("w1", rng.standard_normal((4, 6)).astype(f32)), init("g", np.ones(6, f32)), init("be", np.zeros(6, f32)),
         init("mu0", mu), init("var0", var), init("idx", index), init("w2", rng.standard_normal((6, 2)).astype(f32))])
    x = rng.standard_normal((128, 4)).astype(f32)
    target = rng.standard_normal((128, 2)).astype(f32)
    before = float(np.mean((_outputs(model, {"x": x})["y"] - target) ** 2))
    result = finetune(model, {"x": x, "references": target}, device="cpu", progress=False,
                      config={"epochs": 4, "lr": 0.02, "patience": 0})
    assert result.rewrites.get("BatchNormalization -> affine") == 1
    assert set(result.trained) == {"w1", "g", "be", "w2"} and {"mu0", "var0"} <= set(result.frozen)
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(values["mu0"], mu)
    np.testing.assert_array_equal(values["var0"], var)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    assert float(np.mean((_outputs(result.model, {"x": x})["y"] - target) ** 2)) < 0.8 * before
    # the training loss (inference-form BN) agrees with the exported model's error on the data
    kept = [row for row in result.history if row["epoch"] == result.best_epoch and "loss" in row][-1]
    assert abs(kept["loss"] - float(np.mean((_outputs(result.model, {"x": x})["y"] - target) ** 2))) < 0.1 * before


def _user_loss(tmp_path, opset: int = 17, inputs: int = 2):
    """mean(|p − t|³) as an ONNX file: what a user would export from their own loss."""
    names = ["p", "t", "extra"][:inputs]
    model = make_model(
        [helper.make_node("Sub", ["p", "t"], ["d"]), helper.make_node("Abs", ["d"], ["a"]),
         helper.make_node("Pow", ["a", "three"], ["c"]), helper.make_node("ReduceMean", ["c"], ["loss"], keepdims=0)],
        [tensor(n, ["N", 4]) for n in names], [tensor("loss", [])], [init("three", np.float32(3.0))], opset=opset)
    path = tmp_path / f"loss{opset}_{inputs}.onnx"
    onnx.save(model, path)
    return str(path)


def test_a_user_loss_model_is_spliced_in_and_trains(tmp_path):
    student = mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((128, 8)).astype(np.float32)
    target = _outputs(mlp(np.random.default_rng(0)), {"x": x})["y"]
    cubic = lambda m: float(np.mean(np.abs(_outputs(m, {"x": x})["y"] - target) ** 3))  # noqa: E731
    result = finetune(student, {"x": x, "references": target}, device="cpu", progress=False,
                      config={"epochs": 8, "lr": 0.05, "patience": 0, "loss_model": _user_loss(tmp_path)})
    assert result.losses == ["user(y)"]
    assert cubic(result.model) < 0.5 * cubic(student)
    assert abs(result.history[-1]["loss"] - cubic(result.model)) < 0.5 * cubic(result.model) + 1e-3
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in student.graph.initializer]
    with pytest.raises(ConfigError, match="2 inputs"):
        finetune(student, {"x": x, "references": target}, device="cpu", progress=False,
                 config={"loss_model": _user_loss(tmp_path, inputs=3)})
    with pytest.raises(ConfigError, match="opset 17 or lower"):
        finetune(student, {"x": x, "references": target}, device="cpu", progress=False,
                 config={"loss_model": _user_loss(tmp_path, opset=18)})


def test_keep_last_returns_the_last_epoch_without_selecting_on_the_validation_data():
    teacher, student = mlp(np.random.default_rng(0)), mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    y = _outputs(teacher, {"x": x})["y"]
    # a learning rate far too high: validation loss is not monotone, so "best" and "last" differ
    config = {"epochs": 4, "lr": 0.5, "patience": 0, "warmup": 0.0, "schedule": "constant"}
    best = finetune(student, {"x": x, "references": y}, val={"x": x[:16], "references": y[:16]}, device="cpu",
                    progress=False, config=config)
    last = finetune(student, {"x": x, "references": y}, val={"x": x[:16], "references": y[:16]}, device="cpu",
                    progress=False, config={**config, "keep": "last"})
    assert last.best_epoch == 4
    # the input (epoch 0) is the first candidate; the kept epoch has the lowest validation loss of
    # the epochs that beat the kept one before them beyond the noise, the others say so in the notes
    kept = [row for row in best.history if row["epoch"] == best.best_epoch][-1]["val_loss"]
    assert best.history[0]["epoch"] == 0 and kept <= best.history[0]["val_loss"]
    lower = {row["epoch"] for row in best.history if row["val_loss"] < kept}
    noted = {int(note.split()[1]) for note in best.notes if "within its noise" in note}
    assert lower <= noted


def test_kl_distillation_of_class_scores_moves_the_student_towards_the_teacher():
    teacher, student = mlp(np.random.default_rng(0)), mlp(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((128, 8)).astype(np.float32)
    result = finetune(student, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={"loss": "kl", "epochs": 3, "lr": 0.01, "patience": 0})
    assert result.losses == ["kl(y)", "1·mean of mse/var over 1 compressed-layer outputs"]  # match=auto: fc1's h
    agree = lambda m: np.mean(_outputs(m, {"x": x})["y"].argmax(1) == _outputs(teacher, {"x": x})["y"].argmax(1))  # noqa: E731
    assert agree(result.model) > agree(student)


def test_without_val_a_held_back_part_keeps_the_input_when_no_epoch_beats_it():
    teacher = mlp(np.random.default_rng(0))
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    # the student is the teacher: any step makes the held-back loss worse, so the input comes back
    result = finetune(teacher, {"x": x}, teacher=teacher, device="cpu", progress=False,
                      config={"epochs": 2, "lr": 0.05, "patience": 0, "warmup": 0.0})
    assert "held back 8 of 40" in result.notes[0]
    assert any("undone and retried at half the learning rate" in note for note in result.notes)
    assert any("the input weights are returned" in note for note in result.notes) and result.best_epoch == 0
    assert result.model.SerializeToString() == teacher.SerializeToString()


def test_nothing_trainable_is_one_sentence_and_exit_2(tmp_path, capsys):
    from onnxzip.cli import main

    model = make_model(
        [helper.make_node("Mul", ["x", "w"], ["m"], name="scale"), helper.make_node("Shrink", ["m"], ["y"], name="shrink")],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 4])], [init("w", np.full(4, 1.5, np.float32))])
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32))
    code = main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "data.npz"),
                 "--teacher", str(source), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not target.exists()
    assert "Nothing can train in this model" in err and "Shrink 'shrink'" in err


def test_a_finetune_step_that_trains_nothing_names_the_op_not_its_own_include(capsys):
    """Inside compress the step selects its weights in its plan and passes them as ``include``:
    when none qualifies, the reasons said must be the plan's (the op that blocks the gradient),
    not "not selected (include)" (what the step printed on a ViT before)."""
    from onnxzip.api import compress

    rng = np.random.default_rng(0)
    n = helper.make_node
    model = make_model(  # a Resize whose scales the graph computes (2x, from the input's own shape)
        [n("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), n("Shape", ["h"], ["hs"]),
         n("Cast", ["hs"], ["hf"], to=TensorProto.FLOAT), n("Div", ["hf", "hf"], ["ones"]),
         n("Mul", ["ones", "two"], ["scales"]), n("Resize", ["h", "", "scales"], ["y"], name="up", mode="linear")],
        [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3, 10, 10])],
        [init("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32)), init("two", np.array([1, 1, 2, 2], np.float32))])
    data = {"x": rng.standard_normal((12, 2, 5, 5)).astype(np.float32)}
    result = compress(model, data=data, finetune={"epochs": 1}, allow_gate_failure=True)
    step = next(r for r in result.report.passes if r.pass_name == "finetune")
    reasons = {c.layer: c.reason for c in step.changes if c.skipped}
    assert "Resize 'up'" in reasons["w"] and "scales are computed" in reasons["w"]
    assert "Resize 'up'" in capsys.readouterr().err


def _computed_shape_softmax(rng: np.random.Generator) -> onnx.ModelProto:
    """A softmax as jax2tf writes it (magika's head): the row max and row sum are reshaped to
    [N, 1] and broadcast back by Reshape/Expand to a target computed from Shape(x) through int32
    Casts, so onnxruntime's own shape inference cannot tell their output shapes."""
    f32 = np.float32
    return make_model([
        helper.make_node("MatMul", ["x", "w"], ["z"], name="fc"),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Cast", ["xs"], ["xs32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["xs32", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "one32"], ["t32"], axis=0),
        helper.make_node("Cast", ["t32"], ["target"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["z"], ["zm"], axes=[1], keepdims=0),
        helper.make_node("Max", ["low", "zm"], ["m"]),
        helper.make_node("Reshape", ["m", "target"], ["m2"]),
        helper.make_node("Expand", ["m2", "target"], ["m3"]),
        helper.make_node("Sub", ["z", "m3"], ["zc"]),
        helper.make_node("Exp", ["zc"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "target"], ["s2"]),
        helper.make_node("Expand", ["s2", "target"], ["s3"]),
        helper.make_node("Div", ["e", "s3"], ["y"]),
    ], [tensor("x", ["N", 8])], [tensor("y", ["N", 5])],
        [init("w", rng.standard_normal((8, 5)).astype(f32)), init("axes", np.array([1], np.int64)),
         init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)),
         init("one32", np.array([1], np.int32)), init("low", np.array(-1e30, f32))])


@pytest.mark.parametrize("symbolic, probed", [(True, True), (False, True), (False, False)])
def test_a_softmax_with_computed_shapes_trains_or_says_why(monkeypatch, symbolic, probed):
    """With symbolic shapes the broadcast gradients reduce to [N, 1] and the layer trains; without
    them onnxruntime fails inside TrainStep ("Reshape_Grad ... cannot be reshaped"): in the child's
    first step, or (probe skipped) in the training loop itself; either returns the input
    unchanged with that reason instead of crashing."""
    from onnxzip.train import _artifacts

    rng = np.random.default_rng(0)
    teacher = _computed_shape_softmax(rng)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    w = numpy_helper.to_array(student.graph.initializer[0])
    student.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        (w + 0.5 * rng.standard_normal(w.shape)).astype(np.float32), "w"))
    generate = _artifacts.generate
    forced = {**({} if symbolic else {"symbolic": False}), **({} if probed else {"probe": None})}
    monkeypatch.setattr(_artifacts, "generate", lambda *a, **k: generate(*a, **{**k, **forced}))
    x = rng.standard_normal((96, 8)).astype(np.float32)
    val = rng.standard_normal((48, 8)).astype(np.float32)
    result = finetune(student, {"x": x}, val={"x": val}, teacher=teacher,
                      config={"epochs": 3, "lr": 0.02, "patience": 0}, device="cpu", progress=False)
    expected = _outputs(teacher, {"x": val})["y"]
    before = np.mean((_outputs(student, {"x": val})["y"] - expected) ** 2)
    after = np.mean((_outputs(result.model, {"x": val})["y"] - expected) ** 2)
    if symbolic:
        assert result.trained == ["w"] and after < 0.7 * before
    else:
        where = "failed in its first training step" if probed else "failed in a training step"
        assert result.trained == [] and where in result.frozen["w"]
        assert "cannot be reshaped" in result.frozen["w"] and after == before


def test_an_output_without_a_sample_axis_is_left_out_of_the_distillation_with_a_note():
    """y[N, 3] = x·w and total[3] = Σ_N y (one value for all the samples of a run, like the final
    state of a whole sequence): total has no per-sample target; y trains alone, and the notes say so."""
    rng = np.random.default_rng(2)
    f32 = np.float32
    teacher = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
                          helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0)],
                         [tensor("x", ["N", 4])], [tensor("y", ["N", 3]), tensor("total", [3])],
                         [init("w", rng.standard_normal((4, 3)).astype(f32)), init("axes", np.array([0], np.int64))])
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    w = numpy_helper.to_array(student.graph.initializer[0])
    student.graph.initializer[0].CopyFrom(numpy_helper.from_array((w + 0.3 * rng.standard_normal(w.shape)).astype(f32), "w"))
    x, val = rng.standard_normal((64, 4)).astype(f32), rng.standard_normal((32, 4)).astype(f32)
    result = finetune(student, {"x": x}, val={"x": val}, teacher=teacher,
                      config={"epochs": 3, "lr": 0.05, "patience": 0}, device="cpu", progress=False)
    assert result.losses[0] == "mse(y)/var" and "total" not in " ".join(result.losses) and result.trained == ["w"]
    assert any(note.startswith("not distilled: total") for note in result.notes)
    expected = _outputs(teacher, {"x": val})["y"]
    before = np.mean((_outputs(student, {"x": val})["y"] - expected) ** 2)
    assert np.mean((_outputs(result.model, {"x": val})["y"] - expected) ** 2) < 0.5 * before


def test_the_first_training_step_runs_in_a_child_and_a_death_there_returns_the_input(monkeypatch):
    """A graph the generator accepts can still die in onnxruntime's first TrainStep (signal 11 on
    a PaddlePaddle classifier): the generating child runs that step, so a native crash there (here
    the test hook kills it with SIGSEGV) freezes every weight with the reason and returns the
    input; this process lives on."""
    from onnxzip.train import _artifacts

    rng = np.random.default_rng(0)
    teacher = _computed_shape_softmax(rng)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    monkeypatch.setenv(_artifacts.FAULT_HOOK, "segv")
    result = finetune(student, {"x": x}, teacher=teacher, config={"epochs": 1}, device="cpu", progress=False)
    assert result.trained == [] and "died in its first training step (signal 11)" in result.frozen["w"]
    assert result.notes[0].startswith("Nothing can train")
    assert onnx.helper.printable_graph(result.model.graph) == onnx.helper.printable_graph(student.graph)


def test_a_weight_far_smaller_than_the_learning_rate_steps_at_max_step_of_its_rms():
    # y = (x @ W) * s with s of RMS ~1e-3 (a BN-folded scale): Adam's first step moves every value by
    # about lr = 1e-2, i.e. s by ten times itself; max_step scales s's steps to 5% of its RMS, W's stay
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    s = (1e-3 * rng.uniform(0.5, 1.5, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])],
                       [tensor("x", ["N", 8])], [tensor("y", ["N", 3])], [init("w", w), init("s", s)])
    x = rng.standard_normal((16, 8)).astype(np.float32)
    references = rng.standard_normal((16, 3)).astype(np.float32)
    lr = 1e-2
    config = {"epochs": 1, "schedule": "constant", "warmup": 0, "lr": lr, "batch_size": 16, "patience": 0,
              "keep": "last"}
    moved = {}
    for max_step in (0.05, 0.0):
        result = finetune(model, {"x": x, "references": references}, device="cpu", progress=False,
                          config={**config, "max_step": max_step})
        trained = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
        moved[max_step] = {name: np.abs(trained[name] - value) for name, value in (("w", w), ("s", s))}
        assert sorted(result.trained) == ["s", "w"]
        assert any(n.startswith("max_step: 1 weights") for n in result.notes) == (max_step > 0)
        assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Mul"]  # no trace in the output
    rms = float(np.sqrt(np.mean(s.astype(np.float64) ** 2)))
    # one Adam step moves a value by at most about the learning rate (less where the gradient is near eps)
    assert 0.25 * 0.05 * rms < moved[0.05]["s"].max() <= 1.02 * 0.05 * rms  # 2.5-5% of its RMS (a power of two)
    assert 0.9 * lr < moved[0.0]["s"].max() <= 1.02 * lr  # without: lr, ten times s itself
    assert 0.5 * lr < moved[0.0]["w"].max() <= 1.02 * lr  # W (RMS ~1) steps at lr either way
    np.testing.assert_allclose(moved[0.05]["w"], moved[0.0]["w"], rtol=1e-5, atol=1e-9)


def test_symbolic_spatial_dims_take_the_datas_sizes_so_chained_maxpools_train():
    # YOLOv8's SPPF (nudenet): MaxPools chained and concatenated; with symbolic height and width,
    # onnxruntime-training died in the first step (signal 11) and nothing trained
    rng = np.random.default_rng(0)
    pool = {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]}
    model = make_model(
        [helper.make_node("Conv", ["x", "k1"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["a"], ["m1"], **pool), helper.make_node("MaxPool", ["m1"], ["m2"], **pool),
         helper.make_node("MaxPool", ["m2"], ["m3"], **pool),
         helper.make_node("Concat", ["a", "m1", "m2", "m3"], ["c"], axis=1), helper.make_node("Conv", ["c", "k2"], ["y"])],
        [tensor("x", ["N", 2, "H", "W"])], [tensor("y", ["N", 3, "H", "W"])],
        [init("k1", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
         init("k2", rng.standard_normal((3, 16, 1, 1)).astype(np.float32))])
    x = rng.standard_normal((24, 2, 10, 10)).astype(np.float32)
    result = finetune(model, {"x": x}, teacher=model, device="cpu", progress=False, config={"epochs": 1})
    assert sorted(result.trained) == ["k1", "k2"] and not result.frozen
    assert any(n.startswith("the training graph takes the data's sizes for x[2]=10, x[3]=10") for n in result.notes)
    dims = [d.dim_param or d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 2, "H", "W"]  # the written model keeps its symbolic dims
