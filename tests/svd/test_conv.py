from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxzip.errors import ConfigError
from onnxzip.svd import (
    ConvFactor,
    choose_conv_decomposition,
    conv_flops_per_pixel,
    conv_matrix,
    conv_matrix_shape,
    conv_spectrum,
    decompose_conv,
)

# (Cout, Cin, kh, kw), strides, ONNX pads (top, left, bottom, right), dilations
CONFIGS = [
    ((8, 5, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((6, 4, 5, 5), (2, 2), (2, 2, 2, 2), (1, 1)),
    ((7, 3, 3, 1), (1, 1), (1, 0, 1, 0), (1, 1)),
    ((5, 6, 3, 3), (2, 1), (0, 1, 2, 0), (1, 1)),  # asymmetric pads, stride in one axis
    ((4, 4, 3, 3), (1, 2), (2, 2, 2, 2), (2, 2)),  # dilation 2
    ((6, 3, 5, 3), (2, 2), (1, 2, 3, 0), (2, 1)),
]


def _onnx_conv(x: torch.Tensor, weight: np.ndarray, strides, pads, dilations) -> torch.Tensor:
    """ONNX Conv semantics (explicit, possibly asymmetric pads) on torch conv2d, in float64."""
    top, left, bottom, right = pads
    padded = F.pad(x, (left, right, top, bottom))
    return F.conv2d(padded, torch.from_numpy(np.asarray(weight, dtype=np.float64)), stride=strides, dilation=dilations)


def _run_factors(x: torch.Tensor, factors: tuple[ConvFactor, ConvFactor]) -> torch.Tensor:
    for factor in factors:
        x = _onnx_conv(x, factor.weight, factor.strides, factor.pads, factor.dilations)
    return x


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("shape, strides, pads, dilations", CONFIGS)
def test_full_rank_reproduces_conv(kind, shape, strides, pads, dilations) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape)
    x = torch.from_numpy(rng.standard_normal((2, shape[1], 13, 12)))
    reference = _onnx_conv(x, weight, strides, pads, dilations)
    full_rank = min(conv_matrix_shape(shape, kind))
    factors = decompose_conv(weight, kind, full_rank, strides=strides, pads=pads, dilations=dilations)
    output = _run_factors(x, factors)
    assert output.shape == reference.shape
    torch.testing.assert_close(output, reference, rtol=1e-9, atol=1e-9)


def _rebuilt_kernel(kind: str, factors: tuple[ConvFactor, ConvFactor]) -> np.ndarray:
    """The single kernel Ŵ equal to running the two factor convolutions (stride 1, no pads)."""
    first, second = (factor.weight for factor in factors)
    if kind == "channel":
        return np.einsum("ok,kcyx->ocyx", second[:, :, 0, 0], first)
    return np.einsum("kcy,okx->ocyx", first[:, :, :, 0], second[:, :, 0, :])


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_low_rank_kernel_error_is_the_spectral_tail(kind) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 6, 3, 3))
    x = torch.from_numpy(rng.standard_normal((1, 6, 10, 10)))
    spectrum = conv_spectrum(weight, kind)
    errors = []
    for rank in range(1, spectrum.full_rank + 1):
        factors = decompose_conv(weight, kind, rank)
        rebuilt = _rebuilt_kernel(kind, factors)
        torch.testing.assert_close(_run_factors(x, factors), _onnx_conv(x, rebuilt, (1, 1), (0, 0, 0, 0), (1, 1)))
        errors.append(np.linalg.norm(weight - rebuilt) / np.linalg.norm(weight))
        assert errors[-1] == pytest.approx(spectrum.tail(rank), rel=1e-6, abs=1e-12)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))


def test_matrix_rearrangements_are_isometric() -> None:
    weight = np.random.default_rng(2).standard_normal((5, 4, 3, 2))
    for kind in ("channel", "spatial"):
        matrix = conv_matrix(weight, kind)
        assert matrix.shape == conv_matrix_shape(weight.shape, kind)
        assert np.linalg.norm(matrix) == pytest.approx(np.linalg.norm(weight))
    assert conv_matrix(weight, "spatial")[2 * 3 + 1, 4 * 2 + 1] == weight[4, 2, 1, 1]


