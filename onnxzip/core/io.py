"""Loading and saving ONNX models safely.

* ``load_model`` accepts a path, bytes or a ``ModelProto``; external data is loaded from beside
  the file; every failure becomes one clear sentence (:class:`InvalidModelError` /
  :class:`UnsupportedModelError`).
* ``save_model`` makes the model loadable by onnxruntime 1.19 (see :mod:`onnxzip.core.compat`), writes
  into a temporary folder next to the target and renames into place, so a failure never leaves
  a half-written output. Models over 2 GB (or on request) keep their tensors in one external
  data file beside the model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxzip.core.compat import (
    MAX_OPSET,
    check_opsets,
    compatible_ir_version,
    convert_to_supported_opset,
    default_opset,
    ir_version_as,
)
from onnxzip.errors import InvalidModelError, UnsupportedModelError
from onnxzip.core.sanity import check_structure, check_text

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Leave head room: the proto grows slightly when fields are re-encoded.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The whole message on one line (the checker spreads one sentence over several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(source: onnx.ModelProto | str | os.PathLike[str] | bytes, *, check: bool = True) -> onnx.ModelProto:
    """Load and check a model. A ``ModelProto`` is deep-copied so the caller's object is untouched."""
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
        name = "the model"
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "the model bytes")
        name = "the model bytes"
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise InvalidModelError(f"{path} does not exist.")
        if path.is_dir():
            raise InvalidModelError(f"{path} is a directory, not an ONNX file.")
        model = _parse(path.read_bytes(), str(path))
        _load_external(model, path.parent, str(path))
    opset = default_opset(model)
    if opset > MAX_OPSET[""]:
        model = convert_to_supported_opset(model)
        log.warning("%s: converted from ONNX opset %d to %d (onnxruntime 1.19 loads at most %d)", name,
                    opset, MAX_OPSET[""], MAX_OPSET[""])
    if check:
        check_model(model, name)
    return model


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{name} is empty, not an ONNX model.")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{name} is not an ONNX model or is truncated ({_first_line(exc)})."
        ) from exc
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(f"{name} is not an ONNX model (no graph or opset found).")
    return model


def _load_external(model: onnx.ModelProto, base_dir: Path, name: str) -> None:
    external = [
        t for t in external_data_helper._get_all_tensors(model)  # noqa: SLF001 - covers subgraphs
        if external_data_helper.uses_external_data(t)
    ]
    if not external:
        return
    for tensor in external:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = base_dir / info.location
        if not location.is_file():
            raise InvalidModelError(
                f"{name} keeps tensor '{tensor.name}' in the external data file "
                f"'{info.location}', which is missing next to the model."
            )
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"Could not read the external data of {name}: {_first_line(exc)}.") from exc


def check_model(model: onnx.ModelProto, name: str = "the model") -> None:
    """Refuse models onnxruntime 1.19 cannot load or that are not valid ONNX."""
    check_opsets(model)
    check_text(model, name)  # first: the checker's own messages would quote undecodable bytes
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
    except UnicodeDecodeError as exc:  # a message quoting bytes check_text does not reach
        raise InvalidModelError(f"{name} is not a valid ONNX model: it holds text that is not UTF-8.") from exc
    except onnx.checker.ValidationError as exc:
        message = _one_line(exc)
        if "No Op registered" in message or "No opset import" in message:
            raise UnsupportedModelError(
                f"{name} uses an operator unknown to ONNX: {message}"
            ) from exc
        raise InvalidModelError(f"{name} is not a valid ONNX model: {message}") from exc
    check_structure(model, name)



def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; returns the path.

    ``external_data=None`` picks external data automatically for models over ~1.8 GB; the tensors
    then go to ``<name>.data`` beside the model.
    """
    target = Path(path)
    if target.is_dir():
        raise InvalidModelError(f"{target} is a directory; give a file name for the output model.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with ir_version_as(model, compatible_ir_version(model)):
        return _write(model, target, external_data)


def _write(model: onnx.ModelProto, target: Path, external_data: bool | None) -> Path:
    size = model.ByteSize()
    if external_data is None:
        external_data = size > EXTERNAL_DATA_THRESHOLD
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged_model = staging / target.name
        data_name = f"{target.name}.data"
        if external_data:
            model = copy.deepcopy(model)
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
            onnx.save_model(model, str(staged_model))
            if (staging / data_name).exists():  # absent when every tensor is under 1 kB
                os.replace(staging / data_name, target.parent / data_name)
        else:
            if size > PROTOBUF_LIMIT:
                raise UnsupportedModelError(
                    "The model is over 2 GB and must be saved with external data."
                )
            staged_model.write_bytes(model.SerializeToString())
        os.replace(staged_model, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", target)
    _record_write(target)
    return target


def _record_write(target: Path) -> None:
    """Append the written path to the file named by ``ONNXZIP_RECORD_WRITES`` (CI uses it to
    re-load every model onnxzip wrote in the newest onnxruntime)."""
    record = os.environ.get("ONNXZIP_RECORD_WRITES")
    if record:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(f"{target.resolve()}\n")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file (used to refuse overwriting the input)."""
    with contextlib.suppress(OSError):
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees a half-written file, even when two processes write the same path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (numpy values and dataclasses allowed)."""
    return write_atomically(path, json.dumps(data, indent=2, default=_json_default).encode())
