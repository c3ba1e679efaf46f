"""Malformed models are refused with one sentence naming the problem, and a native onnxruntime
crash happens in a child process, not in ours."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from helpers import init, make_model, mlp, tensor
from onnx import TensorProto, helper

from onnxzip.cli import main
from onnxzip.errors import InvalidModelError, NativeCrashError
from onnxzip.core.io import load_model
from onnxzip.core.sanity import probe_feeds, probe_in_child


def conv(**attributes) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes)
    return make_model([node], [tensor("x", ["N", 2, 8, 8])], [tensor("y", ["N", 4, "h", "w"])],
                      [init("w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32))])


def _refused(model: onnx.ModelProto, fragment: str) -> str:
    with pytest.raises(InvalidModelError) as info:
        load_model(model)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    return message


def test_initializer_dims_inconsistent_with_raw_data():
    model = mlp()
    model.graph.initializer[1].dims[0] = 32  # b1 holds 16 floats: the checker sees too few bytes
    _refused(model, "tensor name: b1")
    model = mlp()
    model.graph.initializer[1].dims[0] = 8  # too many bytes: the checker lets it through
    assert _refused(model, "initializer 'b1'") == (
        "the model has initializer 'b1' whose shape [8] needs 32 bytes but it holds 64.")


def test_raw_data_length_dtype_and_negative_dims():
    model = mlp()
    model.graph.initializer[0].raw_data += b"\0\0\0"
    _refused(model, "needs 512 bytes but it holds 515")
    model = mlp()
    model.graph.initializer[0].data_type = 99
    _refused(model, "99")
    model = mlp()
    model.graph.initializer[0].data_type = TensorProto.FLOAT16  # same bytes, twice the elements
    _refused(model, "needs 256 bytes but it holds 512")
    model = mlp()
    model.graph.initializer[0].dims[0] = -8
    _refused(model, "w1")
    weights = mlp()
    weights.graph.initializer[0].ClearField("raw_data")
    weights.graph.initializer[0].float_data.extend([1.0] * 130)
    _refused(weights, "needs 128 values but it holds 130")


def test_no_outputs_and_bad_utf8():
    model = mlp()
    del model.graph.output[:]
    _refused(model, "declares no graph outputs")
    data = mlp().SerializeToString().replace(b"relu", b"\xff\xfe\xfd\xfc")
    with pytest.raises(InvalidModelError, match="not valid UTF-8 .*node.*name"):
        load_model(data)


@pytest.mark.parametrize(("attributes", "fragment"), [
    ({"strides": [0, 0]}, "strides=[0, 0]"),
    ({"strides": [1]}, "2 spatial axes expected"),
    ({"dilations": [0, 1]}, "dilations=[0, 1]"),
    ({"group": 0}, "group=[0]"),
    ({"kernel_shape": [3, 3, 3]}, "kernel_shape=[3, 3, 3]"),
    ({"pads": [-1, 0, 0, 0]}, "must not be negative"),
    ({"pads": [1, 1, 1, 1, 1, 1]}, "4 entries expected"),
])
def test_conv_attributes_out_of_range(attributes, fragment):
    message = _refused(conv(**attributes), fragment)
    assert "node 'conv' (Conv)" in message
    load_model(conv(strides=[2, 2], pads=[1, 1, 1, 1]))  # in range: accepted


def test_native_crash_is_reported_from_the_child_process():
    model = conv(strides=[0, 0])  # onnxruntime's Conv kernel divides by the stride: SIGFPE
    feeds = {"x": np.ones((1, 2, 8, 8), np.float32)}
    with pytest.raises(NativeCrashError) as info:
        probe_in_child(model, feeds)
    assert str(info.value) == "onnxruntime crashed while running the model (signal 8)."
    assert probe_in_child(conv(), feeds) > 0  # a sound model passes


def test_probe_reports_load_and_run_errors_in_one_sentence():
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=7)], [tensor("x", ["N", 4])],
                       [tensor("y", ["N", 4])])
    with pytest.raises(InvalidModelError, match=r"^onnxruntime could not load the model: .*axis.*\.$"):
        probe_in_child(model, None)
    flat = make_model([helper.make_node("Flatten", ["x"], ["f"], axis=0),
                       helper.make_node("MatMul", ["f", "w"], ["y"])],
                      [tensor("x", ["N", 4])], [tensor("y", ["M", 3])], [init("w", np.ones((4, 3), np.float32))])
    x = np.ones((2, 4), np.float32)
    probe_in_child(flat, {"x": x[:1]})  # batch 1 runs
    with pytest.raises(InvalidModelError, match=r"^onnxruntime could not run the model: "):
        probe_in_child(flat, probe_feeds(flat, {"x": x}))  # batch 2 does not


def test_probe_feeds_cover_batch_one_and_two_or_the_fixed_batch():
    x = np.zeros((16, 8), np.float32)
    assert [f["x"].shape for f in probe_feeds(mlp(), {"x": x})] == [(1, 8), (2, 8)]
    fixed = copy.deepcopy(mlp())
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert [f["x"].shape for f in probe_feeds(fixed, {"x": x})] == [(4, 8)]


def test_cli_exit_2_one_line_and_no_output_for_a_crashing_model(tmp_path, capsys):
    source = tmp_path / "crash.onnx"
    source.write_bytes(conv(group=0).SerializeToString())
    before = source.read_bytes()
    out = tmp_path / "out" / "small.onnx"
    for argv in (["inspect", str(source)], ["compress", str(source), "-o", str(out), "--cluster", "bits=4", "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"onnxzip: error: {source} has node 'conv' (Conv) with group=[0] (it must be a positive integer)."]
    assert not out.parent.exists() or not list(out.parent.iterdir())
    assert source.read_bytes() == before
