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


# -- one reason per kind of layer, whichever capture met it; norms by the dims they reduce


class _Probe(torch.nn.Module):
    """A strided convolution, then the layer under test."""

    def __init__(self, layer):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.layer = layer

    def forward(self, x):
        return self.layer(self.conv(x))


def _norms():
    from families import ChannelsFirstLayerNorm, LayerNorm2d

    return {"permute-layer-norm": lambda: LayerNorm2d(8),
            "mean-var-over-dim-1": lambda: ChannelsFirstLayerNorm(8),
            "layer-norm-module-channels-last": lambda: torch.nn.Sequential(
                _Permute((0, 2, 3, 1)), torch.nn.LayerNorm(8), _Permute((0, 3, 1, 2)))}


class _Permute(torch.nn.Module):
    def __init__(self, order):
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
@pytest.mark.parametrize("norm", list(_norms()))
def test_a_norm_over_channels_is_pointwise_on_both_captures(norm, capture):
    torch.manual_seed(0)
    model = rand_bn(_Probe(_norms()[norm]()))
    dense = densify(model, (1, 3, 29, 31), capture_with=capture)
    report = verify(model, dense)
    assert report.ok and report.proof.nodes, report.failures()


REASONS = {
    "group_norm": (lambda: torch.nn.GroupNorm(2, 8), "normalizes with statistics over spatial"),
    "instance_norm": (lambda: torch.nn.InstanceNorm2d(8, affine=True),
                      "normalizes with statistics over spatial"),
    "bicubic": (lambda: torch.nn.Upsample(scale_factor=2, mode="bicubic"),
                "upsampling is not translation-equivariant"),
    "bilinear": (lambda: _Interpolate("bilinear"), "upsampling is not translation-equivariant"),
    "nearest": (lambda: _Interpolate("nearest"), "upsampling is not translation-equivariant"),
    "transposed-conv": (lambda: torch.nn.ConvTranspose2d(8, 4, 2, 2),
                        "a transposed convolution upsamples"),
    "pixel-shuffle": (lambda: torch.nn.PixelShuffle(2), "depth to space"),
}


class _Interpolate(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode=self.mode)


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
@pytest.mark.parametrize("layer", list(REASONS))
def test_one_reason_per_layer_kind_on_both_captures(layer, capture):
    from econv_convert import UnsupportedLayerError

    make, reason = REASONS[layer]
    with pytest.raises(UnsupportedLayerError, match=reason) as err:
        densify(rand_bn(_Probe(make())), (1, 3, 29, 31), capture_with=capture)
    assert "\n" not in str(err.value) and "no rule for" not in str(err.value)


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
def test_an_instance_norm_on_running_statistics_is_channel_wise(capture):
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 1.5)
    model = _Probe(norm).eval()
    dense = densify(model, (1, 3, 29, 31), capture_with=capture)
    assert verify(model, dense).ok


# -- sizes stay symbolic: PyTorch's own shape decisions are not the model's branches ----------

SIZES = [(32, 32), (33, 31), (35, 40), (17, 18), (64, 61)]


@pytest.mark.parametrize("flatten_sizes", [False, True], ids=["mean", "reshape"])
def test_a_ceil_mode_pool_after_computed_same_padding_converts_at_every_size(flatten_sizes):
    """At the example size the pool's shape rule decided how its last window rounds; that is
    PyTorch's decision, not a branch of the model. The sizes the model's code reads off the
    pooled map are read off it when the dense model runs: odd and even sizes alike, exact at
    each, no size limit claimed."""
    from library_style import CeilPoolSameNet

    torch.manual_seed(0)
    model = rand_bn(CeilPoolSameNet(flatten_sizes=flatten_sizes))
    dense = densify(model, (1, 3, 32, 32), capture_with="torch.export")
    assert not any("covers the input sizes" in n for n in dense.econv.notes), dense.econv.notes
    report = verify(model, dense, shapes=[(2, 3, h, w) for h, w in SIZES])
    assert report.ok and len([c for c in report.checked if c.check == "lattice"]) == len(SIZES), \
        report.failures()


def test_a_size_derived_under_a_shape_decision_keeps_the_decision_and_refuses_other_sizes():
    """A size read off one map and used on another branch cannot be read back off a map the
    op sees: PyTorch's decisions then stay checks. Sizes that round the other way are
    refused, never computed from a wrong size."""
    from library_style import CropToPooled

    from econv_convert.errors import SizeNotCovered

    torch.manual_seed(0)
    model = rand_bn(CropToPooled())
    dense = densify(model, (1, 3, 32, 32), capture_with="torch.export")
    assert any("covers the input sizes" in n for n in dense.econv.notes), dense.econv.notes
    report = verify(model, dense, shapes=[(2, 3, h, w) for h, w in SIZES])
    assert report.ok, report.failures()
    checked = [c.shape[2:] for c in report.checked if c.check == "lattice"]
    skipped = [c.shape[2:] for c in report.cases if c.skipped]
    assert (32, 32) in checked and skipped and set(checked) | set(skipped) == set(SIZES)
    with pytest.raises(SizeNotCovered):
        dense(torch.randn(1, 3, *skipped[0]))


