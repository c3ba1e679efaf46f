"""Fine-tuning an ONNX graph in onnxruntime-training.

``finetune(model, data, val=..., teacher=...)`` rewrites a copy of the graph into a trainable
form (:mod:`onnxzip.train.trainable`), appends the loss (:mod:`onnxzip.train.losses`), generates
artifacts in a temporary folder (in a child process), trains with AdamW or SGD under its own
learning-rate schedule (linear warm-up, then cosine or linear decay), evaluates on ``val`` each
epoch, keeps the best epoch, stops early, and writes the trained values back into the original
graph by initializer name: inputs, outputs, metadata, opsets, packed indices and the file size of
the original stay exactly as they were.

Sparsity training (network slimming) adds λ·Σ|γ| over BatchNormalization/LayerNormalization
scales. The γ are not left to onnxruntime's optimizer: after its step each γ is set again from
its value before the step by its own Adam (or SGD) step on ∂loss/∂γ + λ·sign(γ), at
``gamma_lr_scale`` × the learning rate and without weight decay; a γ whose step crosses zero
stops at zero (:class:`_SparseGammas`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper
from tqdm.auto import tqdm

from onnxzip.core.compat import compatible_ir_version
from onnxzip.measure.cost import observed_shapes
from onnxzip.errors import ConfigError, DataError
from onnxzip.core.graph import export_model, import_graph, tidy
from onnxzip.core.inputs import Samples, fixed_batch, samples_from, take
from onnxzip.core.io import load_model
from onnxzip.core.runtime import make_session, resolve_device, run_samples
from onnxzip.core.sanity import declare_inputs_like, probe_batch
from onnxzip.core.schema import build_config, option
from onnxzip.train import _artifacts
from onnxzip.train.losses import LossTerm, add_loss, load_loss_model
from onnxzip.train.rewrites import PREFIX
from onnxzip.train.trainable import (TrainingCopy, prepare, scale_steps, select_weights, step_limits, unscaled,
                                    with_weights)
from onnxzip.train.availability import require_training
from onnxzip.core.weights import materialize_weights

log = logging.getLogger(__name__)
# onnxruntime refuses a trainable weight that no output depends on; such weights are frozen and
# the training graph is built again, at most this many times.
_MAX_UNREACHABLE = 8
_UNREACHABLE = re.compile(r"Cannot compute the partial derivative for '([^']+)' as it's unreachable")
_MAX_HALVINGS = 3
# Without validation data, this fraction of the training data (seeded) is held back to select the
# epoch and to stop early, when there are at least _MIN_HOLDOUT_SAMPLES samples.
_HOLDOUT = 0.2
_MIN_HOLDOUT_SAMPLES = 10
# An epoch replaces the best weights only when its held-out losses are lower by more than this many
# standard errors of the paired per-batch differences (a one-sided test at about 2.5%).
_NOISE_SE = 2.0
_NO_BUILDER = re.compile(r"gradient builder has not been registered: (\w+)")
# batch_size=auto: at most _MAX_AUTO_BATCH items, fewer so that an epoch has at least _MIN_STEPS steps.
_MAX_AUTO_BATCH = 32
_MIN_STEPS = 8
# match=auto matches the compressed layers' outputs with fewer training samples than this.
AUTO_MATCH_SAMPLES = 1024
# match=auto keeps the teacher's matched activations within this many float32 values (train + val).
_MATCH_BUDGET = 2**26
# lr=auto: the peak learning rate by what trains (measured on the corpus: see the README).
LR_CODEBOOK = 3e-4
LR_DENSE = 1e-3

DataSource = str | os.PathLike[str] | dict[str, NDArray[Any]]


@dataclass
class FinetuneConfig:
    epochs: int = option(3, "training epochs over --data")
    lr: float | Literal["auto"] = option(
        "auto", "peak learning rate; auto: 3e-4 when codebook centroids train (each moves many weights), else "
        "1e-3 (SVD factors, pruned or plain layers); measured on the corpus, see the README")
    optimizer: Literal["adamw", "sgd"] = option("adamw", "optimizer")
    weight_decay: float = option(0.0, "AdamW weight decay")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate decay after warm-up")
    warmup: float = option(0.05, "fraction of the steps with a linear warm-up")
    batch_size: int | Literal["auto"] = option(
        "auto", "items per step; auto: 32, or fewer so that an epoch has at least 8 steps (a model with a fixed "
        "batch dimension uses that size)")
    loss: Literal["auto", "mse", "l1", "kl", "cross_entropy"] = option(
        "auto", "auto: cross_entropy with labels, mse against references, else distillation (mse) "
        "from the teacher; kl distills class scores")
    sparsity: float = option(0.0, "λ of an L1 penalty on BatchNorm/LayerNorm γ: its subgradient joins γ's own "
                             "optimizer step, a γ that crosses zero stops at zero; the last epoch is kept")
    gamma_lr_scale: float = option(20.0, "under sparsity training, γ steps at this multiple of the learning rate "
                                   "(without weight decay), so that unimportant γ can reach zero")
    loss_model: str | None = option(None, "ONNX file of a user loss: inputs (prediction, target) -> one float "
                                    "scalar; target: the data's references, else labels, else the teacher's output")
    match: list[str] = option(["auto"], "inner tensor names whose activations also match the teacher's (MSE; "
                              "same shapes in both models, e.g. block outputs after SVD or codebooks); auto: in "
                              "label-free distillation from fewer than 1024 samples, the outputs of the compressed "
                              "layers, every term divided by the teacher's variance of its tensor; none: no matching")
    match_weight: float = option(1.0, "weight of each matched activation's MSE in the loss (match=auto: shared by "
                                 "the matched tensors)")
    gamma_threshold: float = option(1e-2, "|γ| under this counts as prunable in the report")
    max_step: float = option(
        0.05, "adamw: a weight whose RMS is under lr / max_step trains at a learning rate lowered by a power of two "
              "to at most max_step times its RMS (an Adam step moves every value by about the learning rate, whatever "
              "its scale: a BN-folded scale of RMS 5e-4 would change by half at lr 3e-4); 0: one learning rate for all")
    patience: int = option(2, "stop after this many epochs without improvement (0: never)")
    keep: Literal["best", "last"] = option("best", "the epoch whose weights are returned: best on --val (else the "
                                           "lowest training loss), or last (no selection on the validation data)")
    metric: str | None = option(None, "evaluator metric that selects the epoch, on --val (default: accuracy with "
                                "labels, cosine to the teacher without; with no --val, the held-out loss), or a "
                                "task score of the whole model file, task:FILE.py:function (higher is better)")
    select: Literal["loss", "db"] = option(
        "loss", "without a metric, what the held-out epoch selection compares per sample: loss (the outputs' "
        "loss terms) or db (each output's relative error in dB, 10·log10(error / the target's mean square), "
        "averaged over the outputs: every sample and output weighs equally, like an SNR)")
    include: list[str] = option([], "weight name globs that train (empty: all float weights)")
    exclude: list[str] = option([], "weight name globs that stay frozen")
    seed: int = option(0, "seed of the shuffling")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if (self.lr != "auto" and self.lr <= 0) or (self.batch_size != "auto" and self.batch_size < 1) \
                or self.sparsity < 0 or not 0 <= self.warmup < 1:
            raise ValueError("lr and batch_size must be positive, sparsity >= 0 and 0 <= warmup < 1")
        if self.gamma_lr_scale <= 0:
            raise ValueError("gamma_lr_scale must be positive")


@dataclass
class FinetuneResult:
    """The fine-tuned model and what happened: per-epoch curve, trained and frozen weights."""

    model: onnx.ModelProto
    history: list[dict[str, float]] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    losses: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best_epoch: int = 0
    device: str = "cpu"
    gammas: int = 0
    gammas_below_threshold: int = 0
    matched: list[str] = field(default_factory=list)  # inner tensors matched by match=auto
    float_weights: dict[str, int] = field(default_factory=dict)  # every float initializer: its size
    trained_fraction: float = 0.0  # of the float parameters

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "model"}

    def why_nothing_trains(self) -> str:
        """One sentence: why no weight trains, from the most common reasons of the frozen float
        weights (empty when some weight trains)."""
        if self.trained:
            return ""
        reasons = Counter(reason for name, reason in self.frozen.items() if name in self.float_weights)
        if not reasons:
            return "Nothing can train in this model: it has no float weights."
        common = "; ".join(f"{count} weight{'s' * (count > 1)}: {reason}" for reason, count in reasons.most_common(2))
        return f"Nothing can train in this model ({common})."


@dataclass
class _Data:
    """Training or validation samples: the inputs (with their sample axes), and the targets."""

    inputs: Samples
    labels: NDArray[Any] | None
    references: NDArray[Any] | None

    def __len__(self) -> int:
        return self.inputs.count


def is_array_data(source: Any) -> bool:
    """Whether ``source`` is training data :func:`finetune` reads: arrays by name, or an .npz."""
    return isinstance(source, (dict, Samples)) or (
        isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"))


def _load_data(model: onnx.ModelProto, source: DataSource, what: str,
               sample_axes: dict[str, int | None] | None = None) -> _Data:
    if isinstance(source, (str, os.PathLike)) and not is_array_data(source):
        raise DataError(f"Training data ({what}) must be an .npz file of arrays by input name, got {source}.")
    if not is_array_data(source):
        raise DataError(f"Training data ({what}) must be an .npz path or a dict of arrays.")
    samples = samples_from(model, source, sample_axes)
    labels = None if samples.labels is None else np.asarray(samples.labels)
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
                and np.all(labels == np.round(labels))):
            raise DataError(f"The {what} labels must be class indices (integers), got {labels.dtype}.")
    references = None if samples.references is None else np.asarray(samples.references, np.float32)
    return _Data(samples, None if labels is None else labels.astype(np.int64), references)


def auto_batch_size(batch_size: int | str, count: int) -> int:
    """``batch_size``, or for ``auto`` the largest size up to :data:`_MAX_AUTO_BATCH` that gives an
    epoch over ``count`` samples at least :data:`_MIN_STEPS` steps."""
    if batch_size != "auto":
        return int(batch_size)
    return max(1, min(_MAX_AUTO_BATCH, count // _MIN_STEPS))


def _listed(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", … {len(names) - most} more" if len(names) > most else "")


def _hold_back(data: _Data, seed: int) -> tuple[_Data, _Data]:
    """(the rest, a seeded ``_HOLDOUT`` part) of ``data``, split on each input's sample axis."""
    order = np.random.default_rng(seed).permutation(len(data))
    count = max(1, int(round(_HOLDOUT * len(data))))

    def part(index: NDArray[np.int64]) -> _Data:
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return _Data(data.inputs.take(index), pick(data.labels), pick(data.references))

    return part(np.sort(order[count:])), part(np.sort(order[:count]))