def test_costs() -> None:
    shape = (64, 32, 3, 3)
    assert conv_flops_per_pixel(shape, None) == 2 * 64 * 32 * 9
    assert conv_flops_per_pixel(shape, "channel", 10) == 2 * 10 * (32 * 9 + 64)
    assert conv_flops_per_pixel(shape, "spatial", 10, strides=(2, 2)) == 2 * 10 * (32 * 3 * 2 + 64 * 3)
    factors = decompose_conv(np.ones(shape, dtype=np.float32), "spatial", 10)
    assert sum(f.weight.size for f in factors) == 10 * sum(conv_matrix_shape(shape, "spatial"))


def _separable_kernel(cout: int, cin: int, k: int, terms: int, seed: int) -> np.ndarray:
    """Σ of ``terms`` separable kernels V_t(c, y)·H_t(o, x): spatial rank ``terms``, channel rank
    up to terms·k."""
    rng = np.random.default_rng(seed)
    vertical = rng.standard_normal((cin, k, terms))
    horizontal = rng.standard_normal((cout, k, terms))
    return np.einsum("cyt,oxt->ocyx", vertical, horizontal)


def test_choice_prefers_the_lower_kernel_error() -> None:
    # At 25 %: spatial rank 12 ≥ 10 is exact, channel rank 7 < 30 is not.
    separable = _separable_kernel(32, 32, 3, terms=10, seed=3)
    choice = choose_conv_decomposition(separable, keep_ratio=0.25)
    assert choice is not None and choice.kind == "spatial" and choice.rel_error < 1e-6
    # Low channel rank (Cout outputs spanned by 3 filters): channel SVD wins.
    rng = np.random.default_rng(4)
    channel_low = np.einsum("ok,kcyx->ocyx", rng.standard_normal((32, 3)), rng.standard_normal((3, 32, 3, 3)))
    choice = choose_conv_decomposition(channel_low, keep_ratio=0.25)
    assert choice is not None and choice.kind == "channel" and choice.rel_error < 1e-6
    assert choice.params <= 0.25 * choice.dense_params
    assert json.loads(json.dumps(choice.to_dict()))["kind"] == "channel"


def test_choice_errors_are_those_of_the_rebuilt_kernel() -> None:
    weight = np.random.default_rng(5).standard_normal((16, 8, 3, 3))
    choice = choose_conv_decomposition(weight, param_budget=400)
    assert choice is not None
    m, n = conv_matrix_shape(weight.shape, choice.kind)
    assert choice.rank == 400 // (m + n) and choice.params <= 400
    assert choice.rel_error == pytest.approx(conv_spectrum(weight, choice.kind).tail(choice.rank))


def test_choice_none_when_nothing_pays() -> None:
    rng = np.random.default_rng(6)
    assert choose_conv_decomposition(rng.standard_normal((1, 3, 1, 1)), keep_ratio=0.1) is None
    assert choose_conv_decomposition(rng.standard_normal((64, 64, 1, 1)), keep_ratio=1.0) is None


@pytest.mark.parametrize("kwargs", [{}, {"param_budget": 10, "keep_ratio": 0.5}, {"keep_ratio": 0.0}])
def test_bad_budget_raises(kwargs) -> None:
    with pytest.raises(ConfigError):
        choose_conv_decomposition(np.ones((4, 4, 3, 3)), **kwargs)


def test_bad_conv_inputs_raise() -> None:
    weight = np.ones((4, 3, 3, 3))
    with pytest.raises(ConfigError, match="rank"):
        decompose_conv(weight, "channel", 5)  # min(4, 27) = 4
    with pytest.raises(ConfigError, match="rank"):
        decompose_conv(weight, "spatial", 0)
    with pytest.raises(ConfigError, match="decomposition"):
        decompose_conv(weight, "tucker", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="4-D"):
        decompose_conv(np.ones((4, 3, 3)), "channel", 1)