def test_the_sizes_a_dense_model_covers_are_stated_in_the_input_dims():
    from library_style import SamePaddingNet

    torch.manual_seed(0)
    dense = densify(rand_bn(SamePaddingNet("branches")), (1, 3, 32, 32))
    (note,) = [n for n in dense.econv.notes if "covers the input sizes" in n]
    assert "H" in note and "W" in note and not any(f"s{i}" in note for i in range(100)), note


# -- sizes computed in forward(): adaptive pools, and a flatten of one position as the output --


@pytest.mark.parametrize("capture", ["torch.fx", "torch.export"], ids=["fx", "export"])
@pytest.mark.parametrize("mode", ["phase", "window", "lattice"])
def test_an_adaptive_pool_to_a_computed_size_is_specialized_to_it_and_checked(mode, capture):
    """``F.adaptive_avg_pool2d(x, (h // 2, w // 2))``: a plain pool at the example's size;
    where the baseline would compute another output size the dense model refuses to run
    (with window pooling every window has the example's size)."""
    from library_style import ComputedPoolNet

    from econv_convert.errors import SizeNotCovered

    torch.manual_seed(0)
    model = rand_bn(ComputedPoolNet("half"))
    dense = densify(model, (1, 3, 16, 16), global_pool=mode, capture_with=capture)
    report = verify(model, dense)
    assert report.ok and report.checked, report.failures()
    if mode == "window":
        assert dense(torch.randn(1, 3, 40, 40)).shape[-1] > 1  # a map of window positions
    else:
        with pytest.raises(SizeNotCovered, match="adaptive pool"):
            dense(torch.randn(1, 3, 40, 40))


def test_a_pool_up_to_a_kernel_computed_from_the_input_is_refused_with_its_reason():
    """A VGG head pooling a map smaller than its kernel up to the kernel's size: the windows
    depend on the input size; one reason, never an internal error."""
    from library_style import ComputedPoolNet

    from econv_convert.errors import UnsupportedLayerError

    model = rand_bn(ComputedPoolNet("vgg"))
    with pytest.raises(UnsupportedLayerError, match=r"adaptive pooling from \(2, 2\) to "
                                                    r"\(3, 3\)"):
        densify(model, (1, 3, 8, 8))
    dense = densify(model, (1, 3, 24, 24))  # a map as large as the kernel: no pool taken
    assert verify(model, dense).ok


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("mode", ["window", "lattice"])
def test_a_flatten_of_one_position_as_the_output_converts_with_window_or_lattice(mode, padded):
    """``x.view(x.size(0), -1)`` after a pool as large as the example's map: one output per
    window position (window), the baseline's own flatten of the lattice points (lattice);
    an unpadded network's windows equal the baseline on crops (verify's shift check)."""
    from library_style import ComputedPoolNet

    torch.manual_seed(0)
    model = rand_bn(ComputedPoolNet("flatten", padded=padded))
    example = (1, 3, 16, 16) if padded else (1, 3, 19, 19)
    dense = densify(model, example, global_pool=mode)
    report = verify(model, dense)
    assert report.ok and report.checked, report.failures()
    assert any(c.check == "shift" for c in report.checked) == (mode == "window" and not padded)
    out = dense(torch.randn(1, 3, 48, 48))
    assert out.dim() == (4 if mode == "window" else 2)


def test_a_flatten_of_one_position_as_the_output_is_refused_with_phase_pooling():
    from library_style import ComputedPoolNet

    from econv_convert.errors import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match="flattens a map of one position.*window"):
        densify(rand_bn(ComputedPoolNet("flatten")), (1, 3, 16, 16), global_pool="phase")


# -- a ported library model with every pattern at once -----------------------------------------


# its torch.export capture takes ~25 s on CI's cores: both modes run with -m extended (the
# patterns one by one are the tests above)
@pytest.mark.extended
@pytest.mark.parametrize("mode", ["phase", "window"])
def test_a_ported_library_model_converts_exactly_at_odd_and_even_sizes(mode):
    """Config object, keyword input, output class, computed "same" padding, ceil-mode pool,
    in-place activations, ``+=`` residuals, channels-first LayerNorm: captured whole
    (torch.fx cannot trace the padding arithmetic; torch.export does), exact at every size
    the verification tries, the output class kept."""
    from library_style import ClassifierOutput, PortedNet

    torch.manual_seed(0)
    model = rand_bn(PortedNet())
    dense = densify(model, (1, 3, 32, 32), input_name="pixel_values", global_pool=mode)
    assert dense.econv.capture == "torch.export"
    assert not any("covers the input sizes" in n for n in dense.econv.notes), dense.econv.notes
    shapes = None if mode == "window" else [(2, 3, h, w) for h, w in SIZES]
    report = verify(model, dense, shapes=shapes)
    assert report.ok and report.checked, report.failures()
    assert not [c for c in report.cases if c.skipped and c.check == "lattice"]
    out = dense(pixel_values=torch.randn(1, 3, 45, 38))
    assert isinstance(out, ClassifierOutput) and out.logits.shape[1] == 4