def _batches(count: int, size: int, fixed: bool, rng: np.random.Generator | None) -> list[NDArray[np.int64]]:
    """Index chunks over ``count`` items (shuffled with ``rng``); with a fixed batch the last chunk
    is filled up with items from the start so every chunk has exactly ``size`` items."""
    order = rng.permutation(count) if rng is not None else np.arange(count)
    chunks = [order[i : i + size] for i in range(0, count, size)]
    if fixed and len(chunks[-1]) < size:
        chunks[-1] = np.resize(np.concatenate([chunks[-1], order]), size)[:size]
    return chunks


def _with_symbol(shape: tuple[int, ...], axis: int | None) -> list[int | str]:
    """A target's declared shape: its sample axis symbolic (``N``)."""
    return [("N" if index == axis else size) for index, size in enumerate(shape)]


def lr_at(step: int, total: int, config: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup·total`` steps, then cosine / linear decay to 0 (or constant)."""
    warm = int(round(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / (warm + 1)
    if config.schedule == "constant":
        return config.lr
    progress = (step - warm) / max(total - warm, 1)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class _SparseGammas:
    """The optimizer of the γ under sparsity training (network slimming): onnxruntime's optimizer
    has one learning rate and decays every weight, so after its step each γ is set again from its
    value before the step, by its own Adam (or SGD) step on ``∂loss/∂γ + λ·sign(γ)`` at
    ``gamma_lr_scale`` × the learning rate without weight decay. A γ whose step crosses zero stops
    at zero, and stays there while ``|∂loss/∂γ| ≤ λ``. With Adam the L1 term moves an unimportant γ by about the learning rate each step
    whatever its scale, which a proximal step of ``lr·λ`` after AdamW does not: that shrinks every
    γ alike and only collapses the model when λ is large enough to reach zero."""

    def __init__(self, names: list[str], config: FinetuneConfig) -> None:
        self.names, self.config = names, config
        self.moments: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
        self.steps = 0

    def before(self, state: Any) -> dict[str, tuple[NDArray[np.float32], NDArray[np.float32]]]:
        """Each γ's value and gradient before onnxruntime's optimizer step."""
        return {n: (np.array(state.parameters[n].data), np.array(state.parameters[n].grad)) for n in self.names}

    def after(self, state: Any, before: dict[str, tuple[NDArray[np.float32], NDArray[np.float32]]],
              rate: float) -> None:
        self.steps += 1
        lr = rate * self.config.gamma_lr_scale
        for name, (value, grad) in before.items():
            g = grad.astype(np.float64) + self.config.sparsity * np.sign(value)
            if self.config.optimizer == "adamw":
                m, v = self.moments.get(name, (np.zeros_like(g), np.zeros_like(g)))
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                self.moments[name] = (m, v)
                m_hat, v_hat = m / (1 - 0.9 ** self.steps), v / (1 - 0.999 ** self.steps)
                step = lr * m_hat / (np.sqrt(v_hat) + 1e-8)
            else:
                step = lr * g
            new = value - step
            new[(np.sign(new) != np.sign(value)) & (value != 0)] = 0.0
            # Zero is where L1's subdifferential holds the loss's gradient: stay there.
            new[(value == 0) & (np.abs(grad) <= self.config.sparsity)] = 0.0
            state.parameters[name].data = new.astype(value.dtype)


def _check_labels(output: onnx.ValueInfoProto, labels: NDArray[Any]) -> None:
    """Cross-entropy labels hold one class index per position of the class scores: the output's
    rank less one (its last axis is the classes), each index within the classes when fixed."""
    dims = output.type.tensor_type.shape.dim
    if len(dims) != labels.ndim + 1:
        raise DataError(
            f"cross_entropy on output '{output.name}' (rank {len(dims)}) needs labels of rank {len(dims) - 1}, "
            f"one class index per position; the labels have shape {labels.shape}."
        )
    classes = dims[-1].dim_value if dims[-1].HasField("dim_value") else 0
    if classes > 0 and labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"The labels run from {labels.min()} to {labels.max()}, but output '{output.name}' scores "
            f"{classes} classes (0 to {classes - 1})."
        )


def _check_references(output: onnx.ValueInfoProto, references: NDArray[Any]) -> None:
    """References are the first output's target values: its rank, and its last axis when fixed."""
    dims = output.type.tensor_type.shape.dim
    last = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else 0
    if len(dims) != references.ndim or (len(dims) > 1 and last > 0 and references.shape[-1] != last):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise DataError(
            f"The references have shape {references.shape}, which cannot be output '{output.name}' "
            f"(declared {shape}) with the samples on axis 0."
        )


def _loss_terms(
    model: onnx.ModelProto, config: FinetuneConfig, data: _Data, has_teacher: bool
) -> tuple[list[LossTerm], bool]:
    """The loss terms and whether they need the teacher's outputs."""
    outputs = [o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not outputs:
        raise ConfigError("The model has no float output to train against.")
    first = outputs[0].name
    kind = config.loss
    if config.loss_model:
        loss_graph = load_loss_model(config.loss_model, model)
        if data.references is not None:
            return [LossTerm(first, "user", "onnxzip_references", graph=loss_graph)], False
        if data.labels is not None:
            return [LossTerm(first, "user", "onnxzip_labels", graph=loss_graph)], False
        if not has_teacher:
            raise ConfigError("A user loss (loss_model) needs 'references' or 'labels' in the data, or a teacher.")
        return [LossTerm(first, "user", "onnxzip_teacher_0", graph=loss_graph)], True
    if kind == "cross_entropy" or (kind == "auto" and data.labels is not None):
        if data.labels is None:
            raise DataError("loss=cross_entropy needs 'labels' in the training data.")
        _check_labels(outputs[0], data.labels)
        return [LossTerm(first, "cross_entropy", "onnxzip_labels")], False
    if kind in ("auto", "mse", "l1") and data.references is not None:
        _check_references(outputs[0], data.references)
        return [LossTerm(first, "l1" if kind == "l1" else "mse", "onnxzip_references")], False
    if not has_teacher:
        raise ConfigError(
            "Label-free fine-tuning distills from a teacher: give the original model (--teacher), "
            "or labels / references in the data."
        )
    terms = []
    for index, output in enumerate(outputs):
        rank = len(output.type.tensor_type.shape.dim)
        term_kind = "kl" if kind == "kl" and rank == 2 else ("l1" if kind == "l1" else "mse")
        terms.append(LossTerm(output.name, term_kind, f"onnxzip_teacher_{index}"))
    return terms, True


def _targets(terms: list[LossTerm], data: _Data, teacher: tuple[dict[str, NDArray[Any]], dict[str, int | None]] | None
             ) -> tuple[dict[str, NDArray[Any]], dict[str, int | None]]:
    """Each loss term's target array and its sample axis (labels and references: axis 0; the
    teacher's outputs: the axis onnxruntime's run found, e.g. 1 for ``[T, N, C]``)."""
    targets: dict[str, NDArray[Any]] = {}
    axes: dict[str, int | None] = {}
    for term in terms:
        axes[term.target] = 0
        if term.target == "onnxzip_labels":
            targets[term.target] = data.labels
        elif term.target == "onnxzip_references":
            targets[term.target] = data.references
        else:
            outputs, output_axes = teacher
            axes[term.target] = output_axes.get(term.output, 0)
            value = outputs[term.output].astype(np.float32)
            if term.kind == "kl":
                shifted = np.exp(value - value.max(axis=-1, keepdims=True))
                value = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
            targets[term.target] = value
    return targets, axes


def _teacher_outputs(teacher: onnx.ModelProto, student: onnx.ModelProto, data: _Data, batch: int,
                     device: str, inner: list[str] = ()) -> tuple[dict[str, NDArray[Any]], dict[str, int | None]]:
    """Teacher outputs on ``data`` named like the student's outputs (by name, else by position),
    plus the teacher's activations of the ``inner`` tensors (by their names), and the sample
    axis of each."""
    names = [o.name for o in student.graph.output]
    extra = [name for name in inner if name not in {o.name for o in teacher.graph.output}]
    if extra:
        teacher = copy.deepcopy(teacher)
        teacher.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    raw, raw_axes = run_samples(make_session(teacher, device), data.inputs, batch)
    matched = {name: raw.pop(name) for name in extra}
    matched.update({name: raw[name] for name in inner if name in raw})
    if all(name in raw for name in names):
        outputs = {**{name: raw[name] for name in names}, **matched}
        return outputs, {name: raw_axes.get(name, 0) for name in outputs}
    if len(raw) != len(names):
        raise ConfigError("The teacher's outputs do not match the student's outputs (names or count).")
    renamed = dict(zip(names, raw))
    outputs = {**{name: raw[key] for name, key in renamed.items()}, **matched}
    return outputs, {**{name: raw_axes.get(key, 0) for name, key in renamed.items()},
                     **{name: raw_axes.get(name, 0) for name in matched}}


def _check_matched(names: list[str], student_shapes: dict[str, tuple[int, ...]], teacher: onnx.ModelProto,
                   training_copy: onnx.ModelProto, probe: dict[str, NDArray[Any]]) -> None:
    """Every matched tensor exists in both models and has the same shape in both (the student's
    shapes observed on ``probe``)."""
    produced = {o for n in training_copy.graph.node for o in n.output}
    teacher_produced = {o for n in teacher.graph.node for o in n.output}
    for name in names:
        if name not in produced or name not in teacher_produced:
            where = "the student" if name not in produced else "the teacher"
            raise ConfigError(f"match: tensor {name!r} is not computed in {where} (give names of node outputs "
                              "that both models keep).")
    teacher_shapes = observed_shapes(teacher, probe)
    for name in names:
        if student_shapes.get(name) != teacher_shapes.get(name):
            raise ConfigError(f"match: tensor {name!r} has shape {teacher_shapes.get(name)} in the teacher and "
                              f"{student_shapes.get(name)} in the student (pruned channels cannot be matched).")


_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Gather"})


def _constant_derived(model: onnx.ModelProto) -> tuple[set[str], dict[str, NDArray[Any]]]:
    """(names computed from constants only, {initializer / Constant-node output: its value})."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    derived = set(values)
    for node in model.graph.node:
        if node.op_type != "Constant" and all(not name or name in derived for name in node.input) \
                and not _node_reads_subgraph(node):
            derived.update(o for o in node.output if o)
    return derived, values


def _node_reads_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def compressed_layer_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto,
                             student_shapes: dict[str, tuple[int, ...]],
                             teacher_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The outputs of the student's compressed layers, in graph order: a Conv / MatMul / Gemm /
    LSTM / GRU / RNN / embedding Gather whose first output the teacher computes with the same shape
    (and is not a graph output), and whose weights differ from the teacher's layer of that output
    (a decoded codebook, an SVD factor, a refit or narrower weight, another input tensor)."""
    s_derived, s_values = _constant_derived(student)
    _, t_values = _constant_derived(teacher)
    t_producer = {o: node for node in teacher.graph.node for o in node.output if o}
    outputs = {o.name for o in student.graph.output}
    found: list[str] = []
    for node in student.graph.node:
        if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and (len(node.input) < 2 or node.input[1] in s_derived
                                         or node.input[0] not in s_derived):
            continue  # a codebook being decoded, or data moved around: not an embedding lookup
        out = next((o for o in node.output if o), None)
        other = t_producer.get(out) if out else None
        if other is None or out in outputs or student_shapes.get(out) is None \
                or student_shapes.get(out) != teacher_shapes.get(out):
            continue
        theirs = list(other.input) + [""] * max(0, len(node.input) - len(other.input))
        changed = len(other.input) > len(node.input)
        for mine, their in zip(node.input, theirs):
            if mine in s_values and their in t_values:
                a, b = s_values[mine], t_values[their]
                changed |= a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b)
            elif mine in s_derived:
                changed = True  # decoded in the graph (a codebook) or a constant the teacher lacks
            else:
                changed |= mine != their
        if changed:
            found.append(out)
    return found


def _auto_matched(model: onnx.ModelProto, teacher: onnx.ModelProto, training_copy: onnx.ModelProto,
                  shapes: dict[str, tuple[int, ...]], probe: Samples, samples: int,
                  pair: Samples | None = None) -> list[str]:
    """match=auto: the compressed layers' outputs that the training copy computes, evenly thinned
    out when the teacher's activations of all of them on ``samples`` samples would not fit
    :data:`_MATCH_BUDGET`. With ``pair`` (two samples, where ``probe`` holds one) only outputs
    with an axis that follows the samples qualify (1 at one sample, 2 at two, the rest equal):
    an attention tensor with the batch merged into the heads (``[N·heads, T, d]``) cannot be cut
    into per-sample targets."""
    teacher_shapes = observed_shapes(teacher, probe)
    produced = {o for n in training_copy.graph.node for o in n.output}
    names = [n for n in compressed_layer_outputs(model, teacher, shapes, teacher_shapes) if n in produced]
    if pair is not None:
        paired = observed_shapes(teacher, pair)
        names = [n for n in names if _follows_samples(teacher_shapes.get(n), paired.get(n))]
    probe_count = max(1, probe.count) if isinstance(probe, Samples) else 1
    sizes = {n: int(np.prod(shapes[n])) * samples // probe_count for n in names}
    return _within_budget(names, sizes, _MATCH_BUDGET)


def _follows_samples(one: tuple[int, ...] | None, two: tuple[int, ...] | None) -> bool:
    """Whether a tensor of shape ``one`` at one sample and ``two`` at two has one axis that
    counts the samples (1, then 2) and no other axis that changes."""
    if one is None or two is None or len(one) != len(two):
        return False
    changed = [a for a, (x, y) in enumerate(zip(one, two)) if x != y]
    return len(changed) == 1 and (one[changed[0]], two[changed[0]]) == (1, 2)


def _codebooks(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Those of ``names`` that are codebooks: the table of a Gather whose indices are constants."""
    derived, _ = _constant_derived(model)
    return sorted({n.input[0] for n in model.graph.node
                   if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in derived and n.input[0] in names})


def _within_budget(names: list[str], sizes: dict[str, int], budget: int) -> list[str]:
    """The most of ``names`` (evenly spaced in their order) whose ``sizes`` sum to at most ``budget``."""
    for count in range(len(names), 0, -1):
        picked = [names[int(i)] for i in np.unique(np.round(np.linspace(0, len(names) - 1, count)).astype(int))]
        if sum(sizes[n] for n in picked) <= budget:
            return picked
    return []


def _variance(values: NDArray[Any], chunk: int = 2**22) -> float:
    """The variance of all of ``values`` in float64 (its mean square when that is 0), a chunk at a time."""
    flat = values.reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk].astype(np.float64)
        total += float(part.sum())
        squares += float(np.dot(part, part))
    count = max(flat.size, 1)
    mean_square = squares / count
    return max(mean_square - (total / count) ** 2, 0.0) or mean_square


def _relative(terms: list[LossTerm], targets: dict[str, NDArray[Any]]) -> list[LossTerm]:
    """Each MSE term against a teacher target divided by that target's variance (its mean square
    when the variance is 0), so that no tensor dominates by its scale."""
    result = []
    for term in terms:
        target = targets.get(term.target)
        if term.kind == "mse" and term.target.startswith(("onnxzip_teacher_", "onnxzip_match_")) and target is not None:
            scale = _variance(target)
            if scale > 0 and np.isfinite(scale):
                term = dataclasses.replace(term, weight=term.weight / scale)
        result.append(term)
    return result


def finetune(
    model: onnx.ModelProto | str | os.PathLike[str],
    data: DataSource,
    *,
    val: DataSource | None = None,
    teacher: onnx.ModelProto | str | os.PathLike[str] | None = None,
    config: FinetuneConfig | dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
    probed: bool = False,
    sample_axes: dict[str, int | None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` (an .npz path or arrays by input name, with optional
    ``labels`` / ``references``, laid out by :func:`onnxzip.core.inputs.infer_sample_axes`;
    ``sample_axes`` settles an ambiguous input); see the module docstring. Unless ``probed`` (a model onnxzip
    made from an input that already ran), the model and the teacher first run on the data in a
    child process, so that data they cannot run on, or a crash, is one sentence."""
    if not isinstance(config, FinetuneConfig):
        config = build_config(FinetuneConfig, config or {}, owner="finetune")
    require_training("Fine-tuning")
    model = _prepared(load_model(model))
    teacher_model = load_model(teacher) if teacher is not None else None
    device = resolve_device(device)
    log.info("fine-tuning on %s", "CUDA" if device == "cuda" else "the CPU")
    train = _load_data(model, data, "training", sample_axes)
    declared, pinned = model, None
    if not probed:  # a model that runs one sample at a time is pinned to batch 1 (see probe_batch)
        model, pinned = probe_batch(model, train.inputs)
        if teacher_model is not None:
            teacher_model, _ = probe_batch(teacher_model, train.inputs)
    held_out = _load_data(model, val, "validation", sample_axes) if val is not None else None
    task = task_metric_of(config.metric)  # a task score needs no held-back data: it brings its own
    if held_out is None and task is None and config.keep == "best" and not config.sparsity \
            and len(train) >= _MIN_HOLDOUT_SAMPLES:
        train, held_out = _hold_back(train, config.seed)
        notes = [f"held back {len(held_out)} of {len(train) + len(held_out)} training samples (seed {config.seed}) "
                 "to select the epoch"]
    else:
        notes = []
    fixed = fixed_batch(model, train.inputs)
    batch = fixed or auto_batch_size(config.batch_size, len(train))
    if not fixed and config.batch_size == "auto" and batch < _MAX_AUTO_BATCH:
        notes.append(f"batch size {batch} (auto: at least {_MIN_STEPS} steps per epoch on {len(train)} samples)")
    terms, needs_teacher = _loss_terms(model, config, train, teacher_model is not None)
    named = [m for m in config.match if m.lower() not in ("auto", "none")]
    if named and len(named) != len(config.match):
        raise ConfigError("match: give tensor names, or auto, or none (not a mix).")
    auto_match = bool(config.match and config.match[0].lower() == "auto" and needs_teacher and not config.sparsity
                  and not config.loss_model and len(train) < AUTO_MATCH_SAMPLES)
    if named:
        if teacher_model is None:
            raise ConfigError("Matching intermediate activations (match=) needs a teacher model (--teacher).")
        terms += [LossTerm(name, "mse", f"onnxzip_match_{i}", config.match_weight) for i, name in enumerate(named)]
        needs_teacher = True

    probe = train.inputs.take(slice(0, fixed or 1))
    shapes = observed_shapes(model, probe)
    plan = prepare(model, shapes, config.include, config.exclude, data=train.inputs, probe=probe)
    training_copy, trainable = plan.model, plan.trainable
    sizes = _declare_data_sizes(training_copy, train, held_out)
    if sizes:
        notes.append(f"the training graph takes the data's sizes for {_listed(sizes)} (symbolic in the model)")
    result = FinetuneResult(model, trained=trainable, frozen=plan.frozen, rewrites=plan.rewrites, device=device,
                            losses=[f"{t.kind}({t.output})" for t in terms], notes=[*notes, *plan.notes])
    result.float_weights = {t.name: int(np.prod(t.dims)) for t in plan.model.graph.initializer
                            if t.data_type == onnx.TensorProto.FLOAT and not t.name.startswith(PREFIX)}
    for name, reason in plan.frozen.items():
        log.info("frozen %s: %s", name, reason)
    if not trainable:
        return _restored(_untrained(result), declared, pinned)

    if named:
        _check_matched(named, shapes, teacher_model, training_copy, probe)
    if auto_match:
        named = _auto_matched(model, teacher_model, training_copy, shapes, probe,
                              len(train) + (len(held_out) if held_out is not None else 0),
                              pair=train.inputs.take(slice(0, 2)) if not fixed and len(train) >= 2 else None)
        terms += [LossTerm(name, "mse", f"onnxzip_match_{i}", config.match_weight / len(named))
                  for i, name in enumerate(named)]
        result.matched = named
        result.notes.append(f"match=auto ({len(train)} samples < {AUTO_MATCH_SAMPLES}): every term is relative to the "
                            f"teacher's variance; matched the outputs of {len(named)} compressed layers"
                            + (f" ({_listed(named)})" if named else ""))
    teacher_train = _teacher_outputs(teacher_model, model, train, batch, device, named) if needs_teacher else None
    teacher_val = (_teacher_outputs(teacher_model, model, held_out, batch, device, named)
                   if needs_teacher and held_out is not None else None)
    train_targets, target_axes = _targets(terms, train, teacher_train)
    unsampled = [t for t in terms if target_axes.get(t.target) is None]
    if unsampled:  # e.g. the final state of a whole sequence: one value for all samples, no per-sample target
        terms = [t for t in terms if t not in unsampled]
        if not terms:
            raise DataError("No output of the model follows the samples (each is one value for all of them), "
                            "so there is nothing to distill per sample; give labels or references in the data.")
        result.notes.append(f"not distilled: {_listed([t.output for t in unsampled])} (no sample axis: one value "
                            "for all the samples of a run)")
        result.losses = [f"{t.kind}({t.output})" for t in terms]
        train_targets = {k: v for k, v in train_targets.items() if k in {t.target for t in terms}}
    if auto_match:  # one scale per term, from the training targets, for training and the held-out loss alike
        terms = _relative(terms, train_targets)
        result.losses = [f"{t.kind}({t.output})" + "/var" * (t.kind == "mse") for t in terms
                         if not t.target.startswith("onnxzip_match_")]
        if named:
            result.losses.append(f"{config.match_weight:g}·mean of mse/var over {len(named)} compressed-layer outputs")
    val_targets = _targets(terms, held_out, teacher_val)[0] if held_out is not None else None
    add_loss(training_copy, terms, {k: _with_symbol(v.shape, target_axes[k]) for k, v in train_targets.items()})
    training_copy.ir_version = compatible_ir_version(training_copy)

    if config.lr == "auto":
        codebooks = _codebooks(training_copy, trainable)
        lr = LR_CODEBOOK if codebooks else LR_DENSE
        result.notes.append(f"learning rate {lr:g} (auto: " + (f"{len(codebooks)} codebooks train)" if codebooks
                                                               else "no codebook trains)"))
        config = dataclasses.replace(config, lr=lr)

    if config.optimizer == "adamw":
        limits = step_limits(training_copy, [t for t in trainable if not (config.sparsity and t in plan.gammas)],
                             config.lr, config.max_step)
        if limits:
            scale_steps(training_copy, limits)
            plan.limits = limits
            result.notes.append(
                f"max_step: {len(limits)} weights of RMS under lr/max_step step at {config.max_step:g} of their RMS "
                f"(×{min(limits.values()):.2g}–{max(limits.values()):.2g} the learning rate): {_listed(sorted(limits))}")

    with tempfile.TemporaryDirectory(prefix="onnxzip-train-") as folder:
        work = Path(folder)
        model_file = work / "model.onnx"
        onnx.save(training_copy, str(model_file))
        # one batch for the child's first step: a crash there must not take this process
        first = _batches(len(train), batch, fixed is not None, None)[0]
        axes = {**train.inputs.axes, **target_axes}
        probe = {n: take(v, first, axes.get(n, 0)) for n, v in {**train.inputs, **train_targets}.items()}
        symbolic = _artifacts.computed_shapes(training_copy)
        for _attempt in range(_MAX_UNREACHABLE + 1):
            failure = _artifacts.generate(work, model_file, trainable, config.optimizer, config.weight_decay,
                                          symbolic=symbolic, probe=probe, device=device)
            if failure is not None and symbolic and not (_NO_BUILDER.search(failure) or _UNREACHABLE.search(failure)):
                # the symbolic shapes may be what the generator or the first step refused
                failure = _artifacts.generate(work, model_file, trainable, config.optimizer, config.weight_decay,
                                              symbolic=False, probe=probe, device=device) and failure
            session = None
            if failure is None:
                try:
                    session = _open(work, device)
                except RuntimeError as exc:  # a kernel refused the training graph (onnxruntime's own type)
                    failure = _reason(exc)
            unreachable = _UNREACHABLE.search(failure or "")
            missing = _NO_BUILDER.search(failure or "")
            if missing:  # an op without a gradient we did not know of: freeze what is upstream of it
                op_type = missing.group(1)
                plan.kept.update({n.name: f"{op_type} '{n.name}' (onnxruntime-training has no gradient for it)"
                                  for n in training_copy.graph.node if n.op_type == op_type})
                _, frozen = select_weights(training_copy, config.include, config.exclude, plan.kept)
                newly = [t for t in trainable if t in frozen]
                if not newly:
                    break
                trainable = [t for t in trainable if t not in frozen]
                result.frozen.update({name: frozen[name] for name in newly})
                result.trained = trainable
                log.info("no gradient for %s: %d weights frozen", op_type, len(newly))
                if not trainable:
                    failure = None
                    break
                continue
            if not unreachable or unreachable.group(1) not in trainable or len(trainable) == 1:
                break
            # e.g. a codebook that decodes BatchNorm running statistics: no gradient reaches it.
            name = unreachable.group(1)
            trainable = [t for t in trainable if t != name]
            result.trained = trainable
            result.frozen[name] = "no gradient reaches it from the outputs (onnxruntime)"
            log.info("frozen %s: no gradient path; building the training graph again", name)
        if failure is not None:
            for name in trainable:
                result.frozen[name] = f"onnxruntime-training cannot train this graph: {failure}"
            result.trained = []
        if not result.trained:
            return _restored(_untrained(result), declared, pinned)
        # With matched inner activations the epoch is selected on the model's outputs alone: the
        # matched terms only add signal, and can dominate a loss whose outputs improve.
        output_terms = [t for t in terms if t.target.startswith("onnxzip_teacher_")] if named else []
        db_terms = [t for t in terms if t.target.startswith(("onnxzip_teacher_", "onnxzip_references"))
                    and t.kind in ("mse", "l1", "kl")]
        if config.select == "db" and not db_terms and held_out is not None and config.metric is None:
            result.notes.append("select=db compares outputs with the teacher's or the references; with this "
                                f"loss ({' + '.join(result.losses)}) the epoch is selected on the held-out loss")
        try:
            best = _train(session, result, config, train, (train_targets, target_axes), held_out, val_targets, batch,
                          fixed is not None, plan, model, teacher_val[0] if teacher_val else None, progress,
                          held_back=bool(notes), output_terms=output_terms, db_terms=db_terms, task=task,
                          reopen=lambda: _open(work, device))
        except RuntimeError as exc:  # a kernel of the built graph failed while running: nothing is kept
            for name in result.trained:
                result.frozen[name] = f"onnxruntime-training failed in a training step: {_reason(exc)}"
            return _restored(_untrained(result), declared, pinned)
    result.model = with_weights(model, best, plan.locations)
    total = sum(result.float_weights.values())
    result.trained_fraction = sum(result.float_weights.get(n, 0) for n in result.trained) / total if total else 0.0
    return _restored(result, declared, pinned)


def _declare_data_sizes(model: onnx.ModelProto, train: _Data, held_out: _Data | None) -> list[str]:
    """Give the training copy's symbolic input dims other than the sample axis the sizes the data
    has (the same in the held-out data), in place; returns them as ``input[axis]=size``.
    onnxruntime-training builds wrong gradients on symbolic spatial dims: chained MaxPools whose
    outputs are also concatenated (YOLOv8's SPPF, nudenet) die in the first step with signal 11 or
    fail in a gradient Sum ("Can broadcast 0 by 0 or 1"), and train once the sizes are numbers."""
    initializers = {t.name for t in model.graph.initializer}
    declared: list[str] = []
    for info in model.graph.input:
        if info.name in initializers or info.name not in train.inputs or not info.type.HasField("tensor_type"):
            continue
        shape = np.shape(train.inputs[info.name])
        dims = info.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        sample_axis = train.inputs.axes.get(info.name)
        other = np.shape(held_out.inputs[info.name]) if held_out is not None and info.name in held_out.inputs else shape
        for axis, dim in enumerate(dims):
            if axis == sample_axis or dim.HasField("dim_value") or len(other) != len(shape) or other[axis] != shape[axis]:
                continue
            dim.Clear()
            dim.dim_value = int(shape[axis])
            declared.append(f"{info.name}[{axis}]={shape[axis]}")
    return declared


def _restored(result: FinetuneResult, declared: onnx.ModelProto, pinned: str | None) -> FinetuneResult:
    """``result`` with its model's inputs declared as the user's model declared them, and the note
    of :func:`onnxzip.core.sanity.probe_batch` when it pinned the batch to 1."""
    declare_inputs_like(result.model, declared)
    if pinned:
        result.notes.insert(0, pinned)
    return result


def _untrained(result: FinetuneResult) -> FinetuneResult:
    """``result`` for a model returned unchanged, saying why."""
    result.trained = []
    why = result.why_nothing_trains()
    result.notes.insert(0, f"{why} The model is returned unchanged.")
    log.info("%s", why)  # the caller says it: finetune exits 2, a pipeline step writes it to stderr
    return result


def _reason(exc: BaseException) -> str:
    """The informative tail of an onnxruntime error: after its last source location."""
    text = " ".join(str(exc).split())
    return text.rsplit(" was false. ", 1)[-1][:300] if " was false. " in text else text[-300:]


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight in an initializer (Constant nodes and constant chains materialized), so that
    trained values can be written back by name."""
    graph = import_graph(model)
    if not materialize_weights(graph):
        return model
    tidy(graph)
    return export_model(graph, model)


def task_metric_of(spec: str | None) -> Any:
    """The :class:`~onnxzip.evaluators.user.ModelMetric` of a ``task:FILE.py:function`` metric, else
    None; a metric that names no evaluator is refused here, before anything trains."""
    if not spec:
        return None
    from onnxzip.evaluators.registry import resolve_metric
    from onnxzip.evaluators.user import ModelMetric

    resolved = resolve_metric(spec)
    return resolved if isinstance(resolved, ModelMetric) else None


def _metric_name(config: FinetuneConfig, held_out: _Data | None, model: onnx.ModelProto) -> str | None:
    if held_out is None:
        return None
    if config.metric:
        return config.metric
    if held_out.labels is not None and len(model.graph.output[0].type.tensor_type.shape.dim) == 2:
        return "accuracy"
    if held_out.references is not None:
        return None
    return "cosine"


def _evaluate(model: onnx.ModelProto, metric: str, held_out: _Data, teacher_val: dict[str, NDArray[Any]] | None,
              device: str) -> tuple[float, bool]:
    from onnxzip.evaluators import ArrayDataset, Predictions, evaluate

    arrays: dict[str, Any] = dict(held_out.inputs)
    if held_out.labels is not None:
        arrays["labels"] = held_out.labels
    if held_out.references is not None:
        arrays["references"] = held_out.references
    dataset = ArrayDataset.from_arrays(arrays)
    reference = None
    if teacher_val is not None:
        first = next(iter(teacher_val.values()))
        reference = Predictions.of(list(first))
    value = evaluate(model, dataset, [metric], reference_model=reference, device=device, progress=False)[metric]
    return value.value, value.higher_is_better


def _open(work: Path, device: str) -> tuple[Any, Any, Any]:
    """CheckpointState, Module and Optimizer over the artifacts in ``work``."""
    import onnxruntime as ort
    from onnxruntime.training import api

    ort.set_default_logger_severity(4)  # kernel refusals become our message; unused-initializer noise
    try:
        state = api.CheckpointState.load_checkpoint(str(work / "checkpoint"))
        module = api.Module(str(work / "training_model.onnx"), state, str(work / "eval_model.onnx"),
                            device=device, session_options=_session_options())
        return state, module, api.Optimizer(str(work / "optimizer_model.onnx"), module)
    finally:
        ort.set_default_logger_severity(2)


def _session_options() -> Any:
    """The training session's options: one intra-op thread per CPU this process may run on
    (onnxruntime's default counts physical cores, which a VM or a CPU mask can misreport)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return options


def _train(
    session: tuple[Any, Any, Any], result: FinetuneResult, config: FinetuneConfig, train: _Data,
    train_targets: tuple[dict[str, NDArray[Any]], dict[str, int | None]],
    held_out: _Data | None, val_targets: dict[str, NDArray[Any]] | None, batch: int, fixed: bool,
    plan: TrainingCopy, model: onnx.ModelProto, teacher_val: dict[str, NDArray[Any]] | None, progress: bool,
    held_back: bool = False, output_terms: list[LossTerm] = (), db_terms: list[LossTerm] = (),
    task: Any = None, reopen: Any = None,
) -> dict[str, NDArray[Any]]:
    """The training loop (on data ``held_back`` from the training data, the epoch is selected on
    the loss unless a metric is named; ``select=db`` on the outputs' per-sample relative error in dB
    against ``db_terms``' targets; a ``task`` metric scores each epoch's whole model instead); returns
    the best epoch's weights, or the input's when no epoch beats them. An epoch that scores worse
    than the best so far is undone (the best weights back in a training session opened again by
    ``reopen``, so that the optimizer's moments restart too) and retried at half the learning rate
    (at most :data:`_MAX_HALVINGS` times in a run)."""
    state, module, optimizer = session
    names = module.input_names()
    targets, target_axes = train_targets
    axes = {**train.inputs.axes, **target_axes}
    arrays = {**train.inputs, **targets}
    val_arrays = {**held_out.inputs, **val_targets} if held_out is not None else None
    gammas = plan.gammas
    sparse = [g for g in gammas if g in result.trained] if config.sparsity > 0 else []
    slimming = _SparseGammas(sparse, config)
    # select=db replaces the default held-out measure (the loss; on --val, cosine), never a named metric
    in_db = task is None and not config.metric and config.select == "db" and bool(db_terms)
    metric = None if task is not None or in_db else config.metric if held_back else _metric_name(config, held_out, model)
    scored = val_arrays is not None or task is not None  # each epoch gets a held-out or task score
    selecting = not sparse and config.keep == "best"  # sparsity training keeps its last (sparsest) epoch
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(_batches(len(train), batch, fixed, None))
    total = steps_per_epoch * config.epochs

    def held_out_score(row: dict[str, float]) -> tuple[float, NDArray[np.float64] | None]:
        """(the score, higher is better; the per-batch or per-sample losses it is the mean of, or
        None for a metric)"""
        if val_arrays is not None:
            module.eval()  # one sample a step (a fixed batch: its size), so the paired test sees every sample
            val_losses = np.array([float(np.asarray(module(*[take(val_arrays[n], c, axes.get(n, 0)) for n in names])))
                                   for c in _batches(len(held_out), batch if fixed else 1, fixed, None)])
            row["val_loss"] = float(np.mean(val_losses))
        if task is None and metric is None and not output_terms and not in_db:
            return -row["val_loss"], val_losses
        current = with_weights(model, _snapshot(state, result.trained, plan.limits), plan.locations)
        if task is not None:  # the user's score of the whole model file: it alone selects
            value = task.measure(current).value
            row[task.name] = value
            return (value if task.higher_is_better else -value), None
        if in_db:
            per_sample = _output_db(current, db_terms, held_out, val_targets, batch, result.device)
            row["val_output_db"] = float(np.mean(per_sample))
            return -row["val_output_db"], per_sample
        if metric is None:
            per_sample = _output_loss(current, output_terms, held_out, val_targets, batch, result.device)
            row["val_output_loss"] = float(np.mean(per_sample))
            return -row["val_output_loss"], per_sample
        value, higher = _evaluate(current, metric, held_out, teacher_val, result.device)
        row[metric] = value
        return (value if higher else -value), None

    best_score, best_weights, stale, halvings, scale = -math.inf, _snapshot(state, result.trained, plan.limits), 0, 0, 1.0
    best_losses: NDArray[np.float64] | None = None
    if scored and selecting:  # the input itself is the first candidate
        start: dict[str, float] = {"epoch": 0}
        best_score, best_losses = held_out_score(start)
        result.history.append(start)
    epoch = 0
    while epoch < config.epochs:
        epoch += 1
        module.train()
        losses = []
        began, began_cpu = time.perf_counter(), time.process_time()
        chunks = _batches(len(train), batch, fixed, rng)
        step = (epoch - 1) * steps_per_epoch
        bar = tqdm(total=len(chunks), desc=f"finetune epoch {epoch}/{config.epochs}", unit="batch",
                   leave=False) if progress else None
        rate = None
        for chunk in chunks:
            new_rate = scale * lr_at(step, total, config)
            if new_rate != rate:  # a constant schedule sets it once
                rate = new_rate
                optimizer.set_learning_rate(rate)
            loss = module(*[take(arrays[name], chunk, axes.get(name, 0)) for name in names])
            before = slimming.before(state) if sparse else None
            optimizer.step()
            if before is not None:
                slimming.after(state, before, rate)
            module.lazy_reset_grad()
            losses.append(float(loss))
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses):.4g}")
            step += 1
        if bar is not None:
            bar.close()
        # the training steps alone (the held-out scoring below is not counted): wall and CPU seconds
        row: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": rate, "steps": len(chunks),
                                 "seconds": time.perf_counter() - began,
                                 "cpu_seconds": time.process_time() - began_cpu}
        score, losses_now = held_out_score(row) if scored else (-row["loss"], None)
        result.history.append(row)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        if progress:
            tqdm.write("finetune " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items()))
        noise = _within_noise(best_losses, losses_now, in_db) if selecting and score > best_score else None
        if (score > best_score and noise is None) or not selecting:
            best_score, best_weights, stale, result.best_epoch = score, _snapshot(state, result.trained, plan.limits), 0, epoch
            best_losses = losses_now
            continue
        if noise is not None:  # lower, but not by more than the held-out loss's own spread: not kept, not undone
            result.notes.append(f"epoch {epoch} {noise}: not kept")
        elif scored and halvings < _MAX_HALVINGS:  # undo the epoch, retry it slower
            halvings += 1
            scale /= 2
            if reopen is not None:  # the undone epoch's Adam moments would steer the retry its way again
                state, module, optimizer = reopen()
            _restore(state, best_weights, plan.limits)
            result.notes.append(f"epoch {epoch} made the {'task' if task is not None else 'held-out'} score worse: "
                                "undone and retried at half the "
                                f"learning rate ({scale:g}× the schedule)")
            epoch -= 1
            continue
        stale += 1
        if config.patience and stale >= config.patience:
            result.notes.append(f"stopped early after epoch {epoch} ({config.patience} epochs without improvement)")
            break
    if selecting and scored and result.best_epoch == 0:
        result.notes.append("no epoch beat the input " + (f"on {task.name}" if task is not None else
                            "on the held-out data") + ": the input weights are returned")
    if gammas:
        values = np.concatenate([np.ravel(best_weights.get(g, numpy_helper.to_array(_init(plan.model, g))
                                                           * np.float32(plan.limits.get(g, 1.0)))) for g in gammas])
        result.gammas = int(values.size)
        result.gammas_below_threshold = int(np.sum(np.abs(values) < config.gamma_threshold))
    return best_weights


