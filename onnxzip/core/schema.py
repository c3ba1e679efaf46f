"""One schema for recipes, CLI flags and Python keyword arguments.

Every pass has a config dataclass. :func:`build_config` turns a mapping (from YAML/JSON, from
``--svd energy=0.95,include=attn*`` or from ``svd={"energy": 0.95}``) into that dataclass,
coercing values by the field's annotation and naming unknown or malformed keys in one sentence.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from onnxzip.errors import ConfigError


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (often a string from the CLI) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        # Literals and exact types first, so "auto" matches Literal["auto"] before int fails.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_describe(a) for a in args if a is not type(None))
        raise ConfigError(f"{where} must be {names}, not {value!r}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, not {value!r}.")
    if origin in (list, tuple):
        (inner, *_rest) = typing.get_args(tp) or (str,)
        items = value.split("|") if isinstance(value, str) else list(value)
        return [coerce(item, inner, where) for item in items if item != ""]
    if origin is dict:
        if isinstance(value, str):  # the command line's form: KEY:VALUE|KEY:VALUE
            pairs = [item.rpartition(":") for item in value.split("|") if item]
            if not all(sep and key for key, sep, _ in pairs):
                raise ConfigError(f"{where} must be KEY:VALUE pairs separated by |, not {value!r}.")
            value = {key: item for key, _, item in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, not {value!r}.")
        inner = typing.get_args(tp)[1] if len(typing.get_args(tp)) == 2 else Any
        return {key: coerce(item, inner, f"{where}[{key!r}]") for key, item in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, not {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, not {value!r}.")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, not {value!r}.") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where} must be an integer, not {value!r}.")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}.") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, not {value!r}.")
        return str(value)
    return value


def config_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, include_extras=False)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def build_config(cls: type, values: dict[str, Any] | None, *, owner: str) -> Any:
    """Instantiate config dataclass ``cls`` from ``values``; ``owner`` names it in errors."""
    values = dict(values or {})
    fields = config_fields(cls)
    unknown = sorted(set(k.replace("-", "_") for k in values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{owner} has no option {', '.join(unknown)}; its options are {', '.join(fields) or 'none'}."
        )
    kwargs = {
        key.replace("-", "_"): coerce(value, fields[key.replace("-", "_")][1], f"{owner} option {key}")
        for key, value in values.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner}: {exc}") from exc


def parse_flag_value(text: str | None, *, shorthand: str | None, owner: str) -> dict[str, str]:
    """``"energy=0.95,include=fc*|attn*"`` → dict; a bare value fills the pass's shorthand field
    (``--cluster auto`` → ``{"k": "auto"}``, ``--prune-blocks 2`` → ``{"count": "2"}``)."""
    values: dict[str, str] = {}
    if not text:
        return values
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            values[key.strip()] = value.strip()
        elif shorthand and shorthand not in values:
            values[shorthand] = part
        else:
            raise ConfigError(f"{owner}: expected KEY=VALUE, got {part!r}.")
    return values


def option_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` of every option of config dataclass ``cls``: what --help,
    docstrings and the README's option tables show."""
    rows = []
    for name, (fld, tp) in config_fields(cls).items():
        default = fld.default if fld.default is not dataclasses.MISSING else (
            fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None
        )
        rows.append((name, _describe_type(tp), fld.metadata.get("shown") or repr(default), fld.metadata.get("help", "")))
    return rows


def describe_config(cls: type) -> str:
    """One line per option, for --help and documentation."""
    return "\n".join(f"{name} ({tp}, default {default}): {text}".rstrip(": ") for name, tp, default, text in option_rows(cls))


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_describe_type(typing.get_args(tp)[0])} separated by |"
    if origin is dict:
        key, value = typing.get_args(tp) or (str, Any)
        return f"{_describe_type(key)}:{_describe_type(value)} pairs separated by |"
    if tp is type(None):
        return "none"
    return _describe(tp)


def option(default: Any = dataclasses.MISSING, help: str = "", shown: str | None = None,  # noqa: A002
           **kwargs: Any) -> Any:
    """A config field with help text (``dataclasses.field`` plus metadata); ``shown`` is the
    default as documentation states it, where ``None`` only means "decided from other options"."""
    metadata = {"help": help, "shown": shown}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)
