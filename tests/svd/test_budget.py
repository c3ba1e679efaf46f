from __future__ import annotations

import numpy as np
import pytest

from onnxzip.errors import ConfigError
from onnxzip.svd import (
    BudgetLayer,
    Spectrum,
    allocate_ranks,
    rank_for_keep_ratio,
    total_cost,
    total_error,
)


def _layer(m: int, n: int, singular_values: np.ndarray, positions: float = 1.0) -> BudgetLayer:
    return BudgetLayer.of(Spectrum((m, n), np.asarray(singular_values, dtype=np.float64)), positions)


def _layers() -> dict[str, BudgetLayer]:
    """Layers of different sizes and spectra: fast decay, slow decay, flat, scaled."""
    return {
        "fast": _layer(256, 128, np.exp(-np.arange(128) / 8.0)),
        "slow": _layer(128, 384, 1.0 / (1.0 + np.arange(128)) ** 0.5),
        "flat": _layer(96, 96, np.ones(96)),
        "scaled": _layer(200, 200, 50.0 * np.exp(-np.arange(200) / 40.0)),
    }


@pytest.mark.parametrize("keep_ratio", [0.2, 0.35, 0.5])
@pytest.mark.parametrize("normalization", ["relative", "absolute"])
def test_meets_budget_and_beats_uniform(keep_ratio: float, normalization: str) -> None:
    layers = _layers()
    uniform = {
        name: rank_for_keep_ratio(*layer.spectrum.shape, keep_ratio) for name, layer in layers.items()
    }
    budget = total_cost(layers, uniform)
    ranks = allocate_ranks(layers, budget, normalization=normalization)
    assert total_cost(layers, ranks) <= budget
    assert total_error(layers, ranks, normalization) < total_error(layers, uniform, normalization)


def test_budget_is_tight() -> None:
    """Raising any factorized layer's rank by one would break the budget."""
    layers = _layers()
    budget = 0.4 * total_cost(layers, dict.fromkeys(layers))
    ranks = allocate_ranks(layers, budget)
    slack = budget - total_cost(layers, ranks)
    assert 0 <= slack < min(layer.rank_cost for name, layer in layers.items() if ranks[name] is not None)


def test_fast_decay_is_cut_first_and_flat_stays_dense() -> None:
    layers = _layers()
    dense = total_cost(layers, dict.fromkeys(layers))
    ranks = allocate_ranks(layers, dense - 10_000)
    assert ranks["fast"] is not None and ranks["flat"] is None
    assert ranks["fast"] < 64  # far below break-even 256·128/384 ≈ 85: the tail is tiny


def test_everything_dense_when_budget_allows() -> None:
    layers = _layers()
    dense = total_cost(layers, dict.fromkeys(layers))
    assert allocate_ranks(layers, dense) == dict.fromkeys(layers)


def test_deterministic_with_ties() -> None:
    twin = {name: _layer(64, 64, np.exp(-np.arange(64) / 12.0)) for name in ("a", "b", "c")}
    budget = 0.3 * total_cost(twin, dict.fromkeys(twin))
    first = allocate_ranks(twin, budget)
    assert first == allocate_ranks(twin, budget)
    assert max(first.values()) - min(first.values()) <= 1  # equal layers end up equal ±1


def test_normalization_matters_for_scale() -> None:
    values = np.exp(-np.arange(64) / 10.0)
    layers = {"small": _layer(64, 64, values), "large": _layer(64, 64, 100.0 * values)}
    budget = 0.25 * total_cost(layers, dict.fromkeys(layers))
    relative = allocate_ranks(layers, budget, normalization="relative")
    absolute = allocate_ranks(layers, budget, normalization="absolute")
    assert abs(relative["small"] - relative["large"]) <= 1
    assert absolute["large"] > absolute["small"]


def test_flop_costs() -> None:
    layer = _layer(10, 30, np.ones(10), positions=49)
    assert layer.rank_cost == 49 * 40 and layer.dense_cost == 49 * 300
    assert layer.cost(None) == layer.dense_cost and layer.cost(3) == 3 * 49 * 40


def test_impossible_budget_raises() -> None:
    layers = _layers()
    with pytest.raises(ConfigError, match="budget"):
        allocate_ranks(layers, 100.0)
    with pytest.raises(ConfigError, match="normalization"):
        allocate_ranks(layers, 1e9, normalization="log")  # type: ignore[arg-type]
