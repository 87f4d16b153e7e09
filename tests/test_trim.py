"""Blocks inside the image run trimmed (:mod:`econv_convert.run.trim`): every layer without
the padding the block's edges would get, each map only as large as its data reaches. The block
engine with trimming must give what it gives padded, on every model family it trims (a
differential test: the same blocks, the same halos), and it must trim the blocks it can."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import rand_bn
from families import FAMILIES

from econv_convert import densify, info
from econv_convert.run import blocks, runner, scene, trim
from econv_convert.run.fuse import prepare
from econv_convert.run.sources import InMemorySource

# families whose dense graphs trim (the others run padded: a size read off a map, a
# channels-first LayerNorm via permutes, a channel shuffle)
TRIMMED = ["vgg", "alexnet", "resnet-basic", "resnet-d", "resnext", "densenet",
           "mobilenetv2", "squeezenet", "googlenet", "cnn1d"]
PADDED = ["shufflenetv2", "convnext"]
# and below an output stride (layers that keep their stride), 3-D there only (slower)
CASES = [(f, None) for f in TRIMMED] + [(f, 2) for f in ("resnet-d", "densenet", "cnn3d")]


def _engine(dense, x: np.ndarray, run: runner.Run):
    """The block engine over ``x`` ``(C, *spatial)`` with blocks small enough that some lie
    inside the image: ``(output, blocks inside it along at least one axis)``."""
    geo = scene.geometry(info(dense))
    after = geo.halo_after or geo.halo
    size = max(math.ceil(max(h, t) / s) for h, t, s in zip(geo.halo, after, geo.step))
    size = max(1, size)
    source = InMemorySource(x)
    shape = scene.output_size(run, source, geo, None, None)
    nd = len(geo.step)
    job = blocks.Job(None, None, "", shape, (size,) * nd, geo.step, geo.unit, geo.halo,
                     halo_after=geo.halo_after)
    inside = sum(bool(job.inner_axes(b, x.shape[1:])) for b in job.blocks())
    return blocks.in_memory(job, source, run), inside


def _image(dense, seed: int = 0) -> np.ndarray:
    """An odd-sized input where the second block of :func:`_engine` lies inside the image
    and is not the last one."""
    geo = scene.geometry(info(dense))
    after = geo.halo_after or geo.halo
    sides = []
    for h, t, s, w in zip(geo.halo, after, geo.step, geo.window):
        b = max(1, math.ceil(max(h, t) / s))  # the block, in outputs
        sides.append(3 * b * s + max(w, t) + 3)
    channels = info(dense).example_shape[1]
    return np.random.default_rng(seed).standard_normal((channels, *sides)).astype(np.float32)


def _dense(family: str, stride):
    make, shape, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = rand_bn(make().eval())
    dense = densify(model, shape, global_pool="window", output_stride=stride)
    prepare(dense)  # as predict runs it
    return dense


@pytest.mark.parametrize("family,stride", CASES, ids=[f"{f}-os{s}" for f, s in CASES])
def test_trimmed_blocks_equal_padded_blocks(family, stride):
    dense = _dense(family, stride)
    nd = len(info(dense).example_shape) - 2
    assert trim.trimmable(dense)
    x = _image(dense)
    padded = runner.module_runner(dense, nd, trimmed=False)
    expected, _ = _engine(dense, x, padded)
    run = runner.module_runner(dense, nd)
    got, inside = _engine(dense, x, run)
    assert inside >= 1
    assert run.can_trim and run.checked and run.trimmed == inside
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4,
                               atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("family", PADDED)
def test_graphs_it_cannot_trim_run_padded(family):
    dense = _dense(family, None)
    assert not trim.trimmable(dense)
    assert not runner.module_runner(dense, 2).can_trim


def test_a_wrong_trimmed_pass_is_caught_on_the_first_block(monkeypatch):
    """The first block run trimmed is also run padded and compared: a trimmed pass that is
    off (here: shifted by one position) is dropped and every block runs padded."""
    dense = _dense("resnet-basic", None)
    x = _image(dense)
    expected, _ = _engine(dense, x, runner.module_runner(dense, 2, trimmed=False))
    real = trim.run

    def off_by_one(gm, t, nd, axes=None):
        y, shift = real(gm, t, nd, axes)
        return y, [s + 1 for s in shift]

    monkeypatch.setattr(trim, "run", off_by_one)
    run = runner.module_runner(dense, 2)
    got, inside = _engine(dense, x, run)
    assert inside >= 1 and not run.can_trim and run.trimmed == 0
    np.testing.assert_array_equal(got, expected)


def test_trimmed_maps_are_smaller_and_hold_the_padded_values():
    """One trimmed pass against the padded one: without ceil-mode windows (which read past a
    trimmed map's end), every trimmed position is one the padded pass computes from data."""
    dense = _dense("resnet-basic", None)
    x = torch.from_numpy(_image(dense))[None].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        full = dense(x)
        y, shift = trim.run(dense, x, 2)
    assert all(a < b for a, b in zip(y.shape[-2:], full.shape[-2:]))
    inner = full[..., shift[0]:shift[0] + y.shape[-2], shift[1]:shift[1] + y.shape[-1]]
    torch.testing.assert_close(y, inner, rtol=1e-4, atol=1e-5)


def test_the_models_own_module_is_not_changed():
    dense = _dense("densenet", None)
    before = copy.deepcopy(dense.state_dict())
    x = _image(dense)
    _engine(dense, x, runner.module_runner(dense, 2))
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_trimmed_pass_lets_each_map_go_after_its_last_use(monkeypatch):
    """The trimmed pass interprets the graph node by node; it must drop each map once no
    later node needs it (as the graph's own code does), not hold every map of the pass to its
    end: a deep chain holds a few maps at a time."""
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(12):
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)]
    dense = densify(torch.nn.Sequential(*layers).eval(), (1, 3, 32, 32))
    held = []
    real = trim._trimmed

    def watched(node, arg, values, shifts, spatial, nd, axes):
        # the maps held when each layer runs (weights are 4-D too, but not of batch 1)
        held.append(sum(isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == 1
                        for v in values.values()))
        return real(node, arg, values, shifts, spatial, nd, axes)

    monkeypatch.setattr(trim, "_trimmed", watched)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        y, shift = trim.run(dense, x, 2)
    assert len(held) >= 25 and max(held) <= 3, held
    # and it still gives the padded pass's positions
    with torch.no_grad():
        padded = dense(x)
    torch.testing.assert_close(y, padded[..., shift[0]:shift[0] + y.shape[-2],
                                         shift[1]:shift[1] + y.shape[-1]])