def _within_noise(best: NDArray[np.float64] | None, now: NDArray[np.float64] | None, db: bool = False) -> str | None:
    """Why a lower held-out loss does not count (one phrase), or None when it does: the paired
    differences of the per-batch (or per-sample) losses (``db``: relative errors in dB) must have a
    mean above :data:`_NOISE_SE` standard errors, else the epoch only fits the noise of a small
    held-out part."""
    if best is None or now is None or len(best) != len(now) or len(best) < 2:
        return None
    gain = best - now
    error = float(np.std(gain, ddof=1)) / math.sqrt(len(gain))
    if float(np.mean(gain)) > _NOISE_SE * error:
        return None
    lowered = (f"lowered the held-out relative error by {float(np.mean(gain)):.2f} dB" if db else
               f"lowered the held-out loss by {100 * float(np.mean(gain)) / max(float(np.mean(best)), 1e-30):.1f}%")
    return (f"{lowered}, "
            f"within its noise ({float(np.mean(gain)) / error if error else 0.0:.1f} of the {_NOISE_SE:g} standard "
            f"errors over {len(gain)} paired held-out {'values' if db else 'losses'} needed)")


def _term_outputs(model: onnx.ModelProto, terms: list[LossTerm], data: _Data, targets: dict[str, NDArray[Any]],
                  batch: int, device: str) -> Any:
    """``model`` run once by onnxruntime on ``data``; per loss term, (term, its output, the
    teacher's target, both float64, and the output's sample axis: None when it has none)."""
    outputs, axes = run_samples(make_session(model, device), data.inputs, batch)
    for term in terms:
        yield (term, outputs[term.output].astype(np.float64), targets[term.target].astype(np.float64),
               axes.get(term.output, 0))


