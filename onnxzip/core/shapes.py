"""Sizes for dynamic input dimensions when no data says them.

Every dimension that is neither fixed in the file nor given (``dims`` by symbol name,
``input_shapes`` by input) gets candidate sizes, and onnxruntime decides: the first candidate
set the model runs on is used, and :meth:`ShapeResolution.describe` says which it was.

* the batch (axis 0, or a batch-named symbol): the requested batch, then 1 (files that
  reshape to a batch of 1 inside);
* a named symbol: a size given in the model's metadata under a key containing the name, then
  by name (height/width-like: 64; sequence-like: 16), then the common sizes;
* a spatial axis (axis ≥ 2) of a rank-3/4/5 input of a model with ``Conv``: multiples of 32
  (64, 32, 128, 224), which survive five stride-2 stages;
* anything else: 16, 32, 64, 8, 128, 1, then the sizes the graph's ``Reshape`` constants name.

Dimensions with the same symbol share one size; unnamed ones (no ``dim_param``, ``''`` or
``'?'``) each get their own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxzip.errors import ConfigError, DataError
from onnxzip.core.inputs import batch_dim_names, generate_inputs, graph_inputs

log = logging.getLogger(__name__)

UNNAMED = frozenset({"", "?"})
COMMON_SIZES = (16, 32, 64, 8, 128, 1)
SPATIAL_SIZES = (64, 32, 128, 224)
SPATIAL_NAMES = ("height", "width", "h", "w", "size", "img", "image", "spatial")
SEQUENCE_NAMES = ("seq", "len", "time", "frame", "step", "token", "sentence")
MAX_ATTEMPTS = 12


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` → ``("x", (1, 3, 224, 224))`` (the ``--input-shape`` form)."""
    name, sep, sizes = text.rpartition("=")
    parts = [p.strip() for p in sizes.split(",")] if sep else []
    if not sep or not name.strip() or not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape expects NAME=d0,d1,... with positive sizes, got {text!r}.")
    return name.strip(), tuple(int(p) for p in parts)


