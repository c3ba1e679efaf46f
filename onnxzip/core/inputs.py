"""Model inputs for validation and measurement: loaded from ``.npz`` or generated from the
input signature.

Generated inputs: float inputs are standard normal, integer inputs are drawn from
``[0, vocab)`` where ``vocab`` is the row count of the embedding table they index (``Gather``
data) and ``[0, 10)`` otherwise, booleans are fair coins. Symbolic dimensions are resolved from
``dims`` (e.g. ``{"seq": 16}``); a symbolic first dimension is the batch.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import DataError

RESERVED_NPZ_KEYS = frozenset({"labels", "references", "sample_rate"})


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old IR lists initializers too)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _np_dtype(info: onnx.ValueInfoProto) -> np.dtype:
    elem = info.type.tensor_type.elem_type
    if not elem:
        raise DataError(f"Input '{info.name}' is not a tensor; onnxzip only feeds tensor inputs.")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


BATCH_NAMES = frozenset({"N", "n", "batch", "batch_size", "B", "bs"})


def batch_dim_names(model: onnx.ModelProto) -> set[str]:
    """Symbolic dimension names that mean "batch": conventional names plus any symbol that is
    the first dimension of an input (an LSTM input [seq, N, x] then gets the batch on axis 1)."""
    names = set(BATCH_NAMES)
    for info in graph_inputs(model):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            names.add(dims[0].dim_param)
    return names


def resolve_shape(
    info: onnx.ValueInfoProto,
    batch: int,
    dims: dict[str, int] | None = None,
    batch_names: set[str] | frozenset[str] = BATCH_NAMES,
) -> tuple[int, ...]:
    """Concrete shape for an input: fixed dims as declared, symbolic ones from ``dims``, batch
    dimensions (axis 0 or a batch-named symbol) from ``batch``."""
    dims = dims or {}
    shape = []
    for axis, dim in enumerate(info.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif dim.dim_param and dim.dim_param in dims:
            shape.append(int(dims[dim.dim_param]))
        elif axis == 0 or dim.dim_param in batch_names:
            shape.append(int(batch))
        else:
            label = dim.dim_param or f"axis {axis}"
            raise DataError(
                f"Input '{info.name}' has an unknown dimension '{label}'; give its size with "
                f"--dim {dim.dim_param or 'NAME'}=N or --input-shape {info.name}=d0,d1,... "
                "(dims= / input_shapes= in Python)."
            )
    return tuple(shape)


def _vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    tables = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            sizes[node.input[1]] = int(tables[node.input[0]])
    return sizes


def generate_inputs(
    model: onnx.ModelProto,
    *,
    batch: int = 2,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs matching the model's signature (see module docstring); ``shapes`` gives
    concrete shapes by input name (from :func:`onnxzip.core.shapes.resolve_input_shapes`)."""
    rng = np.random.default_rng(seed)
    vocab = _vocab_sizes(model)
    batch_names = batch_dim_names(model)
    feeds: dict[str, np.ndarray] = {}
    for info in graph_inputs(model):
        dtype = _np_dtype(info)
        shape = shapes[info.name] if shapes and info.name in shapes else resolve_shape(info, batch, dims, batch_names)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        elif dtype == np.bool_:
            feeds[info.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            high = vocab.get(info.name, 10)
            feeds[info.name] = np.asarray(rng.integers(0, high, size=shape), dtype=dtype)
        else:
            raise DataError(f"Input '{info.name}' has type {dtype}, which onnxzip cannot generate; pass --data.")
    return feeds


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` file into a dict; one clear sentence when it is missing or unreadable."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"Data file {source} does not exist.")
    try:
        with np.load(source, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{source} is not a readable .npz file ({exc}).") from exc


def feeds_from_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pick and check the model's inputs from ``arrays`` (extra keys like ``labels`` are ignored)."""
    inputs = graph_inputs(model)
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name not in arrays:
            if len(inputs) == 1 and len(set(arrays) - RESERVED_NPZ_KEYS) == 1:
                key = next(iter(set(arrays) - RESERVED_NPZ_KEYS))
            else:
                available = ", ".join(sorted(arrays)) or "nothing"
                raise DataError(f"The data has no array for input '{info.name}' (it has {available}).")
        else:
            key = info.name
        value = np.asarray(arrays[key])
        dtype = _np_dtype(info)
        if value.dtype != dtype:
            if np.can_cast(value.dtype, dtype, casting="same_kind"):
                value = value.astype(dtype)
            else:
                raise DataError(f"Input '{info.name}' expects {dtype} but the data holds {value.dtype}.")
        declared = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and len(declared) != value.ndim:
            raise DataError(
                f"Input '{info.name}' expects {len(declared)} dimensions but the data has shape {value.shape}."
            )
        if np.issubdtype(value.dtype, np.floating) and value.size and not np.all(np.isfinite(value)):
            raise DataError(f"Input '{info.name}' holds NaN or infinite values; calibration data must be finite.")
        feeds[info.name] = value
    return feeds


def model_feeds(
    model: onnx.ModelProto,
    data: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    *,
    batch: int = 2,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    input_shapes: dict[str, Any] | None = None,
    sample_axes: Mapping[str, int | None] | None = None,
) -> dict[str, np.ndarray]:
    """Feeds from a ``.npz`` path or a dict of arrays (as :class:`Samples`, which know each
    input's sample axis), else generated from the signature at sizes onnxruntime accepts
    (:func:`onnxzip.core.shapes.generated_feeds`)."""
    if data is None:
        from onnxzip.core.shapes import generated_feeds

        return generated_feeds(model, batch=batch, dims=dims, input_shapes=input_shapes, seed=seed)[0]
    return samples_from(model, data, sample_axes)


# --- Sample layout: the one rule every path that feeds N samples uses -----------------------

Dim = int | str | None  # a declared dimension: a fixed size, a symbol, or unknown
SHARED = None  # the sample axis of an input that is the same for every sample


def declared_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    """Each real input's declared shape (fixed sizes as ints, symbols as names, unknown as None;
    None for the whole shape when the rank is unknown)."""
    shapes: dict[str, tuple[Dim, ...] | None] = {}
    for info in graph_inputs(model):
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            shapes[info.name] = None
            continue
        shapes[info.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return shapes


def session_shapes(session: Any) -> dict[str, tuple[Dim, ...] | None]:
    """The same as :func:`declared_shapes`, read from an onnxruntime session's inputs."""
    shapes: dict[str, tuple[Dim, ...] | None] = {}
    for node in session.get_inputs():
        shape = node.shape
        shapes[node.name] = None if shape is None else tuple(
            d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else None) for d in shape
        )
    return shapes


def _batch_like(name: Dim) -> bool:
    return isinstance(name, str) and (name in BATCH_NAMES or "batch" in name.lower())


def _sample_axis(name: str, shape: tuple[Dim, ...], value: np.ndarray, batch_symbols: set[str]) -> int | None | str:
    """The sample axis of one input by the layout rule (see :func:`infer_sample_axes`): an axis index,
    ``SHARED`` for an array that is the declared shape exactly, or "ambiguous"."""
    if value.ndim != len(shape):
        raise DataError(
            f"Input '{name}' expects {len(shape)} dimensions (declared {_show(shape)}) but the data has "
            f"shape {value.shape}."
        )
    wrong = [axis for axis, dim in enumerate(shape) if isinstance(dim, int) and value.shape[axis] != dim]
    if wrong:
        # A fixed axis holds samples when it is the batch (axis 0) or a size-1 axis (a fixed
        # batch of 1 elsewhere, e.g. a state [layers, 1, hidden]); any other mismatch is wrong data.
        if len(wrong) > 1 or not (wrong[0] == 0 or shape[wrong[0]] == 1):
            axis = wrong[0] if wrong[0] != 0 or len(wrong) == 1 else wrong[1]
            raise DataError(
                f"Input '{name}' expects size {shape[axis]} on axis {axis} (declared {_show(shape)}) but the "
                f"data has shape {value.shape}."
            )
        return wrong[0]
    symbolic = [axis for axis, dim in enumerate(shape) if not isinstance(dim, int)]
    if not symbolic:
        return SHARED
    if len(symbolic) == 1:
        return symbolic[0]
    for test in (_batch_like, lambda dim: dim in batch_symbols):
        named = [axis for axis in symbolic if test(shape[axis])]
        if len(named) == 1:
            return named[0]
    if 0 in symbolic:  # the conventional batch axis
        return 0
    return "ambiguous"


def _check_override(name: str, shape: tuple[Dim, ...], value: np.ndarray, axis: int | None) -> None:
    """``--sample-axis NAME=K`` must leave a sample the model accepts: the data has the declared
    rank, every other axis its declared size, and axis K is not fixed above 1 (a fixed batch of 1
    is run sample by sample)."""
    if value.ndim != len(shape):
        raise DataError(
            f"Input '{name}' expects {len(shape)} dimensions (declared {_show(shape)}) but the data has "
            f"shape {value.shape}."
        )
    if axis is not None and isinstance(shape[axis], int) and shape[axis] > 1:
        raise DataError(
            f"--sample-axis {name}={axis} names an axis the model fixes at size {shape[axis]} (declared "
            f"{_show(shape)}); samples go on a symbolic axis or one of size 1."
        )
    for other, dim in enumerate(shape):
        if other != axis and isinstance(dim, int) and value.shape[other] != dim:
            raise DataError(
                f"Input '{name}' expects size {dim} on axis {other} (declared {_show(shape)}) but the data has "
                f"shape {value.shape}."
            )


def _show(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def infer_sample_axes(
    shapes: dict[str, tuple[Dim, ...] | None],
    arrays: Mapping[str, np.ndarray],
    overrides: Mapping[str, int | None] | None = None,
) -> tuple[dict[str, int | None], int]:
    """Per input, the axis that holds the samples, and the number of samples.

    The rule: the sample axis of an input is the axis the model declares symbolic (the batch is
    not always axis 0: recurrent states are often ``[layers, batch, hidden]``); where several are
    symbolic, the one named like a batch (``batch``, ``N``, ...), else the symbol other inputs
    use as their batch (their axis 0), else axis 0 when it is symbolic; a fixed axis whose size the data does not match holds the samples when
    it is axis 0 or a size-1 axis (a fixed batch, run in chunks of that size). An array that is
    the declared shape exactly (a scalar sample rate, a fixed state) is the same for every
    sample. ``overrides`` (``--sample-axis NAME=K``, ``none`` for shared) settle the rest; an
    ambiguous input is one sentence naming that flag.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(shapes))
    if unknown:
        raise DataError(f"--sample-axis names {', '.join(unknown)}, which the model has no input called.")
    batch_symbols: set[str] = set()
    for shape in shapes.values():
        if shape and isinstance(shape[0], str):
            batch_symbols.add(shape[0])
    axes: dict[str, int | None] = {}
    for name, value in arrays.items():
        shape = shapes.get(name)
        value = np.asarray(value)
        if name in overrides:
            axis = overrides[name]
            if axis is not None and not -value.ndim <= axis < value.ndim:
                raise DataError(f"--sample-axis {name}={axis} is outside the data's {value.ndim} dimensions.")
            axes[name] = None if axis is None else axis % value.ndim
            if shape is not None:
                _check_override(name, shape, value, axes[name])
            continue
        if shape is None:  # rank unknown: samples on axis 0 of anything with an axis
            axes[name] = 0 if value.ndim else SHARED
            continue
        found = _sample_axis(name, shape, value, batch_symbols)
        if found == "ambiguous":
            raise DataError(
                f"Input '{name}' (declared {_show(shape)}) has several symbolic axes and none is named like a "
                f"batch; say which holds the samples with --sample-axis {name}=K (sample_axes= in Python)."
            )
        axes[name] = found
    counts = {name: np.shape(arrays[name])[axis] for name, axis in axes.items() if axis is not None}
    if not counts:
        # Every array is the declared shape exactly: one feed, whose axis 0 (if any) is the batch.
        axes = {name: 0 if np.ndim(arrays[name]) else SHARED for name in arrays}
        counts = {name: np.shape(arrays[name])[0] for name, axis in axes.items() if axis is not None}
        if not counts:
            return axes, 1
    if len(set(counts.values())) != 1:
        raise DataError(
            "The inputs hold different numbers of samples ("
            + ", ".join(f"{name}: {count} on axis {axes[name]}" for name, count in counts.items())
            + "); every input needs the same count on its sample axis."
        )
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError("The data holds no samples (the sample axis has size 0).")
    return axes, int(count)


def take(value: np.ndarray, index: Any, axis: int | None) -> np.ndarray:
    """The samples ``index`` (a slice or integer array) of one array along its sample axis."""
    if axis is None:
        return value
    where = [slice(None)] * np.ndim(value)
    where[axis] = index
    return np.asarray(value[tuple(where)])


class Samples(Mapping[str, np.ndarray]):
    """N samples of a model's inputs, loaded once, with each input's sample axis.

    It is a mapping of input name → array (what onnxruntime is fed), so every consumer can use
    it as plain feeds; :func:`onnxzip.core.runtime.run_batched` reads its axes and runs it in chunks
    a fixed-batch model accepts. ``labels`` / ``references`` (reserved names in an ``.npz``)
    ride along on axis 0.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], axes: Mapping[str, int | None], count: int,
                 *, labels: np.ndarray | None = None, references: np.ndarray | None = None) -> None:
        self._arrays = dict(arrays)
        self.axes = dict(axes)
        self.count = int(count)
        self.labels = labels
        self.references = references
        for name, values in (("labels", labels), ("references", references)):
            if values is not None and len(values) != self.count:
                raise DataError(f"The data has {len(values)} {name} for {self.count} samples.")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"Samples({self.count} samples: " + ", ".join(
            f"{k} {v.shape} axis {self.axes.get(k)}" for k, v in self._arrays.items()) + ")"

    def take(self, index: Any) -> Samples:
        """The samples ``index`` (slice or integer array), with labels and references."""
        picked = {name: take(value, index, self.axes.get(name)) for name, value in self._arrays.items()}
        count = len(range(self.count)[index]) if isinstance(index, slice) else len(np.asarray(index))
        return Samples(picked, self.axes, count,
                       labels=None if self.labels is None else self.labels[index],
                       references=None if self.references is None else self.references[index])

    def with_shared(self, extra: Mapping[str, np.ndarray]) -> Samples:
        """The same samples plus arrays that are the same for every sample (weights fed as inputs)."""
        return Samples({**self._arrays, **extra}, {**self.axes, **{k: SHARED for k in extra}}, self.count,
                       labels=self.labels, references=self.references)

    def describe(self) -> str:
        """One line: how the data is laid out (for reports)."""
        parts = [f"{name} {tuple(value.shape)}: " + ("same for every sample" if self.axes.get(name) is None
                 else f"samples on axis {self.axes[name]}") for name, value in self._arrays.items()]
        return f"{self.count} samples; " + "; ".join(parts)


def samples_from(
    model: onnx.ModelProto,
    data: str | os.PathLike[str] | Mapping[str, np.ndarray] | Samples,
    sample_axes: Mapping[str, int | None] | None = None,
) -> Samples:
    """Load ``data`` (an ``.npz`` path or arrays by input name) once into :class:`Samples` for
    ``model``: inputs picked and checked (:func:`feeds_from_arrays`), the layout rule applied."""
    if isinstance(data, Samples):
        return data
    arrays = load_npz(data) if isinstance(data, (str, os.PathLike)) else dict(data)
    feeds = feeds_from_arrays(model, arrays)
    axes, count = infer_sample_axes(declared_shapes(model), feeds, sample_axes)
    labels = np.asarray(arrays["labels"]) if "labels" in arrays else None
    references = np.asarray(arrays["references"]) if "references" in arrays else None
    if labels is not None and labels.ndim == 0:
        raise DataError("'labels' in the data must hold one entry per sample, got a scalar.")
    if references is not None and references.ndim == 0:
        raise DataError("'references' in the data must hold one entry per sample, got a scalar.")
    if references is not None and references.dtype.kind not in "biuf":
        raise DataError(f"'references' in the data must be numbers (target outputs), got {references.dtype}.")
    return Samples(feeds, axes, count, labels=labels, references=references)


def parse_sample_axes(text: str | Mapping[str, Any] | None) -> dict[str, int | None]:
    """``"state=1,sr=none"`` (or a mapping) → ``{"state": 1, "sr": None}``."""
    if not text:
        return {}
    items = text.items() if isinstance(text, Mapping) else (
        part.partition("=")[::2] for part in str(text).split(",") if part.strip())
    axes: dict[str, int | None] = {}
    for name, value in items:
        name, raw = str(name).strip(), str(value).strip().lower()
        if not name or not raw:
            raise DataError(f"--sample-axis expects NAME=AXIS (or NAME=none), got {text!r}.")
        if raw in ("none", "shared", "null"):
            axes[name] = None
            continue
        try:
            axes[name] = int(raw)
        except ValueError as exc:
            raise DataError(f"--sample-axis {name}={value}: the axis must be an integer or 'none'.") from exc
    return axes


def as_samples(feeds: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[Dim, ...] | None]) -> Samples:
    """``feeds`` as :class:`Samples` (as they are when they already are), plain arrays laid out by
    the rule against the declared ``shapes`` (inputs missing from them: rank unknown)."""
    if isinstance(feeds, Samples):
        return feeds
    axes, count = infer_sample_axes({name: shapes.get(name) for name in feeds}, feeds)
    return Samples(feeds, axes, count)


def fixed_batches(shapes: Mapping[str, tuple[Dim, ...] | None], axes: Mapping[str, int | None]) -> set[int]:
    """The sizes the declared ``shapes`` fix on the inputs' sample ``axes`` (empty: the batch is
    symbolic); more than one means the inputs disagree."""
    return {shapes[name][axis] for name, axis in axes.items()
            if axis is not None and shapes.get(name) and axis < len(shapes[name]) and isinstance(shapes[name][axis], int)}


def fixed_batch(model: onnx.ModelProto, samples: Samples | None = None) -> int | None:
    """The batch size ``model`` fixes on its inputs' sample axes (axis 0 without ``samples``;
    deployment files often fix 1), or None when it is symbolic or the inputs disagree."""
    shapes = declared_shapes(model)
    axes = samples.axes if samples is not None else dict.fromkeys(shapes, 0)
    sizes = fixed_batches(shapes, axes)
    return sizes.pop() if len(sizes) == 1 else None


def first_samples(feeds: Mapping[str, np.ndarray], count: int, model: onnx.ModelProto | None = None) -> Samples:
    """The first ``count`` samples of ``feeds`` (a :class:`Samples`, or plain arrays laid out by
    the rule against ``model``'s declared shapes) along each input's sample axis."""
    feeds = as_samples(feeds, declared_shapes(model) if model is not None else {})
    return feeds.take(slice(0, min(count, feeds.count)))


def data_notes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None) -> list[str]:
    """Report notes on how the data is laid out and which inputs carry recurrent state (a float
    input declared like an output): they are fed their calibrated values like any input, and
    fine-tuning distils the state outputs like any output."""
    if not isinstance(feeds, Samples):
        return []
    notes = [f"data: {feeds.describe()}"]
    shapes = declared_shapes(model)
    out_shapes = {tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                        for d in o.type.tensor_type.shape.dim) for o in model.graph.output}
    states = [name for name, shape in shapes.items() if shape and len(shape) > 1 and shape in out_shapes
              and name in feeds and np.issubdtype(feeds[name].dtype, np.floating)]
    if states:
        notes.append("state inputs " + ", ".join(states) + " (declared like an output): fed their calibrated "
                     "values as ordinary inputs; fine-tuning distils the state outputs like every output")
    return notes
