"""Activation-aware refits of float layers from calibration statistics (pure numpy): the
whitened low-rank truncation of a factor pair (SVD-LLM / ASVD style) and the least-squares
refit of a weight whose input changed (the second factor of a pair, a consumer of pruned
channels).

A layer computes y = M x̃ with M ∈ R^{m×n'} on the input x̃ it sees in the compressed model;
the original computed W x with W ∈ R^{m×n} on its own input x (n' = n for a factor pair, n' < n
when channels were pruned). From calibration rows, H = Σ x̃x̃ᵀ (n'×n') and C = Σ x̃xᵀ (n'×n).
The layer problem with a ridge toward a prior M₀ (the current weight, or W when n' = n) is

    min_M  E(M) = Σ ‖M x̃ − W x‖² + λ‖M − M₀‖²_F,   λ = damp · mean(diag H).

Setting ∂E/∂M = 0 gives the least-squares target (:func:`ridge_target`)

    W* = (W Cᵀ + λ M₀) H_λ⁻¹,   H_λ = H + λI,

and E(M) = tr((M − W*) H_λ (M − W*)ᵀ) + const. With H_λ = L Lᵀ (Cholesky, or an eigen factor
when Cholesky fails) this is ‖(M − W*) L‖²_F, so among matrices of rank r the minimiser is
(Eckart–Young on W* L, :func:`whitened_truncation`)

    W* L = U Σ Vᵀ,   M_r = U_r Σ_r V_rᵀ L⁻¹ = B A,   B = U_r Σ_r^½,   A = Σ_r^½ V_rᵀ L⁻¹.

When x̃ = x (C = H, M₀ = W) this is the SVD of W H_λ^½ up to a rotation: the truncation
weighs the directions of W by how much the data excites them, where the plain SVD of W treats
every input direction alike.

For a fixed first factor A the second factor's input is z = A x̃, so its statistics are
H_z = A H Aᵀ and C_z = A C, and the refit of B (:func:`refit_second_factor`) is again
:func:`ridge_target`: B = (W Cᵀ Aᵀ + λ_z B₀)(A H Aᵀ + λ_z I)⁻¹ — numpy.linalg.lstsq of the
targets W x on the rows A x̃ as λ → 0.
"""
from __future__ import annotations

import numpy as np

DAMP = 0.01


def ridge(gram: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """(H_λ = H + λI, λ) with λ = damp · mean(diag H) (1e-12 for an all-zero H)."""
    lam = max(damp * float(np.mean(np.diagonal(gram))), 1e-12)
    return gram + lam * np.eye(gram.shape[0]), lam


def ridge_target(
    weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, damp: float = DAMP,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(W*, H_λ): W* = (W Cᵀ + λ M₀) H_λ⁻¹ minimises Σ‖M x̃ − W x‖² + λ‖M − M₀‖² (see the module
    docstring). ``weight`` W [m, n], ``gram`` H [n', n'], ``cross`` C [n', n], ``prior`` M₀ [m, n']
    (default W, which needs n' = n)."""
    weight = np.asarray(weight, np.float64)
    if prior is None:
        if cross.shape[0] != cross.shape[1]:
            raise ValueError("a prior is needed when the layer's input width changed")
        prior = weight
    gram_d, lam = ridge(np.asarray(gram, np.float64), damp)
    rhs = np.asarray(cross, np.float64) @ weight.T + lam * np.asarray(prior, np.float64).T  # [n', m]
    return solve_psd(gram_d, rhs).T, gram_d


def solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """matrix⁻¹ rhs for a symmetric positive semi-definite ``matrix`` (least squares if singular)."""
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def whitening_factor(gram_d: np.ndarray) -> np.ndarray:
    """L with L Lᵀ = H_λ: the Cholesky factor, or V·diag(√max(e, ε)) from the eigen
    decomposition when H_λ is numerically not positive definite."""
    symmetric = (gram_d + gram_d.T) / 2
    try:
        return np.linalg.cholesky(symmetric)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(symmetric)
        floor = max(float(values.max()), 1e-30) * 1e-12
        return vectors * np.sqrt(np.maximum(values, floor))


def whitened_truncation(target: np.ndarray, gram_d: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B [m, r], A [r, n]) of rank ``rank`` minimising tr((BA − W*) H_λ (BA − W*)ᵀ):
    B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ L⁻¹ from the SVD of W* L (see the module docstring)."""
    factor = whitening_factor(gram_d)
    u, s, vt = np.linalg.svd(np.asarray(target, np.float64) @ factor, full_matrices=False)
    rank = max(1, min(int(rank), s.size))
    root = np.sqrt(s[:rank])
    second = u[:, :rank] * root
    # A = diag(√σ) V_rᵀ L⁻¹, i.e. Aᵀ = L⁻ᵀ V_r diag(√σ)
    first = np.linalg.solve(factor.T, vt[:rank].T * root).T
    return second, first


def refit_second_factor(
    first: np.ndarray, weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, damp: float = DAMP,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """B [m, r] minimising Σ‖B A x̃ − W x‖² + λ_z‖B − B₀‖² for the fixed first factor A [r, n']:
    the normal equations on the factor's own input z = A x̃ (H_z = A H Aᵀ, C_z = A C)."""
    first = np.asarray(first, np.float64)
    gram_z = first @ np.asarray(gram, np.float64) @ first.T
    cross_z = first @ np.asarray(cross, np.float64)
    if prior is None:
        prior = np.zeros((np.shape(weight)[0], first.shape[0]))
    return ridge_target(weight, gram_z, cross_z, damp, prior)[0]


def centered(
    gram: np.ndarray, cross: np.ndarray, sum_current: np.ndarray, sum_original: np.ndarray, count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(H − N μ̃μ̃ᵀ, C − N μ̃μᵀ): the statistics of a layer fitted with its own intercept
    (the bias then takes the mean output shift W μ − M μ̃)."""
    if count <= 0:
        return gram, cross
    mean_current, mean_original = sum_current / count, sum_original / count
    return gram - count * np.outer(mean_current, mean_current), cross - count * np.outer(mean_current, mean_original)
