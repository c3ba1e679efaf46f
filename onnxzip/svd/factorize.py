"""Truncated SVD factorization of a weight matrix, its spectrum, and the rank rules.

A weight W (m×n) with SVD W = U·Σ·Vᵀ is replaced by two factors

    A = U_r·√Σ_r  (m×r),    B = √Σ_r·V_rᵀ  (r×n),

so that A·B is the best rank-r approximation of W in the Frobenius and spectral norms
(Eckart–Young) and ‖W − A·B‖_F² = Σ_{i>r} σ_i². Splitting √Σ evenly keeps both factors on the
same scale, which matters when they are written back as float16.

The factorized form costs r·(m+n) parameters (and as many multiply-accumulates per row of the
activation) against m·n dense, so it only pays when r < m·n/(m+n), the break-even rank.

Backends (chosen by :func:`choose_svd_method`): ``torch.linalg.svd`` (LAPACK gesdd through MKL)
for the exact SVD, ``torch.svd_lowrank`` (Halko et al. randomized range finder with QR-normalized
power iterations) when the rank is small against the matrix. On 2 CPU cores the torch exact SVD
is 1.2–1.5× faster than numpy's ``np.linalg.svd`` (OpenBLAS), and ``torch.svd_lowrank`` 2–3×
faster than scikit-learn's ``randomized_svd`` at the same error (``benchmarks/
bench_svd_factorize.py --compare``; the module constants below give the switching rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

import numpy as np
import torch

from onnxzip.errors import ConfigError

SvdMethod = Literal["auto", "exact", "randomized"]

#: The randomized SVD is used when rank < RANDOMIZED_MAX_RANK_FRACTION · min(m, n) and
#: min(m, n) ≥ RANDOMIZED_MIN_DIM. Measured on 2 cores (``bench_svd_factorize.py --compare``):
#: at r = min/4 the randomized SVD is only 10–35 % faster than the exact one (768×768: 0.19 vs
#: 0.21 s, 1024×1024: 0.32 vs 0.47 s) and at r = 3·min/8 it is slower, so the cross-over lies
#: between; at r = min/32 it is 10–15× faster. Below 512 the exact SVD takes under 0.2 s.
RANDOMIZED_MAX_RANK_FRACTION = 0.25
RANDOMIZED_MIN_DIM = 512
#: Sketch size q = r + max(MIN_OVERSAMPLES, OVERSAMPLE_FRACTION·r) with POWER_ITERATIONS
#: QR-normalized power iterations: within 0.5 % of the optimal rank-r Frobenius error up to
#: r = 3·min(m, n)/8 on decaying spectra with a noise floor, where scikit-learn's default
#: (q = r + 10, 4 iterations) reaches 0.9–1.25 %.
POWER_ITERATIONS = 3
MIN_OVERSAMPLES = 10
OVERSAMPLE_FRACTION = 0.5


def break_even_rank(m: int, n: int) -> float:
    """Rank at which the factors cost as much as the dense matrix: r·(m+n) = m·n."""
    return m * n / (m + n)


def is_profitable(m: int, n: int, rank: int) -> bool:
    """True when rank-``rank`` factors have fewer parameters (and FLOPs) than the dense m×n matrix."""
    return rank * (m + n) < m * n


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_rank(m: int, n: int, rank: int) -> int:
    """Return ``rank`` as an int, raising :class:`ConfigError` unless 1 ≤ rank ≤ min(m, n)."""
    if not _is_int(rank) or not 1 <= rank <= min(m, n):
        raise ConfigError(f"rank {rank!r} is outside [1, {min(m, n)}] for a {m}×{n} matrix.")
    return int(rank)


def rank_for_keep_ratio(m: int, n: int, keep_ratio: float) -> int:
    """Largest rank whose factors keep at most ``keep_ratio`` of the dense parameters,
    r = ⌊keep_ratio·m·n/(m+n)⌋, clamped to [1, min(m, n)] (rank 1 is the smallest form there is)."""
    check_fraction("keep_ratio", keep_ratio)
    return max(1, min(min(m, n), math.floor(keep_ratio * m * n / (m + n))))


def check_fraction(name: str, value: float) -> None:
    """Raise :class:`ConfigError` unless 0 < value ≤ 1."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}.")


