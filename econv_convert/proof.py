"""Every phase of every node: the backend-neutral half of the per-node proof.

Each node is checked on its own, on a small random map: for a baseline node whose value
carries a map, its dense counterpart (the dense graph's nodes between the dense values of
the node's map inputs and of its output) runs on random dense inputs with the node's
channels, at the smallest size that holds every phase of the node's lattice step and its
window's reach (:func:`small_sizes`), with the node's real weights; the baseline's own op
runs on the stacked phase sub-maps of those inputs. :func:`check_node` checks identity (*)
of :mod:`econv_convert.core.lattice` for every phase of every axis, in groups of equally
long sub-maps gathered by one strided view each. The model's own values at the example size
are never computed: the proof's cost is that of a few small maps per node.

A backend hands each node over as a :class:`NodeCase` (:func:`prove_cases` draws the inputs
and compares). A node where the identity does not apply as such raises :class:`NotProven`
with the reason (its arguments read sizes off a map, its dense part reads a value other than
its inputs, it flattens positions); the proof lists it, and the end-to-end checks cover it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from econv_convert.core.lattice import lead_margin, phase_count, phase_start
from econv_convert.errors import describe

# ``apply(subs, count)``: the baseline op on ``count`` stacked sub-maps per map input (in the
# order of the node's map inputs), stacked the same way
Apply = Callable[[list[torch.Tensor], int], torch.Tensor]
_WINDOW_KINDS = ("conv", "max_pool", "avg_pool")


@dataclass
class NodeProof:
    """One node's comparison: the worst error over all its phases."""

    node: str  # the baseline node's name
    phases: int = 0  # (phase, sub-lattice) pairs compared
    max_abs: float = 0.0
    scale: float = 0.0
    ok: bool = True
    detail: str = ""
    empty: int = 0  # phase groups with no point at this input size (not proven here)


@dataclass
class PhaseProof:
    """What the per-node proof found."""

    nodes: list[NodeProof] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why it is not checked
    note: str = ""  # why there is no proof at all (an old checkpoint, a wrapped model)
    seconds: float = 0.0
    precision: str = ""  # the dtype the nodes ran in (each alone, on small random maps)

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes)

    @property
    def worst(self) -> NodeProof | None:
        bad = [n for n in self.nodes if not n.ok]
        if bad:
            return bad[0]
        return max(self.nodes, key=lambda n: n.max_abs / n.scale if n.scale else n.max_abs,
                   default=None)

    @property
    def phases(self) -> int:
        return sum(n.phases for n in self.nodes)

    @property
    def complete(self) -> bool:
        """Whether every phase of every checked node had points at this input size."""
        return not any(n.empty for n in self.nodes)


class NotProven(Exception):
    """Identity (*) does not apply to this node as such; the message says why."""


@dataclass
class NodeCase:
    """One node as a backend hands it to :func:`prove_cases`.

    ``maps``: its map inputs (name -> entry in the node map); ``shapes``: their baseline
    shapes at the size the proof starts from; ``run_dense(inputs)``: the node's dense part
    on dense inputs (name -> tensor); ``apply``: the baseline op on stacked sub-maps;
    ``record``: the layer's record (its window), if it has one."""

    name: str
    spec: dict[str, Any]
    maps: dict[str, dict[str, Any]]
    shapes: dict[str, Sequence[int]]
    run_dense: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    apply: Apply
    record: dict[str, Any] | None = None


def prove_cases(cases, tol: tuple[float, float], dtype: torch.dtype = torch.float64,
                seed: int = 0, proof: PhaseProof | None = None) -> PhaseProof:
    """Check each of ``cases`` (``(name, make)`` pairs, ``make()`` giving a
    :class:`NodeCase` or raising :class:`NotProven`) on random dense inputs of the sizes
    :func:`small_sizes` gives, drawn in ``dtype`` from ``seed``."""
    proof = proof if proof is not None else PhaseProof()
    proof.precision = str(dtype).removeprefix("torch.")
    gen = torch.Generator().manual_seed(seed)
    for name, make in cases:
        try:
            case = make()
            shapes = small_sizes(case.maps, case.shapes, case.record)
            inputs = {m: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                      for m, shape in shapes.items()}
            y = case.run_dense(inputs)
            proof.nodes.append(check_node(case.name, case.spec, case.maps, inputs, y,
                                          case.apply, case.record, tol))
        except NotProven as e:
            proof.skipped[name] = str(e)
        except Exception as e:  # noqa: BLE001  the proof's own limit, never a verdict
            proof.skipped[name] = f"not evaluated here ({describe(e, 80)})"
    return proof


