"""What each layer kind becomes in the dense model: decided once, for every backend.

A backend reads its own node (an fx call, an ONNX node), says what kind of layer it is and
with which geometry (:class:`~econv_convert.core.lattice.Window` per spatial axis, the axes it
reads, its mode), and asks a function here. The answer is a small plan: the output's
:class:`~econv_convert.core.layout.Layout`, the dense window to run, the corrections to make
when the model runs, the record for reports, or a :class:`Refusal` that says why the layer has
no dense form. The backend then emits that plan in its own operations; it holds no lattice
arithmetic and no refusal reasons of its own.

Everything here is plain Python on layouts and integers (and on the symbolic integers an ONNX
graph computes with: the arithmetic of :mod:`econv_convert.core.lattice` runs on them too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

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
from econv_convert.core.records import HEAD_KIND

GLOBAL_MODES_NOTE = {
    "phase": "one output per lattice phase (phase 0 = baseline)",
    "lattice": "pools lattice points only (= baseline)",
    "dense": "pools every position: NOT the baseline function",
    "window": "a window of the example's map slides over the dense map: one prediction per "
              "window position (the window at 0 = baseline)",
}


class Refusal(Exception):
    """A layer with no dense form; ``reason`` says why and ``hint`` what the user can do,
    where an option helps (the backend adds the node's name, and by default suggests
    densifying the part before it)."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def refuse(reason: str, hint: str = "") -> NoReturn:
    raise Refusal(reason, hint)


# layer kinds that are not translation-equivariant on the lattice, whatever their geometry;
# each backend maps its own ops to these
REFUSED = {
    "upsampling": "upsampling is not translation-equivariant on the lattice",
    "transposed_convolution": "a transposed convolution upsamples, which is not "
                              "translation-equivariant on the lattice",
    "depth_to_space": "depth to space (pixel shuffle) moves channels into positions: it "
                      "upsamples",
    "attention": "attention over positions mixes the whole map",
    "sampling": "sampling at computed positions (grid sampling) is not "
                "translation-equivariant",
    "region_pooling": "region pooling reads absolute positions",
    "unpooling": "unpooling writes absolute positions",
    "detection": "detection post-processing reads absolute positions",
    "subgraph": "a subgraph (If/Loop/Scan) is not supported",
    "im2col": "unfolding windows into channels (im2col) has no rule",
    "col2im": "folding channels into positions (col2im) is not translation-equivariant",
    "random_pooling": "fractional pooling is random and not equivariant",
    "lp_pool": "power-average pooling (lp_pool) as a PyTorch function has no rule yet (its "
               "ONNX form, LpPool, converts)",
    "expand": "expanding a spatial map repeats positions",
    "dropout_mask": "dropout's mask output is used (it is random at every position)",
}


def refuse_kind(kind: str) -> NoReturn:
    refuse(REFUSED[kind])


# -- refusals every backend words the same way: the backend names the node ------------------


def no_rule(what: str) -> NoReturn:
    """A node with no rule that a map reaches."""
    refuse(f"no rule for {what} on a spatial map; it may mix positions, which would break "
           "equivalence on the lattice")


def on_merged(what: str) -> NoReturn:
    """A node other than a reduction over spatial positions merged into one dim (a
    flatten(2) before a mean, say)."""
    refuse(f"{what} on merged spatial positions (only a mean, max, min or sum over them has a "
           "rule: global pooling)")


def output_view(x: Layout, linear: str) -> dict[str, Any]:
    """What each dim of a model output means (kind, lattice step, input axis): the lattice
    view of the dense output. Refused: outputs that are no map (a flatten over positions
    that only ``linear``, the backend's linear layer, may consume; positions merged into one
    dim)."""
    if x.fold:
        refuse(f"the output is a flatten over spatial positions; only {linear} may consume "
               "such a flatten")
    if x.merged:
        refuse("the output merges spatial positions into one dim; only a reduction over them "
               "may consume it")
    return {"dims": [(d.kind, d.step, d.axis) for d in x.dims], "base_ndim": x.base_ndim}


