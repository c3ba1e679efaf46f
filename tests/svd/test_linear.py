from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from onnxzip.errors import ConfigError
from onnxzip.svd import factorize_gemm, factorize_matmul, factorize_recurrent_input


def _gemm(a, b, c, *, trans_a: bool, trans_b: bool, alpha: float = 1.0, beta: float = 1.0) -> np.ndarray:
    """ONNX Gemm: Y = α·op(A)·op(B) + β·C (C optional)."""
    y = alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    return y if c is None else y + beta * c


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_factors_keep_the_attributes(trans_a: bool, trans_b: bool) -> None:
    rng = np.random.default_rng(0)
    rows, inner, cols = 5, 12, 9
    a = rng.standard_normal((inner, rows) if trans_a else (rows, inner))
    b = rng.standard_normal((cols, inner) if trans_b else (inner, cols))
    c = rng.standard_normal(cols)
    first, second = factorize_gemm(b, min(inner, cols), trans_b=trans_b)
    hidden = _gemm(a, first, None, trans_a=trans_a, trans_b=trans_b)
    y = _gemm(hidden, second, c, trans_a=False, trans_b=trans_b, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(y, _gemm(a, b, c, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0), atol=1e-10)


def test_matmul_factors_on_either_side() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 10))
    x_right = rng.standard_normal((3, 4, 6))   # X·W, batched activation
    first, second = factorize_matmul(weight, 6)
    np.testing.assert_allclose((x_right @ first) @ second, x_right @ weight, atol=1e-10)
    x_left = rng.standard_normal((10, 7))      # W·X
    first, second = factorize_matmul(weight, 6, weight_on_left=True)
    assert first.shape == (6, 10) and second.shape == (6, 6)
    np.testing.assert_allclose(second @ (first @ x_left), weight @ x_left, atol=1e-10)


def _lstm_with_factored_input(lstm: torch.nn.LSTM, rank: int) -> tuple[torch.nn.LSTM, torch.Tensor]:
    """A copy of ``lstm`` taking the rank-r projection x·Qᵀ as input, and that projection."""
    suffixes = ["", "_reverse"] if lstm.bidirectional else [""]
    stacked = np.stack([getattr(lstm, f"weight_ih_l0{s}").detach().numpy() for s in suffixes])
    projection, new_weight = factorize_recurrent_input(stacked, rank)
    factored = torch.nn.LSTM(rank, lstm.hidden_size, bidirectional=lstm.bidirectional, dtype=torch.float64)
    with torch.no_grad():
        for direction, s in enumerate(suffixes):
            getattr(factored, f"weight_ih_l0{s}").copy_(torch.from_numpy(new_weight[direction]))
            for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(factored, f"{name}{s}").copy_(getattr(lstm, f"{name}{s}"))
    return factored, torch.from_numpy(projection)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_input_factorization_matches_torch(bidirectional: bool) -> None:
    torch.manual_seed(0)
    input_size, hidden = 24, 8
    lstm = torch.nn.LSTM(input_size, hidden, bidirectional=bidirectional, dtype=torch.float64)
    x = torch.randn(11, 3, input_size, dtype=torch.float64)  # (time, batch, input)
    with torch.no_grad():
        reference, _ = lstm(x)
        errors = []
        for rank in (2, 6, 12, 24):
            factored, projection = _lstm_with_factored_input(lstm, rank)
            output, _ = factored(x @ projection.T)
            errors.append(float((output - reference).norm() / reference.norm()))
    assert errors[-1] < 1e-10  # rank 24 = input size: exact
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))


def test_recurrent_shapes_and_errors() -> None:
    weight = np.random.default_rng(2).standard_normal((2, 3 * 5, 7))  # bidirectional GRU
    projection, new_weight = factorize_recurrent_input(weight, 4)
    assert projection.shape == (4, 7) and new_weight.shape == (2, 15, 4)
    with pytest.raises(ConfigError, match="3-D"):
        factorize_recurrent_input(weight[0], 4)
    with pytest.raises(ConfigError, match="rank"):
        factorize_recurrent_input(weight, 8)