def small_sizes(maps: dict[str, dict[str, Any]], shapes: dict[str, Sequence[int]],
                record: dict[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """The dense shapes of a node's random inputs: along each axis, every map input's
    baseline size moved by the same number of lattice points, to what the node's window
    needs (:func:`_needed`) for the input with the fewest, keeping the size's remainder by the
    node's stride (so that a ceil-mode window's remainder stays what it was). A window that
    covers its whole map at the example (a fixed 7 x 7 pool) gets a larger map here, so that
    its other phases have points. A dense map at step ``s`` over ``h`` baseline points is
    ``(h - 1) * s + 1`` long (the tight form)."""
    sizes: dict[int, int] = {}  # axis -> the fewest baseline points any input has
    for name, spec in maps.items():
        shape = shapes[name]
        if len(shape) != len(spec["dims"]):
            raise NotProven("its input's rank differs between the baseline and the dense map")
        for d, (kind, _, axis) in enumerate(spec["dims"]):
            if kind == "space":
                sizes[axis] = min(sizes.get(axis, shape[d]), shape[d])
    cut = {}
    for axis, h in sizes.items():
        least, enough, stride = _needed(record, axis)
        target = max(least, min(h, enough))
        cut[axis] = h - (target + (h - target) % stride)
    out = {}
    for name, spec in maps.items():
        dims = []
        for d, (kind, step, axis) in enumerate(spec["dims"]):
            n = shapes[name][d]
            if kind == "space":
                n = max(1, (n - cut[axis] - 1) * step + 1)
            dims.append(int(n))
        out[name] = tuple(dims)
    return out


def _needed(record: dict[str, Any] | None, axis: int) -> tuple[int, int, int]:
    """Along ``axis``: the fewest baseline points a node's input may have (every phase's
    sub-map, one point shorter than the lattice's, still gives each of the stride's
    sub-lattices an output), the points that are enough (a window that reads no padding on
    every phase, and the stride's sub-lattices twice), and the node's stride. A pointwise node
    needs two (the lattice and one point of every other phase). Inputs already smaller than
    enough are not grown past what they have: a node at lattice step ``s`` costs ``s * s``
    times the baseline op on these sizes, and the deepest nodes of a large network have the
    largest steps and the most channels."""
    if record is None or record.get("kind") not in _WINDOW_KINDS:
        return 2, 2, 1
    before = record.get("before", {})

    def at(key, default):
        v = before.get(key, default)
        if isinstance(v, (list, tuple)):
            return v[axis] if axis < len(v) else default
        return v if isinstance(v, (int, float, list, tuple)) else default

    kernel, stride, dilation = int(at("kernel", 1)), max(1, int(at("stride", 1))), \
        int(at("dilation", 1))
    pad = at("padding", 0)  # a number, a (before, after) pair, or words (SAME): none then
    pads = sum(pad) if isinstance(pad, (list, tuple)) else 2 * pad \
        if isinstance(pad, (int, float)) else 0
    extent = dilation * (kernel - 1) + 1
    return max(2, extent - int(pads) + stride), extent + stride, stride


def plain_maps(nodes: dict[str, dict[str, Any]]) -> set[str]:
    """The values of a node map that are maps as the baseline has them: not flattened over
    positions and with no per-phase dims (a head's frontier is drawn at random in the
    baseline's shape, so only these can be one)."""
    return {name for name, spec in nodes.items() if not spec["flat"] and not spec["n_extra"]}


def head_of(order: Sequence[tuple[str, Sequence[str]]], maps: set[str], proven: set[str],
            constants: set[str], output: str,
            plain: set[str] | None = None) -> tuple[list[str], list[str]] | None:
    """The *head* of a baseline graph whose per-node proof left some maps unproven: every node
    downstream of an unproven map (``order``: the nodes with their inputs, in graph order;
    ``maps``: the values that carry a map; ``proven``: the nodes the proof checked), and its
    *frontier*, the values it reads from the rest of the graph. None unless the head makes
    ``output`` and its frontier holds proven maps alone (no image, no size read off a map),
    each among ``plain`` (:func:`plain_maps`, as the baseline has them) where given: then the
    model before the frontier is proven node by node, every phase, and the head is what an
    end-to-end check must still cover."""
    head: list[str] = []
    inside: set[str] = set()
    for name, inputs in order:
        if (name in maps and name not in proven) or any(i in inside for i in inputs):
            head.append(name)
            inside.add(name)
    if output not in inside:
        return None
    frontier: list[str] = []
    for name, inputs in order:
        if name not in inside:
            continue
        for i in inputs:
            if i in inside or i in constants or i in frontier:
                continue
            if i not in maps or i not in proven or (plain is not None and i not in plain):
                return None
            frontier.append(i)
    return (head, frontier) if frontier else None


def map_inputs(inputs: Sequence[str], nodes: dict[str, dict[str, Any]],
               is_tensor: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
    """The node's map inputs (name -> its entry in the node map), or :class:`NotProven`:
    inputs that hold per-phase values or a flatten, no map input, or a non-map input that is
    not a tensor (``is_tensor``): sizes read off the map, which on a phase sub-map of another
    size would make another op."""
    maps: dict[str, dict[str, Any]] = {}
    for name in inputs:
        spec = nodes.get(name)
        if spec is None:
            continue
        if spec["flat"] or spec["n_extra"]:
            raise NotProven("an input holds per-phase values or a flatten over positions")
        maps[name] = spec
    if not maps:
        raise NotProven("no input carries a map (it makes one)")
    if any(name not in maps and not is_tensor(name) for name in inputs):
        raise NotProven("its arguments are computed from the map's size")
    return maps


def check_node(name: str, spec: dict[str, Any], maps: dict[str, dict[str, Any]],
               dense_inputs: dict[str, torch.Tensor], y: torch.Tensor, apply: Apply,
               record: dict[str, Any] | None, tol: tuple[float, float]) -> NodeProof:
    """Identity (*) at one node: ``spec`` is its entry in the node map, ``maps`` its map
    inputs' entries, ``dense_inputs`` and ``y`` the dense values, ``apply`` the baseline op on
    stacked sub-maps, ``record`` the layer's record (its padding), ``tol`` ``(atol, rtol)``.
    Raises :class:`NotProven` where the identity does not apply as such."""
    if spec["flat"]:
        raise NotProven("its value flattens positions")
    steps_in: dict[int, int] = {}
    for arg_spec in maps.values():
        for kind, step, axis in arg_spec["dims"]:
            if kind == "space" and steps_in.setdefault(axis, step) != step:
                raise NotProven("its inputs are on different lattices")
    out_dims = [tuple(d) for d in spec["dims"]]
    base_out = len(out_dims) - spec["n_extra"]
    axes = sorted(steps_in)
    stride: dict[int, int] = {}
    extra_axis: dict[int, str] = {}  # axis -> the kind of its extra dim
    for d, (kind, step, axis) in enumerate(out_dims):
        if d >= base_out:
            if axis not in steps_in or step != steps_in[axis]:
                raise NotProven("its extra dims are not its input's phases")
            extra_axis[axis] = kind
        elif kind == "space":
            if axis not in steps_in or step % steps_in[axis]:
                raise NotProven("its output's lattice is not a multiple of its input's")
            stride[axis] = step // steps_in[axis]
    if "space" in extra_axis.values():
        raise NotProven("a window pool's positions (checked end to end)")
    margins = _margins(record, axes, next(iter(maps.values()))["dims"])
    # per axis, the (phases a, sub-lattice j) groups whose sub-maps have equal sizes: the
    # lattice (a = 0) and the other phases; an axis the output no longer has (a pool over it
    # in lattice mode) is read on its lattice only
    per_axis = []
    for ax in axes:
        s = steps_in[ax]
        if ax in stride:
            per_axis.append([(a, j) for j in range(stride[ax]) for a in _phase_groups(s)])
        elif ax in extra_axis:
            per_axis.append([(a, 0) for a in _phase_groups(s)])
        else:
            per_axis.append([(range(1), 0)])
    proof = NodeProof(name)
    parts: list[tuple[dict, torch.Tensor, torch.Tensor]] = []  # (phases, dense, op)
    for combo in itertools.product(*per_axis):
        phase = dict(zip(axes, combo))
        subs = {m: _gather_in(t, maps[m]["dims"], phase) for m, t in dense_inputs.items()}
        if any(t is None for t in subs.values()):
            proof.empty += 1  # a phase with no point on some axis at this size
            continue
        count = next(iter(subs.values())).shape[0]
        b = apply([subs[m] for m in maps], count)
        got = _gather_out(y, out_dims, base_out, phase, steps_in, stride)
        if got.numel() == 0 and y.numel():
            proof.empty += 1
        proof.phases += count
        region, why = _region(got, b, out_dims, base_out, phase, stride, margins)
        if why:
            proof.ok = False
            proof.detail = f"phases {_phase_text(phase, steps_in)}: {why}"
            return proof
        parts.append((phase, got[region], b[region]))
    if not parts:
        return proof
    got_all = torch.cat([g.flatten() for _, g, _ in parts])
    base_all = torch.cat([b.flatten() for _, _, b in parts])
    proof.scale = float(base_all.abs().nan_to_num(nan=0.0).max()) if base_all.numel() else 0.0
    bad, proof.max_abs = _mismatch(got_all, base_all, proof.scale, tol)
    if bad is not None:
        proof.ok = False
        for phase, got, b in parts:  # which phase, and where
            if bad < got.numel():
                where = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), b.shape))
                # the stacked phases: one group per axis, axes in order (see _gather_in)
                groups = [phase[ax] for ax in sorted(phase)]
                member = torch.unravel_index(torch.tensor(where[0]),
                                             tuple(len(a) for a, _ in groups))
                exact = {ax: (a.start + int(k), j)
                         for ax, (a, j), k in zip(sorted(phase), groups, member)}
                proof.detail = (f"phase {_phase_text(exact, steps_in)} (point {where[1:]}): dense "
                                f"{float(got.flatten()[bad]):.9g} vs the baseline op "
                                f"{float(b.flatten()[bad]):.9g}")
                break
            bad -= got.numel()
    return proof


