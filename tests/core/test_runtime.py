from __future__ import annotations

import pytest
from helpers import mlp

from onnxzip.errors import ConfigError, RuntimeUnavailableError
from onnxzip.core.runtime import cuda_usable, make_session, resolve_device


def test_auto_falls_back_to_cpu_and_says_which():
    device = resolve_device("auto")
    assert device == ("cuda" if cuda_usable() else "cpu")
    session = make_session(mlp(), "auto")
    expected = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    assert session.get_providers()[0] == expected


@pytest.mark.skipif(cuda_usable(), reason="a usable GPU is present")
def test_asking_for_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeUnavailableError, match="cannot run on CUDA here"):
        resolve_device("cuda")


def test_unknown_device():
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
