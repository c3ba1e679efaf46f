from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, init, make_model, mlp, tensor
from onnx import helper

from onnxzip.api import compress
from onnxzip.measure.cost import model_cost
from onnxzip.errors import ConfigError, QualityGateError
from onnxzip.passes import PASSES, PassContext, PipelinePlan, Plan, get_pass
from onnxzip.recipe import Recipe


def test_registry_has_foundation_passes():
    assert {"identity", "cleanup"} <= set(PASSES)
    with pytest.raises(ConfigError, match="Unknown pass 'nope'"):
        get_pass("nope")


def test_identity_pass_reports_every_layer_and_changes_nothing():
    model = mlp()
    result = get_pass("identity")().run(model, PassContext())
    assert result.model is model
    assert {c.layer for c in result.report.changes} == {"fc1", "add1", "fc2"}
    assert all(c.skipped and c.reason for c in result.report.changes)
    assert result.report.params_before == result.report.params_after == 8 * 16 + 16 + 4 * 16 + 4


def test_cleanup_removes_dead_code_and_fixes_wrong_output_shape():
    model = mlp()
    model.graph.node.append(helper.make_node("Relu", ["x"], ["dead"]))
    model.graph.initializer.append(init("unused", np.ones(100, np.float32)))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # wrong on purpose
    result = get_pass("cleanup")().run(model, PassContext())
    out = result.model
    assert "Relu" in [n.op_type for n in out.graph.node] and len(out.graph.node) == 4
    assert "unused" not in {t.name for t in out.graph.initializer}
    assert out.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    assert any("declared 7" in note for note in result.report.notes)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    assert_same_outputs(mlp(), out, feeds)


def test_cost_counts_matmul_gemm_conv_lstm():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("LSTM", ["seq", "lw", "lr"], ["ly"], hidden_size=5),
        ],
        [tensor("x", ["N", 3, 8, 8]), tensor("seq", [7, "N", 4])],
        [tensor("c", None), tensor("ly", None)],
        [init("w", np.ones((6, 3, 3, 3), np.float32)), init("b", np.ones(6, np.float32)),
         init("lw", np.ones((1, 20, 4), np.float32)), init("lr", np.ones((1, 20, 5), np.float32))],
    )
    by_node = {n.op_type: n for n in model_cost(model).nodes}
    assert by_node["Conv"].flops == 2 * 6 * 4 * 4 * 3 * 3 * 3  # output 4×4 at stride 2
    assert by_node["Conv"].params == 6 * 3 * 3 * 3 + 6
    assert by_node["LSTM"].flops == 2 * 7 * 20 * (4 + 5)
    assert model_cost(mlp()).flops == 2 * (8 * 16 + 16 * 4)


def test_plan_save_edit_replay(tmp_path):
    result = compress(mlp(), identity=True)
    path = tmp_path / "plan.json"
    result.plan.save(path)
    data = json.loads(path.read_text())
    assert [s["pass"] for s in data["steps"]] == ["identity", "cleanup"]
    replayed = compress(mlp(), plan=str(path))
    assert [r.pass_name for r in replayed.report.passes] == ["identity", "cleanup"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"onnxzip_plan": 1, "steps": [{"pass": "identity", "layers": [1]}]}')
    with pytest.raises(ConfigError, match="'layers' must map"):
        compress(mlp(), plan=str(bad))
    assert Plan.from_dict({"pass": "x", "layers": {"a": {"rank": 2}}}).layers == {"a": {"rank": 2}}
    assert PipelinePlan.load(path).steps[0].pass_name == "identity"


def test_recipe_yaml_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - identity\n  - cleanup: {shape_inference: true}\ngate: {min_cosine: 0.999}\n")
    recipe = Recipe.from_file(path)
    assert [s.name for s in recipe.passes] == ["identity", "cleanup"]
    assert recipe.build_passes()[1].config.shape_inference is True
    assert recipe.gate.min_cosine == 0.999
    path.write_text("passes:\n  - cleanup: {shape_inference: maybe}\n")
    with pytest.raises(ConfigError, match="shape_inference must be true or false"):
        Recipe.from_file(path)
    path.write_text("pases: []\n")
    with pytest.raises(ConfigError, match="unknown keys pases"):
        Recipe.from_file(path)