def _phase_groups(step: int) -> list[range]:
    """The phases of a dense map at ``step`` in groups with equally long sub-maps: the
    lattice, and the others (a tight map has one point fewer on each of them)."""
    return [range(1)] + ([range(1, step)] if step > 1 else [])


def _gather(t: torch.Tensor, dim: int, start: int, count: int, width: int, step: int
            ) -> torch.Tensor:
    """Points ``start + k + step * m`` (``k < width``, ``m < count``) of ``t`` along ``dim``:
    a view with ``k`` as a new leading dim and ``m`` along ``dim + 1``."""
    span = (count - 1) * step + width
    return t.narrow(dim, start, span).unfold(dim, width, step).movedim(-1, 0)


def _count(size: int, first: int, step: int) -> int:
    """Points ``first, first + step, ...`` below ``size``: phase 0 of the map from ``first``."""
    return max(0, phase_count(size - first, step, 0))


def _axis_dims(dims, base_out: int | None = None) -> dict[int, int]:
    """Axis -> the dense dim that holds it (a space dim; with ``base_out``, also an extra
    dim past it)."""
    found = {}
    for d, (kind, _, axis) in enumerate(dims):
        if kind == "space" or (base_out is not None and d >= base_out):
            found.setdefault(axis, d)
    return found


