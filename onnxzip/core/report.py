"""Reports: what each pass changed per layer, and the model before/after."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


# The per-layer decisions a pass report's details may carry (svd rank, pruning ratio and counts,
# codebook bits and size): what the loop's trajectory keeps and the per-layer plots draw.
LAYER_DECISION_KEYS = ("rank", "ratio", "bits", "k", "pruned", "kept")


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table with aligned columns (no dependency on a terminal library)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def human_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def human_bytes(value: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


@dataclass
class LayerChange:
    """One layer's outcome in a pass: the decision, or the reason it was skipped."""

    layer: str
    op_type: str
    decision: str
    reason: str | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.decision == "skipped"


@dataclass
class PassReport:
    """What one pass did: per-layer changes, notes, and model totals before/after."""

    pass_name: str
    config: dict[str, Any]
    modified: bool = False
    changes: list[LayerChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # pass-specific records (e.g. a search's episodes)

    def skip(self, layer: str, op_type: str, reason: str, **costs: int) -> None:
        self.changes.append(LayerChange(layer, op_type, "skipped", reason, **costs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            [
                c.layer,
                c.op_type,
                c.decision if not c.reason else f"{c.decision}: {c.reason}",
                f"{human_count(c.params_before)} → {human_count(c.params_after)}",
                f"{human_count(c.flops_before)} → {human_count(c.flops_after)}",
            ]
            for c in self.changes
        ]
        return render_table(["layer", "op", "decision", "params", "FLOPs"], rows)


@dataclass
class ModelSummary:
    """Size on disk, parameters, FLOPs (per sample) and onnxruntime latency (batch 1) of one model."""

    bytes: int
    params: int
    flops: int
    latency_ms: float | None = None


@dataclass
class CompressionReport:
    """Everything ``compress`` did, JSON-serializable."""

    before: ModelSummary
    after: ModelSummary
    passes: list[PassReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    trajectory: list[dict[str, Any]] | None = None  # loops: every try, its costs, metrics, decision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "-"

        rows = [
            ["size on disk", human_bytes(self.before.bytes), human_bytes(self.after.bytes),
             ratio(self.before.bytes, self.after.bytes)],
            ["parameters", human_count(self.before.params), human_count(self.after.params),
             ratio(self.before.params, self.after.params)],
            ["FLOPs/sample", human_count(self.before.flops), human_count(self.after.flops),
             ratio(self.before.flops, self.after.flops)],
        ]
        if self.before.latency_ms and self.after.latency_ms:
            rows.append(["latency (batch 1)", f"{self.before.latency_ms:.3f} ms", f"{self.after.latency_ms:.3f} ms",
                         ratio(self.before.latency_ms, self.after.latency_ms)])
        for name, value in self.metrics.items():
            rows.append([name, *value])
        for row in (self.quality or {}).get("rows", []):
            rows.append([row["metric"], _fmt(row.get("original")), _fmt(row.get("candidate")),
                         f"{row.get('condition')}={row.get('limit')} {'pass' if row.get('passed') else 'FAIL'}"])
        if self.validation:
            worst = min((o["cosine"] for o in self.validation["outputs"]), default=1.0)
            verdict = "pass" if self.validation["passed"] else "FAIL"
            label = "fidelity (min cosine)"
            if self.validation.get("generated"):
                label += ", generated inputs"
            rows.append([label, "1", f"{worst:.6f}", verdict])
        return render_table(["", "before", "after", "reduction"], rows)


def trajectory_table(trajectory: list[dict[str, Any]]) -> str:
    """A loop's trajectory as a table: each try's decision, size, params, FLOPs, latency, metrics."""
    keys = sorted({k for p in trajectory for k in p.get("metrics", {})})
    rows = [[p["stage"] + ("" if p.get("value") is None else f"={p['value']}"), p["decision"],
             human_bytes(p["bytes"]) if p["bytes"] else "-", human_count(p["params"]), human_count(p["flops"]),
             "-" if p.get("latency_ms") is None else f"{p['latency_ms']:.3f} ms",
             *[("-" if k not in p.get("metrics", {}) else f"{p['metrics'][k]:.4g}") for k in keys]]
            for p in trajectory]
    return render_table(["try", "decision", "size", "params", "FLOPs", "latency", *keys], rows)
