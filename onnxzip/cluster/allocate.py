"""Per-layer index widths under a size budget, from measured sensitivity curves.

Each layer l has n_l weights and a curve D_l(b): the output distortion measured when layer l
alone is stored with b-bit indices. Assuming the distortions of different layers add (true to
first order for small, independent errors), the allocation solves

    minimise Σ_l D_l(b_l)   subject to   Σ_l n_l·b_l ≤ B·Σ_l n_l      (B = ``avg_bits``)

by Lagrangian relaxation: for a multiplier λ every layer independently takes
argmin_b D_l(b) + λ·n_l·b, and λ is bisected (in log space) to the smallest value whose choice
fits the budget. The budget left over is then spent greedily: the move with the largest
distortion drop per extra bit, (D_l(b) − D_l(b'))/(n_l·(b' − b)) over every wider b' that fits.
The same greedy run from the narrowest widths is also tried (it can beat the relaxation where
the curves are far from convex) and the allocation with the lower total distortion is kept.
"""
from __future__ import annotations

from collections.abc import Mapping

from onnxzip.errors import ConfigError


def allocate_bits(
    curves: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    avg_bits: float,
) -> dict[str, int]:
    """The width of every layer of ``curves`` (bits → distortion) for a mean of at most
    ``avg_bits`` index bits per weight (weighted by ``sizes``, the element counts)."""
    if not curves:
        return {}
    widths = {name: sorted(curve) for name, curve in curves.items()}
    if any(not options for options in widths.values()):
        raise ConfigError("every layer needs at least one measured width.")
    total = sum(sizes[name] for name in curves)
    budget = avg_bits * total + 1e-9 * total
    narrowest = {name: options[0] for name, options in widths.items()}
    if _used(narrowest, sizes) > budget:
        raise ConfigError(
            f"avg_bits={avg_bits:g} is below the narrowest width the layers allow "
            f"({_used(narrowest, sizes) / total:.3g} bits per weight)."
        )

    def relaxed(lam: float) -> dict[str, int]:
        return {
            name: min(options, key=lambda b: (curves[name][b] + lam * sizes[name] * b, b))
            for name, options in widths.items()
        }

    low, high = -40.0, 10.0  # log10 λ; λ = 10**10 takes the narrowest widths
    for _ in range(60):
        middle = (low + high) / 2
        if _used(relaxed(10**middle), sizes) <= budget:
            high = middle
        else:
            low = middle
    candidates = [_fill(relaxed(10**high), curves, widths, sizes, budget),
                  _fill(narrowest, curves, widths, sizes, budget)]
    best = min(candidates, key=lambda c: sum(curves[n][b] for n, b in c.items()))
    return _exchange(best, curves, widths, sizes, budget)


def _exchange(
    chosen: dict[str, int],
    curves: Mapping[str, Mapping[int, float]],
    widths: Mapping[str, list[int]],
    sizes: Mapping[str, int],
    budget: float,
) -> dict[str, int]:
    """Local search: widen one layer while narrowing another whenever the pair fits the budget
    and lowers the total distortion (the moves a knapsack's greedy misses), then refill."""
    chosen = dict(chosen)
    for _ in range(100):
        used = _used(chosen, sizes)
        best: tuple[float, str, int, str, int] | None = None
        for up, up_options in widths.items():
            for wider in (b for b in up_options if b > chosen[up]):
                extra = sizes[up] * (wider - chosen[up])
                gain = curves[up][chosen[up]] - curves[up][wider]
                for down, down_options in widths.items():
                    if down == up:
                        continue
                    for narrower in (b for b in down_options if b < chosen[down]):
                        freed = sizes[down] * (chosen[down] - narrower)
                        if used + extra - freed > budget:
                            continue
                        change = gain - (curves[down][narrower] - curves[down][chosen[down]])
                        if change > 1e-15 and (best is None or change > best[0]):
                            best = (change, up, wider, down, narrower)
        if best is None:
            break
        _change, up, wider, down, narrower = best
        chosen[up], chosen[down] = wider, narrower
        chosen = _fill(chosen, curves, widths, sizes, budget)
    return chosen


def _used(chosen: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    return float(sum(sizes[name] * bits for name, bits in chosen.items()))


def _fill(
    chosen: dict[str, int],
    curves: Mapping[str, Mapping[int, float]],
    widths: Mapping[str, list[int]],
    sizes: Mapping[str, int],
    budget: float,
) -> dict[str, int]:
    """Spend what ``chosen`` leaves of ``budget``: best distortion drop per extra bit first."""
    chosen = dict(chosen)
    used = _used(chosen, sizes)
    while True:
        best: tuple[float, str, int] | None = None
        for name, options in widths.items():
            curve, now, size = curves[name], chosen[name], sizes[name]
            for wider in options:
                extra = size * (wider - now)
                if wider <= now or used + extra > budget:
                    continue
                gain = (curve[now] - curve[wider]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, wider)
        if best is None:
            return chosen
        _gain, name, wider = best
        used += sizes[name] * (wider - chosen[name])
        chosen[name] = wider


def mean_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Mean index bits per weight of an allocation."""
    total = sum(sizes[name] for name in bits)
    return sum(sizes[name] * b for name, b in bits.items()) / total if total else 0.0