def _gather_in(t: torch.Tensor, dims, phase) -> torch.Tensor | None:
    """The sub-maps op(*) reads for the phase groups ``phase``, stacked along one leading
    dim (axes in order; None when a group has no point, or its members' sub-maps differ in
    size)."""
    where = _axis_dims(dims)
    lead = 0
    for axis in sorted(phase):
        a, j = phase[axis]
        d = where.get(axis)
        if d is None:
            return None
        step = dims[d][1]
        size = t.shape[d + lead]
        counts = {_count(size, phase_start(k, j, step), step) for k in a}
        if len(counts) != 1 or 0 in counts:
            return None
        t = _gather(t, d + lead, phase_start(a.start, j, step), counts.pop(), len(a), step)
        lead += 1
    return t.flatten(0, lead - 1) if lead > 1 else t if lead else t.unsqueeze(0)


def _gather_out(y: torch.Tensor, dims, base_out: int, phase, steps_in, stride) -> torch.Tensor:
    """The dense output's points of the phase groups ``phase``, stacked as
    :func:`_gather_in` stacks the sub-maps: a phase extra dim is read at the phase; an axis
    the output lacks (pooled on its lattice) is its lattice only."""
    where = _axis_dims(dims, base_out)
    at = list(range(y.dim()))  # the original dim at each current position
    for axis in sorted(phase):
        a, j = phase[axis]
        d = where.get(axis)
        if d is None:
            y = y.unsqueeze(0)
        elif d >= base_out:
            i = at.index(d)
            y = y.narrow(i, a.start, len(a)).movedim(i, 0)
            at.remove(d)
        else:
            i = at.index(d)
            s, every = steps_in[axis], steps_in[axis] * stride[axis]
            count = min(_count(y.shape[i], phase_start(k, j, s), every) for k in a)
            if count == 0:
                y = y.narrow(i, 0, 0).unsqueeze(0).expand(len(a), *([-1] * y.dim()))
            else:
                y = _gather(y, i, phase_start(a.start, j, s), count, len(a), every)
        at.insert(0, -1)
    lead = len(phase)
    return y.flatten(0, lead - 1) if lead > 1 else y if lead else y.unsqueeze(0)


