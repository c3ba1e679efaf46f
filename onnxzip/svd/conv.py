"""Low-rank decompositions of a 2-D convolution weight W (Cout, Cin, kh, kw), groups = 1.

Both schemes factorize an isometric rearrangement of W (a reshape or a permutation), so the
relative Frobenius error of the factor matrix equals that of the rebuilt kernel ‖W − Ŵ‖_F/‖W‖_F
and the two schemes can be compared on the kernel at the same parameter budget.

* **channel** SVD: M = W.reshape(Cout, Cin·kh·kw) ≈ A·B. Conv kh×kw (Cin → r) with weight
  B.reshape(r, Cin, kh, kw), keeping the original strides, pads and dilations, then Conv 1×1
  (r → Cout) with weight A.reshape(Cout, r, 1, 1), stride 1, no pads.
* **spatial** SVD (Jaderberg et al. 2014, Tai et al. 2016): M[(c, y), (o, x)] = W[o, c, y, x],
  i.e. W.transpose(1, 2, 0, 3).reshape(Cin·kh, Cout·kw) ≈ A·B. Conv kh×1 (Cin → r) with weight
  V[k, c, y, 0] = A[(c, y), k], stride (sh, 1), pads (top, 0, bottom, 0), dilations (dh, 1); then
  Conv 1×kw (r → Cout) with weight H[o, k, 0, x] = B[k, (o, x)], stride (1, sw),
  pads (0, left, 0, right), dilations (1, dw). Zero padding along one axis commutes with a
  convolution along the other, so the split of the pads is exact.

The original bias, if any, goes on the second convolution. Pads use the ONNX order
(top, left, bottom, right).

Costs per output pixel are FLOPs = 2 × multiply-accumulates (the convention of
:mod:`onnxzip.measure.cost`). Dense: 2·Cout·Cin·kh·kw. Channel: 2·r·(Cin·kh·kw + Cout). Spatial:
2·r·(Cin·kh·sw + Cout·kw) — the vertical conv runs on every input column (about sw per output
pixel, ignoring borders).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from onnxzip.errors import ConfigError
from onnxzip.svd.factorize import (
    Spectrum,
    SvdMethod,
    check_fraction,
    check_rank,
    factorize,
    is_profitable,
)

ConvKind = Literal["channel", "spatial"]
CONV_KINDS: tuple[ConvKind, ...] = ("channel", "spatial")


@dataclass(frozen=True)
class ConvFactor:
    """One convolution of a decomposition: its weight and ONNX Conv attributes."""

    weight: np.ndarray
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]


@dataclass(frozen=True)
class ConvChoice:
    """The decomposition picked for one layer at a parameter budget."""

    kind: ConvKind
    rank: int
    params: int
    dense_params: int
    flops_per_pixel: int
    dense_flops_per_pixel: int
    rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_weight(weight: np.ndarray) -> tuple[int, int, int, int]:
    if np.ndim(weight) != 4:
        raise ConfigError(f"a Conv weight must be 4-D (Cout, Cin, kh, kw), got shape {np.shape(weight)}.")
    cout, cin, kh, kw = np.shape(weight)
    return int(cout), int(cin), int(kh), int(kw)


def _check_kind(kind: str) -> None:
    if kind not in CONV_KINDS:
        raise ConfigError(f"unknown conv decomposition {kind!r}; use channel or spatial.")


def conv_matrix_shape(weight_shape: tuple[int, ...], kind: ConvKind) -> tuple[int, int]:
    """Shape (m, n) of the matrix that ``kind`` factorizes; the factors cost r·(m+n) parameters."""
    _check_kind(kind)
    cout, cin, kh, kw = weight_shape
    return (cout, cin * kh * kw) if kind == "channel" else (cin * kh, cout * kw)


def conv_matrix(weight: np.ndarray, kind: ConvKind) -> np.ndarray:
    """The isometric rearrangement of W that ``kind`` factorizes (see the module docstring)."""
    shape = _check_weight(weight)
    m, n = conv_matrix_shape(shape, kind)
    if kind == "channel":
        return np.reshape(weight, (m, n))
    return np.transpose(weight, (1, 2, 0, 3)).reshape(m, n)


def conv_spectrum(weight: np.ndarray, kind: ConvKind) -> Spectrum:
    """Spectrum of :func:`conv_matrix`; its ``tail(r)`` is the relative kernel error at rank r."""
    return Spectrum.of(conv_matrix(weight, kind))


def conv_flops_per_pixel(
    weight_shape: tuple[int, ...], kind: ConvKind | None, rank: int = 0, strides: tuple[int, int] = (1, 1),
) -> int:
    """FLOPs per output pixel of the dense conv (``kind`` None) or of a rank-``rank`` decomposition."""
    cout, cin, kh, kw = weight_shape
    if kind is None:
        return 2 * cout * cin * kh * kw
    _check_kind(kind)
    if kind == "channel":
        return 2 * rank * (cin * kh * kw + cout)
    return 2 * rank * (cin * kh * strides[1] + cout * kw)


def decompose_conv(
    weight: np.ndarray,
    kind: ConvKind,
    rank: int,
    *,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    method: SvdMethod = "auto",
) -> tuple[ConvFactor, ConvFactor]:
    """The two convolutions (applied in order) that replace Conv(W) at rank ``rank``.

    Weights come back in the compute dtype of :func:`onnxzip.svd.factorize.factorize`.
    """
    cout, cin, kh, kw = _check_weight(weight)
    m, n = conv_matrix_shape((cout, cin, kh, kw), kind)
    rank = check_rank(m, n, rank)
    first, second = factorize(conv_matrix(weight, kind), rank, method=method)
    sh, sw = strides
    top, left, bottom, right = pads
    dh, dw = dilations
    if kind == "channel":
        return (
            ConvFactor(second.reshape(rank, cin, kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw)),
            ConvFactor(first.reshape(cout, rank, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
        )
    vertical = first.T.reshape(rank, cin, kh, 1)
    horizontal = second.reshape(rank, cout, kw).transpose(1, 0, 2).reshape(cout, rank, 1, kw)
    return (
        ConvFactor(np.ascontiguousarray(vertical), (sh, 1), (top, 0, bottom, 0), (dh, 1)),
        ConvFactor(np.ascontiguousarray(horizontal), (1, sw), (0, left, 0, right), (1, dw)),
    )


def choose_conv_decomposition(
    weight: np.ndarray,
    *,
    param_budget: int | None = None,
    keep_ratio: float | None = None,
    strides: tuple[int, int] = (1, 1),
) -> ConvChoice | None:
    """Pick channel or spatial SVD for one layer at a parameter budget.

    The budget is ``param_budget`` parameters or ``keep_ratio`` × the dense ones (exactly one).
    Each scheme gets the largest rank its budget allows (at least 1, at most full rank) and is
    scored by the relative kernel error ‖W − Ŵ‖_F/‖W‖_F, which both schemes measure in the same
    space. Lowest error wins (ties: fewer parameters, then channel). Returns None when neither
    scheme is cheaper than the dense conv at that rank, i.e. the layer should stay dense.
    """
    shape = _check_weight(weight)
    dense_params = int(np.prod(shape))
    if (param_budget is None) == (keep_ratio is None):
        raise ConfigError("choose_conv_decomposition needs exactly one of param_budget, keep_ratio.")
    if keep_ratio is not None:
        check_fraction("keep_ratio", keep_ratio)
        param_budget = int(keep_ratio * dense_params)
    candidates = []
    for kind in CONV_KINDS:
        m, n = conv_matrix_shape(shape, kind)
        rank = max(1, min(min(m, n), param_budget // (m + n)))
        if not is_profitable(m, n, rank):
            continue
        candidates.append(ConvChoice(
            kind=kind,
            rank=rank,
            params=rank * (m + n),
            dense_params=dense_params,
            flops_per_pixel=conv_flops_per_pixel(shape, kind, rank, strides),
            dense_flops_per_pixel=conv_flops_per_pixel(shape, None),
            rel_error=conv_spectrum(weight, kind).tail(rank),
        ))
    return min(candidates, key=lambda c: (c.rel_error, c.params, CONV_KINDS.index(c.kind)), default=None)
