"""Factor pairs for the matrix-like ops with a constant weight: Gemm, MatMul and the input
weights of recurrent layers (LSTM, GRU, RNN). Every function returns the factors in the order
they are applied and in the layout the rewritten ops consume, so the graph pass only places them.
"""
from __future__ import annotations

import numpy as np

from onnxzip.errors import ConfigError
from onnxzip.svd.factorize import SvdMethod, factorize


def factorize_gemm(
    weight: np.ndarray, rank: int, *, trans_b: bool, method: SvdMethod = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the constant B in Y = α·op(A)·op(B) + β·C, as (first, second).

    Both factors keep B's storage layout, so both new Gemms use the original ``transB``:

    * transB = 0: B (K×N) ≈ P·Q, Y = α·(op(A)·P)·Q + β·C; first = P (K×r), second = Q (r×N).
    * transB = 1: B (N×K) ≈ P·Q, op(B) = Bᵀ ≈ Qᵀ·Pᵀ, Y = α·(op(A)·Qᵀ)·Pᵀ + β·C;
      first = Q (r×K), second = P (N×r).

    The first Gemm keeps ``transA`` with α = 1 and no C; the second takes the intermediate with
    transA = 0 and keeps α, β and the bias C.
    """
    p, q = factorize(weight, rank, method=method)
    return (q, p) if trans_b else (p, q)


def factorize_matmul(
    weight: np.ndarray, rank: int, *, weight_on_left: bool = False, method: SvdMethod = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Factors of a constant MatMul operand W (m×n) ≈ P·Q, as (first, second) in application order.

    * X·W (weight on the right): Y = (X·P)·Q; first = P (m×r), second = Q (r×n).
    * W·X (weight on the left): Y = P·(Q·X); first = Q (r×n), second = P (m×r).
    """
    p, q = factorize(weight, rank, method=method)
    return (q, p) if weight_on_left else (p, q)


def factorize_recurrent_input(
    weight: np.ndarray, rank: int, *, method: SvdMethod = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank input weights of an ONNX LSTM / GRU / RNN, as (projection, new_weight).

    ``weight`` is the op's W input, shape (D, G·h, I): D directions, G gates (4 LSTM, 3 GRU,
    1 RNN), input size I. Each direction computes x·W_dᵀ. All directions read the same x, so
    they share one projection: the stacked matrix W_s = [W_0; …; W_{D−1}] (D·G·h × I) is
    factorized as W_s ≈ P·Q with Q (r×I) and P (D·G·h × r), giving per direction

        x·W_dᵀ ≈ (x·Qᵀ)·P_dᵀ,  P_d = P[d·G·h:(d+1)·G·h].

    The rewrite runs z = x·Qᵀ as one MatMul over the whole sequence (I → r) and feeds z to the
    recurrent op with input size r and W' = P reshaped to (D, G·h, r); R and B are unchanged.
    Returns ``projection`` = Q (r×I) and ``new_weight`` = W' (D, G·h, r). The parameter
    break-even is that of the stacked (D·G·h)×I matrix.
    """
    if np.ndim(weight) != 3:
        raise ConfigError(f"a recurrent W must be 3-D (directions, gates·hidden, input), got shape {np.shape(weight)}.")
    directions, gate_rows, input_size = np.shape(weight)
    p, q = factorize(np.reshape(weight, (directions * gate_rows, input_size)), rank, method=method)
    return q, p.reshape(directions, gate_rows, p.shape[1])
