"""Both backends decide each layer kind in one place (``core/rules/``), so the same baseline
as a PyTorch module and as its ONNX export must give the same dense model: the whole dense
output (every position, not only the lattice) compared at odd sizes larger than the example,
over convolution and pooling geometry and every global-pool mode."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from conftest import rand_bn
from onnx_graphs import export, run

from econv_convert import densify, onnx_api

CONV = [(3, 2, 1, 1), (4, 2, 1, 1), (3, 2, 0, 2), (5, 3, 2, 1), (1, 2, 0, 1)]
POOL = [("max", 3, 2, 1, False), ("max", 2, 2, 0, True), ("avg", 3, 2, 1, True),
        ("avg", 2, 2, 0, False), ("none", 0, 0, 0, False)]


def baseline(conv, pool, head: bool) -> nn.Module:
    k, s, p, d = conv
    kind, pk, ps, pp, ceil = pool
    layers = [nn.Conv2d(3, 6, k, s, p, d), nn.BatchNorm2d(6), nn.ReLU()]
    if kind == "max":
        layers.append(nn.MaxPool2d(pk, ps, pp, ceil_mode=ceil))
    elif kind == "avg":
        layers.append(nn.AvgPool2d(pk, ps, pp, ceil_mode=ceil, count_include_pad=False))
    layers += [nn.Conv2d(6, 8, 3, 2, 1, groups=2), nn.BatchNorm2d(8), nn.ReLU6()]
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return rand_bn(nn.Sequential(*layers))


CASES = list(itertools.product(range(len(CONV)), range(len(POOL))))


@pytest.mark.parametrize("conv,pool", CASES,
                         ids=[f"conv{CONV[c]}-{POOL[p][0]}{POOL[p][1:]}" for c, p in CASES])
def test_both_backends_make_the_same_dense_map(conv, pool):
    model = baseline(CONV[conv], POOL[pool], head=False)
    _same(model, (1, 3, 33, 35), "phase")


@pytest.mark.parametrize("mode", ["phase", "lattice", "dense", "window"])
@pytest.mark.parametrize("conv", [0, 2], ids=["padded", "unpadded"])
def test_both_backends_pool_globally_alike(mode, conv):
    model = baseline(CONV[conv], POOL[0], head=True)
    _same(model, (1, 3, 33, 35), mode)


def _same(model: nn.Module, example, mode: str) -> None:
    graph = export(model, example, dynamic=True)
    dense_graph = onnx_api.densify(graph, example, global_pool=mode)
    meta = onnx_api.info(dense_graph)
    dense = densify(model, example, global_pool=mode)
    assert [[list(d) for d in o["dims"]] for o in meta.outputs] == \
        [o["dims"] for o in dense.econv.outputs]
    # the same receptive fields (predict's halos and window support come from them)
    assert meta.out_field == dense.econv.out_field
    assert meta.support == dense.econv.support
    big = (2, 3, example[2] + 19, example[3] + 12) if mode != "lattice" else (2, 3, 33, 35)
    for shape in {tuple(example[:1]) + (3, *example[2:]), big}:
        x = torch.randn(shape)
        with torch.no_grad():
            want = dense(x)
        got = torch.from_numpy(run(dense_graph, x.numpy())[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda m, s=shape: f"input {s}: {m}")
