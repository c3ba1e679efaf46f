"""The finetune step in compress()/recipes and the ``onnxzip finetune`` command."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxzip.api import compress
from onnxzip.cli import main
from onnxzip.evaluators.metrics import cosine_similarity
from onnxzip.recipe import Recipe
from onnxzip.train.availability import training_available

from test_finetune import _bn_cnn, _ce, _digit_data  # noqa: E402 - shared hand-built graph

pytestmark = pytest.mark.skipif(not training_available(), reason="needs onnxruntime-training")


def test_compress_cluster_then_label_free_finetune_beats_untuned_on_the_reference_cnn():
    from onnxzip.models.zoo import get_reference_model

    reference = get_reference_model("cnn")
    data = {reference.input_name: np.asarray(reference.train_inputs[:256])}
    passes = [{"cluster": {"bits": 2}}]
    untuned = compress(reference.onnx_path, {"passes": passes}, data=data, check=False)
    tuned = compress(reference.onnx_path, {"passes": [*passes, {"finetune": {"epochs": 3, "lr": 1e-3, "batch_size": 16}}]},
                     data=data, check=False)
    step = tuned.report.passes[1]
    assert step.pass_name == "finetune" and step.modified
    assert any("mse(output)" in note for note in step.notes)  # distillation: the data has no labels
    assert any("indices" in (c.reason or "") for c in step.changes if c.skipped)
    # every BN trains in affine form, also those whose γ or statistics are decoded from codebooks
    assert "trainable rewrites (undone on export): BatchNormalization -> affine ×15" in step.notes
    original = reference.predict(reference.onnx_path)
    before, after = reference.predict(untuned.model), reference.predict(tuned.model)
    assert cosine_similarity(after, original) > cosine_similarity(before, original) + 0.05
    assert reference.accuracy(tuned.model) > reference.accuracy(untuned.model)
    # Codebook fine-tuning keeps the packed indices, so the file size stays the same.
    assert abs(tuned.model.ByteSize() - untuned.model.ByteSize()) < 64


def test_recipe_step_and_cli_flag_parse():
    recipe = Recipe.from_dict({"passes": [{"prune-channels": {"ratio": 0.5}}, {"finetune": {"epochs": 3, "lr": 1e-4}}]})
    step = recipe.build_passes()[1]
    assert step.name == "finetune" and step.config.epochs == 3 and step.config.lr == 1e-4
    with pytest.raises(Exception, match="finetune"):
        Recipe.from_dict({"passes": [{"finetune": {"epochz": 3}}]})


def test_finetune_command(tmp_path, capsys):
    rng = np.random.default_rng(5)
    model = _bn_cnn(rng)
    x, labels = _digit_data(rng, 320)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    np.savez(tmp_path / "train.npz", x=x, labels=labels)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    code = main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "train.npz"),
                 "--epochs", "2", "--lr", "0.02", "-q"])
    assert code == 0 and "trained 7 weights" in capsys.readouterr().out
    assert _ce(onnx.load(target), x, labels) < _ce(model, x, labels)
    assert main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "missing.npz")]) == 2
    assert main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "unlabelled.npz")]) == 2
    assert "--teacher" in capsys.readouterr().err
    code = main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "unlabelled.npz"),
                 "--teacher", str(source), "--match", "bn", "--epochs", "1", "-q"])
    assert code == 0 and "mse(bn)" in capsys.readouterr().out
    assert main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "unlabelled.npz"),
                 "--teacher", str(source), "--match", "nope", "-q"]) == 2


def test_finetune_command_on_data_the_deployment_file_cannot_run_is_one_sentence(tmp_path, capsys):
    from deployment import vision_model  # IR 6, weights in Constant nodes, only 32×32 images fit

    source, target = tmp_path / "vision.onnx", tmp_path / "out.onnx"
    onnx.save(vision_model(), source)
    before = source.read_bytes()
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    code = main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "small.npz"),
                 "--teacher", str(source), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "could not run the model" in err and "Traceback" not in err
    assert not target.exists() and source.read_bytes() == before
    np.savez(tmp_path / "fit.npz", x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    assert main(["finetune", str(source), "-o", str(target), "--data", str(tmp_path / "fit.npz"),
                 "--teacher", str(source), "--match", "c2", "--epochs", "1", "-q"]) == 0
    trained = onnx.load(target)
    assert trained.ir_version <= 10 and trained.opset_import[0].version == 12  # loads in onnxruntime 1.19
    assert "mse(c2)" in capsys.readouterr().out
