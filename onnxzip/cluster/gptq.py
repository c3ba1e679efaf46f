"""Second-order codebook fitting of one linear layer from its input statistics (pure numpy).

A layer computes y = W x per block (a Conv group, an LSTM/GRU direction; one block for
MatMul/Gemm): W ∈ R^{m×n} in the *view* ``[G, m, n]``. The quantized weight Q = c[ch, idx]
takes every element from a codebook row c_ch ∈ R^K (one row per tensor, or per output channel:
``ch[g, i]`` names the row of block row i). Given calibration inputs x̃ (what the layer sees in
the compressed model) and x (the original model's input), the layer problem is

    min_Q  E(Q) = Σ_samples ‖Q x̃ − W x‖² + λ‖Q − W‖²_F,

with the statistics H = Σ x̃x̃ᵀ (the Gram matrix) and C = Σ x̃xᵀ (the cross term; C = H when
x̃ = x). λ = ``damp`` · mean(diag H) keeps H_λ = H + λI invertible and pulls Q toward W where
the data says nothing. Setting ∂E/∂Q = 0 gives the unconstrained optimum W* with
W* H_λ = W (C + λI)ᵀ, and E(Q) = tr((Q − W*) H_λ (Q − W*)ᵀ) + const: every step below
minimises this quadratic form, so earlier layers' errors (x̃ ≠ x) are compensated through W*.

* :func:`refit_centroids` — for fixed indices, E is quadratic in the centroids. With P_r the
  one-hot [n, K] assignment of block row r (q_r = P_r c_ch), the normal equations per codebook
  row are A c = b with A = Σ_r P_rᵀ H_λ P_r (K × K) and b = Σ_r P_rᵀ H_λ w*_r, i.e.
  b_k = Σ_{j: idx_rj = k} (W* H_λ)_rj, summed over the rows r that use that codebook row.
* :func:`gptq_assign` — GPTQ (Frantar et al. 2022) with a codebook as the grid: columns are
  quantized one at a time (largest diag H first), each column's error e_j = (w_j − q_j)/U_jj fed
  back into the columns not yet quantized through the Cholesky factor U of H_λ⁻¹
  (H_λ⁻¹ = UᵀU), so later columns absorb it; updates are applied lazily in column blocks.
* :func:`fit_codebook` — alternate assignment and refit, keep the iterate of lowest E (the
  starting codebook included: the result is never worse on the fit data).
* Channel-scaled codebooks (q_r = s_r·c[idx_r], one shared codebook row, a scale per output
  channel): E = Σ_r s_r² (q̃_r − w*_r/s_r)ᵀ H_λ (q̃_r − w*_r/s_r), so GPTQ assigns q̃ against the
  target W*/s (rows are independent) and the centroid normal equations weigh row r by s_r²; for
  fixed q̃ each channel's scale has the closed form s_c = Σ_{r∈c} q̃_rᵀ H_λ w*_r / Σ_{r∈c} q̃_rᵀ H_λ q̃_r
  (:func:`refit_scales`), alternated with the centroids.
* Vector codebooks of pairs (:mod:`onnxzip.cluster.vq`, codewords along the output channels):
  block rows r₀, r₁ (``pair_rows``) share one codeword index per column, so the flat codebook
  [2K] holds codeword k's two values at 2k and 2k + 1 and element (r_d, j) uses entry 2·idx + d.
  E separates over the entries exactly as for a scalar codebook of 2K values, so the refit is
  the same; GPTQ assigns each column's pairs jointly to the nearest codeword (both rows carry
  the same column weight 1/U_jj², so the metric is Euclidean) and feeds back each row's error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

DAMP = 0.01
COLUMN_BLOCK = 128
ONEHOT_BYTES = 64 << 20  # bound on the one-hot assignment chunk of a refit


def damped(gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(H_λ = H + λI, λ per block) with λ = damp · mean(diag H) (1e-8 for an all-zero H)."""
    diagonal = np.diagonal(gram, axis1=-2, axis2=-1)
    lam = np.maximum(damp * diagonal.mean(axis=-1), 1e-8)
    identity = np.eye(gram.shape[-1])
    return gram + lam[:, None, None] * identity, lam


def target_weight(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, damp: float) -> np.ndarray:
    """W* solving W* H_λ = W (C + λI)ᵀ per block (W* = W when x̃ = x)."""
    gram_d, lam = damped(gram, damp)
    cross_d = cross + lam[:, None, None] * np.eye(gram.shape[-1])
    rhs = cross_d @ np.swapaxes(weight, -1, -2)  # (C + λI) Wᵀ: [G, n, m]
    return np.swapaxes(np.linalg.solve(gram_d, rhs), -1, -2)


