"""Evaluation data from arrays, ``.npz`` files, image folders, WAV folders or Python iterables.

Conventions shared by every source: the first axis of an array indexes items; an item has no
batch axis (the runner adds it); ``labels`` and ``references`` are reserved names for the
targets, every other name is a model input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxzip.errors import DataError, RuntimeUnavailableError
from onnxzip.evaluators.audio import load_wav_folder
from onnxzip.evaluators.base import Dataset
from onnxzip.core.inputs import Samples, load_npz, samples_from, take

log = logging.getLogger(__name__)

LABELS = "labels"
REFERENCES = "references"
SAMPLE_RATE = "sample_rate"  # a scalar in an .npz: the audio sample rate in Hz
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ArrayDataset(Dataset):
    """Items held in memory: inputs by name, optional labels and references, all indexed alike."""

    def __init__(
        self,
        inputs: Mapping[str, Sequence[np.ndarray] | np.ndarray],
        labels: Sequence[Any] | np.ndarray | None = None,
        references: Sequence[np.ndarray] | np.ndarray | None = None,
        *,
        output: str | None = None,
    ) -> None:
        if not inputs:
            raise DataError("The dataset has no model inputs (only labels/references).")
        self._inputs = dict(inputs)
        self._labels = labels
        self._references = references
        self.output = output
        self.sample_axes: dict[str, int | None] = {}  # from Samples: where each input's items stack
        unsized = [name for name, values in self._inputs.items()
                   if not hasattr(values, "__len__") or (isinstance(values, np.ndarray) and values.ndim == 0)]
        if unsized:
            raise DataError(f"The data holds a single value for {', '.join(unsized)}, not one item per sample "
                            "(give the model too, so a value the same for every sample is recognised).")
        sizes = {name: len(values) for name, values in self._inputs.items()}
        for name, values in ((LABELS, labels), (REFERENCES, references)):
            if values is not None:
                sizes[name] = len(values)
        if len(set(sizes.values())) != 1:
            raise DataError(
                "Inputs and targets must hold the same number of items, got "
                + ", ".join(f"{name}: {size}" for name, size in sizes.items())
                + "."
            )
        self._size = next(iter(sizes.values()))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, output: str | None = None) -> ArrayDataset:
        """Split a name → array mapping into inputs and the reserved ``labels``/``references``
        (and a scalar ``sample_rate``, which becomes the dataset's sample rate)."""
        inputs = {k: v for k, v in arrays.items() if k not in (LABELS, REFERENCES, SAMPLE_RATE)}
        dataset = cls(inputs, arrays.get(LABELS), arrays.get(REFERENCES), output=output)
        if SAMPLE_RATE in arrays:
            dataset.sample_rate = _sample_rate(arrays[SAMPLE_RATE])
        return dataset

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str], *, output: str | None = None) -> ArrayDataset:
        """Arrays by input name plus optional ``labels`` / ``references`` from an ``.npz``."""
        arrays = load_npz(path)
        log.info("loaded %s: %s", path, ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
        return cls.from_arrays(arrays, output=output)

    @classmethod
    def from_items(
        cls, items: Iterable[Mapping[str, Any]], *, output: str | None = None
    ) -> ArrayDataset:
        """Items given one by one as mappings of input arrays plus ``label`` / ``reference``."""
        rows = list(items)
        if not rows or not all(isinstance(row, Mapping) for row in rows):
            raise DataError("An iterable dataset must yield one or more mappings (name → array).")
        names = [name for name in rows[0] if name not in ("label", "reference")]
        try:
            inputs = {name: [np.asarray(row[name]) for row in rows] for name in names}
        except KeyError as exc:
            raise DataError(
                f"An item lacks the input {exc.args[0]!r} that the first item has."
            ) from exc
        labels = [row.get("label") for row in rows] if "label" in rows[0] else None
        references = [row.get("reference") for row in rows] if "reference" in rows[0] else None
        return cls(inputs, labels, references, output=output)

    @classmethod
    def from_samples(cls, samples: Samples, *, output: str | None = None) -> ArrayDataset:
        """Items of :class:`~onnxzip.core.inputs.Samples`: each input cut on its own sample axis, an
        input that is the same for every sample given whole to every item."""
        dataset = cls({name: _AxisItems(value, samples.axes.get(name), samples.count)
                       for name, value in samples.items()},
                      samples.labels, samples.references, output=output)
        dataset.sample_axes = dict(samples.axes)  # items are stacked back on these (a state on axis 1)
        return dataset

    def __len__(self) -> int:
        return self._size

    def inputs(self, index: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(values[index]) for name, values in self._inputs.items()}

    def label(self, index: int) -> Any | None:
        return None if self._labels is None else self._labels[index]

    def reference(self, index: int) -> np.ndarray | None:
        return None if self._references is None else np.asarray(self._references[index])


class _AxisItems:
    """Sequence view of one array's samples along ``axis`` (the whole array when None)."""

    def __init__(self, value: np.ndarray, axis: int | None, count: int) -> None:
        self.value, self.axis, self.count = value, axis, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return take(self.value, index % self.count, self.axis)


def model_dataset(model: Any, source: Any, sample_axes: Mapping[str, int | None] | None = None, *,
                  first: int | None = None) -> Dataset:
    """``source`` as a :class:`Dataset` for ``model``: arrays (an ``.npz``, a mapping or
    :class:`~onnxzip.core.inputs.Samples`) are laid out by the model's declared shapes
    (:func:`onnxzip.core.inputs.infer_sample_axes`), so a state ``[layers, batch, hidden]`` is cut
    on axis 1 and a scalar input is the same for every item; other sources as
    :func:`load_dataset` reads them. ``first`` keeps only the first samples of array data."""
    arrays: Mapping[str, Any] | None = None
    if isinstance(source, Samples):
        return ArrayDataset.from_samples(source if first is None else source.take(slice(0, first)))
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix == ".npz":
        arrays = load_npz(source)
    elif isinstance(source, Mapping):
        arrays = source
    if arrays is None:
        return load_dataset(source)
    samples = samples_from(model, arrays, sample_axes)
    dataset = ArrayDataset.from_samples(samples if first is None else samples.take(slice(0, first)))
    if SAMPLE_RATE in arrays:
        dataset.sample_rate = _sample_rate(arrays[SAMPLE_RATE])
    return dataset


def _sample_rate(value: Any) -> int:
    """The ``sample_rate`` entry of array data: one positive number (Hz)."""
    rate = np.asarray(value)
    if rate.size != 1 or not np.issubdtype(rate.dtype, np.number) or not float(rate.reshape(-1)[0]) > 0:
        raise DataError(f"'{SAMPLE_RATE}' in the data must be one positive number, got {rate!r}.")
    return int(rate.reshape(-1)[0])


def _read_image(path: Path, grayscale: bool) -> np.ndarray:
    """(channels, height, width) float32 in [0, 1]."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "Reading image folders needs Pillow; install it with `pip install onnxzip[images]`."
        ) from exc
    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale or image.mode in ("L", "I;16", "1") else "RGB")
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except OSError as exc:
        raise DataError(f"{path} is not a readable image ({exc}).") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_image_folder(
    folder: str | os.PathLike[str], *, grayscale: bool = False, input_name: str = "input"
) -> ArrayDataset:
    """Images as (channels, height, width) float32 in [0, 1].

    Layout: ``noisy/`` inputs with same-named ``clean/`` references, or images directly in the
    folder (no references). Images of different sizes are run one at a time.
    """
    root = Path(folder)
    input_dir = root / "noisy" if (root / "noisy").is_dir() else root
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{input_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    references = None
    if input_dir != root and (root / "clean").is_dir():
        missing = [p.name for p in files if not (root / "clean" / p.name).exists()]
        if missing:
            raise DataError(f"{root / 'clean'} lacks the references {', '.join(missing[:3])}.")
        references = [_read_image(root / "clean" / p.name, grayscale) for p in files]
    images = [_read_image(p, grayscale) for p in files]
    log.info("loaded %d images from %s", len(images), root)
    return ArrayDataset({input_name: images}, references=references)


def _has(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return any(
        p.suffix.lower() in suffixes
        for directory in (folder, folder / "noisy")
        if directory.is_dir()
        for p in directory.iterdir()
    )


def load_dataset(source: Any, **options: Any) -> Dataset:
    """Any supported source as a :class:`Dataset`.

    ``source`` is a Dataset (returned as is), an ``.npz`` path, a folder of WAV files
    (:func:`~onnxzip.evaluators.audio.load_wav_folder`), a folder of images
    (:func:`load_image_folder`), a mapping of arrays, or an iterable of item mappings.
    ``options`` go to the loader.
    """
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            return ArrayDataset.from_npz(path, **options)
        if path.is_dir() and _has(path, (".wav",)):
            return load_wav_folder(path, **options)
        if path.is_dir() and _has(path, IMAGE_SUFFIXES):
            return load_image_folder(path, **options)
        raise DataError(
            f"{path} is not an .npz file or a folder of WAV files or images."
            if path.exists()
            else f"{path} does not exist."
        )
    if isinstance(source, Mapping):
        return ArrayDataset.from_arrays(source, **options)
    if isinstance(source, Iterable):
        return ArrayDataset.from_items(source, **options)
    raise DataError(f"Cannot read evaluation data from a {type(source).__name__}.")
