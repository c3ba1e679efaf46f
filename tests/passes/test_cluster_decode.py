"""The cluster decode subgraph on its own: both forms (index, value table) exact in onnxruntime for
every width, padded or not, per channel or not, inside an If body; read back by find_decodes;
bounded load-time intermediates (from the shapes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxzip.core.graph import NameScope, export_model, import_graph
from onnxzip.passes.cluster_decode import (
    Codebook,
    DecodeShared,
    insert_decode,
    decode_numpy,
    find_decodes,
    decode_layout,
    load_bytes,
)
from onnxzip.core.runtime import make_session

RNG = np.random.default_rng(3)


def _stored(shape: tuple[int, ...], bits: int, axis: int | None, dtype=np.float32) -> Codebook:
    k = 1 << bits
    rows = 1 if axis is None else shape[axis]
    codebook = RNG.standard_normal((rows, k)).astype(dtype)
    codebook = codebook.reshape(-1) if axis is None else codebook
    indices = RNG.integers(0, k, shape).astype(np.uint8)
    return Codebook(codebook, indices, axis, bits)


def _decode_model(items: list[tuple[str, Codebook]], opset: int = 13, in_if: bool = False) -> onnx.ModelProto:
    """A model whose outputs are the decoded weights (Identity of each), in an If body or not."""
    body = gs.Graph(opset=opset)
    names = NameScope(body)
    shared = DecodeShared()
    outputs = []
    for name, stored in items:
        weight = gs.Constant(name, stored.decode())
        out = gs.Variable(f"{name}_out", stored.codebook.dtype, list(stored.indices.shape))
        node = gs.Node("Identity", f"{name}_id", inputs=[weight], outputs=[out])
        body.nodes.append(node)
        insert_decode(body, weight, [(node, body)], stored, names, shared, opset)
        outputs.append(out)
    body.outputs = outputs
    body.toposort()
    if not in_if:
        return gs.export_onnx(body)
    branch = gs.export_onnx(body).graph
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    outs = [helper.make_tensor_value_info(o.name + "_y", onnx.helper.np_dtype_to_tensor_dtype(o.dtype), o.shape)
            for o in outputs]
    node = helper.make_node("If", ["flag"], [o.name for o in outs], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [flag], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    feeds = {"flag": np.array(True)} if model.graph.input else {}
    return make_session(model, "cpu").run(None, feeds)


CASES = [  # (shape, per-channel axis): padded or not for each width, channel axes 0 / leading ones / other
    ((256, 160), None),
    ((67, 41), None),
    ((1, 1, 1031), None),
    ((32, 256, 3, 3), 0),
    ((1, 32, 64), 1),
    ((40, 24), 1),
    ((5, 3, 3), 0),
    ((1, 8, 4096), 1),
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_if", [False, True])
def test_decode_is_exact_for_every_width_and_layout(bits, in_if):
    items = [(f"w{i}", _stored(shape, bits, axis)) for i, (shape, axis) in enumerate(CASES)]
    model = _decode_model(items, in_if=in_if)
    onnx.checker.check_model(model)
    for (name, stored), got in zip(items, _run(model)):
        want = decode_numpy(stored.codebook, stored.indices, stored.axis)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    forms = {name: decode_layout(bits, s.indices.shape, s.axis, 4) is not None for name, s in items}
    assert any(forms.values()) == (bits < 8) and not all(forms.values())  # both forms checked


def test_cases_cover_padded_and_per_channel_value_tables():
    layouts = [decode_layout(b, shape, axis, 4) for b in range(1, 8) for shape, axis in CASES]
    assert any(layout and layout.padded for layout in layouts)
    assert any(layout and layout.channels and len(layout.planes) > 1 for layout in layouts)
    assert any(layout and layout.channels and len(layout.planes) == 1 for layout in layouts)


@pytest.mark.parametrize("bits", range(1, 9))
def test_find_decodes_reads_and_rewrites_every_form(bits):
    items = [(f"w{i}", _stored(shape, bits, axis)) for i, (shape, axis) in enumerate(CASES)]
    model = _decode_model(items, opset=9 if bits == 3 else 13)
    graph = import_graph(model)
    found = {d.name: d for d in find_decodes(graph)}
    assert sorted(found) == sorted(name for name, _s in items)
    replaced = {}
    for name, stored in items:
        decoded = found[name]
        read = decoded.stored()
        assert decoded.shape == stored.indices.shape and decoded.bits == bits
        np.testing.assert_array_equal(read.decode(), stored.decode())
        assert (read.axis is None) == (stored.axis is None)
        new = _stored(stored.indices.shape, bits, stored.axis)
        decoded.store(Codebook(new.codebook.reshape(read.codebook.shape), new.indices, read.axis, bits))
        replaced[name] = new
    rewritten = export_model(graph, model)
    assert rewritten.ByteSize() == export_model(import_graph(model), model).ByteSize()
    for (name, _s), got in zip(items, _run(rewritten)):
        np.testing.assert_array_equal(got, replaced[name].decode(), err_msg=name)


def _intermediate_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor the decode nodes compute, the decoded weights aside (from the
    shapes onnx infers: what onnxruntime's constant folding materialises at load)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    infos = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    finals = {n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    total = 0
    for node in model.graph.node:
        for name in node.output:
            if name in finals or node.op_type == "Identity":
                continue
            info = infos[name]
            dims = [d.dim_value for d in info.shape.dim]
            assert all(d > 0 for d in dims), name
            size = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize
            total += int(np.prod(dims)) * size
    return total


@pytest.mark.parametrize("bits,shape,axis", [(b, (512, 384), None) for b in range(1, 9)]
                         + [(b, (64, 4096), 0) for b in (1, 2, 4, 5, 8)])
def test_load_time_intermediates_are_bounded(bits, shape, axis, monkeypatch):
    stored = _stored(shape, bits, axis)
    weight = 4 * stored.indices.size
    extra = _intermediate_bytes(_decode_model([("w", stored)]))
    # value-table form: the int32 keys (4 B per byte of the widest plane, more to add the lower
    # planes), the shared index table, the value table and one float copy (the Gather before its
    # Reshape); 8 bits: the int32 index only
    # (per channel: one more int32 key, the value table twice and 8 bits adds the row offsets)
    bound = ({1: 1.3, 2: 1.4, 3: 2.5, 4: 1.6, 5: 3.0, 6: 3.0, 7: 4.5, 8: 1.0} if axis is None
             else {1: 2.4, 2: 2.2, 4: 2.4, 5: 4.5, 8: 2.0})[bits]
    assert extra <= bound * weight, (bits, extra / weight)
    layout = decode_layout(bits, shape, axis, 4)
    assert abs(load_bytes(bits, shape, axis, 4, layout) - extra) <= 0.1 * extra
    if bits < 8:  # the index form computes several int32 copies of the weight's size
        assert layout is not None
        monkeypatch.setattr("onnxzip.passes.cluster_decode.decode_layout", lambda *args: None)
        index_form = _intermediate_bytes(_decode_model([("w", stored)]))
        assert abs(load_bytes(bits, shape, axis, 4, None) - index_form) <= 0.1 * index_form
        assert extra < 0.7 * index_form
