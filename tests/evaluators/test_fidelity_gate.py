"""The default fidelity gate on outputs a compression scaled: cosine cannot see a scale, the
relative L2 limit does."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor
from onnx import helper

import onnxzip


def _scaled(scale: float) -> object:
    """x[N, 6] → MatMul w → Sigmoid → ×scale → p[N, 1] (a speech probability, silero-vad's shape)."""
    w = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(6, 1)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["s"]),
                       helper.make_node("Mul", ["s", "k"], ["p"])],
                      [tensor("x", ["N", 6])], [tensor("p", ["N", 1])],
                      [init("w", w), init("k", np.array(scale, np.float32))])


def test_an_output_scaled_by_a_fifth_fails_the_default_gate_on_relative_l2_not_cosine():
    data = {"x": np.random.default_rng(0).standard_normal((24, 6)).astype(np.float32)}
    report = onnxzip.validate(_scaled(1.0), _scaled(0.2), data=data)
    (out,) = report.outputs
    assert out.cosine > 0.9999 and abs(out.rel_l2 - 0.8) < 1e-5
    assert not report.passed and report.failures == ["p: relative L2 error 0.8 > 0.5"]
    assert onnxzip.validate(_scaled(1.0), _scaled(0.9), data=data).passed  # rel_l2 0.1
    assert onnxzip.validate(_scaled(1.0), _scaled(0.2), data=data, gate={"max_rel_l2": None}).passed


def test_the_automatic_relative_l2_limit_goes_off_with_the_cosine_limit_and_is_checked():
    from onnxzip.errors import ConfigError
    from onnxzip.evaluators.fidelity import FidelityGate

    data = {"x": np.random.default_rng(0).standard_normal((24, 6)).astype(np.float32)}
    assert onnxzip.validate(_scaled(1.0), _scaled(0.2), data=data, gate={"min_cosine": None}).passed  # gate off
    assert not onnxzip.validate(_scaled(1.0), _scaled(0.2), data=data, gate={"min_cosine": None,
                                                                              "max_rel_l2": 0.5}).passed
    assert FidelityGate().rel_l2_limit == 0.5 and FidelityGate(max_rel_l2=0.2).rel_l2_limit == 0.2
    with pytest.raises(ConfigError, match="max_rel_l2='often'"):
        FidelityGate(max_rel_l2="often")
