"""Deployment-like files, first try (issue 9): dynamic dims named or not, a fixed batch of 1,
weights in Constant nodes and nested If branches, wrong declared outputs, IR 6 / opset 12."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxzip.api import compress
from onnxzip.errors import ConfigError, DataError
from onnxzip.passes import PassContext
from onnxzip.passes.cleanup import CleanupPass
from onnxzip.passes.base import Pass
from onnxzip.core.runtime import make_session, run_batched, run_session
from onnxzip.core.shapes import generated_feeds, parse_input_shape, resolve_input_shapes
from deployment import speech_model, vision_model
from helpers import init, make_model, tensor


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxzip.cli", "-q", *argv], capture_output=True, text=True)


def _runs(path) -> dict[str, np.ndarray]:
    """The written model loads and runs in onnxruntime on inputs at its resolved sizes."""
    model = onnx.load(path)
    onnx.checker.check_model(model)
    feeds, _ = generated_feeds(model, batch=1)
    return run_session(make_session(model, "cpu"), feeds)


def test_dynamic_dims_named_and_unnamed_get_sizes_onnxruntime_accepts():
    vision = resolve_input_shapes(vision_model())
    # axis 0 unnamed → batch 2; axes 2/3 ('?' and no name) are conv spatial: 64 fails the
    # Reshape[0, 2048], 32 runs.
    assert vision.shapes == {"x": (2, 3, 32, 32)} and vision.probed and vision.attempts == 2
    assert "'x' axis 2=32" in vision.describe() and "batch=2" in vision.describe()
    speech = resolve_input_shapes(speech_model())
    assert speech.shapes == {"input1": (1, 1, 64, 16)} and speech.chosen == {"T": 16}
    given = resolve_input_shapes(vision_model(), input_shapes={"x": "1,3,32,32"})
    assert given.shapes == {"x": (1, 3, 32, 32)} and not given.chosen
    assert resolve_input_shapes(speech_model(), dims={"T": 40}).shapes == {"input1": (1, 1, 64, 40)}


def test_input_shape_option_is_checked():
    assert parse_input_shape("x=1,3,224,224") == ("x", (1, 3, 224, 224))
    for bad in ("x", "x=", "x=1,0", "=1,2", "x=1,a"):
        with pytest.raises(ConfigError):
            parse_input_shape(bad)
    with pytest.raises(ConfigError, match="not an input"):
        resolve_input_shapes(vision_model(), input_shapes={"y": [1, 3, 32, 32]})
    with pytest.raises(ConfigError, match="rank 4"):
        resolve_input_shapes(vision_model(), input_shapes={"x": [1, 3, 32]})


def _unguessable() -> onnx.ModelProto:
    """x[N, L] @ W[77, 64]: only L = 77 runs, a size no hint names."""
    rng = np.random.default_rng(0)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [tensor("x", ["N", "L"])],
                      [tensor("y", ["N", 64])], [init("w", rng.standard_normal((77, 64)).astype(np.float32))])


def test_weight_only_plan_needs_no_run_and_other_plans_say_what_to_give():
    model = _unguessable()
    result = compress(model, cluster={"bits": 4})
    assert result.validation is None and any("fidelity not checked" in n for n in result.report.notes)
    assert result.model.ByteSize() < model.ByteSize()
    with pytest.raises(DataError, match="--input-shape"):
        compress(model, svd={"rank": 8})
    given = compress(model, svd={"rank": 32}, input_shapes={"x": [2, 77]}, allow_gate_failure=True)
    assert given.validation is not None and given.validation.rows == 2


@pytest.mark.parametrize("build", [vision_model, speech_model])
def test_cluster_bits_4_works_with_no_other_flag(tmp_path, build):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(build(), source)
    before = source.read_bytes()
    result = _cli("compress", str(source), "-o", str(out), "--cluster", "bits=4")
    assert result.returncode == 0, result.stderr
    assert "generated inputs" in result.stdout and "note: inputs generated from the signature: dynamic dimensions set to" in result.stdout
    assert source.read_bytes() == before
    assert out.stat().st_size < source.stat().st_size / 3
    outputs = _runs(out)
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


def test_multi_sample_data_on_a_fixed_batch_of_1(tmp_path):
    source, out, data = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "data.npz"
    onnx.save(speech_model(), source)
    np.savez(data, input1=np.random.default_rng(1).standard_normal((16, 1, 64, 20)).astype(np.float32))
    result = _cli("compress", str(source), "-o", str(out), "--cluster", "bits=4", "--data", str(data),
                  "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert '"rows": 16' in (tmp_path / "r.json").read_text()
    assert out.stat().st_size < source.stat().st_size
    _runs(out)
    from onnxzip.api import validate

    report = validate(source, out, str(data))
    assert report.passed and report.rows == 16 and not report.generated


def test_run_batched_follows_a_fixed_batch_of_1_or_k():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    for k in (1, 2):
        model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [k, 4])], [tensor("y", [k, 3])],
                           [init("w", w)])
        x = rng.standard_normal((5, 4)).astype(np.float32)
        out = run_batched(make_session(model, "cpu"), {"x": x})["y"]
        np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
    dynamic = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
                         [init("w", w)])
    x = rng.standard_normal((7, 4)).astype(np.float32)
    np.testing.assert_allclose(run_batched(make_session(dynamic, "cpu"), {"x": x}, 3)["y"], x @ w, rtol=1e-5, atol=1e-5)


def test_wrong_output_declarations_become_valid_ones():
    for build, expected in ((speech_model, ["batch", "mask_dim1", "mask_dim2"]), (vision_model, [1, "logits_dim1"])):
        model = build()
        feeds, _ = generated_feeds(model)
        result = CleanupPass().run(model, PassContext(feeds=feeds, device="cpu"))
        onnx.checker.check_model(result.model)
        dims = result.model.graph.output[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == expected
        make_session(result.model, "cpu")
    fixed = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 6])], [tensor("y", [1, 5])])
    feeds, _ = generated_feeds(fixed)
    result = CleanupPass().run(fixed, PassContext(feeds=feeds, device="cpu"))
    assert [d.dim_param or d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim] == [1, 6]


def test_svd_budget_on_weights_repeated_in_nested_if_branches_does_not_grow_the_file():
    model = speech_model()
    result = compress(model, svd={"budget": 0.7})
    assert result.model.ByteSize() < model.ByteSize()
    assert any("duplicate weights once" in note for note in result.report.notes)
    # the factors the svd pass writes per branch are stored once too, so the rewrite is kept
    svd = result.report.passes[0]
    assert svd.bytes_after < svd.bytes_before and any(not c.skipped for c in svd.changes)
    # the three branch copies of the sliced weight are one initializer of the main graph
    assert sum(1 for t in result.model.graph.initializer if t.dims[-1:] == [64] and t.dims[:2] == [1, 128]) <= 1


class _Growing(Pass):
    name = "grow-test"
    config_class = object

    def __init__(self) -> None:  # no options
        self.config = None

    def config_dict(self):
        return {}

    def apply(self, model, plan, context):
        from onnxzip.passes.base import PassResult
        from onnxzip.core.report import LayerChange

        grown = onnx.ModelProto()
        grown.CopyFrom(model)
        grown.graph.initializer.append(init("padding", np.ones(1000, np.float32)))
        report = self.new_report()
        report.changes.append(LayerChange("fc", "MatMul", "rewritten"))
        report.modified = True
        return PassResult(grown, report, plan)


def test_a_rewrite_that_would_grow_the_file_is_skipped_with_the_reason():
    model = _unguessable()
    result = _Growing().run(model, PassContext(device="cpu"))
    assert result.model is model and not result.report.modified
    assert result.report.changes[0].skipped and "would not be smaller" in result.report.changes[0].reason


def test_per_channel_cluster_on_constant_node_weights_with_a_denormal_channel():
    """np.bincount crashed on negative bins: a channel spanning denormals overflowed the scale."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    weight[3] = 0.0
    weight[3, :, 0, 0] = np.float32(1e-45)
    const = helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(weight, "w_value"))
    model = make_model([const, helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 16, 8, 8])], [tensor("y", ["N", 8, 8, 8])], opset=13)
    result = compress(model, cluster={"bits": 4, "per_channel": True, "min_size": 16})
    assert result.report.passes[0].changes[0].details["per_channel"]
    make_session(result.model, "cpu")
    from onnxzip.cluster import cluster_weights

    huge = np.where(rng.random((16, 3, 3)) < 0.5, -3e38, 3e38).astype(np.float32)  # hi - lo overflows float32
    for values in (weight[3], huge):
        clustered = cluster_weights(values, 16)
        np.testing.assert_array_equal(clustered.decode(), values)  # 2 distinct values: exact


