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


# what a dense graph may call that a block does not trim (it runs padded, exact and slower),
# by why; every other registered rule's target must be one :func:`trim.handles`
RUNS_PADDED = {
    # sizes and numbers read off a map, and checks on them
    "_operator.and_", "_operator.eq", "_operator.ge", "_operator.getitem", "_operator.gt",
    "_operator.le", "_operator.lshift", "_operator.lt", "_operator.mod", "_operator.ne",
    "_operator.not_", "_operator.or_", "_operator.rshift", "getattr", "math.ceil",
    "math.floor", "math.sqrt", "math.trunc", "torch._assert",
    "torch.ops.aten._assert_scalar.default", "torch.ops.aten.sym_size.int", "torch.sym_float",
    "torch.sym_int", "torch.sym_ite", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "econv_convert.torch.outputs.restore",
    # layouts: a map's positions moved between dims
    "torch.chunk", "torch.flatten", "torch.functional.split", "torch.permute", "torch.reshape",
    "torch.stack", "torch.transpose", "torch.unbind", "torch.unsqueeze", "torch.slice_scatter",
    "torch._C._nn.pad", "torch.nn.functional.pad", "torch.pixel_shuffle",
    "torch.pixel_unshuffle", "torch.nn.functional.fold", "torch.nn.functional.unfold",
    # reductions and layers over several positions or channels-last
    "torch.amax", "torch.mean", "torch.sum", "torch.softmax", "torch.log_softmax",
    "torch.nn.functional.softmax", "torch.nn.functional.log_softmax", "torch.layer_norm",
    "torch.nn.functional.layer_norm", "torch.group_norm", "torch.instance_norm",
    "torch.nn.functional.group_norm", "torch.nn.functional.instance_norm",
    "torch._C._nn.linear", "torch._C._nn.scaled_dot_product_attention",
    "torch.nn.functional.multi_head_attention_forward",
    # windows of other kinds (sizes and positions they read are their own)
    "torch._C._nn.adaptive_avg_pool2d", "torch._C._nn.adaptive_avg_pool3d",
    "torch.adaptive_avg_pool1d", "torch.nn.functional.adaptive_avg_pool2d",
    "torch.nn.functional.adaptive_avg_pool3d", "torch.nn.functional.adaptive_max_pool1d",
    "torch.nn.functional.adaptive_max_pool2d", "torch.nn.functional.adaptive_max_pool3d",
    "torch.nn.functional.lp_pool1d", "torch.nn.functional.lp_pool2d",
    "torch.nn.functional.lp_pool3d", "torch.nn.functional.fractional_max_pool2d",
    "torch.conv_transpose1d", "torch.conv_transpose2d", "torch.conv_transpose3d",
    "torch.nn.functional.grid_sample", "torch.nn.functional.interpolate",
    "torch.nn.functional.upsample",
}


def test_every_registered_layer_is_trimmed_or_known_to_run_padded():
    """A new layer kind must not silently run untrimmed: each target a rule registers is one
    the trimmed pass runs, or listed above with why it is not."""
    import econv_convert.torch.api  # noqa: F401  (registers every rule)
    from econv_convert.torch import targets
    from econv_convert.torch.rewrite.frame import FUNCTIONS, METHODS

    names = {targets.qualified_name(t): t for t in FUNCTIONS}
    unknown = sorted(n for n, t in names.items() if not trim.handles(t) and n not in RUNS_PADDED)
    assert not unknown, (f"rules registered for {unknown}: run them trimmed in run/trim.py or "
                         "list them in RUNS_PADDED with why")
    stale = sorted(n for n in RUNS_PADDED if n not in names or trim.handles(names[n]))
    assert not stale, f"RUNS_PADDED names {stale}: no longer registered, or trimmed now"
    elementwise = {m for m in METHODS if METHODS[m].__name__ in ("_unary", "_binary")}
    assert elementwise <= trim._METHODS


@pytest.mark.parametrize("layer", ["concat", "batch_norm_fn", "prelu", "max_pool_fn"])
def test_layers_written_as_functions_trim(layer):
    """Layers a model calls as functions (``torch.concat``, ``F.batch_norm``, ``F.prelu``,
    ``torch.max_pool2d`` below an output stride) trim, and equal the padded pass."""
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.w = torch.nn.Parameter(torch.rand(8) * 0.5)
            self.register_buffer("m", torch.randn(8))
            self.register_buffer("v", torch.rand(8) + 0.5)
            self.head = torch.nn.Conv2d(8, 2, 3, stride=2)

        def forward(self, x):
            y = torch.concat([self.a(x), self.b(x)], dim=1) if layer == "concat" else \
                torch.cat([self.a(x), self.b(x)], 1)
            if layer == "batch_norm_fn":
                y = F.batch_norm(y, self.m, self.v, self.w, None, False)
            if layer == "prelu":
                y = F.prelu(y, self.w)
            y = torch.max_pool2d(y, 2, 2) if layer == "max_pool_fn" else F.max_pool2d(y, 2)
            return self.head(y).mean((2, 3))

    torch.manual_seed(0)
    model = Net().eval()
    stride = 2 if layer == "max_pool_fn" else None
    dense = densify(model, (1, 3, 24, 24), global_pool="window", output_stride=stride)
    gm = prepare(dense)
    assert trim.trimmable(gm)
    x = torch.randn(1, 3, 40, 44)
    y, shift = trim.run(gm, x, 2)
    with torch.no_grad():
        want = gm(x)
    # the positions both hold (the padded pass's tight crop may end before the trimmed map)
    n = [min(a, b - s) for a, b, s in zip(y.shape[-2:], want.shape[-2:], shift)]
    assert min(n) > 4
    torch.testing.assert_close(y[..., :n[0], :n[1]],
                               want[..., shift[0]:shift[0] + n[0], shift[1]:shift[1] + n[1]])
