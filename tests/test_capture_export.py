"""Models captured whole with torch.export as with torch.fx: in-place ops written the way
model-definition libraries write residual blocks (``+=``, ``add_``, ``mul_``, ``clamp_``,
``inplace=True`` activations) convert exactly through both captures, every phase proven."""

from __future__ import annotations

import pytest
import torch
from conftest import rand_bn
from library_style import InplaceConfig, InplaceNet

from econv_convert import InvalidInputError, InvalidModelError, densify, verify

STYLES = ["iadd", "add_", "mul_", "clamp_"]


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
@pytest.mark.parametrize("style", STYLES)
def test_in_place_ops_convert_exactly_through_both_captures(style, capture):
    torch.manual_seed(0)
    model = rand_bn(InplaceNet(style))
    dense = densify(model, (1, 3, 33, 29), input_name="pixel_values", capture_with=capture)
    assert dense.econv.capture == capture
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.proof is not None and report.proof.nodes and not report.proof.note
    x = torch.randn(2, 3, 41, 37)
    with torch.no_grad():  # the in-place ops did not change the caller's tensors
        before = x.clone()
        dense(x)
    torch.testing.assert_close(x, before)


@pytest.mark.parametrize("act", ["silu", "relu6"])
def test_in_place_activations_of_the_config_convert_under_export(act):
    torch.manual_seed(0)
    model = rand_bn(InplaceNet("iadd", InplaceConfig(hidden_act=act)))
    dense = densify(model, (1, 3, 33, 29), input_name="pixel_values",
                    capture_with="torch.export")
    assert verify(model, dense).ok


def test_an_unknown_capture_is_refused():
    with pytest.raises(InvalidInputError, match="capture 'jit' is not one of"):
        densify(InplaceNet(), (1, 3, 33, 29), capture_with="jit")


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
def test_a_changed_tensor_read_under_another_name_sees_the_change(capture):
    from library_style import AliasedResidual

    torch.manual_seed(0)
    model = rand_bn(AliasedResidual())
    dense = densify(model, (1, 3, 31, 27), capture_with=capture)
    assert verify(model, dense).ok


def test_an_in_place_change_of_a_view_is_captured_by_export():
    """torch.fx cannot follow a change through a view; torch.export functionalizes it."""
    from library_style import SliceScaledInPlace

    torch.manual_seed(0)
    model = rand_bn(SliceScaledInPlace())
    with pytest.raises(InvalidModelError, match="changes a view of another tensor in place"):
        densify(model, (1, 3, 31, 27), capture_with="torch.fx")
    dense = densify(model, (1, 3, 31, 27))
    assert dense.econv.capture == "torch.export"
    assert verify(model, dense).ok
