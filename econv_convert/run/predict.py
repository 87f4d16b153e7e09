"""Exact tiled dense inference for inputs larger than one dense pass fits in memory.

Away from the borders a dense model is translation-equivariant under any integer shift
(stride-1 dilated convolutions and pools, constant divisors), so the output at a position
depends only on the input inside its receptive field. Each tile is aligned to the lattice,
carries a halo of one receptive field plus one lattice step on every side that is not an
image border, and contributes only its own block of output positions: the stitched result is
the whole-image result, at a memory cost set by the tile size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from econv_convert.errors import InvalidInputError
from econv_convert.run.geometry import geometry, output_size
from econv_convert.run.resources import ResourceError, available_bytes, estimate_bytes
from econv_convert.torch.api import info

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TilePlan:
    tile: tuple[int, ...]  # output block per tile, input pixels, a multiple of the step
    halo: tuple[int, ...]
    count: int
    estimate_bytes: int  # memory estimate of one tile's dense pass


def plan_tiles(dense: nn.Module, shape: Sequence[int], *, tile: int | None = None,
               max_memory: int | None = None) -> TilePlan:
    """Choose the tile size (input pixels a tile contributes per axis): ``tile`` if given,
    else the largest that fits ``max_memory`` (default: half of the available memory). The
    halo is the block engine's (:func:`econv_convert.run.geometry.geometry`)."""
    meta = info(dense)
    geo = geometry(meta)
    # a multiple of the lattice step: every tile starts on the image's lattice, so its tight
    # crops (and ceil-mode ends) fall where the whole image's do
    step, halo, after = geo.unit, geo.halo, geo.halo_after or geo.halo
    sizes = list(shape[2:])
    budget = max_memory if max_memory is not None else (available_bytes() or 8 * 2**30) // 2

    def cost(t: int) -> int:
        tile_shape = [1, shape[1]] + [min(n, t + h + a) for n, h, a in zip(sizes, halo, after)]
        return estimate_bytes(meta, tile_shape)

    unit = math.lcm(*step)
    if tile is None:
        t = unit * max(1, max(sizes) // unit + 1)
        while t > unit and cost(t) > budget:
            t = max(unit, (t // 2) // unit * unit)
        if cost(t) > budget:
            raise ResourceError(
                f"even the smallest tile ({t} pixels plus a halo of {max(halo)}) needs about "
                f"{cost(t) / 2**20:.0f} MiB, over the budget of {budget / 2**20:.0f} MiB; "
                "raise max_memory=...")
        tile = t
    elif tile < unit or tile % unit:
        raise InvalidInputError(f"tile={tile} must be a positive multiple of the lattice "
                                f"step {unit}")
    count = shape[0] * math.prod(math.ceil(n / tile) for n in sizes)
    return TilePlan(tuple(tile for _ in sizes), halo, count, cost(tile))


def predict(dense: nn.Module, x: torch.Tensor, *, tile: int | None = None,
            max_memory: int | None = None, progress: Progress | None = None) -> torch.Tensor:
    """``dense(x)`` computed tile by tile; identical (fp32 tolerance) to one whole pass.

    The blocks are the ones ``econv-convert predict`` computes into zarr (the same engine,
    :func:`econv_convert.run.blocks.block_output`), here for every image of the batch in
    this process, in float32. Tiles of 2-D and 3-D models run channels-last (faster dense
    convolutions on CPU; see :func:`econv_convert.run.bench.memory_format`)."""
    import numpy as np

    from econv_convert.run import blocks, runner
    from econv_convert.run.sources import InMemorySource

    plan = plan_tiles(dense, tuple(x.shape), tile=tile, max_memory=max_memory)
    geo = geometry(info(dense))
    res = geo.step[0]  # outputs are this many pixels apart
    lead: list[int] = []
    run = runner.module_runner(dense, x.dim() - 2, x.device, lead)

    outs = []
    for n in range(x.shape[0]):
        source = InMemorySource(x[n].detach().float().cpu().numpy())
        shape = output_size(run, source, geo, None, None)
        job = blocks.Job(None, None, "", shape, tuple(t // res for t in plan.tile), geo.step,
                        geo.unit, geo.halo, halo_after=geo.halo_after)
        done = n * len(job.blocks())
        total = x.shape[0] * len(job.blocks())
        outs.append(blocks.in_memory(job, source, run, progress=None if progress is None else
                                    (lambda k, _, d=done: progress(d + k, total))))
    y = np.stack(outs)
    return torch.from_numpy(y.reshape(x.shape[0], *lead, *y.shape[2:])).to(x.dtype)


# -- pictures ---------------------------------------------------------------------------------


def heat_map(y: torch.Tensor, channel: int | None) -> torch.Tensor:
    """An ``H x W x 3`` uint8 picture of one output channel, or of the arg-max class."""
    import matplotlib
    import numpy as np

    y = y[0]
    if channel is None:  # one colour per class
        palette = np.asarray(matplotlib.colormaps["tab20"].colors)
        classes = y.argmax(0).numpy() % len(palette)
        return torch.from_numpy((palette[classes] * 255).astype("uint8"))
    else:
        values = y[channel]
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo if hi > lo else 1.0)
        cmap = matplotlib.colormaps["viridis"]
    rgba = cmap(values.numpy())
    return torch.from_numpy((rgba[..., :3] * 255).astype("uint8"))
