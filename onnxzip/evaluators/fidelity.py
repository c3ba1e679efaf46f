"""Fidelity validation: run the original and a candidate model in onnxruntime on the same
inputs and compare every output.

Per output: maximum absolute error, relative L2 error ‖a−b‖₂/‖a‖₂, cosine similarity
⟨a,b⟩/(‖a‖‖b‖) over the flattened tensors, and — when the output looks like class scores
(float [N, C] with 2 ≤ C ≤ 100 000, or higher rank and named like logits/scores) — the share of rows whose argmax agrees.
A :class:`FidelityGate` turns those numbers into pass/fail before anything is written.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import ConfigError
from onnxzip.evaluators.metrics import (
    argmax_share,
    cosine_similarity,
    max_abs_difference,
    relative_l2_error,
)
from onnxzip.core.io import load_model
from onnxzip.core.runtime import make_session, resolve_device, run_batched


@dataclass
class OutputFidelity:
    name: str
    shape: list[int]
    max_abs: float
    rel_l2: float
    cosine: float
    argmax_agreement: float | None = None
    problem: str | None = None


AUTO_REL_L2 = 0.5  # max_rel_l2=auto while min_cosine is on: cosine 0.99 alone allows rel_l2 ≥ 0.14


@dataclass
class FidelityGate:
    """Limits on output fidelity; ``None`` disables a limit. Defaults catch broken rewrites.

    ``max_rel_l2="auto"`` is :data:`AUTO_REL_L2` while ``min_cosine`` is on and off with it:
    cosine does not see a scale (an output shrunk 5×, a speech probability measured on silero-vad
    at 3 bits, keeps cosine 0.9999 at a relative L2 error of 0.8), and a gate turned off by
    ``min_cosine: null`` stays off."""

    min_cosine: float | None = 0.99
    max_rel_l2: float | str | None = "auto"
    max_abs: float | None = None
    min_argmax_agreement: float | None = 0.95  # class-score outputs only

    def __post_init__(self) -> None:
        for name in ("min_cosine", "min_argmax_agreement"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ConfigError(f"Fidelity limit {name}={value} must lie between -1 and 1.")
        if isinstance(self.max_rel_l2, str) and self.max_rel_l2 != "auto":
            raise ConfigError(f"Fidelity limit max_rel_l2={self.max_rel_l2!r} must be a number, 'auto' or null.")
        for name in ("max_rel_l2", "max_abs"):
            value = getattr(self, name)
            if value is not None and value != "auto" and float(value) < 0:
                raise ConfigError(f"Fidelity limit {name}={value} must not be negative.")

    @property
    def rel_l2_limit(self) -> float | None:
        """The relative L2 limit in force (``auto`` resolved)."""
        if self.max_rel_l2 == "auto":
            return AUTO_REL_L2 if self.min_cosine is not None else None
        return None if self.max_rel_l2 is None else float(self.max_rel_l2)

    def failures(self, outputs: list[OutputFidelity]) -> list[str]:
        found = []
        for out in outputs:
            if out.problem:
                found.append(f"{out.name}: {out.problem}")
                continue
            if self.min_cosine is not None and not out.cosine >= self.min_cosine:
                found.append(f"{out.name}: cosine {out.cosine:.6f} < {self.min_cosine}")
            rel_l2 = self.rel_l2_limit
            if rel_l2 is not None and not out.rel_l2 <= rel_l2:
                found.append(f"{out.name}: relative L2 error {out.rel_l2:.3g} > {rel_l2:g}")
            if self.max_abs is not None and not out.max_abs <= self.max_abs:
                found.append(f"{out.name}: max abs error {out.max_abs:.3g} > {self.max_abs}")
            if (
                self.min_argmax_agreement is not None
                and out.argmax_agreement is not None
                and not out.argmax_agreement >= self.min_argmax_agreement
            ):
                found.append(
                    f"{out.name}: argmax agreement {out.argmax_agreement:.4f} < {self.min_argmax_agreement}"
                )
        return found


GENERATED_HINT = (
    "the inputs were generated (random, not real data), so the gate measures fidelity on noise; "
    "pass --data with real inputs for a meaningful check"
)
CLASS_SCORE_NAMES = ("logit", "score", "prob", "class")


def looks_like_class_scores(array: np.ndarray, name: str = "") -> bool:
    """[N, classes] float outputs, or higher-rank ones named like logits/scores/probabilities
    (a [N, T, F] mask is not class scores)."""
    if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2 or not 2 <= array.shape[-1] <= 100_000:
        return False
    return array.ndim == 2 or any(word in name.lower() for word in CLASS_SCORE_NAMES)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputFidelity:
    """Fidelity numbers of one output (see module docstring)."""
    if reference.shape != candidate.shape:
        return OutputFidelity(
            name, list(reference.shape), float("inf"), float("inf"), -1.0,
            problem=f"shape changed from {reference.shape} to {candidate.shape}",
        )
    max_abs = max_abs_difference(candidate, reference)
    rel_l2 = relative_l2_error(candidate, reference)
    cosine = cosine_similarity(candidate, reference)
    agreement = argmax_share(candidate, reference) if looks_like_class_scores(reference, name) else None
    problem = None
    if not np.all(np.isfinite(candidate)) and np.all(np.isfinite(reference)):
        problem = "candidate output has NaN or infinite values"
    return OutputFidelity(name, list(reference.shape), max_abs, rel_l2, cosine, agreement, problem)


@dataclass
class ValidationReport:
    """Per-output fidelity plus where the inputs came from and what the gate said."""

    outputs: list[OutputFidelity]
    device: str
    inputs: str
    rows: int
    gate: FidelityGate = field(default_factory=FidelityGate)
    failures: list[str] = field(default_factory=list)
    generated: bool = False  # inputs were generated from the signature, not real data
    quality: Any = None  # onnxzip.evaluators.GateReport when metric conditions were judged too

    @property
    def passed(self) -> bool:
        return not self.failures and (self.quality is None or self.quality.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "inputs": self.inputs,
            "rows": self.rows,
            "generated": self.generated,
            "gate": asdict(self.gate),
            "failures": self.failures,
            "outputs": [asdict(o) for o in self.outputs],
            **({"quality": self.quality.to_dict()} if self.quality is not None else {}),
        }

    def table(self) -> str:
        from onnxzip.core.report import render_table

        rows = [
            [
                o.name,
                "x".join(map(str, o.shape)),
                f"{o.max_abs:.3g}",
                f"{o.rel_l2:.3g}",
                f"{o.cosine:.6f}",
                "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.2%}",
            ]
            for o in self.outputs
        ]
        text = render_table(["output", "shape", "max abs", "rel L2", "cosine", "argmax agree"], rows)
        verdict = "PASS" if not self.failures else "FAIL: " + "; ".join(self.failures)
        text = f"{text}\ninputs: {self.inputs} ({self.rows} rows) on {self.device}; fidelity gate: {verdict}"
        if self.generated:
            text += f"\nnote: {GENERATED_HINT}"
        if self.quality is not None:
            text += f"\n\n{self.quality.render()}"
        return text


def _describe_source(data: Any, dataset: bool) -> str:
    if isinstance(data, (str, os.PathLike)):
        return f"first items of {data}" if dataset else str(data)
    return "dataset items" if dataset else "given arrays"


def validate(
    original: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    data: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    *,
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Any] | None = None,
    batch: int = 2,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    gate: FidelityGate | None = None,
    generated: str | None = None,
    sample_axes: dict[str, int | None] | None = None,
) -> ValidationReport:
    """Compare ``candidate`` with ``original`` in onnxruntime on the same inputs.

    Without ``data`` the inputs are generated at sizes onnxruntime accepts
    (:func:`onnxzip.core.shapes.generated_feeds`); ``generated`` describes feeds that a caller
    generated itself and passes as ``data``. Array data is laid out by the original's declared
    shapes (:func:`onnxzip.core.inputs.infer_sample_axes`; ``sample_axes`` settles an ambiguous input)."""
    reference_model = load_model(original)
    candidate_model = load_model(candidate)
    from onnxzip.evaluators.quality import fidelity_feeds, is_dataset_source
    from onnxzip.core.shapes import generated_feeds

    gate = gate or FidelityGate()
    if data is None:
        feeds, resolution = generated_feeds(
            reference_model, batch=batch, dims=dims, input_shapes=input_shapes, seed=seed
        )
        generated = resolution.describe()
    else:
        feeds = fidelity_feeds(reference_model, data, batch=batch, dims=dims or {}, seed=seed,
                               sample_axes=sample_axes)
    resolved = resolve_device(device)
    reference_out = run_batched(make_session(reference_model, resolved), feeds, batch_size)
    candidate_out = run_batched(make_session(candidate_model, resolved), feeds, batch_size)
    outputs = []
    for name, value in reference_out.items():
        if name not in candidate_out:
            outputs.append(OutputFidelity(name, list(value.shape), float("inf"), float("inf"), -1.0,
                                          problem="output missing from the candidate"))
            continue
        outputs.append(compare_arrays(name, value, candidate_out[name]))
    rows = getattr(feeds, "count", None) or (
        next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 1)
    report = ValidationReport(
        outputs=outputs,
        device=resolved,
        inputs=f"generated from the signature, not real data: {generated}" if generated
        else _describe_source(data, is_dataset_source(data)),
        rows=int(rows),
        gate=gate,
        generated=generated is not None,
    )
    report.failures = gate.failures(outputs)
    return report
