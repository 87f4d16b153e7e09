"""``--global-pool window``: a patch classifier as a heat map, on both backends.

The contract, each part tested here over trunk geometries (strided convolutions, max and
average pools, ceil mode, padding or none, odd sizes) with random BatchNorm statistics:

1. at the example size the dense model is the baseline (window position 0);
2. on a larger input, the output at lattice position ``k * step`` is the head applied to the
   window-pool (the example map's extent) of the baseline trunk's features from ``k`` on;
3. for a trunk without padding, the output at every position ``q`` is ``baseline(crop at
   q)``: the classifier run on the example-size window there;
4. the PyTorch and the ONNX path give the same dense output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rand_bn
from onnx_graphs import export, run

from econv_convert import UnsupportedLayerError, densify, lattice_view, onnx_api, verify


class Trunk(nn.Sequential):
    def __init__(self, kernel: int, stride: int, pad: int, pool: str, ceil: bool):
        pooling = (nn.MaxPool2d(3, 2, ceil_mode=ceil) if pool == "max"
                   else nn.AvgPool2d(2, 2, ceil_mode=ceil))
        super().__init__(
            nn.Conv2d(3, 8, kernel, stride, pad, bias=False), nn.BatchNorm2d(8),
            nn.ReLU(inplace=True), pooling,
            nn.Conv2d(8, 12, 3, 2, pad), nn.BatchNorm2d(12), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """A trunk, a global pool and a head, written the ways libraries write them."""

    def __init__(self, trunk: nn.Module, head: str, classes: int = 5):
        super().__init__()
        self.trunk = trunk
        self.head_kind = head
        if head == "conv":  # SqueezeNet: a 1x1 convolution, then the pool
            self.classifier = nn.Conv2d(12, classes, 1)
        elif head == "norm":  # ConvNeXt: pool, LayerNorm, Linear
            self.norm = nn.LayerNorm(12)
            self.fc = nn.Linear(12, classes)
        else:
            self.pool = nn.AdaptiveMaxPool2d(1) if head == "max" else nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(12, classes)

    def pool_and_head(self, f: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "conv":
            return torch.flatten(F.adaptive_avg_pool2d(self.classifier(f), 1), 1)
        if self.head_kind == "norm":
            return self.fc(self.norm(f.mean((-2, -1))))
        return self.fc(torch.flatten(self.pool(f), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_and_head(self.trunk(x))


GEOMETRIES = {
    "k3s2p1-max": (3, 2, 1, "max", False),
    "k3s2p1-max-ceil": (3, 2, 1, "max", True),
    "k5s1p2-avg": (5, 1, 2, "avg", False),
    "k3s2p0-max": (3, 2, 0, "max", False),
    "k4s2p0-avg-ceil": (4, 2, 0, "avg", True),
}
HEADS = ["avg", "max", "conv", "norm"]


def model_of(geometry: str, head: str) -> Classifier:
    return rand_bn(Classifier(Trunk(*GEOMETRIES[geometry]), head))


def window_of(model: Classifier, example) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(model.trunk(torch.zeros(example)).shape[2:])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_window_pooling_is_the_classifier_at_every_window(geometry, head):
    model = model_of(geometry, head)
    example = (1, 3, 45, 39)
    dense = densify(model, example, global_pool="window")
    step = dense.econv.axis_steps
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        # 1. the example size: the baseline
        torch.testing.assert_close(lattice_view(dense, dense(x)), model(x))
        # 2. a larger, odd input: lattice positions are the head over trunk windows
        big = torch.randn(1, 3, 45 + 29, 39 + 35)
        y = dense(big)
        trunk = model.trunk(big)
        wh, ww = window_of(model, example)
        rows, cols = trunk.shape[2] - wh + 1, trunk.shape[3] - ww + 1
        assert rows > 1 and cols > 1
        for i in range(rows):
            for j in range(cols):
                want = model.pool_and_head(trunk[:, :, i:i + wh, j:j + ww])
                torch.testing.assert_close(y[:, :, i * step[0], j * step[1]], want,
                                           msg=lambda m, i=i, j=j: f"window ({i}, {j}): {m}")
        # 3. without padding: every position is the classifier on its crop
        if not dense.econv.has_padding:
            for i in range(y.shape[2]):
                for j in range(0, y.shape[3], 3):
                    crop = big[:, :, i:i + 45, j:j + 39]
                    torch.testing.assert_close(y[:, :, i, j], model(crop))


@pytest.mark.parametrize("geometry", ["k3s2p1-max-ceil", "k3s2p0-max"])
@pytest.mark.parametrize("head", ["avg", "conv"])
def test_window_pooling_is_the_same_on_the_onnx_path(geometry, head):
    model = model_of(geometry, head)
    example = (1, 3, 45, 39)
    graph = export(model, example, dynamic=True)
    dense_graph = onnx_api.densify(graph, example, global_pool="window")
    meta = onnx_api.info(dense_graph)
    dense = densify(model, example, global_pool="window")
    big = torch.randn(1, 3, 45 + 29, 39 + 35)
    with torch.no_grad():
        want = dense(big)
    got = torch.from_numpy(run(dense_graph, big.numpy())[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [list(map(list, o["dims"])) for o in meta.outputs] == \
        [o["dims"] for o in dense.econv.outputs]
    assert onnx_api.verify(graph, dense_graph).ok


def test_verify_checks_the_example_size_and_shifted_windows():
    model = model_of("k3s2p0-max", "avg")
    dense = densify(model, (1, 3, 45, 39), global_pool="window")
    report = verify(model, dense)
    assert report.ok
    checks = [c.check for c in report.checked]
    # one window position per offset, every combination of the output phases
    phases = 1
    for s in dense.econv.axis_steps:
        phases *= s
    assert checks.count("lattice") == 1 and checks.count("shift") == min(phases, 16) or \
        checks.count("shift") >= max(dense.econv.axis_steps)
    assert checks.count("phases") == 1


def test_a_smaller_input_than_the_window_is_an_error_naming_it():
    dense = densify(model_of("k3s2p1-max", "avg"), (1, 3, 45, 39), global_pool="window")
    with pytest.raises(Exception, match="smaller than this dense model's window"):
        dense(torch.randn(1, 3, 30, 39))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


def test_squeeze_excitation_has_no_window_form():
    trunk = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), SqueezeExcite(12), nn.Conv2d(12, 12, 3, 2))
    model = rand_bn(Classifier(trunk, "avg"))
    refusal = r"'mul' in module 'trunk.1'.*window-pooled value meets the map"
    with pytest.raises(UnsupportedLayerError, match=refusal):
        densify(model, (1, 3, 45, 39), global_pool="window")
    densify(model, (1, 3, 45, 39), global_pool="phase")  # the phase form exists


def test_window_pooling_needs_the_window_in_the_record():
    dense = densify(model_of("k3s2p1-max", "avg"), (1, 3, 45, 39), global_pool="window")
    pools = [r for r in dense.econv.records if r["kind"].startswith("global")]
    assert [tuple(p["after"]["kernel"]) for p in pools] == [(6, 5)]
    assert np.all(np.asarray(pools[0]["field"]) >= (45 - 8, 39 - 8))


@pytest.mark.parametrize("reduce", ["mean", "amax"])
def test_window_pooling_of_1d_and_3d_maps(reduce):
    for conv, bn, shape in ((nn.Conv1d, nn.BatchNorm1d, (1, 2, 41)),
                            (nn.Conv3d, nn.BatchNorm3d, (1, 2, 13, 15, 14))):
        nd = len(shape) - 2
        trunk = nn.Sequential(conv(2, 6, 3, 2, 1), bn(6), nn.ReLU(), conv(6, 6, 3, 2))
        dims = tuple(range(-nd, 0))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.trunk, self.fc = trunk, nn.Linear(6, 3)

            def head(self, f):
                return self.fc(getattr(torch, reduce)(f, dims))

            def forward(self, x):
                return self.head(self.trunk(x))

        model = rand_bn(Net())
        dense = densify(model, shape, global_pool="window")
        step = dense.econv.axis_steps
        big = torch.randn(1, 2, *(n + 9 for n in shape[2:]))
        with torch.no_grad():
            torch.testing.assert_close(lattice_view(dense, dense(torch.ones(shape))),
                                       model(torch.ones(shape)))
            y, trunk_map = dense(big), model.trunk(big)
            window = model.trunk(torch.zeros(shape)).shape[2:]
            corner = tuple(slice(0, w) for w in window)
            shifted = tuple(slice(1, 1 + w) for w in window)
            for where, lattice in ((corner, (0,) * nd), (shifted, step)):
                want = model.head(trunk_map[(slice(None), slice(None), *where)])
                torch.testing.assert_close(y[(slice(None), slice(None), *lattice)], want)
