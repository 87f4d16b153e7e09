"""Where a dense model's outputs lie on its input: the receptive field of a map model, the
block engine's geometry (steps, lattice, halos, windows, offset) and the whole image's output
size. Tiled prediction (:mod:`econv_convert.run.predict`), the block engine
(:mod:`econv_convert.run.scene`) and arrays in memory (:mod:`econv_convert.run.arrays`) all
take them from here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from econv_convert.core.lattice import UNKNOWN_REACH
from econv_convert.errors import InvalidInputError, describe
from econv_convert.run.runner import ModelSpec, runner
from econv_convert.run.sources import normalize


def map_field(meta) -> tuple[int, ...]:
    """The receptive field per spatial axis (input pixels) of a dense model whose one output
    is a map over the input; refuses a model whose outputs depend on more than a window (a
    global pool in another mode than ``window``) or that has several outputs."""
    if len(meta.outputs) != 1:
        raise InvalidInputError("prediction needs a model with one output map")
    if meta.global_pools and meta.global_pool != "window":
        raise InvalidInputError(
            "this dense model pools over the whole image (global_pool="
            f"{meta.global_pool}), so no output depends on a window only; densify it with "
            "global_pool=window (a heat map of the classifier) or cut before the pool "
            "(until=...)")
    nd = len(meta.example_shape) - 2
    dims = meta.outputs[0]["dims"]
    if len(dims) < nd or any(kind != "space" for kind, *_ in dims[-nd:]):
        raise InvalidInputError("the model's output is not a map over the input's spatial axes")
    field = [1] * nd
    for r in meta.records:
        for i, f in enumerate(r["field"][:nd]):
            field[i] = max(field[i], f)
    return tuple(field)



# -- blocks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where a dense model's outputs lie on its input, per spatial axis, in input pixels:
    ``step`` between neighbouring outputs, ``unit`` the lattice (window starts keep to it),
    ``halo`` the input a block reads before its own (and ``halo_after`` after it),
    ``window`` the input one output reads (the example input with ``--global-pool window``,
    else the receptive field) and ``offset`` the input pixel of output 0's window corner."""

    step: tuple[int, ...]
    unit: tuple[int, ...]
    halo: tuple[int, ...]
    window: tuple[int, ...]
    offset: tuple[int, ...] | None
    halo_after: tuple[int, ...] = ()


def geometry(meta) -> Geometry:
    """The :class:`Geometry` of a dense model from its :class:`DenseInfo`; refuses a model
    whose output is not one map over the input (a global pool in phase mode, several
    outputs)."""
    field_ = map_field(meta)
    example = meta.canonical(meta.example_shape)
    nd = len(example) - 2
    res = meta.output_stride or 1  # dense positions are this many input pixels apart
    unit = tuple(res * s for s in meta.axis_steps)
    windowed = meta.global_pool == "window" and meta.global_pools > 0
    support = _support(meta, windowed, nd)
    if support is None:  # where an output's field starts is not known: one field each side
        halo = tuple(u * (math.ceil(f / u) + 1) for f, u in zip(field_, unit))
        after = halo
    else:
        # output q reads input [q * res - before, q * res - before + size): a block reads
        # that much before its first output and after its last, in whole lattice steps. A
        # dense model's output ends on its input's last lattice point (the phases past it
        # are cut), and a block ends on a lattice step: between lattice points (s > 1
        # positions a step) the block's last output is one short of the next lattice point,
        # whose field the window must hold too
        halo = tuple(u * math.ceil(b / u) for (b, _), u in zip(support, unit))
        after = tuple(u * math.ceil(max(0, n - b - (res if s == 1 else 0)) / u)
                      for (b, n), u, s in zip(support, unit, meta.axis_steps))
    window = tuple(example[2:]) if windowed else tuple(field_)
    # output q's window starts at input pixel q * step: the example-size window in window
    # mode, the receptive field of an unpadded network; a padded network's field reaches
    # before pixel 0 by an amount its graph does not record in one number: left unknown
    offset = (0,) * nd if windowed or not meta.has_padding else None
    return Geometry((res,) * nd, unit, halo, window, offset, after)


def _support(meta, windowed: bool, nd: int) -> list[tuple[int, int]] | None:
    """Per axis, (pixels before an output's lattice point where the input it reads starts,
    how many it reads), when the model records it: window pooling's support, or the
    receptive field with its padding reach (``core.lattice.Field``) of a map model."""
    if getattr(meta, "support", None) and len(meta.support) == nd:
        found = [(int(b), int(n)) for b, n in meta.support]
    elif not windowed and meta.out_field and len(meta.out_field) == nd:
        found = [(int(f[2]), int(f[0])) for f in meta.out_field]
    else:
        return None
    if any(b < 0 or b >= UNKNOWN_REACH or n < 1 for b, n in found):
        return None
    return found


def output_size(model, source, geo: Geometry, mean, std) -> tuple[int, ...]:
    """The whole image's output shape ``(C, *spatial)``, from one run at the far corner: a
    window that starts on the lattice loses exactly ``start / step`` outputs (every layer's
    size shrinks by the shift over its stride), so the image's size is the corner's plus
    that. ``model``: a :class:`ModelSpec` or a run function."""
    sizes = source.shape[1:]
    nd = len(sizes)
    after = geo.halo_after or geo.halo
    need = [h + t + max(win, u) for h, t, win, u in zip(geo.halo, after, geo.window, geo.unit)]
    starts = [max(0, (n - m) // u * u) for n, m, u in zip(sizes, need, geo.unit)]
    x = normalize(source.read_window([(a, n) for a, n in zip(starts, sizes)]), mean, std)[None]
    run = runner(model) if isinstance(model, ModelSpec) else model
    corner = "x".join(str(n - a) for a, n in zip(starts, sizes))
    try:
        y = run(np.ascontiguousarray(x))
    except Exception as e:
        raise InvalidInputError(f"the model does not run on a {corner} window of the input "
                                f"({describe(e)}); is the input smaller than the model's "
                                "window?") from None
    if y.ndim < nd + 1:
        raise InvalidInputError(f"the model's output {tuple(y.shape)} is not a map")
    channels = math.prod(y.shape[1:-nd])
    size = [n + s // st for n, s, st in zip(y.shape[-nd:], starts, geo.step)]
    if any(n <= 0 for n in size):
        raise InvalidInputError("the input " + "x".join(map(str, sizes)) + " is smaller "
                                "than the model's window")
    return (channels, *size)