def _output_loss(model: onnx.ModelProto, terms: list[LossTerm], data: _Data, targets: dict[str, NDArray[Any]],
                 batch: int, device: str) -> NDArray[np.float64]:
    """Per sample, the loss terms on the model's outputs (mse / l1 / kl against the teacher's,
    weighted as in the training graph) of ``model`` run by onnxruntime on ``data``, in float64;
    their mean is the loss of the whole set."""
    total = np.zeros(len(data))
    for term, y, t, axis in _term_outputs(model, terms, data, targets, batch, device):
        if term.kind == "mse":
            error = (y - t) ** 2
        elif term.kind == "l1":
            error = np.abs(y - t)
        else:  # kl against the teacher's probabilities: -classes · mean(p · log softmax(y))
            shifted = y - y.max(axis=-1, keepdims=True)
            error = -y.shape[-1] * t * (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
        if axis is None:  # the same for every sample
            total += term.weight * float(np.mean(error))
            continue
        error = np.moveaxis(error, axis, 0)
        total += term.weight * error.reshape(error.shape[0], -1).mean(axis=1)
    return total


def _output_db(model: onnx.ModelProto, terms: list[LossTerm], data: _Data, targets: dict[str, NDArray[Any]],
               batch: int, device: str) -> NDArray[np.float64]:
    """Per sample, the mean over the ``terms``' outputs of the relative error in dB,
    ``10·log10(mean((y − t)²) / mean(t²))`` of ``model`` run by onnxruntime on ``data`` (for ``kl``
    terms on the softmax of the output against the teacher's probabilities), floored at −120 dB
    below the output's mean power. Unlike the pooled loss, every sample and every output weighs the
    same, whatever its scale (as in SNR-like task metrics averaged over utterances)."""
    total = np.zeros(len(data))
    for term, y, t, axis in _term_outputs(model, terms, data, targets, batch, device):
        if term.kind == "kl":
            shifted = np.exp(y - y.max(axis=-1, keepdims=True))
            y = shifted / shifted.sum(axis=-1, keepdims=True)
        if axis is None:  # the same for every sample
            y, t = y[None], t[None]
        else:
            y, t = np.moveaxis(y, axis, 0), np.moveaxis(t, axis, 0)
        error = ((y - t) ** 2).reshape(y.shape[0], -1).mean(axis=1)
        power = (t ** 2).reshape(t.shape[0], -1).mean(axis=1)
        floor = 1e-12 * max(float(power.mean()), 1e-30)
        total += 10.0 * np.log10((error + floor) / (power + floor))
    return total / max(len(terms), 1)


def _restore(state: Any, weights: dict[str, NDArray[Any]], limits: dict[str, float]) -> None:
    for name, value in unscaled(weights, limits, back=True).items():
        state.parameters[name].data = value


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _snapshot(state: Any, names: list[str], limits: dict[str, float]) -> dict[str, NDArray[Any]]:
    """The weights the parameters ``names`` stand for (their steps scaled by ``limits``)."""
    return unscaled({name: np.array(state.parameters[name].data) for name in names}, limits)
