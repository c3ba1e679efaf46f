"""Global rank allocation: meet a total parameter (or FLOP) budget at the least added error.

Each layer ℓ has a spectrum σ_ℓ (k_ℓ values), a cost per rank unit c_ℓ (m+n parameters, or
FLOPs) and a dense cost D_ℓ (m·n). At rank r it costs r·c_ℓ and adds the error
E_ℓ(r) = Σ_{i>r} w_ℓ,i with weights

* ``relative`` (default): w = σ²/Σσ², the squared relative Frobenius error of the layer. Layers
  of very different scale (embeddings next to projections, weights folded with a norm) are
  treated alike, and the objective Σ_ℓ E_ℓ is the sum of squared per-layer relative errors.
* ``absolute``: w = σ², the squared Frobenius error of the weights themselves.

Greedy (separable convex allocation): every layer starts dense. Its first move jumps from D_ℓ
to the rank r* ≤ r_max (r_max the largest profitable rank, r·c_ℓ < D_ℓ) minimizing
E_ℓ(r)/(D_ℓ − r·c_ℓ), the error added per unit saved; each later move drops one singular
value, adding w_r per c_ℓ saved. These slopes never decrease along a layer (the σ are sorted
and r* minimizes the jump slope), so taking the globally cheapest move from a heap until the
total is within budget is the greedy of the convex hull. When a jump overshoots, its rank is
raised back to the largest one still within budget. Ties go to the earlier layer, so the result
is deterministic. Layers never moved stay dense (rank None).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxzip.errors import ConfigError
from onnxzip.svd.factorize import Spectrum

Normalization = Literal["relative", "absolute"]


@dataclass(frozen=True)
class BudgetLayer:
    """A layer as the allocator sees it: its spectrum, cost per rank unit and dense cost."""

    spectrum: Spectrum
    rank_cost: float
    dense_cost: float

    @classmethod
    def of(cls, spectrum: Spectrum, positions: float = 1.0) -> BudgetLayer:
        """Costs of an m×n weight: r·(m+n) vs m·n, times ``positions`` (1 for parameters; the
        rows the weight multiplies per sample, e.g. tokens or output pixels, for MACs)."""
        m, n = spectrum.shape
        return cls(spectrum=spectrum, rank_cost=positions * (m + n), dense_cost=positions * m * n)

    def cost(self, rank: int | None) -> float:
        return self.dense_cost if rank is None else rank * self.rank_cost

    def error_weights(self, normalization: Normalization) -> np.ndarray:
        """w_i = σ_i² (absolute) or σ_i²/Σσ² (relative); E(r) = Σ_{i>r} w_i."""
        if normalization not in ("relative", "absolute"):
            raise ConfigError(f"unknown error normalization {normalization!r}; use relative or absolute.")
        weights = np.square(self.spectrum.singular_values)
        energy = weights.sum()
        return weights / energy if normalization == "relative" and energy > 0 else weights

    def error(self, rank: int | None, normalization: Normalization = "relative") -> float:
        """Added error E(r) of this layer at ``rank`` (0 when dense)."""
        return 0.0 if rank is None else float(self.error_weights(normalization)[rank:].sum())


def total_cost(layers: Mapping[str, BudgetLayer], ranks: Mapping[str, int | None]) -> float:
    """Σ_ℓ cost of layer ℓ at its rank (dense cost for None)."""
    return sum(layer.cost(ranks[name]) for name, layer in layers.items())


def total_error(
    layers: Mapping[str, BudgetLayer], ranks: Mapping[str, int | None], normalization: Normalization = "relative",
) -> float:
    """Σ_ℓ E_ℓ(r_ℓ), the objective :func:`allocate_ranks` minimizes."""
    return sum(layer.error(ranks[name], normalization) for name, layer in layers.items())


def allocate_ranks(
    layers: Mapping[str, BudgetLayer], budget: float, *, normalization: Normalization = "relative",
) -> dict[str, int | None]:
    """Ranks (None = stay dense) whose total cost is ≤ ``budget`` at the least added error.

    Raises :class:`ConfigError` when even rank 1 everywhere profitable cannot reach the budget.
    """
    names = list(layers)
    ranks: dict[str, int | None] = dict.fromkeys(names)
    total = total_cost(layers, ranks)
    weights = [layers[name].error_weights(normalization) for name in names]
    max_ranks: list[int] = []
    heap: list[tuple[float, int, int]] = []  # (added error per unit saved, layer index, target rank)
    for index, name in enumerate(names):
        layer = layers[name]
        max_rank = min(layer.spectrum.full_rank, math.ceil(layer.dense_cost / layer.rank_cost) - 1)
        max_ranks.append(max_rank)
        if max_rank < 1:
            continue
        candidates = np.arange(1, max_rank + 1)
        tails = np.cumsum(weights[index][::-1])[::-1]  # tails[r] = Σ_{i>r} w_i, r = 0..k−1
        tail_at = np.append(tails, 0.0)[candidates]
        slopes = tail_at / (layer.dense_cost - candidates * layer.rank_cost)
        best = int(np.flatnonzero(slopes == slopes.min())[-1])  # ties: the larger rank
        heap.append((float(slopes[best]), index, int(candidates[best])))
    heapq.heapify(heap)
    while total > budget and heap:
        _, index, rank = heapq.heappop(heap)
        name = names[index]
        layer = layers[name]
        if ranks[name] is None:
            # The largest rank in [r*, r_max] that still meets the budget, if the jump overshoots.
            fit = math.floor((budget - total + layer.dense_cost) / layer.rank_cost)
            rank = max(rank, min(fit, max_ranks[index]))
        total += layer.cost(rank) - layer.cost(ranks[name])
        ranks[name] = rank
        if rank > 1:
            heapq.heappush(heap, (float(weights[index][rank - 1] / layer.rank_cost), index, rank - 1))
    if total > budget:
        raise ConfigError(f"the budget {budget:g} is below the smallest reachable cost {total:g}.")
    return ranks
