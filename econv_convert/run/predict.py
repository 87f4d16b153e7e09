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
from econv_convert.run.resources import ResourceError, available_bytes, estimate_bytes
from econv_convert.torch.api import info

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TilePlan:
    tile: tuple[int, ...]  # output block per tile, input pixels, a multiple of the step
    halo: tuple[int, ...]
    count: int
    estimate_bytes: int  # memory estimate of one tile's dense pass


def map_field(meta) -> tuple[int, ...]:
    """The receptive field per spatial axis (input pixels) of a dense model whose one output
    is a map over the input; refuses a model whose outputs depend on more than a window (a
    global pool in another mode than ``window``) or that has several outputs."""
    if len(meta.outputs) != 1:
        raise InvalidInputError("prediction needs a model with one output map")
    if meta.global_pools and meta.global_pool != "window":
        raise InvalidInputError(
            "this dense model pools over the whole image (--global-pool "
            f"{meta.global_pool}), so no output depends on a window only; densify it with "
            "--global-pool window (a heat map of the classifier) or cut before the pool (--until)")
    nd = len(meta.example_shape) - 2
    dims = meta.outputs[0]["dims"]
    if len(dims) < nd or any(kind != "space" for kind, *_ in dims[-nd:]):
        raise InvalidInputError("the model's output is not a map over the input's spatial axes")
    field = [1] * nd
    for r in meta.records:
        for i, f in enumerate(r["field"][:nd]):
            field[i] = max(field[i], f)
    return tuple(field)


def _geometry(dense: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Receptive field and total lattice step per spatial axis, in input pixels, and the
    pixels between neighbouring outputs (the output stride); refuses what cannot be tiled."""
    meta = info(dense)
    res = meta.output_stride or 1  # axis_steps counts output positions, res pixels apart
    return map_field(meta), tuple(res * s for s in meta.axis_steps), res


def plan_tiles(dense: nn.Module, shape: Sequence[int], *, tile: int | None = None,
               max_memory: int | None = None) -> TilePlan:
    """Choose the tile size: ``tile`` if given, else the largest that fits ``max_memory``
    (default: half of the available memory)."""
    field, step, _ = _geometry(dense)
    # a multiple of the step: every tile starts on the image's lattice, so its tight crops
    # (and ceil-mode ends) fall where the whole image's do
    halo = tuple(s * (f // s + 2) for f, s in zip(field, step))
    sizes = list(shape[2:])
    meta = info(dense)
    budget = max_memory if max_memory is not None else (available_bytes() or 8 * 2**30) // 2

    def cost(t: int) -> int:
        tile_shape = [shape[0], shape[1]] + [min(n, t + 2 * h) for n, h in zip(sizes, halo)]
        return estimate_bytes(meta, tile_shape)

    if tile is None:
        unit = math.lcm(*step)
        t = unit * max(1, max(sizes) // unit + 1)
        while t > unit and cost(t) > budget:
            t = max(unit, (t // 2) // unit * unit)
        if cost(t) > budget:
            raise ResourceError(
                f"even the smallest tile ({t} pixels plus a halo of {max(halo)}) needs about "
                f"{cost(t) / 2**20:.0f} MiB, over the budget of {budget / 2**20:.0f} MiB; "
                "raise --max-memory")
        tile = t
    else:
        unit = math.lcm(*step)
        if tile < unit or tile % unit:
            raise InvalidInputError(f"--tile {tile} must be a positive multiple of the lattice "
                                    f"step {unit}")
    count = math.prod(math.ceil(n / tile) for n in sizes)
    return TilePlan(tuple(tile for _ in sizes), halo, count, cost(tile))


def predict(dense: nn.Module, x: torch.Tensor, *, tile: int | None = None,
            max_memory: int | None = None, progress: Progress | None = None) -> torch.Tensor:
    """``dense(x)`` computed tile by tile; identical (fp32 tolerance) to one whole pass.

    Tiles of 2-D and 3-D models run channels-last (faster dense convolutions on CPU; see
    :func:`econv_convert.run.bench.memory_format`)."""
    from econv_convert.run.bench import memory_format

    plan = plan_tiles(dense, tuple(x.shape), tile=tile, max_memory=max_memory)
    res = _geometry(dense)[2]  # tiles and halos are whole lattice steps: multiples of res
    fmt = memory_format(x.dim(), True)
    sizes = x.shape[2:]
    nd = len(sizes)
    starts = [range(0, n, t) for n, t in zip(sizes, plan.tile)]
    pieces: list[tuple[tuple[int, ...], torch.Tensor]] = []
    done = 0
    grid = _product(starts)
    with torch.no_grad():
        for origin in grid:
            lo = [max(0, o - h) for o, h in zip(origin, plan.halo)]
            hi = [min(n, o + t + h) for o, t, h, n in zip(origin, plan.tile, plan.halo, sizes)]
            crop = x
            for i in range(nd):
                crop = crop.narrow(2 + i, lo[i], hi[i] - lo[i])
            y = dense(crop.contiguous(memory_format=fmt))
            # tile output index q is image output index lo / res + q (outputs are res pixels
            # apart); keep the outputs of pixels [origin, origin + tile)
            keep = y
            offsets = []
            for i in range(nd):
                d = y.dim() - nd + i
                a = (origin[i] - lo[i]) // res
                b = min(y.shape[d], a + plan.tile[i] // res)
                if b <= a:
                    keep = None
                    break
                keep = keep.narrow(d, a, b - a)
                offsets.append(origin[i] // res)
            if keep is not None:
                pieces.append((tuple(offsets), keep.contiguous()))
            done += 1
            if progress:
                progress(done, plan.count)
    if not pieces:
        raise InvalidInputError(f"the input {tuple(x.shape)} is smaller than the model's window")
    lead = pieces[0][1].shape[: pieces[0][1].dim() - nd]
    extent = [max(o[i] + p.shape[p.dim() - nd + i] for o, p in pieces) for i in range(nd)]
    out = pieces[0][1].new_empty((*lead, *extent))
    for offsets, p in pieces:
        index = [slice(None)] * len(lead) + [slice(o, o + n) for o, n in
                                             zip(offsets, p.shape[p.dim() - nd:])]
        out[tuple(index)] = p
    return out


def _product(ranges):
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head, *rest)


# -- files ------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_input(path, mean: Sequence[float] | None, std: Sequence[float] | None,
               channels: int) -> tuple[torch.Tensor, bool]:
    """An ``N,C,H,W`` float tensor from ``.npy`` (``C,H,W`` or ``N,C,H,W``) or an image file;
    returns it and whether it came from an image."""
    import numpy as np

    suffix = str(path).lower().rsplit(".", 1)[-1]
    if f".{suffix}" in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if channels == 3 else "L")
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"{path}: not a readable image ({e})") from None
        t = torch.from_numpy(arr)
        t = t.permute(2, 0, 1) if t.dim() == 3 else t[None]
        image = True
    elif suffix == "npy":
        try:
            t = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        except (ValueError, OSError) as e:
            raise InvalidInputError(f"{path}: not a readable .npy array ({e})") from None
        image = False
    else:
        raise InvalidInputError(f"{path}: expected a .npy array or an image file")
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != channels:
        raise InvalidInputError(f"{path}: expected {channels} channels as C,H,W or N,C,H,W, "
                                f"got shape {tuple(t.shape)}")
    if mean is not None:
        t = t - torch.tensor(mean, dtype=t.dtype).reshape(1, -1, 1, 1)
    if std is not None:
        t = t / torch.tensor(std, dtype=t.dtype).reshape(1, -1, 1, 1)
    return t.contiguous(), image


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
