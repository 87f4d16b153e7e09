"""Reshapes, padding, slicing, concatenation, splits, permutations and squeezes: what each does to
the dims a dense map's layout names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.rules.common import Record, refuse, refuse_kind

# -- reshapes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReshapePlan:
    """``kind``: ``same`` (nothing to do), ``plain`` (the baseline op as it is), ``dims`` (a
    reshape where an entry of ``from_dims`` names the input dim whose dense size goes there
    (a dim the reshape leaves alone), None the baseline's size; the extras follow),
    ``merge``/``fold`` (a flatten of spatial positions kept as the unflattened map:
    ``layout``), ``unfold`` (a spatial dim split into blocks: space to depth, ``blocks`` per
    split dim)."""

    kind: str
    layout: Layout | None = None
    from_dims: tuple[int | None, ...] = ()
    blocks: dict[int, int] = field(default_factory=dict)  # input dim -> block size


def groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Dims of shapes ``a`` and ``b`` matched into runs of equal products, or None."""
    out = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins, outs = [], []
        pa = pb = 1
        if i < len(a):
            ins.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            outs.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                outs.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims of the input into this run (flatten of N x C x 1 x 1)
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            ins.append(i)
            i += 1
        out.append((ins, outs))
    return out


def reshape(x: Layout, base_in: Sequence[int], base_out: Sequence[int]) -> ReshapePlan:
    """A reshape (``view``, ``flatten``, ONNX ``Reshape``/``Flatten``) from ``base_in`` to
    ``base_out`` (the baseline's shapes at the example): dims are matched by products; a run
    that leaves each spatial dim alone is a reshape of the other dims; all spatial dims merged
    last (``x.view(n, c, -1)``) are kept for a reduction; channels and space flattened last
    are kept for a fully connected head; a spatial dim split into (blocks, block) is space to
    depth; anything else that mixes positions is refused."""
    base_in, base_out = tuple(base_in), tuple(base_out)
    if x.fold:
        if base_in == base_out:
            return ReshapePlan("same", x)
        refuse_kind("on_flatten", what="reshaping")
    if not x.has_space and not x.n_extra:
        return ReshapePlan("plain")
    matched = groups(base_in, base_out)
    if matched is None:
        refuse_kind("reshape_unmatched", base=base_in, out=base_out)
    out_dims: list[Dim] = []
    from_dims: list[int | None] = []
    blocks: dict[int, int] = {}
    untouched = True
    for ins, outs in matched:
        in_space = [i for i in ins if x.base_dims[i].spatial]
        if in_space and 0 in ins and len(ins) > 1:
            refuse_kind("window_partition")
        if not in_space and len(ins) == 1 and len(outs) == 1:
            out_dims.append(PLAIN)  # an unchanged dim (the batch): its dense size, as it is
            from_dims.append(ins[0])
        elif not in_space:
            out_dims += [PLAIN] * len(outs)
            from_dims += [None] * len(outs)
        elif len(ins) == 1 and len(outs) == 1:
            out_dims.append(x.base_dims[ins[0]])
            from_dims.append(ins[0])
        elif len(ins) == 1 and len(outs) == 2 and x.base_dims[ins[0]].kind == "space":
            d = x.base_dims[ins[0]]
            block = base_out[outs[1]]
            if block < 2 or x.n_extra:
                refuse_kind("split_spatial")
            # (h) -> (h / r, r): position i * r + j is block i, offset j: a stride-r window
            blocks[ins[0]] = block
            out_dims += [Dim("space", d.axis, d.step * block), PLAIN]
            from_dims += [ins[0], None]
        elif all(x.base_dims[i].spatial for i in ins):
            merge = len(outs) < len(ins)
            if (merge and outs == [len(base_out) - 1] and ins[-1] == len(base_in) - 1
                    and not x.n_extra and untouched):
                return ReshapePlan("merge", replace(x, merged=len(ins)))
            refuse(("merges spatial dims into one sequence of positions (tokens for attention)"
                    if merge else "splits a spatial dim (a window partition)")
                   + ", which is not translation-equivariant on the lattice")
        elif outs == [len(base_out) - 1] and ins[-1] == len(base_in) - 1 and not x.n_extra:
            # a flatten of (channels..., space...) into the last dim: a fold, for a Linear head
            if x.base_dims[ins[0]].spatial or not all(
                    x.base_dims[i].spatial for i in ins[1:]):
                refuse_kind("flatten_order")
            return ReshapePlan("fold", Layout(base_out, tuple(out_dims) + tuple(
                x.base_dims[i] for i in ins), 0, len(ins),
                fold_shape=tuple(base_in[i] for i in ins[1:])))
        else:
            refuse_kind("reshape_mixes", base=base_in, out=base_out)
        untouched &= len(ins) == 1 and len(outs) == 1
    if blocks:
        return ReshapePlan("unfold", Layout(base_out, tuple(out_dims)), tuple(from_dims),
                           blocks)
    return ReshapePlan("dims", Layout(base_out, tuple(out_dims) + x.extras, x.n_extra),
                       tuple(from_dims))


# -- padding and slicing -----------------------------------------------------------------------


@dataclass(frozen=True)
class PadPlan:
    """``scales``: per padded dim, the factor that turns the baseline's amount into the dense
    one (the dim's lattice step; 1 for a dim that is not spatial)."""

    scales: tuple[int, ...]
    record: Record


def pad(x: Layout, dims: Sequence[int], mode: str, amounts: Sequence[Any] = (),
        field: Sequence[int] = ()) -> PadPlan:
    """Padding of dims ``dims`` (baseline dims) in ``mode`` (constant, reflect, replicate,
    circular): amounts scale by each dim's step. Reflect and replicate are exact because
    dense maps end on their last lattice point; circular padding wraps to the wrong phase.
    ``amounts`` (baseline units, (lo, hi) per dim; symbolic when computed from sizes) go to
    the record."""
    if x.fold or x.n_extra:
        refuse_kind("with_extra_dims", what="padding")
    scales = tuple(x.base_dims[d].step if x.base_dims[d].kind == "space" else 1 for d in dims)
    if mode in ("circular", "wrap") and any(s > 1 for s in scales):
        refuse_kind("circular_padding")
    steps = tuple(sorted({s for s in scales if s > 1})) or (1,)
    static = all(isinstance(a, int) for a in amounts)
    # amounts are (lo, hi) pairs in the order of ``dims`` (F.pad lists the last dim first)
    before = {"pad": tuple(amounts) if static else "computed from sizes", "mode": mode,
              "dims": tuple(dims)}
    after = ({"pad": tuple(a * s for a, s in zip(amounts, _pairwise(scales)))} if static
             else {"pad": "computed when run, times the step"})
    return PadPlan(scales, Record("pad", before, after, steps, steps, tuple(field)))


def _pairwise(scales: Sequence[int]) -> list[int]:
    return [s for s in scales for _ in range(2)]


def spatial_slice(d: Dim, step: Any) -> Dim:
    """A baseline slice with ``step`` along spatial dim ``d``: the kept positions are on a
    lattice ``step`` times coarser (the bounds are applied when the model runs)."""
    if not isinstance(step, int):
        refuse_kind("slice_computed_step")
    if step < 1:
        refuse_kind("slice_negative_step")
    return Dim(d.kind, d.axis, d.step * step)


# -- dims: concatenation, splits, permutations, squeezes, channel axes ---------------------------


def concat(layouts: Sequence[Layout], axis: int, stack: bool = False) -> Layout:
    """``cat``/``stack``/``Concat`` along ``axis``: the parts must be on the same lattice and
    not concatenated along space. Returns the output's layout without its base shape (the
    backend knows it) as the first part's dims."""
    if any(lay.fold for lay in layouts):
        refuse_kind("on_flatten", what="concatenating")
    first = layouts[0]
    for lay in layouts[1:]:
        if lay.base_ndim != first.base_ndim or lay.extras != first.extras:
            refuse_kind("concat_layouts")
        if any(i != axis and d != e for i, (d, e) in enumerate(zip(lay.base_dims,
                                                                   first.base_dims))):
            refuse_kind("concat_lattices")
    if not stack and first.base_dims[axis].spatial:
        refuse_kind("concat_spatial")
    dims = list(first.base_dims)
    if stack:
        dims.insert(axis, PLAIN)
    return Layout(first.base, tuple(dims) + first.extras, first.n_extra)


def split(x: Layout, axis: int, what: str = "split") -> None:
    """``split``/``chunk``/``Split`` along ``axis``: channels, not space."""
    if x.fold:
        refuse_kind("on_flatten", what="splitting")
    if x.base_dims[axis].spatial:
        refuse_kind("along_spatial", what=what)


def permute(x: Layout, perm: Sequence[int]) -> tuple[Dim, ...]:
    """The base dims after ``perm`` (the extras stay last)."""
    if x.fold:
        refuse_kind("on_flatten", what="permuting")
    return tuple(x.base_dims[p] for p in perm)


def squeeze(x: Layout, dims: Sequence[int]) -> tuple[Dim, ...]:
    """The base dims after squeezing ``dims`` (size 1 in the baseline): a spatial dim of
    size 1 can be larger in the dense model."""
    if x.fold:
        refuse_kind("on_flatten", what="squeezing")
    if any(x.base_dims[d].spatial for d in dims):
        refuse_kind("squeeze_spatial")
    return tuple(d for i, d in enumerate(x.base_dims) if i not in dims)


def unsqueeze(x: Layout, dims: Sequence[int]) -> tuple[Dim, ...]:
    if x.fold:
        refuse_kind("on_flatten", what="unsqueezing")
    out = list(x.base_dims)
    for d in sorted(dims):
        out.insert(d, PLAIN)
    return tuple(out)