@dataclass(frozen=True, eq=False)
class Spectrum:
    """All singular values of an m×n matrix (descending, float64) and what follows from them.

    energy = Σσ_i² = ‖W‖_F²; a rank-r approximation keeps Σ_{i≤r}σ_i² of it.
    """

    shape: tuple[int, int]
    singular_values: np.ndarray

    @classmethod
    def of(cls, matrix: np.ndarray) -> Spectrum:
        """Singular values of ``matrix`` (computed in float32, or float64 for float64 input)."""
        tensor = _as_tensor(matrix)
        values = torch.linalg.svdvals(_tall(tensor)).numpy().astype(np.float64)
        return cls(shape=(int(tensor.shape[0]), int(tensor.shape[1])), singular_values=values)

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def energy(self) -> float:
        """Σσ², accumulated in float64."""
        return float(np.sum(np.square(self.singular_values)))

    def _cumulative(self) -> np.ndarray:
        """Fraction of the energy kept at rank 0..full_rank (1 for a zero matrix)."""
        kept = np.concatenate([[0.0], np.cumsum(np.square(self.singular_values))])
        total = kept[-1]
        return kept / total if total > 0 else np.ones_like(kept)

    def energy_kept(self, rank: int) -> float:
        """Σ_{i≤r}σ_i² / Σσ_i²."""
        return float(self._cumulative()[check_rank(*self.shape, rank)])

    def tail(self, rank: int) -> float:
        """Relative Frobenius error of the best rank-r approximation, √(Σ_{i>r}σ_i² / Σσ_i²)."""
        return math.sqrt(max(0.0, 1.0 - self.energy_kept(rank)))

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest r with Σ_{i≤r}σ_i² ≥ fraction·Σσ_i²."""
        check_fraction("energy fraction", fraction)
        # The tolerance absorbs float rounding so that fraction 1.0 maps to the last nonzero value.
        rank = int(np.searchsorted(self._cumulative(), fraction - 1e-12, side="left"))
        return max(1, min(rank, self.full_rank))

    def summary(self, max_values: int = 16) -> dict[str, Any]:
        """JSON-serializable report: shape, energy, break-even, leading singular values and
        the ranks keeping 90 / 99 / 99.9 % of the energy."""
        m, n = self.shape
        return {
            "shape": [m, n],
            "full_rank": self.full_rank,
            "break_even_rank": break_even_rank(m, n),
            "energy": self.energy,
            "singular_values": [float(v) for v in self.singular_values[:max_values]],
            "rank_for_energy": {str(f): self.rank_for_energy(f) for f in (0.9, 0.99, 0.999)},
        }


@dataclass(frozen=True)
class RankRule:
    """How to pick a layer's rank: exactly one of an explicit ``rank``, a parameter ``keep_ratio``
    (factors keep at most that share of the dense parameters) or an ``energy`` fraction of Σσ²."""

    rank: int | None = None
    keep_ratio: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("rank", "keep_ratio", "energy") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"a rank rule needs exactly one of rank, keep_ratio, energy; got {given or 'none'}.")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}.")
        if self.keep_ratio is not None:
            check_fraction("keep_ratio", self.keep_ratio)
        if self.energy is not None:
            check_fraction("energy fraction", self.energy)

    @property
    def needs_spectrum(self) -> bool:
        return self.energy is not None

    def resolve(self, shape: tuple[int, int], spectrum: Spectrum | None = None) -> int:
        """The rank this rule gives an m×n matrix (``spectrum`` is required for an energy rule)."""
        m, n = shape
        if self.rank is not None:
            return check_rank(m, n, self.rank)
        if self.keep_ratio is not None:
            return rank_for_keep_ratio(m, n, self.keep_ratio)
        if spectrum is None:
            raise ConfigError("an energy rank rule needs the matrix spectrum.")
        return spectrum.rank_for_energy(self.energy)


def choose_svd_method(m: int, n: int, rank: int) -> Literal["exact", "randomized"]:
    """``randomized`` when rank < 0.25·min(m, n) and min(m, n) ≥ 512, else ``exact``."""
    small = min(m, n)
    if small >= RANDOMIZED_MIN_DIM and rank < RANDOMIZED_MAX_RANK_FRACTION * small:
        return "randomized"
    return "exact"


def _as_tensor(matrix: np.ndarray) -> torch.Tensor:
    """A 2-D float tensor view of ``matrix``: float64 stays float64, other floats compute in float32."""
    array = np.asarray(matrix)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"SVD needs a 2-D float matrix, got shape {array.shape} of {array.dtype}.")
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def _tall(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` or, when it is wide (m < n), its transpose: LAPACK's SVD of a wide matrix is
    2–3× slower than of the tall transpose, and Wᵀ = V·Σ·Uᵀ has the same singular values."""
    return tensor.T.contiguous() if tensor.shape[0] < tensor.shape[1] else tensor


def truncated_svd(
    matrix: np.ndarray, rank: int, *, method: SvdMethod = "auto", seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets (U_r m×r, σ_r, V_rᵀ r×n) of ``matrix``.

    The randomized path is seeded (a forked torch RNG, so global state is untouched) and
    therefore deterministic.
    """
    tensor = _as_tensor(matrix)
    m, n = tensor.shape
    rank = check_rank(m, n, rank)
    if method == "auto":
        method = choose_svd_method(m, n, rank)
    work = _tall(tensor)
    if method == "exact":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    elif method == "randomized":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sketch = min(rank + max(MIN_OVERSAMPLES, int(OVERSAMPLE_FRACTION * rank)), m, n)
            u, s, v = torch.svd_lowrank(work, q=sketch, niter=POWER_ITERATIONS)
        vh = v.mT
    else:
        raise ConfigError(f"unknown SVD method {method!r}; use auto, exact or randomized.")
    if work is not tensor:  # decomposed Wᵀ = V·Σ·Uᵀ: swap the factors back
        u, vh = vh.mT, u.mT
    return (np.ascontiguousarray(u[:, :rank].numpy()), s[:rank].numpy(),
            np.ascontiguousarray(vh[:rank].numpy()))


def factorize(
    matrix: np.ndarray, rank: int, *, method: SvdMethod = "auto", seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-r factors A = U_r·√Σ_r (m×r) and B = √Σ_r·V_rᵀ (r×n) of ``matrix``.

    Returned in the compute dtype: float64 for float64 input, float32 otherwise (float16 input
    goes through float32; :func:`factorize_preserving_dtype` casts back).
    """
    u, s, vh = truncated_svd(matrix, rank, method=method, seed=seed)
    root = np.sqrt(s)
    return u * root, root[:, None] * vh


def factorize_preserving_dtype(
    matrix: np.ndarray, rank: int, *, method: SvdMethod = "auto", seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`factorize`, with both factors cast back to ``matrix``'s dtype (e.g. float16)."""
    first, second = factorize(matrix, rank, method=method, seed=seed)
    dtype = np.asarray(matrix).dtype
    return first.astype(dtype), second.astype(dtype)
