"""Rules over graph structure: branches, squeeze-excitation, reshapes, padding, slicing, heads,
and the refusals for layers that are not translation-equivariant on the lattice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_lattice_equal, rand_bn

from econv_convert import UnsupportedLayerError, densify, verify


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate=nn.Sigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.gate = gate()

    def forward(self, x):
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(y))))


class LinearSE(nn.Module):
    """The other common form: mean, view(b, c), Linear layers, view(b, c, 1, 1)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, 4), nn.ReLU(), nn.Linear(4, c), nn.Hardsigmoid())

    def forward(self, x):
        b, c, _, _ = x.shape
        y = x.mean((2, 3)).view(b, c)
        return x * self.fc(y).view(b, c, 1, 1)


def trunk(*layers: nn.Module, cin: int = 3, c: int = 8) -> nn.Module:
    return rand_bn(nn.Sequential(nn.Conv2d(cin, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                 nn.MaxPool2d(3, 2, 1, ceil_mode=True), *layers))


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("se", [SqueezeExcite, LinearSE], ids=["conv-se", "linear-se"])
def test_squeeze_excitation_inside_the_network(se, mode):
    model = trunk(se(8), nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), se(8),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    assert_lattice_equal(model, (1, 3, 40, 40), [(45, 37), (53, 61)], global_pool=mode)


def test_squeeze_excitation_phase_scales_each_shift_by_its_own_pool():
    model = trunk(SqueezeExcite(8))
    dense = densify(model, (1, 3, 40, 40), global_pool="phase")
    pre = densify(model[:-1], (1, 3, 40, 40))
    x = torch.randn(1, 3, 41, 43)
    fmap, y = pre(x), dense(x)
    se = model[-1]
    for r, c in [(0, 0), (1, 3), (2, 1)]:  # total step 4
        sub = fmap[..., r::4, c::4]
        scale = torch.sigmoid(se.fc2(F.relu(se.fc1(sub.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(y[..., r::4, c::4], sub * scale, rtol=1e-4, atol=1e-5)


class Residual(nn.Module):
    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))
        self.short = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True,
                                                count_include_pad=False), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


def test_residual_with_average_pool_shortcut():
    assert_lattice_equal(trunk(Residual(8, 2), Residual(8, 1)), (1, 3, 37, 37),
                         [(41, 45), (50, 33)])


class Dense(nn.Module):
    def forward(self, x):
        return torch.cat([x, F.relu(x) * 2.0, x.sigmoid()], dim=1)


class Shuffle(nn.Module):
    def forward(self, x):
        b, c, h, w = x.size()
        a, z = x.chunk(2, dim=1)
        x = torch.cat((a, F.relu(z)), 1)
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


@pytest.mark.parametrize("block", [Dense(), Shuffle(), nn.ChannelShuffle(2)],
                         ids=["concat", "chunk-view-transpose-shuffle", "ChannelShuffle"])
def test_channel_operations(block):
    assert_lattice_equal(trunk(block, nn.Conv2d(8 if not isinstance(block, Dense) else 24, 4, 3)),
                         (1, 3, 33, 35), [(40, 37)])


class ChannelsLast(nn.Module):
    """ConvNeXt style: permute to channels-last, LayerNorm + Linear + scale, permute back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw = nn.Linear(c, 2 * c)
        self.pw2 = nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def test_channels_last_layer_norm_and_linear():
    assert_lattice_equal(trunk(ChannelsLast(8), nn.Conv2d(8, 8, 2, 2)), (1, 3, 35, 33),
                         [(41, 39)])


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_explicit_padding(mode):
    class Pad(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 2, 2, 0), mode=mode)

    assert_lattice_equal(trunk(Pad(), nn.Conv2d(8, 4, 3, 2)), (1, 3, 29, 31), [(37, 33)])


def test_shape_assertions_of_the_baseline_are_dropped():
    class Checked(nn.Module):
        def forward(self, x):
            torch._assert(x.shape[1] == 8, "channels")
            torch._assert(x.shape[-1] >= 3, "the map is too small")  # a spatial size
            return x

    assert_lattice_equal(trunk(Checked(), nn.Conv2d(8, 4, 3, 2)), (1, 3, 33, 35), [(41, 37)])


def test_spatial_slicing():
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :, 1:-1, 2:] + x[..., :-2, :-2]

    assert_lattice_equal(trunk(Crop(), nn.Conv2d(8, 4, 3)), (1, 3, 33, 35), [(41, 37)])


def test_flatten_linear_head_is_a_dilated_convolution_with_the_same_parameter():
    # no padding anywhere: every dense position is a genuine window of the input
    model = rand_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 5)))
    dense = assert_lattice_equal(model, (1, 3, 31, 31))
    assert dense.state_dict()["6.weight"].shape == model[6].weight.shape
    # on a larger image the head slides: one prediction per position, each a genuine crop
    report = verify(model, dense)
    assert report.ok and any(c.check == "shift" for c in report.checked)


def test_state_dict_keys_and_shapes_are_the_baselines():
    model = trunk(SqueezeExcite(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    dense = densify(model, (1, 3, 32, 32))
    base = model.state_dict()
    got = dense.state_dict()
    assert list(got) == list(base) or sorted(got) == sorted(base)
    assert all(got[k].shape == base[k].shape for k in base)


def test_until_returns_a_dense_feature_extractor():
    model = trunk(Residual(8, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    dense = densify(model, (1, 3, 32, 32), until="4")
    x = torch.randn(2, 3, 37, 35)
    torch.testing.assert_close(dense(x)[..., ::8, ::8], model[:5](x), rtol=1e-4, atol=1e-5)
    assert sorted(dense.state_dict()) == sorted(model.state_dict())


# -- refusals ------------------------------------------------------------------------------------

class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t, t, t)[0]


class PositionalEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8, 9, 9))  # the map at 32 x 32

    def forward(self, x):
        return x + self.pos


class CircularPad(nn.Module):
    def forward(self, x):
        return F.pad(x, (1, 1, 1, 1), mode="circular")


REFUSED = {
    "interpolate": (Upsample(), r"node 'interpolate'.*upsampling"),
    "upsample-module": (nn.Upsample(scale_factor=2), r"node '4'.*Upsample"),
    "conv-transpose": (nn.ConvTranspose2d(8, 8, 2, 2), r"node '4'.*transposed"),
    "attention": (Attention(), r"node '.*'.*(mixes positions|attention|spatial)"),
    "positional-embedding": (PositionalEmbedding(), r"varies over space"),
    "group-norm": (nn.GroupNorm(2, 8), r"node '4'.*statistics over spatial positions"),
    "circular-pad": (CircularPad(), r"circular padding"),
}


@pytest.mark.parametrize("layer,match", REFUSED.values(), ids=list(REFUSED))
def test_refusals_name_the_node_and_the_reason(layer, match):
    model = trunk(layer)
    with pytest.raises(UnsupportedLayerError, match=match) as info:
        densify(model, (1, 3, 32, 32))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("block", [2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pixel_unshuffle_is_a_strided_window(block, stride):
    """Space to depth after a stride-``stride`` prefix: its taps are a lattice step apart."""
    model = rand_bn(nn.Sequential(nn.Conv2d(3, 4, 3, stride, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.PixelUnshuffle(block),
                                  nn.Conv2d(4 * block * block, 5, 3, 2, 1)))
    m = 4 * block  # rows before the unshuffle

    def size(rows):
        return (rows - 1) * stride + 1

    assert_lattice_equal(model, (1, 3, size(m), size(m)),
                         [(size(m + block), size(m)), (size(m) + stride - 1, size(m + 2 * block))])


def test_depth_to_space_stays_refused():
    with pytest.raises(UnsupportedLayerError, match="depth to space"):
        densify(trunk(nn.PixelShuffle(2)), (1, 3, 32, 32))
