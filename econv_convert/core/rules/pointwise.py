"""Element-wise ops with broadcasting: how operands on different lattices, phases or extra dims
meet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.rules.common import refuse_kind

# -- element-wise ops with broadcasting ----------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Spread a phase-pooled operand over the map it meets: its size-1 dims ``targets`` take
    the phase dims, tiled to the sizes of dims ``like_dims`` of operand ``like``."""

    targets: tuple[int, ...]
    like: int
    like_dims: tuple[int, ...]


@dataclass(frozen=True)
class BroadcastPlan:
    """The output's base dims and extras, and per operand what to do first: nothing,
    :class:`Spread`, or an int (that many trailing singleton dims to add, so it broadcasts
    against the extras)."""

    out_dims: tuple[Dim, ...]
    extras: tuple[Dim, ...]
    actions: tuple[Spread | int | None, ...]


def broadcast(layouts: Sequence[Layout], out_rank: int) -> BroadcastPlan:
    """Element-wise ops with broadcasting (numpy rules, dims aligned from the right): maps must
    be on the same lattice; a spatial dim broadcasts only against size 1 (a tensor varying over
    positions would be a positional embedding); a phase-pooled operand (squeeze-and-excitation)
    is spread over the map so each position gets its own phase's value; operands without the
    extras of another get trailing singletons."""
    if any(lay.fold for lay in layouts):
        refuse_kind("on_flatten", what="an element-wise op on")
    maps = [k for k, lay in enumerate(layouts)
            if not lay.n_extra and any(d.kind == "space" for d in lay.base_dims)]
    actions: list[Spread | int | None] = [None] * len(layouts)
    views = list(layouts)
    for k, lay in enumerate(layouts):
        phase = [e for e in lay.extras if e.kind == "phase"]
        if not phase or len(phase) != lay.n_extra or not maps:
            continue
        like = layouts[maps[0]]
        offset = like.base_ndim - lay.base_ndim
        targets, like_dims = [], []
        for e in phase:
            j = next((j for j, d in enumerate(like.base_dims)
                      if d.kind == "space" and d.axis == e.axis), None)
            if j is None:
                refuse_kind("phase_pooled_axis")
            if like.base_dims[j].step != e.step:
                refuse_kind("phase_pooled_step", step=e.step, other=like.base_dims[j].step)
            t = j - offset
            if t < 0 or lay.base[t] != 1:
                refuse_kind("phase_pooled_dim")
            targets.append(t)
            like_dims.append(j)
        actions[k] = Spread(tuple(targets), maps[0], tuple(like_dims))
        dims = list(lay.base_dims)
        for t, j in zip(targets, like_dims):
            dims[t] = like.base_dims[j]
        views[k] = Layout(lay.base, tuple(dims))
    out: list[Dim] = []
    for i in range(out_rank):
        found = [(lay.base_dims[j], lay.base[j]) for lay in views
                 for j in [i - (out_rank - lay.base_ndim)] if j >= 0]
        space = {d for d, _ in found if d.spatial}
        if len(space) > 1:
            refuse_kind("other_lattices")
        if space and any(not d.spatial and n != 1 for d, n in found):
            refuse_kind("positional_tensor")
        out.append(space.pop() if space else PLAIN)
    if any(lay.n_extra and any(e.kind == "space" for e in lay.extras) for lay in layouts) \
            and any(any(d.spatial for d in lay.base_dims) for lay in layouts):
        refuse_kind("window_pooled_meets_map")
    extras = max((lay.extras for lay in views), key=len)
    for k, lay in enumerate(views):
        if lay.extras and lay.extras != extras:
            refuse_kind("other_extra_dims")
        if extras and not lay.extras:
            actions[k] = len(extras)
    return BroadcastPlan(tuple(out), extras, tuple(actions))