@dataclass(frozen=True)
class Record:
    """A rewritten layer as reports show it (the backend adds node names and shapes)."""

    kind: str
    before: dict[str, Any]
    after: dict[str, Any]
    step_in: tuple[int, ...]
    step_out: tuple[int, ...]
    field: tuple[int, ...]
    note: str = ""
    cost: int = 0  # multiply-adds (or comparisons) per output element


def fields_through(fields: Sequence[Field], windows: Sequence[Window]) -> tuple[Field, ...]:
    """Receptive fields and steps after window layers ``windows`` (one per spatial axis)."""
    fields = fields or tuple(Field() for _ in windows)
    return tuple(f.through(w) for f, w in zip(fields, windows, strict=True))


def input_layout(shape: Sequence[int], channels_last: bool = False) -> Layout:
    """The model input: batch, channels, and every other dim spatial on lattice step 1
    (``channels_last``: batch, spatial..., channels)."""
    nd = len(shape) - 2
    space = tuple(Dim("space", i, 1) for i in range(nd))
    dims = (PLAIN, *space, PLAIN) if channels_last else (PLAIN, PLAIN, *space)
    return Layout(tuple(shape), dims)


# -- window layers: convolutions and pools ------------------------------------------------------


@dataclass(frozen=True)
class WindowPlan:
    """What a convolution or pool becomes.

    ``form``: ``plain`` (nothing spatial reaches it: the baseline op as it is), ``extra`` (no
    spatial dims but extra ones: the op at each extra position), ``kept`` (its stride kept
    under an output stride: the baseline op), ``global`` (one window covers the whole map: a
    global pool, see ``pool`` and ``limits``), ``dense`` (stride 1, the ``dense`` windows, a
    tight crop)."""

    form: str
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


