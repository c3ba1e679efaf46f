"""Quality gate: parsing one schema from strings and mappings, verdicts, the report."""

from __future__ import annotations

import json
import math

import pytest

from onnxzip.errors import ConfigError
from onnxzip.evaluators import GateCondition, MetricResult, QualityGate, parse_conditions


def _results(**values: float) -> dict[str, MetricResult]:
    lower_is_better = {"rel_l2", "max_abs_error"}
    return {
        name: MetricResult(name, value, name not in lower_is_better, "dB" if name == "snr" else "")
        for name, value in values.items()
    }


def test_strings_and_mappings_give_the_same_conditions() -> None:
    from_strings = parse_conditions(["accuracy:max_drop=0.01", "snr:min=30,max_drop=3"])
    from_mappings = parse_conditions(
        [{"metric": "accuracy", "max_drop": 0.01}, {"metric": "snr", "min": 30, "max_drop": "3"}]
    )
    assert (
        from_strings
        == from_mappings
        == [
            GateCondition("accuracy", "max_drop", 0.01),
            GateCondition("snr", "min", 30.0),
            GateCondition("snr", "max_drop", 3.0),
        ]
    )
    assert [c.text for c in from_strings] == [
        "accuracy:max_drop=0.01",
        "snr:min=30",
        "snr:max_drop=3",
    ]
    assert parse_conditions("pesq:max_drop=0.2") == [GateCondition("pesq", "max_drop", 0.2)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("accuracy", "sets no bound"),
        ("accuracy:drop=0.01", "unknown bound"),
        ("accuracy:max_drop=much", "expected a number"),
        ("accuracy:max_drop=-0.1", ">= 0"),
        ("accuracy:max_drop", "key=value"),
        (":min=3", "names no metric"),
        ({"min": 3}, "needs a 'metric'"),
        ({"metric": "snr"}, "sets no bound"),
        (42, "Cannot read"),
    ],
)
def test_bad_conditions_raise_one_clear_sentence(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_conditions(spec)


def test_floor_and_ceiling() -> None:
    gate = QualityGate(["snr:min=30", "rel_l2:max=0.05"])
    assert gate.check(None, _results(snr=31.0, rel_l2=0.05)).passed
    report = gate.check(None, _results(snr=29.9, rel_l2=0.01))
    assert not report.passed and [row.metric for row in report.failures] == ["snr"]
    assert not gate.check(None, _results(snr=40.0, rel_l2=0.2)).passed
    assert gate.check(None, _results(snr=math.inf, rel_l2=0.0)).passed


def test_max_drop_follows_the_direction_of_each_metric() -> None:
    gate = QualityGate(["accuracy:max_drop=0.01", "rel_l2:max_drop=0.02"])
    original = _results(accuracy=0.90, rel_l2=0.10)
    assert gate.check(original, _results(accuracy=0.895, rel_l2=0.115)).passed
    assert gate.check(original, _results(accuracy=0.95, rel_l2=0.0)).passed  # both improved
    failed = gate.check(original, _results(accuracy=0.88, rel_l2=0.13))
    assert [row.passed for row in failed.rows] == [False, False]
    assert failed.rows[0].change == pytest.approx(-0.02)
    assert failed.rows[1].change == pytest.approx(0.03)


def test_max_drop_needs_the_original_and_the_gate_needs_every_metric() -> None:
    with pytest.raises(ConfigError, match="original model"):
        QualityGate("pesq:max_drop=0.2").check(None, _results(pesq=3.0))
    with pytest.raises(ConfigError, match="not measured"):
        QualityGate("stoi:min=0.8").check(None, _results(pesq=3.0))


def test_report_renders_a_table_and_json() -> None:
    gate = QualityGate([{"metric": "snr", "min": 30}, "accuracy:max_drop=0.01"])
    assert gate.metrics == ["snr", "accuracy"]
    report = gate.check(_results(snr=math.inf, accuracy=0.9), _results(snr=math.inf, accuracy=0.85))
    text = report.render()
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "original", "candidate", "change", "limit", "result"]
    assert "snr (dB)" in lines[2] and "inf" in lines[2] and "pass" in lines[2]
    assert "drop <= 0.01" in lines[3] and "FAIL" in lines[3]
    assert lines[-1] == "quality gate: FAILED (1 of 2 conditions)"
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["rows"][0] == {
        "metric": "snr",
        "condition": "min",
        "limit": 30.0,
        "original": "inf",
        "candidate": "inf",
        "change": 0.0,
        "unit": "dB",
        "passed": True,
    }
