"""Verification in float64: exact deep models pass where float32 rounding would fail them, and
an error of 1e-6 in one rule is caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import rand_bn
from onnx_graphs import Graph

from econv_convert import densify, onnx_api, verify
from econv_convert.examples import tiny_resnet
from econv_convert.torch import ops, targets


def deep_mobile_net(blocks: int = 8, c: int = 16, var: float = 0.02) -> nn.Module:
    """Inverted residual blocks with grouped 1 x 1 convolutions and ReLU6, 8 x blocks + 4
    layers, and BatchNorm statistics of small variance: float32 rounding grows through it."""
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU6()]
    for i in range(blocks):
        stride = 2 if i in (2, 6) else 1
        layers += [nn.Conv2d(c, 4 * c, 1, groups=2, bias=False), nn.BatchNorm2d(4 * c),
                   nn.ReLU6(), nn.Conv2d(4 * c, 4 * c, 3, stride, 1, groups=4 * c, bias=False),
                   nn.BatchNorm2d(4 * c), nn.ReLU6(), nn.Conv2d(4 * c, c, 1, groups=2, bias=False),
                   nn.BatchNorm2d(c)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * var + var)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def test_a_deep_exact_model_fails_in_float32_and_passes_in_float64():
    torch.manual_seed(0)
    model = deep_mobile_net()
    assert len(list(model.modules())) > 40
    dense = densify(model, (1, 3, 64, 64))
    in_float32 = verify(model, dense, precision="model", atol=1e-5, rtol=1e-4)
    assert not in_float32.ok and in_float32.max_rel > 1e-4  # rounding, not an error
    report = verify(model, dense)
    assert report.ok and report.precision == "float64", report.failures()
    assert report.max_rel < 1e-10
    # the model's own dtype on the smallest checked input, for information: a map of a few
    # lattice points may round without error there
    assert report.native["dtype"] == "float32" and report.native["max_error_over_scale"] < 1e-3
    assert next(model.parameters()).dtype == torch.float32  # the model is not changed


def test_an_error_of_1e6_in_one_rule_is_caught(monkeypatch):
    torch.manual_seed(0)
    model = rand_bn(tiny_resnet(5, 8))
    dense = densify(model, (1, 3, 48, 48))
    assert verify(model, dense).ok
    conv = ops.conv

    def perturbed_conv(*args, **kwargs):  # a test-only mutation of the convolution rule
        return conv(*args, **kwargs) * (1 + 1e-6)

    targets.register(perturbed_conv)
    monkeypatch.setattr(ops, "conv", perturbed_conv)
    dense = densify(model, (1, 3, 48, 48))  # the graph calls the mutated op
    report = verify(model, dense)
    assert not report.ok and report.max_rel > 1e-7
    old_tolerances = verify(model, dense, precision="model", atol=1e-5, rtol=1e-4)
    assert old_tolerances.ok  # what float32 with its tolerances could not see


def test_half_precision_models_are_proved_in_float64_and_measured_in_their_dtype():
    torch.manual_seed(0)
    model = rand_bn(tiny_resnet(5, 8)).to(torch.bfloat16)
    dense = densify(model, (1, 3, 48, 48))
    report = verify(model, dense)
    assert report.ok and report.precision == "float64" and report.max_rel < 1e-10
    assert report.native["dtype"] == "bfloat16" and "max_error_over_scale" in report.native


class CastsToFloat32(nn.Module):
    """A model that casts its input itself: it cannot run as a float64 copy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2)

    def forward(self, x):
        return self.conv(x.float())


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype_and_says_so():
    torch.manual_seed(0)
    model = CastsToFloat32().eval()
    report = verify(model, densify(model, (1, 3, 17, 17)))
    assert report.ok and report.precision == "float32"
    assert any("cannot run in float64" in n for n in report.notes)


def test_onnx_graphs_with_convolutions_are_checked_in_float32_with_a_depth_tolerance():
    g = Graph((1, 3, 31, 29))
    g.x = g.node("Conv", [g.x, g.weight((4, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    model = g.model()
    dense = onnx_api.densify(model)
    report = onnx_api.verify(model, dense)
    assert report.ok and report.precision == "float32"
    assert any("no float64 kernel for Conv" in n for n in report.notes)


def test_onnx_graphs_whose_ops_all_run_in_double_are_checked_in_float64():
    g = Graph((1, 3, 31, 29), stem_stride=0)
    g.x = g.node("MaxPool", [g.x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    g.x = g.node("Relu", [g.x])
    g.x = g.node("MaxPool", [g.x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    model = g.model()
    dense = onnx_api.densify(model)
    report = onnx_api.verify(model, dense)
    assert report.ok and report.precision == "float64", (report.notes, report.failures())
    assert report.max_rel < 1e-12


@pytest.mark.parametrize("precision", ["float64", "model"])


def test_cli_reports_the_precision(precision, tmp_path):
    import json

    from conftest import FIXTURES
    from typer.testing import CliRunner

    from econv_convert.cli import app

    result = CliRunner().invoke(app, ["verify", str(FIXTURES / "tiny_resnet.pt"), "--json",
                                      "--precision", precision])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["verification"]
    assert data["precision"] == ("float64" if precision == "float64" else "float32")
    assert (data["native"] is None) == (precision == "model")

