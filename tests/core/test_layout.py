"""The data layout rule (which axis holds the samples) and the one batched runner, on graphs
laid out like real deployment files: a state ``[layers, batch, hidden]``, a scalar sample
rate, a fixed batch of 1, an output with the batch on axis 1."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import load_fuzz, make_model, tensor
from onnx import helper

from onnxzip.errors import DataError
from onnxzip.evaluators.data import model_dataset
from onnxzip.core.inputs import Samples, infer_sample_axes, parse_sample_axes, samples_from
from onnxzip.core.runtime import make_session, run_samples, run_session


def _stateful(batch: int | str = "batch") -> onnx.ModelProto:
    """The fuzzer's stateful model: x[batch, 8], state[2, batch, 8], a scalar int64 sr → y[batch, 4]
    and state_out[2, batch, 8]."""
    return onnx.load_from_string(load_fuzz().stateful(batch))


def _data(count: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((count, 8)).astype(np.float32),
            "state": rng.standard_normal((2, count, 8)).astype(np.float32),
            "sr": np.array(16000, np.int64)}


def _one_by_one(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(model, "cpu")
    rows = [run_session(session, {"x": data["x"][i:i + 1], "state": data["state"][:, i:i + 1], "sr": data["sr"]})
            for i in range(len(data["x"]))]
    return {"y": np.concatenate([r["y"] for r in rows]), "state_out": np.concatenate([r["state_out"] for r in rows], 1)}


def test_rule_finds_the_batch_axis_of_a_state_and_shares_a_scalar() -> None:
    samples = samples_from(_stateful(), _data())
    assert samples.axes == {"x": 0, "state": 1, "sr": None}
    assert samples.count == 5
    assert samples.take([1, 3])["state"].shape == (2, 2, 8)
    assert samples.take([1, 3])["sr"].shape == ()


def test_rule_on_a_fixed_batch_of_one_and_its_errors() -> None:
    shapes = {"a": (1, 1, 257), "s": (1, 2, 128, 2)}
    axes, count = infer_sample_axes(shapes, {"a": np.zeros((7, 1, 257)), "s": np.zeros((7, 2, 128, 2))})
    assert (axes, count) == ({"a": 0, "s": 0}, 7)
    axes, count = infer_sample_axes(shapes, {"a": np.zeros((7, 1, 257)), "s": np.zeros((1, 2, 128, 2))})
    assert (axes, count) == ({"a": 0, "s": None}, 7)  # one state for every sample
    with pytest.raises(DataError, match="different numbers of samples"):
        infer_sample_axes(shapes, {"a": np.zeros((7, 1, 257)), "s": np.zeros((3, 2, 128, 2))})
    with pytest.raises(DataError, match="expects size 257 on axis 2"):
        infer_sample_axes(shapes, {"a": np.zeros((7, 1, 256)), "s": np.zeros((7, 2, 128, 2))})
    with pytest.raises(DataError, match="expects 3 dimensions"):
        infer_sample_axes(shapes, {"a": np.zeros((7, 257)), "s": np.zeros((7, 2, 128, 2))})
    assert infer_sample_axes({"t": ("p", "q")}, {"t": np.zeros((3, 4))}) == ({"t": 0}, 3)  # axis 0 by convention
    with pytest.raises(DataError, match="--sample-axis t=K"):
        infer_sample_axes({"t": (2, "p", "q")}, {"t": np.zeros((2, 3, 4))})
    assert infer_sample_axes({"t": (2, "p", "q")}, {"t": np.zeros((2, 3, 4))}, {"t": 2}) == ({"t": 2}, 4)
    with pytest.raises(DataError, match="no samples"):
        infer_sample_axes({"t": ("batch", 4)}, {"t": np.zeros((0, 4))})
    assert parse_sample_axes("state=1, sr=none") == {"state": 1, "sr": None}
    with pytest.raises(DataError, match="integer"):
        parse_sample_axes("state=x")


def test_run_samples_matches_one_sample_at_a_time() -> None:
    model, data = _stateful(), _data(5)
    expected = _one_by_one(model, data)
    for batch_size in (None, 2):
        outputs, axes = run_samples(make_session(model, "cpu"), samples_from(model, data), batch_size)
        assert axes == {"y": 0, "state_out": 1}
        for name in expected:
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


def test_fixed_batch_of_one_runs_any_number_of_samples() -> None:
    model = _stateful(batch=1)
    data = _data(3)
    outputs, axes = run_samples(make_session(model, "cpu"), samples_from(model, data))
    assert axes == {"y": 0, "state_out": 1}
    expected = _one_by_one(model, data)
    for name in expected:
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


def test_output_with_the_batch_on_axis_one_joins_on_axis_one() -> None:
    """x[batch, 3, 4] → Transpose → y[3, batch, 4], at a fixed batch of 2 with 5 samples."""
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])],
                       [tensor("x", [2, 3, 4])], [tensor("y", [3, "batch", 4])])
    x = np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 4)
    outputs, axes = run_samples(make_session(model, "cpu"), {"x": x})
    assert axes == {"y": 1}
    np.testing.assert_array_equal(outputs["y"], x.transpose(1, 0, 2))


def test_dataset_items_follow_the_layout() -> None:
    from onnxzip.evaluators import predict

    model, data = _stateful(), _data(4)
    dataset = model_dataset(model, data)
    assert dataset.inputs(2)["state"].shape == (2, 8)
    predictions = predict(model, dataset, progress=False)
    np.testing.assert_allclose(np.stack(predictions.items), _one_by_one(model, data)["y"], rtol=1e-5, atol=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxzip.cli", "-q", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("batch", ["batch", 1])
def test_compress_and_finetune_on_stateful_data(tmp_path, batch) -> None:
    """The automatic modes that once crashed on such files (the sweep of avg_bits fed every
    sample at once; fine-tuning read the batch on axis 0) run and say how the data was read."""
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_stateful(batch), model_path)
    np.savez(data_path, **_data(12))
    report = tmp_path / "r.json"
    done = _cli("compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--data", str(data_path),
                "--cluster", "avg_bits=4", "--finetune", "epochs=1", "--force", "--report", str(report))
    assert done.returncode == 0, done.stderr
    text = report.read_text()
    assert "samples on axis 1" in text and "state inputs state" in text
    tuned = _cli("finetune", str(model_path), "-o", str(tmp_path / "f.onnx"), "--data", str(data_path),
                 "--teacher", str(model_path), "--epochs", "1")
    assert tuned.returncode in (0, 2), tuned.stderr
    assert "Traceback" not in tuned.stderr


def test_ambiguous_layout_is_one_sentence_and_the_flag_settles_it(tmp_path) -> None:
    model = make_model([helper.make_node("Relu", ["t"], ["y"])], [tensor("t", [2, "p", "q"])],
                       [tensor("y", [2, "p", "q"])])
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, model_path)
    np.savez(data_path, t=np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32))
    out = tmp_path / "o.onnx"
    done = _cli("compress", str(model_path), "-o", str(out), "--data", str(data_path))
    assert done.returncode == 2
    assert "--sample-axis t=K" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
    done = _cli("compress", str(model_path), "-o", str(out), "--data", str(data_path), "--sample-axis", "t=2")
    assert done.returncode == 0, done.stderr


def test_samples_is_a_mapping_of_feeds() -> None:
    samples = Samples({"x": np.zeros((3, 2))}, {"x": 0}, 3, labels=np.arange(3))
    assert dict(samples).keys() == {"x"}
    assert samples.take(slice(1, 3)).labels.tolist() == [1, 2]
    with pytest.raises(DataError, match="2 labels for 3 samples"):
        Samples({"x": np.zeros((3, 2))}, {"x": 0}, 3, labels=np.arange(2))



def test_an_ambiguous_output_axis_follows_a_mirrored_input_or_the_last_chunk() -> None:
    """Where onnxruntime knows no output shape (silero-vad's stateN behind an If) and the chunk's
    size also sizes another axis (chunks of 2 samples, state [2, batch, 128]): an output shaped
    like a sampled input takes that input's axis; otherwise the shorter last chunk settles it."""
    from onnxzip.core.runtime import _joined_axis, _output_axis

    assert _output_axis(None, (2, 2, 8), 2, set()) == 0  # what it said before: the first matching axis
    assert _output_axis(None, (2, 2, 8), 2, set(), [((2, 8), 0), ((2, 2, 8), 1)]) == 1
    assert _output_axis(None, (2, 2), 2, set(), [((2, 8), 0)]) == 0
    chunks = [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 1))]
    assert _joined_axis("y", chunks, 0) == 1
    assert _joined_axis("y", chunks, 1) == 1
    assert _joined_axis("y", chunks[:2], 0) == 0
    with pytest.raises(DataError, match="changes shape between runs"):
        _joined_axis("y", [np.zeros((2, 2)), np.zeros((3, 1))], 0)
