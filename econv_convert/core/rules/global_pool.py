"""Global pooling and reductions over space: what each --global-pool mode computes, and reductions
over merged positions or non-spatial dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from econv_convert.core.lattice import (
    Field,
    Window,
)
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.rules.common import Record, refuse_kind

GLOBAL_MODES_NOTE = {
    "phase": "one output per lattice phase (phase 0 = baseline)",
    "lattice": "pools lattice points only (= baseline)",
    "dense": "pools every position: NOT the baseline function",
    "window": "a window of the example's map slides over the dense map: one prediction per "
              "window position (the window at 0 = baseline)",
}


# -- global pooling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalPlan:
    """A reduction over whole spatial dims in the chosen mode: ``space`` (the spatial dims
    pooled, with their ``steps``), ``others`` (non-spatial dims reduced with them, as the
    baseline does), and the output's dims (``out_dims`` with ``n_extra`` trailing phase dims
    in phase mode)."""

    space: tuple[int, ...]
    steps: tuple[int, ...]
    others: tuple[int, ...]
    keepdim: bool
    mode: str
    reduce: str
    out_dims: tuple[Dim, ...]
    n_extra: int
    record: Record
    # window mode: the baseline's map size at the example (the window, in lattice points) and
    # the receptive fields of the window positions
    extent: tuple[int, ...] = ()
    fields: tuple[Field, ...] = ()
    # window mode, per axis: (input pixels the window position's field starts before its
    # lattice point, its size): what one output reads, for the blocks of predict
    support: tuple[tuple[int, int], ...] = ()


def global_pool(x: Layout, dims: Sequence[int], reduce: str, mode: str,
                keepdim: bool, field: Sequence[Field | int] = ()) -> GlobalPlan:
    """Global pooling (mean, sum, max, min over whole spatial dims ``dims``) in ``mode``:
    ``phase`` (one output per lattice phase, as trailing extra dims: phase 0 is the
    baseline), ``lattice`` (lattice points only: the baseline's value), ``dense`` (every
    position: a different function), ``window`` (a pool of the map's extent at the example,
    dilated by the step, sliding over the dense map: the window positions become trailing
    extra ``space`` dims, as the positions of a fully connected head do; position 0 is the
    baseline at the example size). ``field``: the receptive fields of the input map."""
    if x.n_extra or x.fold:
        refuse_kind("second_global_pool")
    dims = sorted(x.norm_dim(d) for d in dims)
    space = tuple(d for d in dims if x.base_dims[d].kind == "space")
    steps = tuple(x.base_dims[d].step for d in space)
    others = tuple(d for d in dims if d not in space)
    kept = [PLAIN if d.spatial else d
            for i, d in enumerate(x.base_dims) if keepdim or i not in dims]
    extras: tuple[Dim, ...] = ()
    extent: tuple[int, ...] = ()
    fields: tuple[Field, ...] = ()
    after: dict = {"mode": mode}
    support: tuple[tuple[int, int], ...] = ()
    full = tuple(f for f in field if isinstance(f, Field))
    field = tuple(f.size if isinstance(f, Field) else f for f in field)
    sizes = tuple(field)
    if mode == "phase":
        extras = tuple(Dim("phase", x.base_dims[d].axis, x.base_dims[d].step) for d in space)
    elif mode == "window":
        extras = tuple(Dim("space", x.base_dims[d].axis, x.base_dims[d].step) for d in space)
        extent = tuple(x.base[d] for d in space)
        if full and len(full) == len(extent):  # in input pixels, with the padding's reach
            fields = tuple(f.through(Window(m)) for f, m in zip(full, extent))
        else:
            start = field or (1,) * len(space)
            fields = tuple(Field(f, s).through(Window(m)) for f, s, m in zip(start, steps, extent))
        sizes = tuple(f.size for f in fields)
        after = {"mode": mode, "kernel": extent, "dilation": steps}
        if full and len(full) == len(extent):
            # in the input's pixels (the fields' own step): the window's first position
            # reads from ``lo`` before its lattice point, through the last one's field
            support = tuple((f.lo, f.size + (m - 1) * f.step) for f, m in zip(full, extent))
    record = Record(f"global_{reduce}", {"dims": tuple(dims)}, after, steps,
                    steps if mode == "window" else (1,) * len(steps), sizes,
                    GLOBAL_MODES_NOTE[mode])
    return GlobalPlan(space, steps, others, keepdim, mode, reduce, tuple(kept) + extras,
                      len(extras), record, extent, fields, support)


def merged_reduction(x: Layout, dims: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """A reduction of a value whose spatial dims were merged into its last dim
    (``x.view(n, c, -1)``, baseline rank ``rank``): global pooling of those spatial dims when
    it reduces the merged dim alone; refused otherwise. Returns the dense dims to pool."""
    if dims is None or [d % rank for d in dims] != [rank - 1]:
        refuse_kind("reduction_besides_merged")
    return tuple(range(rank - 1, x.base_ndim))


def reduction(x: Layout, dims: Sequence[int] | None, what: str) -> str:
    """A reduction over ``dims``: ``global`` when it pools spatial dims (see
    :func:`global_pool`), ``channels`` when it reduces other dims only (positions untouched),
    ``plain`` when nothing spatial reaches it."""
    if x.is_plain:
        return "plain"
    if dims is None:
        refuse_kind("reduction_with_batch", what=what)
    if x.fold:
        refuse_kind("on_flatten", what="a reduction over")
    return "global" if any(x.base_dims[x.norm_dim(d)].spatial for d in dims) else "channels"