def adaptive_pool(x: Layout, output_size: Sequence[int | None]) -> tuple[str, tuple[int, ...]]:
    """An adaptive pool: ``("global", ())`` when it pools to size 1; ``("window", kernel)``
    when the map's size at the example is a multiple of the output size (a plain pool of that
    kernel and stride, specialized to that size); refused otherwise."""
    h = x.base[2:]
    out = tuple(n if o is None else int(o) for o, n in zip(output_size, h, strict=True))
    if all(o == 1 for o in out):
        return "global", ()
    if any(n % o for n, o in zip(h, out)):
        refuse(f"adaptive pooling from {tuple(h)} to {out}: the windows depend on the input "
               "size and are not translation-equivariant on the lattice",
               "give an --input-shape at which the map there is a multiple of " f"{out}")
    return "window", tuple(n // o for n, o in zip(h, out))


def adaptive_note(h: Sequence[int], kernel: Sequence[int]) -> str:
    return (f"adaptive pool specialized to the example size {tuple(h)}: a plain pool of "
            f"kernel {tuple(kernel)}; other input sizes follow the plain pool")


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
        refuse("global pooling of a map that already has extra dims (a second global pool "
               "after a phase- or window-pooled one)",
               "--global-pool lattice pools the lattice only")
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
        refuse("a reduction over other dims than the merged spatial positions")
    return tuple(range(rank - 1, x.base_ndim))


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
        refuse("an element-wise op on a flatten of spatial positions")
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
                refuse("a phase-pooled value meets a map without that spatial axis")
            if like.base_dims[j].step != e.step:
                refuse(f"a phase-pooled value (step {e.step}) scales a map on step "
                       f"{like.base_dims[j].step}")
            t = j - offset
            if t < 0 or lay.base[t] != 1:
                refuse("a phase-pooled value meets a map along a dim it was not pooled over")
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
            refuse("operands on different lattices (their strides differ); their baseline "
                   "maps have equal sizes only by accident of the input size")
        if space and any(not d.spatial and n != 1 for d, n in found):
            refuse("adds or multiplies a tensor that varies over space (a positional "
                   "embedding is not translation-equivariant)")
        out.append(space.pop() if space else PLAIN)
    if any(lay.n_extra and any(e.kind == "space" for e in lay.extras) for lay in layouts) \
            and any(any(d.spatial for d in lay.base_dims) for lay in layouts):
        refuse("a window-pooled value meets the map it was pooled from (as in "
               "squeeze-and-excitation): each position would need its own window of the map, "
               "which has no dense form",
               "--global-pool phase keeps one value per lattice phase")
    extras = max((lay.extras for lay in views), key=len)
    for k, lay in enumerate(views):
        if lay.extras and lay.extras != extras:
            refuse("operands with different extra dims")
        if extras and not lay.extras:
            actions[k] = len(extras)
    return BroadcastPlan(tuple(out), extras, tuple(actions))


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
        refuse("reshaping a flatten of spatial positions")
    if not x.has_space and not x.n_extra:
        return ReshapePlan("plain")
    matched = groups(base_in, base_out)
    if matched is None:
        refuse(f"reshape {base_in} -> {base_out} cannot be matched dim by dim")
    out_dims: list[Dim] = []
    from_dims: list[int | None] = []
    blocks: dict[int, int] = {}
    untouched = True
    for ins, outs in matched:
        in_space = [i for i in ins if x.base_dims[i].spatial]
        if in_space and 0 in ins and len(ins) > 1:
            refuse("moves spatial positions into the batch (a window partition), which is not "
                   "translation-equivariant on the lattice")
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
                refuse("splits a spatial dim in a way that is not a window partition")
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
                refuse("a flatten of channels and space that is not in channels-first order")
            return ReshapePlan("fold", Layout(base_out, tuple(out_dims) + tuple(
                x.base_dims[i] for i in ins), 0, len(ins),
                fold_shape=tuple(base_in[i] for i in ins[1:])))
        else:
            refuse(f"reshape {base_in} -> {base_out} mixes spatial positions with other dims")
        untouched &= len(ins) == 1 and len(outs) == 1
    if blocks:
        return ReshapePlan("unfold", Layout(base_out, tuple(out_dims)), tuple(from_dims),
                           blocks)
    return ReshapePlan("dims", Layout(base_out, tuple(out_dims) + x.extras, x.n_extra),
                       tuple(from_dims))


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
        refuse("space to depth on a map with extra dims")
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
        refuse("padding a map with extra dims")
    scales = tuple(x.base_dims[d].step if x.base_dims[d].kind == "space" else 1 for d in dims)
    if mode in ("circular", "wrap") and any(s > 1 for s in scales):
        refuse("circular padding of a map on a lattice wraps to the wrong phase (it is not "
               "translation-equivariant on the lattice)")
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
        refuse("a spatial slice with a computed step")
    if step < 1:
        refuse("a spatial slice with a negative step")
    return Dim(d.kind, d.axis, d.step * step)


# -- dims: concatenation, splits, permutations, squeezes, channel axes ---------------------------


def concat(layouts: Sequence[Layout], axis: int, stack: bool = False) -> Layout:
    """``cat``/``stack``/``Concat`` along ``axis``: the parts must be on the same lattice and
    not concatenated along space. Returns the output's layout without its base shape (the
    backend knows it) as the first part's dims."""
    if any(lay.fold for lay in layouts):
        refuse("concatenating a flatten of spatial positions")
    first = layouts[0]
    for lay in layouts[1:]:
        if lay.base_ndim != first.base_ndim or lay.extras != first.extras:
            refuse("concatenation of tensors with different layouts")
        if any(i != axis and d != e for i, (d, e) in enumerate(zip(lay.base_dims,
                                                                   first.base_dims))):
            refuse("concatenating maps on different lattices")
    if not stack and first.base_dims[axis].spatial:
        refuse("concatenation along a spatial dim is not translation-equivariant")
    dims = list(first.base_dims)
    if stack:
        dims.insert(axis, PLAIN)
    return Layout(first.base, tuple(dims) + first.extras, first.n_extra)


def split(x: Layout, axis: int, what: str = "split") -> None:
    """``split``/``chunk``/``Split`` along ``axis``: channels, not space."""
    if x.fold:
        refuse("splitting a flatten of spatial positions")
    if x.base_dims[axis].spatial:
        refuse(f"{what} along a spatial dim")


def permute(x: Layout, perm: Sequence[int]) -> tuple[Dim, ...]:
    """The base dims after ``perm`` (the extras stay last)."""
    if x.fold:
        refuse("permuting a flatten of spatial positions")
    return tuple(x.base_dims[p] for p in perm)


def squeeze(x: Layout, dims: Sequence[int]) -> tuple[Dim, ...]:
    """The base dims after squeezing ``dims`` (size 1 in the baseline): a spatial dim of
    size 1 can be larger in the dense model."""
    if x.fold:
        refuse("squeezing a flatten of spatial positions")
    if any(x.base_dims[d].spatial for d in dims):
        refuse("squeezing a spatial dim of size 1 (its dense size can be larger)")
    return tuple(d for i, d in enumerate(x.base_dims) if i not in dims)


def unsqueeze(x: Layout, dims: Sequence[int]) -> tuple[Dim, ...]:
    if x.fold:
        refuse("unsqueezing a flatten of spatial positions")
    out = list(x.base_dims)
    for d in sorted(dims):
        out.insert(d, PLAIN)
    return tuple(out)


def channel_axes(x: Layout, axes: Sequence[int], what: str) -> None:
    """A layer that reads along ``axes`` (softmax, normalizations, LRN, a channel-wise
    statistic): those must not be spatial, or the layer mixes positions."""
    if x.fold:
        refuse(f"{what} on a flatten of spatial positions")
    if any(x.base_dims[a].spatial for a in axes):
        refuse(f"{what} over a spatial dim mixes positions")


def statistics_over_space(x: Layout, what: str) -> None:
    """GroupNorm, InstanceNorm: statistics over spatial positions differ between the lattice
    and the dense map."""
    if x.has_space:
        refuse(f"{what} normalizes with statistics over spatial positions, which differ between "
               "the lattice and the dense map")


def reduction(x: Layout, dims: Sequence[int] | None, what: str) -> str:
    """A reduction over ``dims``: ``global`` when it pools spatial dims (see
    :func:`global_pool`), ``channels`` when it reduces other dims only (positions untouched),
    ``plain`` when nothing spatial reaches it."""
    if x.is_plain:
        return "plain"
    if dims is None:
        refuse(f"{what} over every dim, batch included")
    if x.fold:
        refuse("a reduction over a flatten of spatial positions")
    return "global" if any(x.base_dims[x.norm_dim(d)].spatial for d in dims) else "channels"


# -- fully connected layers --------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPlan:
    """``kind``: ``plain``, ``head`` (a Flatten + fully connected over a C x k... map: a
    dilated convolution of kernel ``kernel`` whose positions become extra dims), ``per_position``
    (after global pooling or a head: the layer at each extra position), ``channels`` (over a
    channels-last map: positions untouched)."""

    kind: str
    kernel: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    out_dims: tuple[Dim, ...] = ()  # base dims of a head's output, then its extras
    n_extra: int = 0
    record: Record | None = None
    fields: tuple[Field, ...] = ()


def linear(x: Layout, in_features: int, fields: Sequence[Field] = ()) -> LinearPlan:
    """A fully connected layer (``Linear``, ``Gemm``, ``MatMul`` by a weight) on ``x``."""
    if x.is_plain:
        return LinearPlan("plain")
    if x.fold:
        folded = x.fold_dims
        if x.base_ndim != 2 or folded[0].spatial or any(not d.spatial for d in folded[1:]):
            refuse("a fully connected layer over a flatten that is not (N, C, spatial...) in "
                   "channels-first order")
        space = folded[1:]
        kernel = tuple(x.fold_shape)
        steps = tuple(d.step for d in space)
        out_fields = tuple(f.through(Window(k)) for f, k in zip(fields, kernel)) \
            if fields else ()
        record = Record(HEAD_KIND, {"in_features": in_features},
                        {"kernel": kernel, "dilation": steps}, steps, steps,
                        tuple(f.size for f in out_fields),
                        "Flatten + fully connected as a dilated convolution", in_features)
        extras = tuple(Dim("space", d.axis, d.step) for d in space)
        return LinearPlan("head", kernel, steps, (PLAIN, PLAIN) + extras, len(extras), record,
                          out_fields)
    if x.base_dims[-1].spatial:
        refuse("a fully connected layer over a spatial dim mixes positions")
    if x.n_extra:
        if x.has_space:
            refuse("a fully connected layer on a map with extra dims")
        return LinearPlan("per_position")
    return LinearPlan("channels")
