"""Constant tables a formula reproduces, stored as the formula.

A transformer's sinusoidal position encoding (``pe[p, 2k] = sin(p·f_k)``, ``pe[p, 2k+1] =
cos(p·f_k)``, or the sines and cosines in two halves) is a buffer PyTorch exports as a float
initializer, often for thousands of positions (``max_len`` 2048 × 192 values: 1.5 MB, most of a
compressed 7 MB segmenter). :func:`regenerate_sinusoids` replaces each such table by the nodes that
compute it (``Range`` → ``Mul`` by the ``D/2`` frequencies → ``Sin`` / ``Cos`` → ``Concat`` →
``Reshape``): all of their inputs are constants, so onnxruntime folds them into the same table
when it loads the model and the run costs nothing more. The frequencies are read off the table
(row 1 is ``sin f_k, cos f_k``) and the whole table is recomputed in float32 and compared before
anything is replaced; what remains is the float32 rounding of ``p·f_k`` at large positions in the
original table (about 1e-4 at position 2000).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.core.compat import default_opset

MIN_VALUES = 1024  # smaller tables are not worth the nodes
TOLERANCE = 2e-4  # the largest difference allowed between the table and its float32 recomputation
MIN_OPSET = 11  # Range


def _layouts(table: np.ndarray) -> list[str]:
    """The sine/cosine layouts row 0 of a [positions, width] table fits (sin 0 = 0, cos 0 = 1)."""
    half = table.shape[1] // 2
    found = []
    if np.allclose(table[0, 0::2], 0, atol=1e-6) and np.allclose(table[0, 1::2], 1, atol=1e-6):
        found.append("interleaved")
    if np.allclose(table[0, :half], 0, atol=1e-6) and np.allclose(table[0, half:], 1, atol=1e-6):
        found.append("halves")
    return found


def _compute(frequencies: np.ndarray, positions: int, layout: str) -> np.ndarray:
    angles = np.arange(positions, dtype=np.float32)[:, None] * frequencies[None, :]
    sines, cosines = np.sin(angles), np.cos(angles)
    if layout == "interleaved":
        return np.stack([sines, cosines], axis=2).reshape(positions, -1)
    return np.concatenate([sines, cosines], axis=1)


def sinusoid_of(values: np.ndarray) -> tuple[np.ndarray, str, float] | None:
    """(frequencies [D/2] float32, layout, largest difference) when ``values`` (any shape whose
    dims other than the last two non-unit ones are 1) is a sinusoidal position table within
    :data:`TOLERANCE`; None otherwise."""
    dims = [d for d in values.shape if d != 1]
    if values.dtype != np.float32 or values.size < MIN_VALUES or len(dims) != 2 or dims[1] % 2:
        return None
    table = values.reshape(dims)
    if not np.all(np.isfinite(table)) or np.max(np.abs(table)) > 1 + 1e-5:
        return None
    half = dims[1] // 2
    for layout in _layouts(table):
        sines, cosines = (table[1, 0::2], table[1, 1::2]) if layout == "interleaved" else (table[1, :half], table[1, half:])
        frequencies = np.arctan2(sines, cosines).astype(np.float32)
        if np.any(frequencies <= 0):
            continue
        error = float(np.max(np.abs(_compute(frequencies, dims[0], layout) - table)))
        if error <= TOLERANCE:
            return frequencies, layout, error
    return None


def regenerate_sinusoids(model: onnx.ModelProto) -> list[str]:
    """Replace the main graph's sinusoidal position tables (see the module docstring) by the nodes
    computing them, in place; one note per table. Graph inputs and outputs are left alone, and
    models below opset 11 (no ``Range``)."""
    graph = model.graph
    if default_opset(model) < MIN_OPSET:
        return []
    interface = {i.name for i in graph.input} | {o.name for o in graph.output}
    notes, nodes, kept = [], [], []
    for tensor in graph.initializer:
        found = None
        if (tensor.data_type == onnx.TensorProto.FLOAT and tensor.name not in interface
                and tensor.data_location != onnx.TensorProto.EXTERNAL
                and int(np.prod(tensor.dims, dtype=np.int64)) >= MIN_VALUES):
            values = numpy_helper.to_array(tensor)
            found = sinusoid_of(values)
        if found is None:
            kept.append(tensor)
            continue
        frequencies, layout, error = found
        nodes.extend(_nodes(tensor.name, values.shape, frequencies, layout, kept))
        notes.append(f"sinusoids: '{tensor.name}' {list(values.shape)} ({layout} sin/cos of position × "
                     f"{len(frequencies)} frequencies) is computed from its {len(frequencies)} frequencies "
                     f"(onnxruntime folds it at load; largest difference {error:.1e}), "
                     f"{values.nbytes - 4 * len(frequencies):,} bytes fewer")
    if notes:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for node in reversed(nodes):
            graph.node.insert(0, node)
    return notes


def _nodes(name: str, shape: tuple[int, ...], frequencies: np.ndarray, layout: str,
           initializers: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Nodes writing ``name`` (the table, ``shape``) from ``frequencies``; their constants go
    into ``initializers``."""
    dims = [d for d in shape if d != 1]
    positions, width = dims
    half = width // 2

    def const(suffix: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), out(suffix)))
        return out(suffix)

    def out(suffix: str) -> str:
        return f"{name}/sinusoid_{suffix}"

    column = [positions, 1]
    nodes = [
        helper.make_node("Range", [const("start", np.array(0, np.float32)), const("limit", np.array(positions, np.float32)),
                                   const("delta", np.array(1, np.float32))], [out("positions")], name=out("range")),
        helper.make_node("Reshape", [out("positions"), const("column", np.array(column, np.int64))], [out("column_out")],
                         name=out("to_column")),
        helper.make_node("Mul", [out("column_out"), const("frequencies", frequencies)], [out("angles")], name=out("angles_mul")),
        helper.make_node("Sin", [out("angles")], [out("sin")], name=out("sin_op")),
        helper.make_node("Cos", [out("angles")], [out("cos")], name=out("cos_op")),
    ]
    if layout == "interleaved":
        pair = const("pair", np.array([positions, half, 1], np.int64))
        nodes += [helper.make_node("Reshape", [out("sin"), pair], [out("sin3")], name=out("sin_pair")),
                  helper.make_node("Reshape", [out("cos"), pair], [out("cos3")], name=out("cos_pair")),
                  helper.make_node("Concat", [out("sin3"), out("cos3")], [out("table")], axis=2, name=out("join"))]
    else:
        nodes.append(helper.make_node("Concat", [out("sin"), out("cos")], [out("table")], axis=1, name=out("join")))
    nodes.append(helper.make_node("Reshape", [out("table"), const("shape", np.array(shape, np.int64))], [name],
                                  name=out("to_shape")))
    return nodes
