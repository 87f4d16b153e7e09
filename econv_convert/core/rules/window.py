"""Window layers (convolutions, max and average pools, adaptive pools, space to depth): the dense
window, the corrections, the output layout, or where a pool covers its whole input, a global
pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from econv_convert.core.lattice import (
    DenseWindow,
    Field,
    Window,
    covered_limit,
    covers_input,
    dense_window,
    keeps_stride,
    window_geometry,
)
from econv_convert.core.layout import PLAIN, Dim, Layout, LayoutError
from econv_convert.core.rules.common import Record, fields_through, refuse, refuse_kind
from econv_convert.core.rules.global_pool import GlobalPlan, global_pool

# -- window layers: convolutions and pools ------------------------------------------------------


# the forms a window layer takes (:class:`WindowPlan`), picked once by the core for both backends
Form = Literal["plain", "extra", "kept", "global", "dense"]


@dataclass(frozen=True)
class WindowPlan:
    """What a convolution or pool becomes.

    ``form``: ``plain`` (nothing spatial reaches it: the baseline op as it is), ``extra`` (no
    spatial dims but extra ones: the op at each extra position), ``kept`` (its stride kept
    under an output stride: the baseline op), ``global`` (one window covers the whole map: a
    global pool, see ``pool`` and ``limits``), ``dense`` (stride 1, the ``dense`` windows, a
    tight crop)."""

    form: Form
    steps: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    windows: tuple[Window, ...] = ()
    dense: tuple[DenseWindow, ...] = ()
    out_dims: tuple[Dim, ...] = ()  # the output's base dims (extras are the input's)
    fields: tuple[Field, ...] = ()
    record: Record | None = None
    padded: bool = False  # padding or ceil-mode ends: shifted windows differ at the borders
    kept_stride: tuple[int, ...] | None = None  # the cumulative stride, when a stride is kept
    pool: GlobalPlan | None = None
    limits: tuple[int, ...] = ()  # global: the largest map a window covers, per axis
    note: str = ""


def window(kind: str, x: Layout, windows: Sequence[Window], fields: Sequence[Field], *,
           output_stride: int | None, cost: int, mode: str = "phase",
           reduce: str | None = None, count_include_pad: bool = False,
           divisor_override: bool = False, note: str = "") -> WindowPlan:
    """The plan of a window layer of ``kind`` (conv, max_pool, avg_pool, lp_pool) with one
    ``Window`` per spatial axis, on input layout ``x`` whose receptive fields are ``fields``.

    ``reduce`` (``max``, ``mean``) marks a pool that is a global pool where its one window
    covers the whole map (a kernel larger than the map); an average pool is one only where it
    divides by the number of real positions."""
    windows = tuple(windows)
    nd = len(windows)
    try:
        form, steps, axes = x.window_input(nd)
    except LayoutError as e:
        refuse(str(e))
    if form != "dense":
        return WindowPlan(form, windows=windows)
    padded = any(not isinstance(w.pad_lo, int) or w.pad_lo or w.pad_hi or w.ceil_mode
                 for w in windows)
    out_fields = fields_through(fields, windows)
    strides = tuple(w.stride for w in windows)
    out_steps = tuple(s * t for s, t in zip(steps, strides))
    before = window_geometry(windows, **({"count_include_pad": count_include_pad}
                                         if kind == "avg_pool" else {}))
    if keeps_stride(steps, fields or tuple(Field() for _ in windows), strides, output_stride):
        record = Record(kind, before, {"stride": strides}, steps, steps,
                        tuple(f.size for f in out_fields),
                        f"stride kept (output stride {output_stride})", cost)
        kept = tuple(f.step for f in out_fields) if any(t > 1 for t in strides) else None
        return WindowPlan("kept", steps, axes, windows, (),
                          (PLAIN, PLAIN) + tuple(Dim("space", a, 1) for a in axes), out_fields,
                          record, padded, kept)
    mean = reduce == "mean" and not divisor_override and not (
        count_include_pad and any(w.pad_lo or w.pad_hi for w in windows))
    h = x.base[2:]
    if (reduce == "max" or mean) and all(isinstance(w.pad_lo, int) and covers_input(n, w)
                                         for n, w in zip(h, windows)):
        limits = tuple(covered_limit(w) for w in windows)
        pool = global_pool(x, range(2, 2 + nd), reduce, mode, keepdim=True)
        return WindowPlan("global", steps, axes, windows, pool=pool, limits=limits,
                          fields=tuple(fields), note=(
                              f"a pool of kernel {tuple(w.kernel for w in windows)} reads all "
                              f"of its {tuple(h)} input: a global pool while that map stays "
                              f"within {limits} positions"))
    dense = tuple(dense_window(w, s) for w, s in zip(windows, steps))
    after = window_geometry(windows, steps, **({"count_include_pad": count_include_pad}
                                               if kind == "avg_pool" else {}))
    record = Record(kind, before, after, steps, out_steps, tuple(f.size for f in out_fields),
                    note, cost)
    out_dims = (PLAIN, PLAIN) + tuple(Dim("space", a, t) for a, t in zip(axes, out_steps))
    return WindowPlan("dense", steps, axes, windows, dense, out_dims, out_fields, record,
                      padded, note=note)


# A pool whose one window covered its whole map at the example is a global pool while the map
# fits in that window. Past it the baseline would slide the window: the dense model has no value
# there, and both backends stop the run with these words (PyTorch with SizeNotCovered; an ONNX
# graph with a Reshape named PAST_COVER that fails, which econv-convert's runs turn into
# SizeNotCovered): never a number.
PAST_COVER = "econv_past_cover"


def past_cover(what: str, limits: Sequence[int], n: int | None = None) -> str:
    reads = f"a map of {n} positions" if n is not None else "a larger map"
    return (f"{what}: the input is too large for this dense model (the pool there reads "
            f"{reads}, more than its kernel of {', '.join(map(str, limits))} covers)")


def adaptive_pool(x: Layout, output_size: Sequence[int | None]) -> tuple[str, tuple[int, ...]]:
    """An adaptive pool: ``("global", ())`` when it pools to size 1; ``("window", kernel)``
    when the map's size at the example is a multiple of the output size (a plain pool of that
    kernel and stride, specialized to that size); refused otherwise."""
    h = x.base[2:]
    out = tuple(n if o is None else int(o) for o, n in zip(output_size, h, strict=True))
    if all(o == 1 for o in out):
        return "global", ()
    if any(n % o for n, o in zip(h, out)):
        refuse_kind("adaptive_pool", size=tuple(h), out=out)
    return "window", tuple(n // o for n, o in zip(h, out))


def adaptive_note(h: Sequence[int], kernel: Sequence[int]) -> str:
    return (f"adaptive pool specialized to the example size {tuple(h)}: a plain pool of "
            f"kernel {tuple(kernel)}; other input sizes follow the plain pool")


# -- space to depth --------------------------------------------------------------------------


def space_to_depth(x: Layout, block: int) -> Layout:
    """Space to depth (``pixel_unshuffle``, ONNX ``SpaceToDepth``): a stride-``block`` window
    of ``block`` positions per axis whose taps become channels. Densely, each position reads
    its ``block`` taps ``step`` apart and the output is on a lattice ``block`` times coarser.
    Returns the output layout (same dims, spatial ones on the coarser lattice). Where the
    tap index goes in the channels (pixel_unshuffle: c * r * r + i * r + j; ONNX:
    (i * r + j) * C + c) does not change the layout: each backend's emitter keeps its
    framework's order."""
    try:
        form, steps, axes = x.window_input(len(x.base) - 2)
    except LayoutError as e:
        refuse(str(e))
    if form == "extra":
        refuse_kind("with_extra_dims", what="space to depth on")
    if form == "plain":
        return Layout.plain(x.base)
    dims = (PLAIN, PLAIN) + tuple(Dim("space", a, s * block) for a, s in zip(axes, steps))
    return Layout(x.base, dims)


def space_to_depth_record(x: Layout, block: int, fields: Sequence[Field]) -> tuple[
        Record, tuple[Field, ...]]:
    steps = tuple(d.step for d in x.base_dims[2:])
    windows = [Window(block, block) for _ in steps]
    out_fields = fields_through(fields, windows)
    return Record("space_to_depth", {"block": block}, {"block": block, "dilation": steps},
                  steps, tuple(s * block for s in steps), tuple(f.size for f in out_fields),
                  cost=1), out_fields
