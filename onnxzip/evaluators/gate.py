"""The quality gate: conditions on metric results → go / no-go with a readable report.

A condition bounds one metric in one of three ways:

* ``min`` – the candidate's value must be ≥ the limit (a floor, e.g. ``snr:min=30``);
* ``max`` – the candidate's value must be ≤ the limit (a ceiling, e.g. ``rel_l2:max=0.05``);
* ``max_drop`` – the candidate may be worse than the original model, measured in the same run,
  by at most the limit, in the metric's own units. "Worse" follows the metric's direction:
  drop = original − candidate when higher is better, candidate − original otherwise
  (``accuracy:max_drop=0.01``, ``pesq:max_drop=0.2``).

Conditions are plain data. The same schema reads the recipe form
``{"metric": "snr", "min": 30, "max_drop": 3}`` and the CLI form ``"snr:min=30,max_drop=3"``;
each bound becomes one :class:`GateCondition`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from onnxzip.errors import ConfigError
from onnxzip.evaluators.base import FUNCTION_KINDS, MetricResult, coerce, format_number, json_number, parse_spec

KINDS = ("min", "max", "max_drop")


@dataclass(frozen=True)
class GateCondition:
    """One bound on one metric."""

    metric: str
    kind: str
    limit: float
    #: Options of the metric itself (``sample_rate``), as sorted (key, value) pairs.
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"Condition on {self.metric!r}: unknown bound {self.kind!r}; "
                f"use {', '.join(KINDS)}."
            )
        if math.isnan(self.limit) or (self.kind == "max_drop" and self.limit < 0):
            raise ConfigError(
                f"Condition on {self.metric!r}: {self.kind} must be a number"
                f"{' >= 0' if self.kind == 'max_drop' else ''}, got {self.limit}."
            )

    @property
    def text(self) -> str:
        """The condition as its CLI string, e.g. ``accuracy:max_drop=0.01``."""
        return f"{self.metric}:{self.kind}={self.limit:g}"

    def bound(self) -> str:
        """Human form of the limit: ``>= 30``, ``<= 0.05``, ``drop <= 0.01``."""
        symbol = {"min": ">=", "max": "<=", "max_drop": "drop <="}[self.kind]
        return f"{symbol} {self.limit:g}"

    def check(self, original: MetricResult | None, candidate: MetricResult) -> GateRow:
        """Judge ``candidate`` (and ``original`` for ``max_drop``)."""
        change = None
        if original is not None:
            # Equal values (also two infinite SNRs) have no change rather than inf − inf = nan.
            same = candidate.value == original.value
            change = 0.0 if same else candidate.value - original.value
        if self.kind == "min":
            passed = candidate.value >= self.limit
        elif self.kind == "max":
            passed = candidate.value <= self.limit
        else:
            if original is None:
                raise ConfigError(
                    f"{self.text} needs the original model's {self.metric}; measure it too."
                )
            drop = candidate.drop_from(original)
            # An infinite original (exact match) can only be kept by an infinite candidate.
            passed = drop <= self.limit or candidate.value == original.value
        return GateRow(
            self,
            None if original is None else original.value,
            candidate.value,
            change,
            bool(passed),
            candidate.unit,
        )


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected a number, got {value!r}.") from exc


def parse_conditions(
    spec: str | Mapping[str, Any] | GateCondition | Iterable[Any],
) -> list[GateCondition]:
    """Conditions from a CLI string, a recipe mapping, a GateCondition, or a list of these."""
    if isinstance(spec, GateCondition):
        return [spec]
    if isinstance(spec, str):
        metric, options = parse_spec(spec)
        if not options:
            raise ConfigError(
                f"{spec!r} sets no bound; write e.g. '{metric}:min=30' ({', '.join(KINDS)})."
            )
        return parse_conditions({"metric": metric, **options})
    if isinstance(spec, Mapping):
        fields = dict(spec)
        metric = fields.pop("metric", None)
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"A gate condition needs a 'metric' name, got {dict(spec)!r}.")
        # Keys other than bounds are options of the metric (stoi:min=0.8,sample_rate=16000);
        # building the metric names any it does not accept.
        options = tuple(sorted((k, coerce(v)) for k, v in fields.items() if k not in KINDS))
        from onnxzip.evaluators.registry import resolve_metric

        if metric.partition(":")[0] in FUNCTION_KINDS:  # load user code now: its errors come first
            resolve_metric({"name": metric, **dict(options)})
        elif options:
            try:
                resolve_metric({"name": metric, **dict(options)})
            except ConfigError as exc:
                raise ConfigError(
                    f"Condition on {metric!r}: unknown bound(s) {', '.join(k for k, _ in options)}; "
                    f"use {', '.join(KINDS)} or an option the metric accepts ({exc})"
                ) from exc
        bounds = {k: v for k, v in fields.items() if k in KINDS}
        if not bounds:
            raise ConfigError(f"Condition on {metric!r} sets no bound ({', '.join(KINDS)}).")
        return [
            GateCondition(metric, kind, _number(value, f"{metric}:{kind}"), options)
            for kind, value in bounds.items()
        ]
    if isinstance(spec, Iterable):
        return [condition for item in spec for condition in parse_conditions(item)]
    raise ConfigError(f"Cannot read a gate condition from a {type(spec).__name__}.")


@dataclass(frozen=True)
class GateRow:
    """One judged condition: (metric, original, candidate, change, limit, passed)."""

    condition: GateCondition
    original: float | None
    candidate: float
    change: float | None
    passed: bool
    unit: str = ""

    @property
    def metric(self) -> str:
        return self.condition.metric

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (non-finite numbers as strings)."""
        return {
            "metric": self.metric,
            "condition": self.condition.kind,
            "limit": json_number(self.condition.limit),
            "original": json_number(self.original),
            "candidate": json_number(self.candidate),
            "change": json_number(self.change),
            "unit": self.unit,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class GateReport:
    """Every condition's verdict; the gate passes when all rows do."""

    rows: tuple[GateRow, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[GateRow]:
        return [row for row in self.rows if not row.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": [row.to_dict() for row in self.rows]}

    def render(self) -> str:
        """A fixed-width text table, one line per condition, then the verdict."""
        header = ("metric", "original", "candidate", "change", "limit", "result")
        lines = [
            (
                row.metric + (f" ({row.unit})" if row.unit else ""),
                format_number(row.original),
                format_number(row.candidate),
                "-" if row.change is None else f"{row.change:+.4g}",
                row.condition.bound(),
                "pass" if row.passed else "FAIL",
            )
            for row in self.rows
        ]
        widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
        table = [
            "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in [header, *lines]
        ]
        table.insert(1, "  ".join("-" * width for width in widths))
        verdict = (
            "quality gate: PASSED"
            if self.passed
            else (f"quality gate: FAILED ({len(self.failures)} of {len(self.rows)} conditions)")
        )
        return "\n".join([*table, verdict])

    def __str__(self) -> str:
        return self.render()


class QualityGate:
    """Go / no-go on metric results: ``QualityGate(conditions).check(original, candidate)``."""

    def __init__(self, conditions: Any = ()) -> None:
        self.conditions = parse_conditions(conditions)

    @property
    def metrics(self) -> list[str | dict[str, Any]]:
        """Metrics the conditions need, in first-mention order (evaluate these): the name, or
        ``{"name": ..., **options}`` when a condition gives the metric options."""
        specs: dict[str, dict[str, Any]] = {}
        for condition in self.conditions:
            specs.setdefault(condition.metric, {}).update(condition.options)
        return [{"name": name, **options} if options else name for name, options in specs.items()]

    @property
    def needs_data(self) -> bool:
        """Whether a condition scores predictions on data; ``task`` metrics score model files."""
        return any(condition.metric.partition(":")[0] != "task" for condition in self.conditions)

    def check(
        self,
        original: Mapping[str, MetricResult] | None,
        candidate: Mapping[str, MetricResult],
    ) -> GateReport:
        """Judge ``candidate`` results (and ``original`` ones for ``max_drop`` conditions)."""
        rows = []
        for condition in self.conditions:
            if condition.metric not in candidate:
                raise ConfigError(
                    f"The gate checks {condition.metric!r}, but it was not measured; measured: "
                    f"{', '.join(candidate) or 'nothing'}."
                )
            rows.append(
                condition.check((original or {}).get(condition.metric), candidate[condition.metric])
            )
        return GateReport(tuple(rows))

    def __repr__(self) -> str:
        return f"QualityGate([{', '.join(repr(c.text) for c in self.conditions)}])"
