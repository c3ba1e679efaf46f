"""Data sources: arrays, .npz, iterables, image folders; and their errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from onnxzip.errors import DataError, RuntimeUnavailableError
from onnxzip.evaluators import ArrayDataset, load_dataset

Image = pytest.importorskip("PIL.Image")


def test_npz_splits_inputs_from_labels_and_references(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3)), labels=np.arange(5), references=np.ones((5, 2)))
    dataset = load_dataset(path)
    assert len(dataset) == 5 and set(dataset.inputs(0)) == {"x"}
    assert dataset.label(4) == 4 and dataset.reference(1).shape == (2,)


def test_sizes_must_agree_and_inputs_must_exist() -> None:
    with pytest.raises(DataError, match="same number of items"):
        ArrayDataset({"x": np.zeros((5, 3))}, labels=np.arange(4))
    with pytest.raises(DataError, match="no model inputs"):
        ArrayDataset.from_arrays({"labels": np.arange(3)})
    with pytest.raises(DataError, match="lacks the input 'b'"):
        ArrayDataset.from_items([{"a": 1, "b": 2}, {"a": 1}])
    with pytest.raises(DataError, match="mappings"):
        load_dataset([1, 2, 3])


def test_iterable_items_carry_label_and_reference() -> None:
    dataset = load_dataset(iter([{"x": np.zeros(2), "label": 1}, {"x": np.ones(2), "label": 0}]))
    assert len(dataset) == 2 and dataset.label(0) == 1 and dataset.reference(0) is None


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_pairs_noisy_and_clean(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _save(tmp_path / "noisy" / "a.png", gray)
    _save(tmp_path / "clean" / "a.png", 255 - gray)
    _save(tmp_path / "noisy" / "b.png", np.zeros((6, 8, 3), dtype=np.uint8))
    _save(tmp_path / "clean" / "b.png", np.zeros((6, 8, 3), dtype=np.uint8))
    dataset = load_dataset(tmp_path)
    assert len(dataset) == 2
    image = dataset.inputs(0)["input"]
    assert image.shape == (1, 8, 8) and image.dtype == np.float32
    assert image.max() == pytest.approx(252 / 255)
    assert dataset.reference(0)[0, 0, 0] == pytest.approx(1.0)
    assert dataset.inputs(1)["input"].shape == (3, 6, 8)
    assert load_dataset(tmp_path, grayscale=True).inputs(1)["input"].shape == (1, 6, 8)


def test_image_folder_without_pillow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(RuntimeUnavailableError, match=r"onnxzip\[images\]"):
        load_dataset(tmp_path)


def test_unknown_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an .npz file"):
        load_dataset(tmp_path)