def test_inspect_counts_constant_node_weights_and_says_what_it_could_not_measure():
    from onnxzip.inspection import inspect_model

    info = inspect_model(vision_model())
    assert info.params == 32 * 27 + 32 * 32 * 9 + 32 + 2048 * 10
    assert info.flops > 0 and info.flops_unmeasured == 0
    assert any("'x' axis 2=32" in note for note in info.notes)
    speech = inspect_model(speech_model())
    assert speech.by_op_type["LSTM"]["flops"] > 0 and speech.by_op_type["LSTM"]["params"] == 3 * (128 * 64 + 128 * 32)
    unknown = inspect_model(_unguessable())
    assert unknown.flops_unmeasured == 1 and "not measured" in unknown.text()
    assert unknown.params == 77 * 64


def test_generated_inputs_are_named_in_the_gate_and_class_scores_gate_on_argmax():
    from onnxzip.evaluators.fidelity import FidelityGate, OutputFidelity, validate

    report = validate(vision_model(), vision_model())
    assert report.generated and "not real data" in report.table() and "'x' axis 2=32" in report.inputs
    flipped = OutputFidelity("logits", [2, 10], 0.1, 0.01, 0.999, argmax_agreement=0.5)
    assert any("argmax agreement" in f for f in FidelityGate().failures([flipped]))


def test_unnamed_dims_without_data_raise_a_named_error_only_when_nothing_runs():
    with pytest.raises(DataError, match="--input-shape"):
        resolve_input_shapes(_unguessable())
    bad = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])
    assert resolve_input_shapes(bad).shapes == {"x": (2, 4)}
