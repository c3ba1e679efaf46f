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
    concrete shapes by input name (from :func:`onnxzip.shapes.resolve_input_shapes`)."""
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
        if declared and len(declared) != value.ndim:
            raise DataError(
                f"Input '{info.name}' expects {len(declared)} dimensions but the data has shape {value.shape}."
            )
        for axis, dim in enumerate(declared):
            if axis == 0:
                continue  # N samples on a fixed batch of k run in chunks (runtime.run_batched)
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != value.shape[axis]:
                raise DataError(
                    f"Input '{info.name}' expects size {dim.dim_value} on axis {axis} but the data "
                    f"has shape {value.shape}."
                )
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
) -> dict[str, np.ndarray]:
    """Feeds from a ``.npz`` path or a dict of arrays, else generated from the signature at
    sizes onnxruntime accepts (:func:`onnxzip.shapes.generated_feeds`)."""
    if data is None:
        from onnxzip.shapes import generated_feeds

        return generated_feeds(model, batch=batch, dims=dims, input_shapes=input_shapes, seed=seed)[0]
    arrays = load_npz(data) if isinstance(data, (str, os.PathLike)) else dict(data)
    return feeds_from_arrays(model, arrays)
