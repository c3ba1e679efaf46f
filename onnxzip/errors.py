"""Named errors. Each carries one clear sentence meant for the user.

The CLI turns :class:`OnnxzipError` subclasses into exit code 2 (bad input / bad option) or
1 (:class:`QualityGateError`), printing only the message, never a traceback.
"""
from __future__ import annotations


class OnnxzipError(Exception):
    """Base class of every error onnxzip raises on purpose."""

    exit_code = 2


class InvalidModelError(OnnxzipError):
    """The file is not a readable ONNX model (not ONNX, truncated, missing external data...)."""


class NativeCrashError(InvalidModelError):
    """onnxruntime crashed natively (a signal) on the model, in a child process."""


class UnsupportedModelError(OnnxzipError):
    """The model is valid ONNX but uses something onnxzip or the target runtime cannot handle."""


class ConfigError(OnnxzipError):
    """A recipe, plan, flag or keyword argument is wrong."""


class DataError(OnnxzipError):
    """Input data (.npz, folders, iterables) is missing or does not match the model."""


class UserFunctionError(OnnxzipError):
    """User code onnxzip was told to call (a metric or scorer function) raised or returned no number."""


class RuntimeUnavailableError(OnnxzipError):
    """An optional capability (training, CUDA, an audio metric) is not installed here."""


class QualityGateError(OnnxzipError):
    """The compressed model failed a quality condition; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