def check_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` checked against the model's inputs (names exist, ranks agree)."""
    declared = {i.name: i for i in graph_inputs(model)}
    checked: dict[str, tuple[int, ...]] = {}
    for name, shape in (input_shapes or {}).items():
        if name not in declared:
            raise ConfigError(
                f"input_shapes names '{name}', which is not an input of the model "
                f"(inputs: {', '.join(declared) or 'none'})."
            )
        if isinstance(shape, str):
            shape = parse_input_shape(f"{name}={shape}")[1]
        try:
            sizes = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"input_shapes['{name}'] must be a list of sizes, got {shape!r}.") from exc
        rank = len(declared[name].type.tensor_type.shape.dim)
        if declared[name].type.tensor_type.HasField("shape") and rank != len(sizes):
            raise ConfigError(f"input_shapes['{name}'] has {len(sizes)} sizes, but the input has rank {rank}.")
        if any(d <= 0 for d in sizes):
            raise ConfigError(f"input_shapes['{name}'] must hold positive sizes, got {list(sizes)}.")
        checked[name] = sizes
    return checked


@dataclass
class ShapeResolution:
    """Concrete input shapes and how the unknown dimensions were chosen."""

    shapes: dict[str, tuple[int, ...]]
    chosen: dict[str, int] = field(default_factory=dict)  # label → size, for dims onnxzip picked
    probed: bool = False  # onnxruntime ran the model at these shapes
    attempts: int = 0

    def describe(self) -> str:
        if not self.chosen:
            return "input sizes as given"
        sizes = ", ".join(f"{label}={size}" for label, size in self.chosen.items())
        how = f"onnxruntime ran the model (try {self.attempts})" if self.probed else "not checked by a run"
        return f"dynamic dimensions set to {sizes} ({how}); fix them with --input-shape or --dim"


def _metadata_sizes(model: onnx.ModelProto) -> dict[str, int]:
    sizes = {}
    for prop in model.metadata_props:
        value = prop.value.strip()
        if value.isdigit() and int(value) > 0:
            sizes[prop.key.lower()] = int(value)
    return sizes


def _reshape_sizes(model: onnx.ModelProto) -> list[int]:
    """Sizes > 1 named by the main graph's Reshape shape constants (and their products)."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            constants[node.output[0]] = node.attribute[0].t
    found: list[int] = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants:
            values = [int(v) for v in onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1)]
            positive = [v for v in values if v > 1]
            found.extend(positive)
            if len(positive) > 1:
                found.append(int(np.prod(positive)))
    return found


def _candidates(model: onnx.ModelProto, info: onnx.ValueInfoProto, axis: int, symbol: str) -> list[int]:
    has_conv = any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)
    rank = len(info.type.tensor_type.shape.dim)
    found: list[int] = []
    lowered = symbol.lower()
    if lowered:
        found.extend(size for key, size in _metadata_sizes(model).items() if lowered in key)
    if lowered in SPATIAL_NAMES or (has_conv and 3 <= rank <= 5 and axis >= 2):
        found.extend(SPATIAL_SIZES)
    elif any(word in lowered for word in SEQUENCE_NAMES):
        found.append(16)
    found.extend(COMMON_SIZES)
    found.extend(_reshape_sizes(model))
    return list(dict.fromkeys(found))


class UnresolvedShapesError(DataError):
    """No tried sizes ran the model. ``guessed`` tells whether sizes other than the batch had to
    be guessed: if not, the model fails at every batch size, i.e. it cannot run at all."""

    def __init__(self, guessed: bool, message: str) -> None:
        super().__init__(message)
        self.guessed = guessed


def resolve_input_shapes(
    model: onnx.ModelProto,
    *,
    batch: int = 2,
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Any] | None = None,
    seed: int = 0,
    probe: bool = True,
) -> ShapeResolution:
    """Concrete shapes for every input (see the module docstring). With ``probe`` the
    candidates are tried in onnxruntime until the model runs; :class:`DataError` when none does."""
    dims = dict(dims or {})
    given = check_input_shapes(model, input_shapes or {})
    batch_names = batch_dim_names(model)
    # Each unknown dimension: (input name, axis, group key, label, candidates).
    unknown: list[tuple[str, int, str]] = []
    groups: dict[str, tuple[str, list[int]]] = {}
    fixed: dict[str, list[int | None]] = {}
    for info in graph_inputs(model):
        if info.name in given:
            fixed[info.name] = list(given[info.name])
            continue
        sizes: list[int | None] = []
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            symbol = dim.dim_param if dim.dim_param not in UNNAMED else ""
            if dim.HasField("dim_value") and dim.dim_value > 0:
                sizes.append(int(dim.dim_value))
                continue
            if symbol and symbol in dims:
                sizes.append(int(dims[symbol]))
                continue
            sizes.append(None)
            if axis == 0 or symbol in batch_names:
                key, label, options = "batch", symbol or "batch", [batch, 1]
            elif symbol:
                key, label, options = f"symbol {symbol}", symbol, _candidates(model, info, axis, symbol)
            else:
                key = f"input {info.name} axis {axis}"
                label, options = f"'{info.name}' axis {axis}", _candidates(model, info, axis, "")
            groups.setdefault(key, (label, list(dict.fromkeys(options))))
            unknown.append((info.name, axis, key))
        fixed[info.name] = sizes
    if not unknown:
        return ShapeResolution({name: tuple(s) for name, s in fixed.items()})  # type: ignore[misc]

    def shapes_for(choice: dict[str, int]) -> dict[str, tuple[int, ...]]:
        out = {name: list(sizes) for name, sizes in fixed.items()}
        for name, axis, key in unknown:
            out[name][axis] = choice[key]
        return {name: tuple(s) for name, s in out.items()}  # type: ignore[misc]

    others = [key for key in groups if key != "batch"]
    depth = max((len(groups[k][1]) for k in others), default=1)
    choices = []
    for batch_size in groups["batch"][1] if "batch" in groups else [None]:
        for index in range(depth):
            choice = {k: groups[k][1][min(index, len(groups[k][1]) - 1)] for k in others}
            if batch_size is not None:
                choice["batch"] = batch_size
            if choice not in choices:
                choices.append(choice)
    choices = choices[:MAX_ATTEMPTS]

    def result(choice: dict[str, int], probed: bool, attempt: int) -> ShapeResolution:
        chosen = {groups[k][0]: v for k, v in choice.items()}
        return ShapeResolution(shapes_for(choice), chosen, probed, attempt)

    if not probe:
        return result(choices[0], False, 0)
    from onnxzip.errors import InvalidModelError
    from onnxzip.core.runtime import make_session, run_session

    try:
        session = make_session(model, "cpu", optimization="basic")
    except InvalidModelError as exc:
        log.info("cannot probe input sizes: %s", exc)
        return result(choices[0], False, 0)
    tried, first_error = [], ""
    for attempt, choice in enumerate(choices, 1):
        feeds = generate_inputs(model, shapes=shapes_for(choice), seed=seed)
        try:
            run_session(session, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.debug("input sizes %s rejected: %s", choice, reason)
            first_error = first_error or reason
            tried.append(", ".join(f"{groups[k][0]}={v}" for k, v in choice.items()))
            continue
        resolution = result(choice, True, attempt)
        log.info("%s", resolution.describe())
        return resolution
    labels = ", ".join(label for label, _ in groups.values())
    if not others:
        sizes = " or ".join(str(choice["batch"]) for choice in choices)
        raise UnresolvedShapesError(False, f"onnxruntime cannot run the model at batch size {sizes}: {first_error}")
    raise UnresolvedShapesError(
        True,
        f"onnxruntime ran the model at none of {len(tried)} tried sizes for its dynamic dimensions "
        f"({labels}); give them with --input-shape NAME=d0,d1,... or --dim NAME=N, or pass --data.",
    )


def generated_feeds(
    model: onnx.ModelProto,
    *,
    batch: int = 2,
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Any] | None = None,
    seed: int = 0,
    probe: bool = True,
) -> tuple[dict[str, np.ndarray], ShapeResolution]:
    """Generated inputs at resolved shapes (:func:`resolve_input_shapes`), and the resolution."""
    resolution = resolve_input_shapes(
        model, batch=batch, dims=dims, input_shapes=input_shapes, seed=seed, probe=probe
    )
    return generate_inputs(model, shapes=resolution.shapes, seed=seed), resolution
