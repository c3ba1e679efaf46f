"""Reference models: accuracy in onnxruntime, graph form, dynamic batch, torch parity, cache.

The first run on a machine trains the models (a few minutes on 2 CPU cores); later runs read the
shared cache (``$ONNXZIP_CACHE/models``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from torch import nn

from onnxzip.errors import ConfigError
from onnxzip.models import zoo
from onnxzip.models.data import Splits
from onnxzip.models.train import TrainConfig, fit_classifier, predict
from onnxzip.core.runtime import make_session, run_session

MIN_ACCURACY = {"cnn": 0.95, "transformer": 0.93}


@pytest.fixture(scope="session", params=sorted(MIN_ACCURACY))
def reference(request) -> zoo.ReferenceModel:
    return zoo.get_reference_model(request.param)


@pytest.fixture(scope="session")
def folded_cnn() -> zoo.ReferenceModel:
    return zoo.get_reference_model("cnn", folded=True)


def _ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


def test_onnxruntime_accuracy_matches_torch(reference: zoo.ReferenceModel) -> None:
    accuracy = reference.accuracy(reference.onnx_path)
    assert accuracy > MIN_ACCURACY[reference.name]
    assert accuracy == pytest.approx(reference.metrics["test_accuracy"], abs=1 / 360)
    assert reference.test_inputs.dtype == np.float32 and reference.test_labels.dtype == np.int64
    assert len(reference.test_labels) == 360 and len(reference.train_labels) == 1437


def test_graph_form(reference: zoo.ReferenceModel, folded_cnn: zoo.ReferenceModel) -> None:
    model = onnx.load(reference.onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    ops = _ops(reference.onnx_path)
    if reference.name == "cnn":
        assert ops.count("BatchNormalization") == 15 and ops.count("Conv") == 15
        folded_ops = _ops(folded_cnn.onnx_path)
        assert "BatchNormalization" not in folded_ops and folded_ops.count("Conv") == 15
        assert folded_cnn.accuracy(folded_cnn.onnx_path) == pytest.approx(
            reference.accuracy(reference.onnx_path), abs=1 / 360
        )
    else:
        # 4 layers × (q, k, v, out, 2 FFN, 2 attention products) + embedding; no fused attention.
        assert ops.count("MatMul") == 4 * 8 + 1 and "Attention" not in ops


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_and_torch_parity(reference: zoo.ReferenceModel, batch: int) -> None:
    inputs = reference.test_inputs[:batch]
    session = make_session(reference.onnx_path, "cpu")
    (output,) = run_session(session, {reference.input_name: inputs}).values()
    expected = predict(zoo.load_reference_module(reference.name), inputs)
    assert output.shape == (batch, 10)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_unknown_name_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown reference model"):
        zoo.get_reference_model("resnet-9000")


def test_cache_key_is_stable_and_tracks_the_config(monkeypatch) -> None:
    assert zoo.cache_key("cnn") == zoo.cache_key("cnn") != zoo.cache_key("transformer")
    before = zoo.cache_key("cnn")
    spec = zoo.REFERENCE_MODELS["cnn"]
    reseeded = dataclasses.replace(spec, config=dataclasses.replace(spec.config, seed=1))
    monkeypatch.setitem(zoo.REFERENCE_MODELS, "cnn", reseeded)
    assert zoo.cache_key("cnn") != before


def _tiny_data() -> Splits:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((40, 4)).astype(np.float32)
    labels = (inputs[:, 0] > 0).astype(np.int64)
    return Splits(inputs[:32], labels[:32], inputs[32:], labels[32:])


def test_trains_once_then_reads_the_cache(monkeypatch, tmp_path) -> None:
    runs = []

    def counting_fit(*args, **kwargs) -> dict[str, float]:
        runs.append(1)
        return fit_classifier(*args, **kwargs)

    config = TrainConfig(epochs=2, learning_rate=1e-2, weight_decay=0.0)
    spec = zoo.ReferenceSpec(lambda: nn.Linear(4, 2), _tiny_data, config, counting_fit)
    monkeypatch.setitem(zoo.REFERENCE_MODELS, "tiny", spec)
    first = zoo.get_reference_model("tiny", cache_dir=tmp_path)
    second = zoo.get_reference_model("tiny", cache_dir=tmp_path)
    assert len(runs) == 1 and (first.onnx_path, first.metrics) == (second.onnx_path, second.metrics)
    assert first.onnx_path.parent.parent == tmp_path and first.torch_state_path.exists()
    reloaded = zoo.load_reference_module("tiny", cache_dir=tmp_path)
    assert isinstance(reloaded, nn.Linear) and not reloaded.training
    zoo.get_reference_model("tiny", cache_dir=tmp_path, retrain=True)
    assert len(runs) == 2 and first.onnx_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.onnx_path.parent.name]


def test_sparse_cnn_survives_pruning_half_its_channels_by_bn_gamma() -> None:
    """L1 on BN γ (``cnn-sparse``) is what makes BN-|γ| pruning safe: removing half of the
    channels (ranked globally) keeps ≥ 95% test accuracy, while the plain CNN collapses."""
    from onnxzip.passes import PassContext, get_pass

    results = {}
    for name in ("cnn", "cnn-sparse"):
        reference = zoo.get_reference_model(name)
        pruned = get_pass("prune-channels")(ratio=0.5).run(onnx.load(reference.onnx_path), PassContext())
        results[name] = reference.accuracy(pruned.model, device="cpu")
    sparse = zoo.get_reference_model("cnn-sparse")
    assert sparse.accuracy(sparse.onnx_path, device="cpu") > 0.98
    assert results["cnn-sparse"] > 0.95 > 0.5 > results["cnn"]


def test_train_all_covers_every_reference_model_the_readme_lists(capsys) -> None:
    """``python -m onnxzip.models.train all`` reaches all five models; the denoiser (the quickest
    to build) reports its held-out PSNR through it."""
    from pathlib import Path

    from onnxzip.models.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for name in ("cnn", "cnn-sparse", "transformer", "speech", "denoise"):
        assert name in usage
        assert f"`{name}`" in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert main(["denoise", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("denoise: ") and "denoised_psnr" in line and line.endswith("model.onnx")