def decode(codebook: np.ndarray, indices: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Q[g, i, j] = codebook[channels[g, i], indices[g, i, j]]."""
    return codebook[channels[..., None], indices]


def objective(q: np.ndarray, target: np.ndarray, gram_d: np.ndarray) -> float:
    """tr((Q − W*) H_λ (Q − W*)ᵀ) summed over blocks: E(Q) up to its constant."""
    diff = q - target
    return float(np.sum((diff @ gram_d) * diff))


def refit_centroids(
    indices: np.ndarray, codebook: np.ndarray, channels: np.ndarray, target: np.ndarray,
    gram_d: np.ndarray, pinned: np.ndarray | None = None, row_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Centroids minimising E for fixed ``indices`` (normal equations of size K per codebook
    row, see the module docstring). Entries no row uses, and ``pinned`` ones (e.g. an exact 0
    kept for pruned weights), keep their values. ``row_weight`` [G, m]: each block row's weight
    in E (s_r² of a channel-scaled codebook, with ``target`` = W*/s)."""
    rows, k = codebook.shape
    blocks, m, n = indices.shape
    flat_rows = np.broadcast_to(channels[..., None], indices.shape)
    weighted = target @ gram_d  # W* H_λ
    if row_weight is not None:
        weighted = weighted * row_weight[..., None]
    b = np.bincount((flat_rows * k + indices).reshape(-1), weights=weighted.reshape(-1),
                    minlength=rows * k).reshape(rows, k)
    a = np.zeros((rows * k, k))
    step = max(1, ONEHOT_BYTES // (n * k * 8))
    for g in range(blocks):
        for start in range(0, m, step):
            chunk = indices[g, start:start + step]  # [r, n]
            count = chunk.shape[0]
            positions = np.tile(np.arange(n), count)
            # P_rᵀ H_λ for every row r of the chunk, as one sparse product: row (r, k) sums the
            # rows j of H_λ with idx_rj = k (n² adds per weight row instead of n²·K multiplies)
            select = sparse.csr_matrix((np.ones(count * n), ((np.arange(count)[:, None] * k + chunk).reshape(-1),
                                                             positions)), shape=(count * k, n))
            left = np.asarray(select @ gram_d[g]).reshape(count, k, n)  # [r, K, n]
            if row_weight is not None:
                left = left * row_weight[g, start:start + step, None, None]
            # (P_rᵀ H_λ) P_r summed into the codebook row of each r: entry (row of r, idx_rj)
            owner = (channels[g, start:start + step, None] * k + chunk).reshape(-1)
            gather = sparse.csr_matrix((np.ones(count * n), (owner, np.arange(count * n))),
                                       shape=(rows * k, count * n))
            a += gather @ left.transpose(0, 2, 1).reshape(count * n, k)
    a = a.reshape(rows, k, k)
    fitted = codebook.astype(np.float64).copy()
    free = np.diagonal(a, axis1=1, axis2=2) > 0
    if pinned is not None:
        free &= ~pinned
    for row in range(rows):
        keep = free[row]
        if not keep.any():
            continue
        fixed = ~keep
        rhs = b[row, keep] - a[row][np.ix_(keep, fixed)] @ fitted[row, fixed]
        system = a[row][np.ix_(keep, keep)]
        try:
            fitted[row, keep] = np.linalg.solve(system, rhs)
        except np.linalg.LinAlgError:
            fitted[row, keep] = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return fitted


def refit_scales(q: np.ndarray, target: np.ndarray, gram_d: np.ndarray, scale_ids: np.ndarray,
                 scale: np.ndarray) -> np.ndarray:
    """Channel scales minimising E for a fixed unscaled Q̃ = ``q`` [G, m, n] (block row r scaled by
    ``scale[scale_ids[g, r]]``): s_c = Σ_{r∈c} q̃_rᵀ H_λ w*_r / Σ_{r∈c} q̃_rᵀ H_λ q̃_r; a channel
    whose Q̃ rows are all zero keeps its scale."""
    left = q @ gram_d  # Q̃ H_λ
    ids = scale_ids.reshape(-1)
    num = np.bincount(ids, np.sum(left * target, axis=2).reshape(-1), minlength=scale.size)
    den = np.bincount(ids, np.sum(left * q, axis=2).reshape(-1), minlength=scale.size)
    fitted = np.asarray(scale, dtype=np.float64).copy()
    ok = den > 1e-30
    fitted[ok] = num[ok] / den[ok]
    return fitted


def _inverse_cholesky(gram_d: np.ndarray) -> np.ndarray:
    """Upper U with H_λ⁻¹ = UᵀU per block; more damping while H_λ⁻¹ is not positive definite."""
    scale = np.diagonal(gram_d, axis1=-2, axis2=-1).mean(axis=-1)[:, None, None]
    identity = np.eye(gram_d.shape[-1])
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1e-1):
        try:
            inverse = np.linalg.inv(gram_d + extra * scale * identity)
            return np.swapaxes(np.linalg.cholesky((inverse + np.swapaxes(inverse, 1, 2)) / 2), 1, 2)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the Gram matrix stays singular after damping")


def column_order(gram_d: np.ndarray, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(column order [G, n], upper Cholesky factor of the permuted H_λ⁻¹) for :func:`gptq_assign`:
    largest diag H first with ``act_order`` (GPTQ's act-order), else the stored order."""
    blocks, n = gram_d.shape[:2]
    order = (np.argsort(-np.diagonal(gram_d, axis1=1, axis2=2), axis=1, kind="stable") if act_order
             else np.broadcast_to(np.arange(n), (blocks, n)))
    picked = np.arange(blocks)[:, None, None]
    return order, _inverse_cholesky(gram_d[picked, order[:, :, None], order[:, None, :]])


def _pair_nearest(column: np.ndarray, flat: np.ndarray, pair_rows: np.ndarray,
                  row_weight: np.ndarray | None = None) -> np.ndarray:
    """Entries (2k, 2k + 1) of the nearest codeword k of each row pair of ``column`` [G, m], each
    row's squared error weighted by ``row_weight`` [G, m] (s_r² of a channel-scaled codebook)."""
    first = np.take_along_axis(column, pair_rows[:, :, 0], axis=1)
    second = np.take_along_axis(column, pair_rows[:, :, 1], axis=1)
    w0 = w1 = 1.0
    if row_weight is not None:
        w0 = np.take_along_axis(row_weight, pair_rows[:, :, 0], axis=1)[..., None]
        w1 = np.take_along_axis(row_weight, pair_rows[:, :, 1], axis=1)[..., None]
    cost = w0 * (first[..., None] - flat[0::2]) ** 2 + w1 * (second[..., None] - flat[1::2]) ** 2
    nearest = np.argmin(cost, axis=-1)
    index = np.empty(column.shape, dtype=np.int64)
    np.put_along_axis(index, pair_rows[:, :, 0], 2 * nearest, axis=1)
    np.put_along_axis(index, pair_rows[:, :, 1], 2 * nearest + 1, axis=1)
    return index


def gptq_assign(
    target: np.ndarray, ordered: tuple[np.ndarray, np.ndarray], codebook: np.ndarray, channels: np.ndarray,
    *, column_block: int = COLUMN_BLOCK, pair_rows: np.ndarray | None = None, row_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into ``codebook`` rows for the weights ``target`` [G, m, n], assigned column by
    column in the order of ``ordered`` (:func:`column_order`) with error feedback through H_λ⁻¹
    (see the module docstring). ``pair_rows`` [G, m/2, 2]: the rows of each pair of a vector
    codebook (``codebook`` [1, 2K], entries 2k and 2k + 1 the two values of codeword k)."""
    blocks, m, n = target.shape
    order, upper = ordered
    weight = np.take_along_axis(target, order[:, None, :], axis=2).copy()
    centroids = codebook[channels]  # [G, m, K]
    chosen = np.empty((blocks, m, n), dtype=np.int64)
    for start in range(0, n, column_block):
        stop = min(start + column_block, n)
        errors = np.empty((blocks, m, stop - start))
        for j in range(start, stop):
            column = weight[:, :, j]
            if pair_rows is None:
                index = np.argmin(np.abs(column[..., None] - centroids), axis=-1)
            else:
                index = _pair_nearest(column, codebook[0], pair_rows, row_weight)
            chosen[:, :, j] = index
            quantized = np.take_along_axis(centroids, index[..., None], axis=-1)[..., 0]
            error = (column - quantized) / upper[:, j, j][:, None]
            weight[:, :, j:stop] -= error[..., None] * upper[:, None, j, j:stop]
            errors[:, :, j - start] = error
        weight[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    indices = np.empty_like(chosen)
    np.put_along_axis(indices, np.broadcast_to(order[:, None, :], chosen.shape), chosen, axis=2)
    return indices


@dataclass
class CodebookFit:
    """The best iterate of :func:`fit_codebook`: its codebook [rows, K] (float64), indices
    [G, m, n], and E before (the given codebook) and after, relative to E(0) = tr(W* H_λ W*ᵀ)."""

    codebook: np.ndarray
    indices: np.ndarray
    before: float
    after: float
    step: str
    scale: np.ndarray | None = None  # channel-scaled: the fitted scale per channel


@dataclass
class LayerProblem:
    """What :func:`fit_codebook` derives from one layer's weight and statistics, whatever the
    codebook: H_λ, W*, E(0) and the GPTQ column order with its Cholesky factor (computed on first
    use). Build it once with :func:`layer_problem` to fit several codebooks (widths) of a layer."""

    gram_d: np.ndarray
    target: np.ndarray
    scale: float
    act_order: bool
    ordered: tuple[np.ndarray, np.ndarray] | None = None

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        if self.ordered is None:
            self.ordered = column_order(self.gram_d, self.act_order)
        return self.ordered


def layer_problem(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, *, damp: float = DAMP,
                  act_order: bool = True) -> LayerProblem:
    """The :class:`LayerProblem` of ``weight`` [G, m, n]; ``gram``/``cross`` may have one block
    broadcast to all of ``weight``'s."""
    weight = weight.astype(np.float64)
    blocks = weight.shape[0]
    gram = np.broadcast_to(gram, (blocks, *gram.shape[1:]))
    cross = np.broadcast_to(cross, (blocks, *cross.shape[1:]))
    gram_d = damped(gram, damp)[0]
    target = target_weight(weight, gram, cross, damp)
    scale = max(objective(np.zeros_like(target), target, gram_d), 1e-30)
    return LayerProblem(gram_d, target, scale, act_order)


def fit_codebook(
    weight: np.ndarray, codebook: np.ndarray, indices: np.ndarray, channels: np.ndarray,
    gram: np.ndarray, cross: np.ndarray, *, iterations: int = 3, damp: float = DAMP,
    act_order: bool = True, assign: bool = True, pinned: np.ndarray | None = None,
    problem: LayerProblem | None = None, scale: np.ndarray | None = None, scale_ids: np.ndarray | None = None,
    pair_rows: np.ndarray | None = None,
) -> CodebookFit:
    """Minimise E over the centroids and (with ``assign``) the indices of one layer: first the
    closed-form refit for the given indices, then ``iterations`` rounds of GPTQ assignment and
    refit. ``gram``/``cross`` may have one block broadcast to all of ``weight``'s; ``problem``
    (:func:`layer_problem` of the same arguments) skips deriving them again. A channel-scaled
    codebook passes its ``scale`` [C] and the channel of each block row, ``scale_ids`` [G, m]:
    the scales are refit in closed form after each centroid refit (module docstring). A vector
    codebook passes its flat [1, 2K] codebook, element entries as ``indices`` and ``pair_rows``."""
    if problem is None:
        problem = layer_problem(weight, gram, cross, damp=damp, act_order=act_order)
    gram_d, target, norm = problem.gram_d, problem.target, problem.scale
    scaled = scale is not None and scale_ids is not None

    def rows(s: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(target W*/s, row weights s²) of scales ``s`` (a zero scale: the row weighs nothing)."""
        if s is None:
            return target, None
        r = s[scale_ids]
        live = np.abs(r) > 1e-30
        return target / np.where(live, r, 1.0)[..., None], np.where(live, r * r, 0.0)

    def error(values: np.ndarray, chosen: np.ndarray, s: np.ndarray | None) -> float:
        q = decode(values, chosen, channels)
        return objective(q if s is None else q * s[scale_ids][..., None], target, gram_d) / norm

    def refit(chosen: np.ndarray, values: np.ndarray, s: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        goal, weights = rows(s)
        values = refit_centroids(chosen, values, channels, goal, gram_d, pinned, weights)
        if s is None:
            return values, None
        s = refit_scales(decode(values, chosen, channels), target, gram_d, scale_ids, s)
        goal, weights = rows(s)
        return refit_centroids(chosen, values, channels, goal, gram_d, pinned, weights), s

    current = codebook.astype(np.float64)
    start = np.asarray(scale, dtype=np.float64) if scaled else None
    best = CodebookFit(current, indices, 0.0, 0.0, "unchanged", start)
    best.before = best.after = error(current, indices, start)
    candidates = [(*refit(indices, current, start), indices, "centroid refit" + (" + scales" if scaled else ""))]
    for round_ in range(iterations if assign else 0):
        values, s = candidates[-1][:2]
        goal, weights = rows(s)
        assigned = gptq_assign(goal, problem.order(), values, channels, pair_rows=pair_rows, row_weight=weights)
        candidates.append((*refit(assigned, values, s), assigned, f"gptq assignment + refit ×{round_ + 1}"))
    for values, s, chosen, step in candidates:
        found = error(values, chosen, s)
        if found < best.after:
            best = CodebookFit(values, chosen, best.before, found, step, s)
    return best
