"""onnxzip.torch_export (onnxzip.export): BatchNorm kept or folded, dynamic batch, IR version, outputs match torch."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxzip.errors import ConfigError, UnsupportedModelError
from onnxzip.torch_export import export
from onnxzip.core.runtime import make_session, run_session


class ConvNet(nn.Module):
    """Conv-BN-ReLU, then a Linear over each channel's pixels: Conv, BN and MatMul in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(2)).mean(dim=1)


@pytest.fixture()
def convnet() -> ConvNet:
    torch.manual_seed(0)
    module = ConvNet()
    # Untrained BN statistics equal its affine parameters (zeros and ones); make them distinct.
    with torch.no_grad():
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    return module.train()


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _assert_matches_torch(model: onnx.ModelProto, module: nn.Module, batch: int) -> None:
    x = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(batch))
    actual = run_session(make_session(model, "cpu"), {"input": x.numpy()})["output"]
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_keeps_inference_batchnorm_and_matches_torch_at_any_batch(convnet: ConvNet) -> None:
    model = export(convnet, torch.randn(2, 1, 4, 4))
    onnx.checker.check_model(model, full_check=True)
    assert convnet.training, "export restores the module's mode"
    (batchnorm,) = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert len(batchnorm.output) == 1
    assert all(a.i == 0 for a in batchnorm.attribute if a.name == "training_mode")
    assert "Transpose" not in _ops(model), "constant folding pre-transposes the Linear weight"
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 7):
        _assert_matches_torch(model, convnet, batch)


def test_folds_batchnorm_when_asked(convnet: ConvNet, tmp_path) -> None:
    path = tmp_path / "sub" / "folded.onnx"
    model = export(convnet, torch.randn(2, 1, 4, 4), path, keep_batchnorm=False)
    assert "BatchNormalization" not in _ops(model) and "Conv" in _ops(model)
    assert onnx.load(path) == model
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["folded.onnx"]
    _assert_matches_torch(model, convnet, 3)


def test_untrained_batchnorm_gets_its_own_initializers() -> None:
    # The exporter would share equal tensors (running_var == weight == ones) through Identity.
    model = export(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), torch.randn(1, 1, 2, 2))
    assert "Identity" not in _ops(model)
    (batchnorm,) = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    initializers = {init.name for init in model.graph.initializer}
    assert set(batchnorm.input[1:]) <= initializers and len(set(batchnorm.input[1:])) == 4


@pytest.mark.parametrize(("opset", "ir_version"), [(17, 8), (18, 8), (19, 9), (20, 9)])
def test_ir_version_is_the_lowest_for_the_opset(opset: int, ir_version: int) -> None:
    model = export(nn.Linear(3, 2), torch.randn(1, 3), opset=opset)
    assert model.ir_version == ir_version


def test_names_and_static_batch() -> None:
    model = export(
        nn.Linear(3, 2),
        torch.randn(4, 3),
        dynamic_batch=False,
        input_names=["x"],
        output_names=["y"],
    )
    assert [i.name for i in model.graph.input] == ["x"] and [
        o.name for o in model.graph.output
    ] == ["y"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize(
    ("module", "inputs", "message"),
    [
        ("not a module", torch.randn(1, 3), "torch.nn.Module"),
        (nn.Linear(3, 2), np.zeros((1, 3), np.float32), "example_inputs"),
        (nn.Linear(3, 2), torch.randn(1, 5), "failed on example_inputs"),
    ],
)
def test_bad_arguments_raise_config_error(module, inputs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export(module, inputs)


def test_wrong_number_of_names_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="output_names has 2 names"):
        export(nn.Linear(3, 2), torch.randn(1, 3), output_names=["a", "b"])


def test_operator_without_onnx_form_raises_unsupported_model_error() -> None:
    class Histogram(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.histc(x, bins=4)

    with pytest.raises(UnsupportedModelError, match="aten::histc"):
        export(Histogram(), torch.randn(2, 3))


def test_saved_file_has_the_usual_permissions(tmp_path) -> None:
    path = tmp_path / "linear.onnx"
    export(nn.Linear(3, 2), torch.randn(1, 3), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_dynamic_axes_beyond_the_batch():
    torch.manual_seed(0)
    module = nn.GRU(6, 5, batch_first=True)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    model = export(Last(), torch.ones(1, 4, 6), dynamic_axes={1: "frames"})
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (model.graph.input[0], model.graph.output[0])]
    assert dims[0] == ["batch", "frames", 6] and dims[1][:2] == ["batch", "frames"]
    x = np.random.default_rng(0).standard_normal((3, 11, 6)).astype(np.float32)
    expected = Last()(torch.from_numpy(x)).detach().numpy()
    actual = run_session(make_session(model, "cpu"), {"input": x})["output"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
