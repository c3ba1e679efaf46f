"""Sinusoidal position tables stored as the nodes that compute them (cleanup's ``sinusoids``)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, init, make_model, tensor
from onnx import helper

from onnxzip.core.tables import regenerate_sinusoids, sinusoid_of
from onnxzip.passes import PassContext, get_pass


def position_table(positions: int, width: int, layout: str = "interleaved") -> np.ndarray:
    """What PyTorch's PositionalEncoding registers (computed in float32), as [1, positions, width]."""
    position = np.arange(positions, dtype=np.float32)[:, None]
    frequencies = np.exp(np.arange(0, width, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / width))
    angles = (position * frequencies).astype(np.float32)
    if layout == "interleaved":
        table = np.zeros((positions, width), np.float32)
        table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
    else:
        table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return table[None]


def encoder(table: np.ndarray) -> onnx.ModelProto:
    """x [N, T, D] + table[:, :T] (a Slice by the input's length, as exports do) → MatMul → y."""
    width = table.shape[-1]
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
             helper.make_node("Slice", ["pe", "zero", "shape", "one"], ["pe_t"]),
             helper.make_node("Add", ["x", "pe_t"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    return make_model(nodes, [tensor("x", ["N", "T", width])], [tensor("y", ["N", "T", 8])],
                      [init("pe", table), init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)),
                       init("w", rng.standard_normal((width, 8)).astype(np.float32))], opset=17)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_a_sinusoidal_table_becomes_the_nodes_computing_it(layout):
    table = position_table(512, 64, layout)
    model = encoder(table)
    result = get_pass("cleanup")().run(model, PassContext())
    assert "pe" not in {t.name for t in result.model.graph.initializer}
    assert result.model.ByteSize() < model.ByteSize() - 120_000  # 512 x 64 float32 = 131 kB
    assert any("sinusoids: 'pe' [1, 512, 64]" in note and layout in note for note in result.report.notes)
    x = np.random.default_rng(1).standard_normal((2, 300, 64)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, atol=1e-4)


def test_tables_a_formula_does_not_reproduce_are_kept():
    table = position_table(512, 64)
    assert sinusoid_of(table) is not None
    nudged = table.copy()
    nudged[0, 300, 10] += 0.01  # one value off: not the formula
    noise = np.random.default_rng(2).uniform(-1, 1, table.shape).astype(np.float32)
    for values in (nudged, noise, table[:, :8, :8]):  # the last: too small to be worth it
        assert sinusoid_of(values) is None
    model = encoder(nudged)
    assert regenerate_sinusoids(model) == []
    assert "pe" in {t.name for t in model.graph.initializer}
    off = get_pass("cleanup")(sinusoids=False).run(encoder(table), PassContext()).model
    assert "pe" in {t.name for t in off.graph.initializer}


def test_a_loop_ends_with_the_cleanup_a_pipeline_ends_with(tmp_path):
    """A loop recipe's steps run no cleanup; its best model gets one after the loop (khmersm's
    codebooks loop: 3.57x with the position table stored, 17.5x without)."""
    import onnxzip

    model = encoder(position_table(512, 64))
    x = np.random.default_rng(3).standard_normal((8, 40, 64)).astype(np.float32)
    recipe = {"gate": {"min_cosine": None, "min_argmax_agreement": None}, "metrics": ["cosine:min=0.99"],
              "loop": {"stages": [{"name": "cluster", "sweep": [8], "steps": [{"cluster": {"bits": "$value"}}]}]}}
    result = onnxzip.compress(model, recipe, data={"x": x}, work_dir=tmp_path / "work")
    assert result.report.passes[-1].pass_name == "cleanup"
    assert "pe" not in {t.name for t in result.model.graph.initializer}
    assert result.passed and result.report.after.bytes < 20_000
