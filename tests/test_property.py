"""Property: random architectures built from the supported layer kinds densify and verify
exactly (whenever the baseline itself accepts the example input)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from conftest import rand_bn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from econv_convert import densify, verify
from econv_convert.errors import UnsupportedLayerError

C = 6  # channels everywhere, so blocks compose freely


class Residual(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(C, C, 3, stride, 1), nn.BatchNorm2d(C), nn.ReLU(),
                                  nn.Conv2d(C, C, 3, 1, 1), nn.BatchNorm2d(C))
        self.short = nn.Identity() if stride == 1 else nn.Conv2d(C, C, 1, stride)

    def forward(self, x):
        return torch.relu(self.main(x) + self.short(x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(C, C // 2, 1)
        self.b = nn.Sequential(nn.Conv2d(C, C // 2, 3, 1, 1), nn.BatchNorm2d(C // 2))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(C, 3, 1), nn.ReLU(), nn.Conv2d(3, C, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3), keepdim=True))


@st.composite
def conv(draw):
    k = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    dil = draw(st.integers(1, 2)) if k > 1 else 1
    pad = draw(st.integers(0, k // 2))
    groups = draw(st.sampled_from([1, C]))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate"]))
    return nn.Sequential(nn.Conv2d(C, C, k, stride, pad, dil, groups, padding_mode=mode),
                         nn.BatchNorm2d(C), nn.ReLU())


@st.composite
def pool(draw):
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    if draw(st.booleans()):
        dil = draw(st.integers(1, 2)) if k > 1 else 1
        return nn.MaxPool2d(k, stride, pad, dil, ceil_mode=ceil)
    return nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=draw(st.booleans()))


BLOCKS = st.one_of(conv(), pool(), st.builds(Residual, st.sampled_from([1, 2])),
                   st.builds(Concat), st.builds(SE))


@st.composite
def architectures(draw):
    blocks = draw(st.lists(BLOCKS, min_size=1, max_size=6))
    head = draw(st.sampled_from(["map", "global", "flatten"]))
    size = (draw(st.integers(9, 40)), draw(st.integers(9, 40)))
    return blocks, head, size


class Net(nn.Module):
    def __init__(self, blocks, head, size):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, 2, 1)
        self.body = nn.Sequential(*blocks)
        self.head = head
        if head == "global":
            self.fc = nn.Linear(C, 4)
        elif head == "flatten":
            with torch.no_grad():
                n = self.body.eval()(self.stem(torch.zeros(1, 3, *size))).numel()
            self.fc = nn.Linear(n, 4)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.head == "global":
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        if self.head == "flatten":
            return self.fc(torch.flatten(x, 1))
        return x


def _baseline(arch, seed) -> Net:
    """The network, with random BatchNorm statistics; examples whose baseline rejects its
    own example input (a map smaller than a window) are dropped."""
    blocks, head, size = arch
    torch.manual_seed(seed)
    try:
        model = rand_bn(Net(blocks, head, size), seed)
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    except RuntimeError:
        assume(False)
    return model


# CI draws the same examples every run (derandomize: a failure there is this change's, and
# reproducible); PROPERTY_RANDOM=1 draws new ones, as a long local run does
RANDOM = bool(os.environ.get("PROPERTY_RANDOM"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=not RANDOM, print_blob=True)
@given(arch=architectures(), mode=st.sampled_from(["phase", "lattice"]), seed=st.integers(0, 99))
def test_random_architectures_densify_exactly(arch, mode, seed):
    size = arch[2]
    model = _baseline(arch, seed)
    dense = densify(model, (1, 3, *size), global_pool=mode)
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.checked


@settings(max_examples=int(os.environ.get("ONNX_EXAMPLES", 25)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow], derandomize=not RANDOM, print_blob=True)
@given(arch=architectures(), mode=st.sampled_from(["phase", "lattice"]), seed=st.integers(0, 99))
def test_random_architectures_exported_to_onnx_densify_exactly(arch, mode, seed):
    """The same random networks exported to ONNX: exact in onnxruntime, and the same dense
    outputs as the PyTorch path."""
    from onnx_graphs import export, run

    from econv_convert import onnx_api

    size = arch[2]
    model = _baseline(arch, seed)
    graph = export(model, (1, 3, *size))
    dense = onnx_api.densify(graph, global_pool=mode)
    report = onnx_api.verify(graph, dense)
    assert report.ok, report.failures()
    assert report.checked
    x = torch.randn(1, 3, size[0] + 7, size[1] + 4)
    try:
        with torch.no_grad():
            want = densify(model, (1, 3, *size), global_pool=mode)(x)
    except UnsupportedLayerError:
        return  # the PyTorch path refuses where ONNX rules apply (not the property here);
        # anything else it raises is a bug of its own and fails here
    got = torch.from_numpy(run(dense, x.numpy())[0])
    # an output whose max-pool windows read padding only has no value: -inf or NaN in PyTorch
    # (-inf times a phase mask), the lowest float in onnxruntime (its MaxPool pads with it),
    # or what later layers make of it (a convolution with negative weights turns it into a
    # huge positive number); all read as "no value" here (README, Known limits)
    def no_value(t):
        return torch.where(t.nan_to_num(nan=math.inf).abs() > 1e30, math.nan, t)

    want, got = no_value(want), no_value(got)
    # phases with no window inside a one-lattice-point map are NaN in both paths
    scale = float(want.nan_to_num().abs().clamp(max=1e30).max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6, equal_nan=True)


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_a_pool_that_covers_a_one_position_map_before_a_global_head(mode):
    """Found by the ONNX property run: a ceil-mode 2 x 2 average pool over a 1 x 1 map covers
    it (a global pool keeping its phases), then the head's global pool. ONNX refused the
    second pool in phase mode (PyTorch pools at each phase: the map has no position left),
    and in lattice mode verify doubled its sizes without end, none taken by the dense model
    that stops past the covering pool's kernel, until it asked for 25 GB."""
    blocks = [nn.Sequential(nn.Conv2d(C, C, 4, 2), nn.BatchNorm2d(C), nn.ReLU()),
              nn.Sequential(nn.Conv2d(C, C, 3, 1), nn.BatchNorm2d(C), nn.ReLU()),
              nn.AvgPool2d(2, 3, ceil_mode=True)]
    test_random_architectures_exported_to_onnx_densify_exactly.hypothesis.inner_test(
        arch=(blocks, "global", (15, 15)), mode=mode, seed=0)
