from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, init, make_model, mlp, tensor
from onnx import helper

from onnxzip.errors import InvalidModelError, UnsupportedModelError
from onnxzip.core.io import load_model, save_model


def test_roundtrip_preserves_metadata_and_lowers_ir(tmp_path):
    model = mlp()
    model.ir_version = 13  # what a new onnx stamps; onnxruntime 1.19 refuses it
    model.producer_name = "exporter"
    model.doc_string = "doc"
    model.metadata_props.add(key="labels", value="a,b,c,d")
    path = save_model(model, tmp_path / "m.onnx")
    loaded = onnx.load(path)
    assert loaded.ir_version == 8  # lowest IR for opset 17
    assert model.ir_version == 13  # the caller's object is untouched
    assert loaded.producer_name == "exporter" and loaded.doc_string == "doc"
    assert {p.key: p.value for p in loaded.metadata_props} == {"labels": "a,b,c,d"}
    assert [i.name for i in loaded.graph.input] == ["x"] and [o.name for o in loaded.graph.output] == ["y"]
    assert_same_outputs(model, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging leftovers


def _wide_model():
    rng = np.random.default_rng(0)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 64])],
                      [tensor("y", ["N", 64])], [init("w", rng.standard_normal((64, 64)).astype(np.float32))])


def test_external_data_roundtrip(tmp_path):
    model = _wide_model()
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    assert_same_outputs(model, load_model(path))


def test_missing_external_data_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXZIP_RECORD_WRITES", raising=False)  # damaged on purpose below
    path = save_model(_wide_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InvalidModelError, match="external data file 'm.onnx.data'.*missing"):
        load_model(path)


@pytest.mark.parametrize(
    "content, message",
    [(b"not an onnx file at all", "not an ONNX model"), (b"", "empty")],
)
def test_not_onnx(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=message):
        load_model(path)


def test_truncated(tmp_path):
    data = mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError):
        load_model(path)


def test_directory_and_missing(tmp_path):
    with pytest.raises(InvalidModelError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(InvalidModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_opset_too_new_and_unknown_op(caplog):
    """Opset 22/23 files whose ops all have an opset-21 form are converted down (what onnxruntime
    1.19 loads), said on stderr and in compress's report; one using an op new in 23 is refused."""
    new = mlp()
    new.opset_import[0].version = 23
    loaded = load_model(new)
    assert loaded.opset_import[0].version == 21 and new.opset_import[0].version == 23
    assert any("converted from ONNX opset 23 to 21" in r.getMessage() for r in caplog.records)
    assert_same_outputs(mlp(), loaded, atol=0)
    from onnxzip.api import compress

    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    result = compress(new, data={"x": x}, cluster={"bits": 6})
    assert result.report.notes[0].startswith("converted from ONNX opset 23 to 21")
    assert result.model.opset_import[0].version == 21
    assert not any(p.key.startswith("onnxzip") for p in result.model.metadata_props)
    attention = make_model(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)],
        [tensor("q", [1, 4, 8]), tensor("k", [1, 4, 8]), tensor("v", [1, 4, 8])], [tensor("y", [1, 4, 8])], opset=23)
    with pytest.raises(UnsupportedModelError, match="opset 23.*at most opset 21.*Attention.*re-export"):
        load_model(attention)
    unknown = make_model([helper.make_node("FancyOp", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    with pytest.raises(UnsupportedModelError, match="FancyOp"):
        load_model(unknown)


def test_int4_weights_need_ir10(tmp_path):
    model = make_model(
        [helper.make_node("Cast", ["q"], ["qf"], to=onnx.TensorProto.FLOAT), helper.make_node("Add", ["x", "qf"], ["y"])],
        [tensor("x", [4])], [tensor("y", [4])],
        [helper.make_tensor("q", onnx.TensorProto.INT4, [4], [1, -2, 3, -4])], opset=21,
    )
    assert onnx.load(save_model(model, tmp_path / "m.onnx")).ir_version == 10


def test_large_models_switch_to_external_data_automatically(tmp_path, monkeypatch):
    import onnxzip.core.io as io_module

    monkeypatch.setattr(io_module, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stands in for ~2 GB
    model = _wide_model()  # 16 kB of weights
    path = save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 64 * 4
    assert path.stat().st_size < 10_000
    assert_same_outputs(model, load_model(path))


def test_compress_result_reports_size_on_disk(tmp_path):
    from onnxzip.api import compress

    result = compress(_wide_model(), identity=True)
    path = result.save(tmp_path / "out.onnx", external_data=True)
    on_disk = path.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    assert result.report.after.bytes == on_disk
