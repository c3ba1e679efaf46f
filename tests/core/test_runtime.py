from __future__ import annotations

import pytest
from helpers import mlp

from onnxzip.errors import ConfigError, RuntimeUnavailableError
from onnxzip.core.runtime import cuda_usable, make_session, resolve_device


def test_auto_falls_back_to_cpu_and_says_which():
    device = resolve_device("auto")
    assert device == ("cuda" if cuda_usable() else "cpu")
    session = make_session(mlp(), "auto")
    expected = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    assert session.get_providers()[0] == expected


@pytest.mark.skipif(cuda_usable(), reason="a usable GPU is present")
def test_asking_for_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeUnavailableError, match="cannot run on CUDA here"):
        resolve_device("cuda")


def test_unknown_device():
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        resolve_device("tpu")


def test_with_outputs_adds_inner_tensors_once_and_never_a_graph_input():
    """An input listed as an output comes back wrong in onnxruntime (here: the Relu of it), so
    with_outputs leaves inputs out; inner tensors are added once, existing outputs kept."""
    import numpy as np
    from helpers import make_model, tensor
    from onnx import helper

    from onnxzip.core.runtime import run_session, with_outputs

    model = make_model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
                       [tensor("x", ["N", 2])], [tensor("y", ["N", 2])])
    probe = with_outputs(model, ["x", "h", "h", "y"])
    assert [o.name for o in probe.graph.output] == ["y", "h"]
    assert [o.name for o in model.graph.output] == ["y"]  # the caller's model is unchanged
    x = np.array([[-1.0, 2.0]], np.float32)
    outputs = run_session(make_session(probe, "cpu", optimization="disabled"), {"x": x})
    np.testing.assert_array_equal(outputs["h"], [[0.0, 2.0]])
    assert "x" not in outputs