def test_gate_failure_raises_with_report():
    damaged = mlp()
    w = onnx.numpy_helper.to_array(damaged.graph.initializer[0])
    damaged.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(-w, "w1"))

    from dataclasses import dataclass

    from onnxzip.passes.base import Pass, PassResult, register_pass

    @dataclass
    class _Cfg:
        pass

    class Break(Pass):
        name = "test-break"
        config_class = _Cfg

        def apply(self, model, plan, context):
            return PassResult(damaged, self.new_report(), plan)

    register_pass(Break)
    try:
        with pytest.raises(QualityGateError, match="quality gate.*cosine") as info:
            compress(mlp(), test_break=True)
        assert info.value.report.validation.failures
        result = compress(mlp(), test_break=True, allow_gate_failure=True)
        assert not result.passed
    finally:
        PASSES.pop("test-break")


def test_a_step_whose_model_onnxruntime_cannot_run_is_skipped_and_said(caplog):
    """A pass that makes a valid-looking model onnxruntime refuses at run time (a Reshape to
    a size that does not fit) fails alone: the run goes on with its input, the report and
    stderr say which step and why, and the output equals the input."""
    from dataclasses import dataclass

    from onnxzip.passes.base import Pass, PassResult, register_pass

    broken = mlp()
    broken.graph.initializer.append(init("bad_shape", np.array([-1, 7], np.int64)))
    hidden = next(n for n in broken.graph.node if n.op_type == "Relu")
    old = hidden.output[0]
    hidden.output[0] = "relu_raw"
    broken.graph.node.insert(list(broken.graph.node).index(hidden) + 1,
                             helper.make_node("Reshape", ["relu_raw", "bad_shape"], [old], name="bad_view"))
    onnx.checker.check_model(broken)

    @dataclass
    class _Cfg:
        pass

    class Unrunnable(Pass):
        name = "test-unrunnable"
        config_class = _Cfg
        reduces_bytes = False

        def apply(self, model, plan, context):
            report = self.new_report()
            report.modified = True
            return PassResult(broken, report, plan)

    register_pass(Unrunnable)
    try:
        model = mlp()
        data = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
        result = compress(model, data=data, test_unrunnable=True)
        failed = result.report.passes[0]
        assert failed.pass_name == "test-unrunnable" and not failed.modified
        assert any("step 'test-unrunnable' failed" in note and "bad_view" in note and "input kept" in note
                   for note in failed.notes)
        assert any("step 'test-unrunnable' failed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        assert result.plan.steps[0].found["failed"]
        assert_same_outputs(model, result.model)
    finally:
        PASSES.pop("test-unrunnable")


def test_every_pass_keeps_model_metadata_and_io_names():
    rng = np.random.default_rng(3)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["h2"], name="relu"),
            helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 64])],
        [tensor("y", ["N", 32])],
        [init("w1", rng.standard_normal((64, 128)).astype(np.float32)),
         init("w2", rng.standard_normal((128, 32)).astype(np.float32))],
        producer_name="deploy-exporter",
        doc_string="model doc",
    )
    model.metadata_props.add(key="class_names", value="a;b;c")
    model.graph.doc_string = "graph doc"
    result = compress(
        model,
        {"passes": [{"svd": {"rank": 8, "min_size": 1}}, {"cluster": {"k": 16, "min_size": 1}}, "cleanup"],
         "gate": {"min_cosine": None, "min_argmax_agreement": None}},
    )
    out = result.model
    assert [p.pass_name for p in result.report.passes] == ["svd", "cluster", "cleanup"]
    assert any(not c.skipped for c in result.report.passes[0].changes)
    assert any(not c.skipped for c in result.report.passes[1].changes)
    assert {p.key: p.value for p in out.metadata_props} == {"class_names": "a;b;c"}
    assert out.producer_name == "deploy-exporter" and out.doc_string == "model doc"
    assert out.graph.doc_string == "graph doc"
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