def _region(got: torch.Tensor, b: torch.Tensor, dims, base_out: int, phase, stride,
            margins) -> tuple[tuple[slice, ...], str]:
    """The points where (*) holds for the phase groups ``phase`` (leading dim: the phases),
    or why the two sides cannot be compared."""
    if got.dim() != b.dim():
        return (), f"dense gives rank {got.dim() - 1}, the baseline op {b.dim() - 1}"
    lattice = all(a.start == 0 and j == 0 for a, j in phase.values())
    region = [slice(None)]
    for d in range(1, b.dim()):
        kind, _, axis = dims[d - 1]
        n_d, n_b = got.shape[d], b.shape[d]
        if kind != "space" or d - 1 >= base_out:
            if n_d != n_b:
                return (), f"dim {d - 1}: dense {n_d}, the baseline op {n_b}"
            region.append(slice(None))
            continue
        if n_d > n_b or (lattice and n_d != n_b):
            return (), (f"dim {d - 1}: dense has {n_d} points, the baseline op on the sub-map "
                        f"{n_b}")
        a, j = phase[axis]
        lo, hi, constant = margins.get(axis, (0, 0, True))
        start, stop = lead_margin(lo, stride[axis], j), n_d
        if not constant and a.start > 0:
            start, stop = max(start, lo), min(stop, n_b - hi)
        region.append(slice(start, max(start, stop)))
    return tuple(region), ""


def _mismatch(got: torch.Tensor, base: torch.Tensor, scale: float,
              tol: tuple[float, float]) -> tuple[int | None, float]:
    """The first point outside the tolerance (None if there is none), and the largest
    difference (NaN on one side only counts as infinite)."""
    atol, rtol = tol
    diff = (got - base).abs_()
    if bool(torch.isnan(diff).any()):
        lone = torch.isnan(got) != torch.isnan(base)
        diff = torch.where(lone, torch.full_like(diff, math.inf), diff.nan_to_num_(nan=0.0))
        base = base.nan_to_num(nan=0.0)
    # |d - b| <= atol * scale + rtol * |b|
    excess = diff - base.abs().mul_(rtol)
    worst = float(diff.max()) if diff.numel() else 0.0
    if not diff.numel() or float(excess.max()) <= atol * max(scale, 1e-300):
        return None, worst
    return int(torch.argmax((excess > atol * max(scale, 1e-300)).to(torch.uint8))), worst


def _phase_text(phase: dict[int, tuple[Any, int]], steps: dict[int, int]) -> str:
    """The output phases ``a + s * j`` per axis (a range where ``a`` is a group)."""
    def one(a, j, s):
        if isinstance(a, int):
            return str(a + s * j)
        lo, hi = a.start + s * j, a.stop - 1 + s * j
        return str(lo) if lo == hi else f"{lo}..{hi}"
    return "(" + ", ".join(one(a, j, steps[ax]) for ax, (a, j) in sorted(phase.items())) + ")"


def _margins(record: dict[str, Any] | None, axes: Sequence[int],
             in_dims: Sequence[Sequence]) -> dict[int, tuple[int, int, bool]]:
    """Per axis: (leading pad, trailing pad, whether the padding is a constant), from the
    layer's record; ``in_dims`` says which axis each input dim holds."""
    if record is None:
        return {}
    before = record.get("before", {})
    if record["kind"] in _WINDOW_KINDS:
        pad = before.get("padding", 0)
        if isinstance(pad, str):
            raise NotProven("padding computed from the input size")
        pads = pad if isinstance(pad, (list, tuple)) else [pad] * len(axes)
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p, p) for p in pads]
        return {ax: (lo, hi, True) for ax, (lo, hi) in zip(axes, pairs)}
    if record["kind"] == "pad" and before.get("mode", "constant") != "constant":
        amounts, dims = before.get("pad"), before.get("dims")
        if not isinstance(amounts, (list, tuple)) or dims is None:
            raise NotProven("reflect or replicate padding computed from the input size, or "
                            "recorded without its dims (an older file)")
        found = {}
        for k, d in enumerate(dims):  # (lo, hi) pairs in the order of the padded dims
            kind, _, axis = in_dims[d]
            if kind == "space":
                found[axis] = (amounts[2 * k], amounts[2 * k + 1], False)
        return found
    return {}
