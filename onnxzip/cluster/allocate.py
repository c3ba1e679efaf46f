"""Per-layer index widths under a size budget, from measured sensitivity curves.

Each layer l has n_l weights and a curve D_l(b): the output distortion measured when layer l
alone is stored with b-bit indices. Assuming the distortions of different layers add (true to
first order for small, independent errors), the allocation solves

    minimise Σ_l D_l(b_l)   subject to   Σ_l n_l·b_l ≤ B·Σ_l n_l      (B = ``avg_bits``)

greedily: every layer starts at its narrowest width; then, while budget is left, the move with
the largest distortion drop per extra bit, (D_l(b) − D_l(b'))/(n_l·(b' − b)) over every wider
b' that fits, is taken. Looking past b + 1 follows the lower convex hull of a curve, so a
non-convex curve (4 bits no better than 3, 5 much better) does not stall the greedy. This is
the Lagrangian (equal-slope) solution whenever the curves are convex.
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
    chosen = {name: options[0] for name, options in widths.items()}
    total = sum(sizes[name] for name in curves)
    budget = avg_bits * total
    used = sum(sizes[name] * chosen[name] for name in curves)
    if used > budget + 1e-9 * total:
        raise ConfigError(
            f"avg_bits={avg_bits:g} is below the narrowest width the layers allow "
            f"({used / total:.3g} bits per weight)."
        )
    while True:
        best: tuple[float, str, int] | None = None
        for name, options in widths.items():
            curve, now, size = curves[name], chosen[name], sizes[name]
            for wider in options:
                extra = size * (wider - now)
                if wider <= now or used + extra > budget + 1e-9 * total:
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
