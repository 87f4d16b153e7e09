"""Pooling rules: max and average pools of every geometry, adaptive pools, global pools."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_lattice_equal, rand_bn

from econv_convert import UnsupportedLayerError, densify, lattice_view


def prefix(stride: int = 2) -> list[nn.Module]:
    return [nn.Conv2d(3, 4, 3, stride, 1), nn.BatchNorm2d(4), nn.ReLU()]


MAXPOOL = [
    (k, t, p, d, c)
    for k, t, p, d, c in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2),
                                           (False, True))
    if p <= k // 2 and not (k == 1 and d == 2)
]


@pytest.mark.parametrize("k,stride,pad,dil,ceil", MAXPOOL,
                         ids=[f"k{k}-s{t}-p{p}-d{d}-{'ceil' if c else 'floor'}"
                              for k, t, p, d, c in MAXPOOL])
def test_max_pool2d_geometry(k, stride, pad, dil, ceil):
    model = rand_bn(nn.Sequential(*prefix(), nn.MaxPool2d(k, stride, pad, dil, ceil_mode=ceil),
                                  nn.Conv2d(4, 3, 2, 2)))
    assert_lattice_equal(model, (1, 3, 29, 31), [(33, 26), (37, 41), (30, 30)])


AVGPOOL = [
    (k, t, p, c, inc)
    for k, t, p, c, inc in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (False, True),
                                             (False, True))
    if p <= k // 2
]


@pytest.mark.parametrize("k,stride,pad,ceil,include", AVGPOOL,
                         ids=[f"k{k}-s{t}-p{p}-{'ceil' if c else 'floor'}-{'incl' if i else 'excl'}"
                              for k, t, p, c, i in AVGPOOL])
def test_avg_pool2d_geometry(k, stride, pad, ceil, include):
    model = rand_bn(nn.Sequential(
        *prefix(), nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=include),
        nn.Conv2d(4, 3, 2, 2)))
    assert_lattice_equal(model, (1, 3, 29, 31), [(33, 26), (37, 41), (30, 30)])


LPPOOL = [(p, k, t, c) for p, k, t, c in itertools.product(
    (1, 2, 3.5, float("inf")), (2, 3), (1, 2, 3), (False, True))]


@pytest.mark.parametrize("p,k,stride,ceil", LPPOOL,
                         ids=[f"p{p}-k{k}-s{t}-{'ceil' if c else 'floor'}"
                              for p, k, t, c in LPPOOL])
def test_lp_pool2d_geometry(p, k, stride, ceil):
    """Power-average pooling (added as a layer kind: the core's window plan of kind lp_pool,
    one rule in torch/rewrite/window.py; the ONNX LpPool rule beside it)."""
    model = rand_bn(nn.Sequential(*prefix(), nn.LPPool2d(p, k, stride, ceil_mode=ceil),
                                  nn.Conv2d(4, 3, 2, 2)))
    assert_lattice_equal(model, (1, 3, 29, 31), [(33, 26), (37, 41), (30, 30)])


@pytest.mark.parametrize("pool", [nn.LPPool1d(2, 3, 2, ceil_mode=True),
                                  nn.LPPool3d(1, 2, 2, ceil_mode=True)], ids=["1d", "3d"])
def test_lp_pool_1d_3d(pool):
    nd = 1 if isinstance(pool, nn.LPPool1d) else 3
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1]
    model = rand_bn(nn.Sequential(conv(2, 4, 3, 2, 1), bn(4), pool, conv(4, 2, 2)))
    shape = (1, 2, 50) if nd == 1 else (1, 2, 11, 13, 12)
    sizes = [(51,), (39,)] if nd == 1 else [(13, 10, 14)]
    assert_lattice_equal(model, shape, sizes)


@pytest.mark.parametrize("divisor", [1, 3, 7])
def test_avg_pool2d_divisor_override(divisor):
    model = rand_bn(nn.Sequential(*prefix(), nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                          divisor_override=divisor)))
    assert_lattice_equal(model, (1, 3, 27, 30), [(33, 25)])


@pytest.mark.parametrize("pool", [nn.MaxPool1d(3, 2, 1, ceil_mode=True),
                                  nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                                  nn.AvgPool1d(2)], ids=["max", "avg-excl", "avg"])
def test_pool1d(pool):
    model = rand_bn(nn.Sequential(nn.Conv1d(2, 4, 3, 2), nn.BatchNorm1d(4), pool,
                                  nn.Conv1d(4, 2, 3)))
    assert_lattice_equal(model, (1, 2, 50), [(51,), (64,), (39,)])


@pytest.mark.parametrize("pool", [nn.MaxPool3d(3, 2, 1, ceil_mode=True),
                                  nn.AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False)],
                         ids=["max", "avg"])
def test_pool3d(pool):
    model = rand_bn(nn.Sequential(nn.Conv3d(2, 4, 3, 2, 1), nn.BatchNorm3d(4), pool))
    assert_lattice_equal(model, (1, 2, 11, 9, 10), [(13, 10, 9)])


def test_functional_pools_use_the_same_rules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2)

        def forward(self, x):
            x = F.max_pool2d(self.conv(x), 3, 2, 1, ceil_mode=True)
            x = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
            return torch.flatten(x.mean((2, 3), keepdim=True), 1)

    assert_lattice_equal(Net(), (1, 3, 33, 29), [(40, 37), (27, 31)])


# -- global pooling ----------------------------------------------------------------------------

def classifier(head: nn.Module) -> nn.Module:
    return rand_bn(nn.Sequential(*prefix(2), nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6),
                                 nn.ReLU(), head))


HEADS = {
    "adaptive-avg": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)),
    "adaptive-max": lambda: nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten(),
                                          nn.Linear(6, 3)),
    "keepdim-1x1-conv": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 3, 1)),
}


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("head", HEADS, ids=list(HEADS))
def test_global_pool_modes_equal_baseline(head, mode):
    assert_lattice_equal(classifier(HEADS[head]()), (1, 3, 32, 32), [(37, 29), (45, 50)],
                         global_pool=mode)


def test_phase_mode_gives_one_prediction_per_phase():
    model = classifier(HEADS["adaptive-avg"]())
    dense = densify(model, (1, 3, 32, 32), global_pool="phase")
    x = torch.randn(2, 3, 37, 41)
    y = dense(x)
    assert y.shape == (2, 3, 4, 4)  # N x K x s x s, s = 4
    # phase (r, c) pools the dense map's sub-lattice starting at (r, c)
    trunk = densify(model[:-1], (1, 3, 32, 32))
    fmap = trunk(x)
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        feats = fmap[..., r::4, c::4].mean((2, 3))
        torch.testing.assert_close(y[..., r, c], model[-1][2](feats), rtol=1e-4, atol=1e-5)


def test_dense_mode_is_a_different_function():
    model = classifier(HEADS["adaptive-avg"]())
    dense = densify(model, (1, 3, 32, 32), global_pool="dense")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(lattice_view(dense, dense(x)), model(x), atol=1e-4)
    assert any("NOT the baseline" in r["note"] for r in dense.econv.records)


def test_adaptive_pool_to_a_divisor_is_a_plain_pool():
    model = rand_bn(nn.Sequential(*prefix(2), nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten(),
                                  nn.Linear(4 * 4 * 2, 3)))
    dense = assert_lattice_equal(model, (1, 3, 16, 16), [(15, 15)])
    assert dense.econv.specialized  # the report says the pool depends on the size
    assert any("specialized" in n for n in dense.econv.notes)


def test_adaptive_pool_to_a_non_divisor_is_refused():
    model = rand_bn(nn.Sequential(*prefix(2), nn.AdaptiveAvgPool2d(3)))
    with pytest.raises(UnsupportedLayerError, match=r"node '3'.*adaptive pooling"):
        densify(model, (1, 3, 16, 16))


class _MergedPool(nn.Module):
    """Global pooling written as ``view(n, c, -1)`` + a reduction over the merged dim."""

    def __init__(self, how: str):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, 2, 1))
        self.fc = nn.Linear(6, 4)
        self.how = how

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        if self.how == "view-mean":
            x = x.view(n, c, h * w).mean(-1)
        elif self.how == "flatten-amax-keepdim":
            x = torch.flatten(x, 2).amax(2, keepdim=True).squeeze(-1)
        elif self.how == "relu-sum":
            x = x.reshape(n, c, -1).relu().sum(dim=-1)
        else:
            x = x.view(n, c, -1).softmax(-1).sum(-1)  # attention-like: refused
        return self.fc(x)


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("how", ["view-mean", "flatten-amax-keepdim", "relu-sum"])
def test_global_pool_written_as_view_and_reduce(how, mode):
    assert_lattice_equal(rand_bn(_MergedPool(how)), (1, 3, 33, 35), [(40, 37), (29, 31)],
                         global_pool=mode)


def test_merged_positions_are_only_reduced():
    with pytest.raises(UnsupportedLayerError, match=r"'softmax'.*merged spatial positions"):
        densify(rand_bn(_MergedPool("softmax")), (1, 3, 33, 35))


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_squeeze_excitation_with_expand_as(mode):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, 2, 1)
            self.fc = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            w = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
            return x * w.expand_as(x)

    assert_lattice_equal(rand_bn(SE()), (1, 3, 33, 35), [(40, 37)], global_pool=mode)
