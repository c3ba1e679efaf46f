"""PNG plots of a compression report: the loop's trajectory (size against quality, the accepted
frontier drawn), per-layer decisions (SVD ranks, pruning ratios, codebook bits) and histograms of
normalization scales γ before and after sparsity training. matplotlib is an optional extra."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from onnxzip.errors import ConfigError
from onnxzip.core.report import LAYER_DECISION_KEYS

_ACCEPTED = ("original", "accepted")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("Plots need matplotlib: pip install 'onnxzip[plots]' (or pip install matplotlib).") from exc
    return plt


def quality_key(trajectory: list[dict[str, Any]]) -> str:
    """The metric on the quality axis: the first task metric measured, else fidelity (cosine)."""
    for point in trajectory:
        for name in point.get("metrics", {}):
            if name != "min_cosine":
                return name
    return "min_cosine"


def frontier(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Pareto front of (size, quality): no other point is both smaller and better."""
    ordered = sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1]))
    front: list[tuple[float, float]] = []
    for size, quality in ordered:
        if not front or (quality > front[-1][1] if higher_is_better else quality < front[-1][1]):
            front.append((size, quality))
    return front


def plot_trajectory(trajectory: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    key = quality_key(trajectory)
    lower_better = key in ("rel_l2", "max_abs_error")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [p for p in trajectory if p.get("bytes") and key in p.get("metrics", {})]
    for decision, style in (("original", dict(marker="*", s=160, c="black")),
                            ("accepted", dict(marker="o", s=50, c="tab:green")),
                            ("ungated", dict(marker="s", s=40, c="tab:gray")),
                            ("rejected", dict(marker="x", s=50, c="tab:red")),
                            ("rolled back", dict(marker="x", s=50, c="tab:orange"))):
        chosen = [p for p in measured if p["decision"] == decision]
        if chosen:
            ax.scatter([p["bytes"] / 1024 for p in chosen], [p["metrics"][key] for p in chosen], label=decision, **style)
    for p in measured:
        label = p["stage"] if p.get("value") is None else f"{p['stage']}={p['value']}"
        ax.annotate(label, (p["bytes"] / 1024, p["metrics"][key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = frontier([(p["bytes"] / 1024, p["metrics"][key]) for p in measured if p["decision"] in _ACCEPTED],
                     higher_is_better=not lower_better)
    if front:
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", c="tab:green", alpha=0.6, label="accepted frontier")
    ax.set_xscale("log")
    ax.set_xlabel("size (kB, log scale)")
    ax.set_ylabel(key)
    ax.set_title("compression trajectory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_decisions(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"svd rank": {layer: value}, ...}`` from the pass reports and the accepted tries."""
    found: dict[str, dict[str, float]] = {}
    for point in report.get("trajectory") or []:
        if point.get("decision") != "accepted":
            continue
        for pass_name, keys in (point.get("layers") or {}).items():
            for key, layers in keys.items():
                found[f"{pass_name} {key}"] = dict(layers)  # later accepted tries replace earlier ones
    for pass_report in report.get("passes") or []:
        for change in pass_report.get("changes", []):
            if change.get("decision") == "skipped":
                continue
            for key in LAYER_DECISION_KEYS:
                value = (change.get("details") or {}).get(key)
                if isinstance(value, (int, float)):
                    found.setdefault(f"{pass_report['pass_name']} {key}", {})[change["layer"]] = value
    return {k: v for k, v in found.items() if v}


def plot_layers(decisions: dict[str, dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(len(decisions), 1, figsize=(8, 2.4 * len(decisions)), squeeze=False)
    for ax, (title, layers) in zip(axes[:, 0], decisions.items()):
        names = list(layers)
        ax.bar(range(len(names)), [layers[n] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n[-24:] for n in names], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(title.split()[-1])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gamma(series: dict[str, np.ndarray], path: Path, threshold: float | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max((np.abs(v).max() for v in series.values() if v.size), default=1.0)
    bins = np.linspace(0, top, 50)
    for label, values in series.items():
        ax.hist(np.abs(values), bins=bins, alpha=0.55, label=f"{label} ({values.size})")
    if threshold:
        ax.axvline(threshold, c="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("|γ|")
    ax.set_ylabel("channels")
    ax.set_title("normalization scales γ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gamma_series(trajectory: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """|γ| of the original, after each sparsity-training stage, and of the final model."""
    series: dict[str, np.ndarray] = {}
    kept = [p for p in trajectory if p["decision"] in (*_ACCEPTED, "ungated") and p.get("gamma")]
    for point in kept:
        if point["decision"] == "original":
            series["original"] = np.asarray(point["gamma"])
        elif point.get("sparsity"):
            series[f"after {point['stage']}"] = np.asarray(point["gamma"])
    accepted = [p for p in kept if p["decision"] in _ACCEPTED]
    if accepted and accepted[-1]["decision"] != "original":
        series["final"] = np.asarray(accepted[-1]["gamma"])
    return series


def plot_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write every plot the report has data for into ``out_dir``; returns the files written
    (none when the report has no trajectory and no per-layer decisions)."""
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    trajectory = report.get("trajectory") or []
    if trajectory:
        written.append(plot_trajectory(trajectory, target / "trajectory.png"))
    decisions = layer_decisions(report)
    if decisions:
        written.append(plot_layers(decisions, target / "layers.png"))
    series = gamma_series(trajectory)
    if len(series) > 1:
        written.append(plot_gamma(series, target / "gamma.png"))
    return written
