"""Convolution rule: every geometry, behind a strided prefix so the rule runs on a lattice
step above one (a step-1 convolution would test nothing)."""

from __future__ import annotations

import itertools

import pytest
import torch.nn as nn
from conftest import assert_lattice_equal, rand_bn

NDCONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NDBN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def prefix(nd: int, stride: int = 2, cin: int = 3, cout: int = 4) -> list[nn.Module]:
    """A strided convolution and a BatchNorm: puts the next layer on lattice step ``stride``."""
    return [NDCONV[nd](cin, cout, 3, stride, 1), NDBN[nd](cout), nn.ReLU()]


CONV2D = [
    (k, t, p, d)
    for k, t, p, d in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2))
    if not (k == 1 and d == 2)
]


@pytest.mark.parametrize("k,stride,pad,dil", CONV2D,
                         ids=[f"k{k}-s{t}-p{p}-d{d}" for k, t, p, d in CONV2D])
def test_conv2d_geometry(k, stride, pad, dil):
    model = rand_bn(nn.Sequential(*prefix(2), nn.Conv2d(4, 5, k, stride, pad, dil),
                                  nn.BatchNorm2d(5), nn.Conv2d(5, 3, 3, 2)))
    assert_lattice_equal(model, (1, 3, 31, 27), [(33, 40), (29, 35), (47, 30)])


@pytest.mark.parametrize("groups,cout", [(1, 8), (2, 8), (4, 4), (4, 8)],
                         ids=["dense", "groups2", "depthwise", "depthwise-x2"])
def test_conv2d_groups(groups, cout):
    model = rand_bn(nn.Sequential(*prefix(2, cout=4), nn.Conv2d(4, cout, 3, 2, 1, groups=groups),
                                  nn.BatchNorm2d(cout), nn.ReLU6()))
    assert_lattice_equal(model, (1, 3, 25, 25), [(30, 21)])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
def test_conv2d_padding_modes(mode, stride):
    model = rand_bn(nn.Sequential(*prefix(2), nn.Conv2d(4, 4, 3, stride, 2, padding_mode=mode),
                                  nn.Conv2d(4, 2, 3, 1, 1, padding_mode=mode)))
    assert_lattice_equal(model, (1, 3, 23, 26), [(31, 19)])


@pytest.mark.parametrize("k,dil", [(2, 1), (3, 1), (4, 1), (3, 2), (2, 3)],
                         ids=["k2", "k3", "k4", "k3-d2", "k2-d3"])
def test_conv2d_padding_same(k, dil):
    model = rand_bn(nn.Sequential(*prefix(2), nn.Conv2d(4, 4, k, 1, "same", dil), nn.ReLU(),
                                  nn.Conv2d(4, 3, 3, 2, "valid")))
    assert_lattice_equal(model, (1, 3, 26, 23), [(21, 30)])


CONV1D = list(itertools.product((1, 3, 4), (1, 2), (0, 1), (1, 3)))


@pytest.mark.parametrize("k,stride,pad,dil", CONV1D,
                         ids=[f"k{k}-s{t}-p{p}-d{d}" for k, t, p, d in CONV1D])
def test_conv1d_geometry(k, stride, pad, dil):
    model = rand_bn(nn.Sequential(*prefix(1, stride=3), nn.Conv1d(4, 4, k, stride, pad, dil),
                                  nn.BatchNorm1d(4), nn.MaxPool1d(2, 2, ceil_mode=True)))
    assert_lattice_equal(model, (1, 3, 40), [(41,), (57,), (33,)])


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (2, 2, 0), (3, 2, 0)],
                         ids=["k3-s1-p1", "k3-s2-p1", "k2-s2-p0", "k3-s2-p0"])
def test_conv3d_geometry(k, stride, pad):
    model = rand_bn(nn.Sequential(*prefix(3), nn.Conv3d(4, 4, k, stride, pad), nn.BatchNorm3d(4)))
    assert_lattice_equal(model, (1, 3, 9, 11, 10), [(13, 9, 11)])


def test_anisotropic_strides_and_kernels():
    model = rand_bn(nn.Sequential(
        nn.Conv2d(3, 4, (3, 5), (1, 2), (1, 2)), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, (5, 3), (3, 1), (2, 0), (1, 2)), nn.MaxPool2d((2, 3), (2, 1))))
    assert_lattice_equal(model, (1, 3, 29, 31), [(37, 26), (33, 41)])


def test_asymmetric_padding_with_stride_in_the_runtime_op():
    """PyTorch convolutions pad symmetrically (or 'same' at stride 1), but the runtime op
    accepts asymmetric padding with a stride; its crop must use the unpadded size."""
    import torch
    import torch.nn.functional as F

    from econv_convert.torch import ops

    x = torch.randn(1, 2, 29, 31)
    w = torch.randn(3, 2, 3, 3)
    expected = F.conv2d(F.pad(x, (1, 2, 0, 2)), w, stride=2)  # baseline, step 1 input
    got = ops.conv(x, w, None, (1, 1), (2, 2), (0, 1), (2, 2), (1, 1), 1)
    torch.testing.assert_close(got[..., ::2, ::2], expected)
