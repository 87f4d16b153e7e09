"""Every phase of every node: the per-node half of verification.

The baseline graph and the dense graph run once on the same input (float64, the real
weights). At every baseline node whose value carries a map, the baseline's own op is applied
to the phase sub-maps of the dense inputs, and must give the dense output on the matching
sub-lattice: identity (*) of :mod:`econv_convert.core.lattice`, for every phase of every axis.
Non-map arguments (weights, sizes computed by the model) are the baseline run's values.

An error anywhere in a dense graph, on the lattice or between it, shows up at the first node
whose output it reaches. A node is left out only where the identity does not apply as such
(a flatten over positions, per-phase values broadcast back onto a map, inputs on different
lattices); the proof lists those nodes and why, and the end-to-end checks cover them.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.core.lattice import lead_margin, phase_start
from econv_convert.core.records import info
from econv_convert.errors import EConvError, describe

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


def prove(baseline: fx.GraphModule, dense: fx.GraphModule, nodes: dict[str, dict[str, Any]],
          records: Sequence[dict[str, Any]], x: torch.Tensor,
          tol: tuple[float, float]) -> PhaseProof:
    """Run both graphs on ``x`` and check identity (*) at every node of ``nodes`` (the
    dense model's node map, :attr:`DenseInfo.nodes`); ``records`` give the layers' geometry
    (their padding decides where (*) holds for the phases ``j > 0``). ``tol`` is
    ``(atol, rtol)``: ``|dense - op| <= atol * scale + rtol * |op|``, ``scale`` the node's
    largest ``|op|``."""
    proof = PhaseProof()
    if not nodes:
        proof.note = "the dense model records no node map (written by an older version)"
        return proof
    by_name = {n.name: n for n in baseline.graph.nodes}
    dense_nodes = {n.name: n for n in dense.graph.nodes}
    missing = [k for k, v in nodes.items() if k not in by_name or v["dense"] not in dense_nodes]
    if missing:
        proof.note = (f"the dense graph does not hold the nodes its record names ({missing[0]}"
                      "): not the graph econv-convert made")
        return proof
    try:
        base_env = _run(baseline, x)
    except Exception as e:  # noqa: BLE001  a graph the proof cannot run: say so, no verdict
        proof.note = f"the baseline graph does not run node by node ({describe(e, 100)})"
        return proof
    geometry = {r.get("fx_name"): r for r in records}
    # each baseline node is checked when its dense node has run; the dense values its check
    # reads are kept until then
    due: dict[str, list[fx.Node]] = defaultdict(list)
    wanted: dict[str, str] = {}  # dense node -> the last dense node whose check reads it
    order = {n.name: i for i, n in enumerate(dense.graph.nodes)}
    for node in baseline.graph.nodes:
        spec = nodes.get(node.name)
        if spec is None or node.op not in ("call_function", "call_method"):
            continue
        due[spec["dense"]].append(node)
        for arg in node.all_input_nodes:
            arg_spec = nodes.get(arg.name)
            if arg_spec is not None:
                name = arg_spec["dense"]
                if order[spec["dense"]] > order.get(wanted.get(name, name), -1):
                    wanted[name] = spec["dense"]
    def check(dense_node: fx.Node, env: dict[str, Any]) -> None:
        for node in due.get(dense_node.name, ()):
            try:
                result = _check_node(node, nodes, base_env, env, geometry.get(node.name), tol)
            except _Skip as e:
                proof.skipped[node.name] = str(e)
            except Exception as e:  # noqa: BLE001  the proof's own limit, never a verdict
                proof.skipped[node.name] = f"not evaluated here ({describe(e, 80)})"
            else:
                proof.nodes.append(result)

    try:
        _run(dense, x, after=check, keep=wanted)
    except Exception as e:  # noqa: BLE001  likewise
        proof.note = f"the dense graph does not run node by node ({describe(e, 100)})"
    return proof


def prove_model(dense: nn.Module, x: torch.Tensor, tol: tuple[float, float]) -> PhaseProof:
    """:func:`prove` for a dense model as it is given (its ``econv`` record names the nodes;
    its baseline graph is rebuilt by ``inverse``), in ``x``'s dtype and device, on the first
    sample of ``x`` (every phase of a batch of one is every phase)."""
    from econv_convert.torch.api import inverse  # the API builds on this module's checks

    if not isinstance(dense, fx.GraphModule):
        return PhaseProof(note="the dense model is not the graph econv-convert made (a "
                          "wrapper?): checked end to end only")
    meta = info(dense)
    try:
        baseline = inverse(dense).to(x.device, x.dtype)
    except EConvError as e:
        return PhaseProof(note=f"its baseline graph cannot be rebuilt ({e})")
    with torch.no_grad():
        return prove(baseline, dense, meta.nodes, meta.records, x[:1], tol)


class _Skip(Exception):
    """Identity (*) does not apply to this node as such; the message says why."""


def _run(gm: fx.GraphModule, x: torch.Tensor, after=None,
         keep: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``gm`` on ``x`` node by node. Without ``after``, every value is kept and returned
    by name; with it, ``after(node, env)`` is called after each node and values are dropped
    after their last use (or the last check that reads them, ``keep``)."""
    env: dict[str, Any] = {}
    nodes = list(gm.graph.nodes)
    last: dict[str, int] = {}
    if after is not None:
        index = {n.name: i for i, n in enumerate(nodes)}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a.name] = max(last.get(a.name, 0), i)
        for name, reader in (keep or {}).items():
            last[name] = max(last.get(name, index[name]), index[reader])
    dying: dict[int, list[str]] = defaultdict(list)
    for name, i in last.items():
        dying[i].append(name)
    placeholders = 0
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            value = x if not placeholders else None
            placeholders += 1
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "get_attr":
                value = gm
                for part in node.target.split("."):
                    value = getattr(value, part)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = gm.get_submodule(node.target)(*args, **kwargs)
        env[node.name] = value
        if after is not None:
            after(node, env)
            for name in dying.get(i, ()):
                env.pop(name, None)
    return env


def _check_node(node: fx.Node, nodes: dict[str, dict[str, Any]], base_env: dict[str, Any],
                dense_env: dict[str, Any], record: dict[str, Any] | None,
                tol: tuple[float, float]) -> NodeProof:
    spec = nodes[node.name]
    if spec["flat"]:
        raise _Skip("its value flattens positions")
    maps: dict[str, dict[str, Any]] = {}  # the map arguments by baseline name
    for arg in node.all_input_nodes:
        arg_spec = nodes.get(arg.name)
        if arg_spec is None:
            continue
        if arg_spec["flat"] or arg_spec["n_extra"]:
            raise _Skip("an input holds per-phase values or a flatten over positions")
        maps[arg.name] = arg_spec
    if not maps:
        raise _Skip("no input carries a map (it makes one)")
    if any(arg.name not in maps and not isinstance(base_env.get(arg.name), torch.Tensor)
           for arg in node.all_input_nodes):
        # a view to sizes read off the map, padding computed from them: on a phase sub-map of
        # another size the same numbers make another op
        raise _Skip("its arguments are computed from the map's size")
    steps_in: dict[int, int] = {}
    for arg_spec in maps.values():
        for kind, step, axis in arg_spec["dims"]:
            if kind == "space" and steps_in.setdefault(axis, step) != step:
                raise _Skip("its inputs are on different lattices")
    out_dims = [tuple(d) for d in spec["dims"]]
    base_out = len(out_dims) - spec["n_extra"]
    axes = sorted(steps_in)
    stride: dict[int, int] = {}
    extra_axis: dict[int, str] = {}  # axis -> the kind of its extra dim
    for d, (kind, step, axis) in enumerate(out_dims):
        if d >= base_out:
            if axis not in steps_in or step != steps_in[axis]:
                raise _Skip("its extra dims are not its input's phases")
            extra_axis[axis] = kind
        elif kind == "space":
            if axis not in steps_in or step % steps_in[axis]:
                raise _Skip("its output's lattice is not a multiple of its input's")
            stride[axis] = step // steps_in[axis]
    if "space" in extra_axis.values():
        raise _Skip("a window pool's positions (checked end to end)")
    margins = _margins(record, axes)
    op = _specialized_op(node, record, len(axes)) or _baseline_op(node, base_env, list(maps))
    dense_inputs = {name: dense_env[s["dense"]] for name, s in maps.items()}
    y = dense_env[spec["dense"]]
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
    proof = NodeProof(node.name)
    parts: list[tuple[dict, torch.Tensor, torch.Tensor]] = []  # (phases, dense, op)
    for combo in itertools.product(*per_axis):
        phase = dict(zip(axes, combo))
        subs = {name: _gather_in(t, maps[name]["dims"], phase) for name, t in dense_inputs.items()}
        if any(t is None for t in subs.values()):
            proof.empty += 1  # a phase with no point on some axis at this size
            continue
        count = next(iter(subs.values())).shape[0]
        b = _apply(op, [subs[name] for name in maps], count)
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
    """Points ``first, first + step, ...`` below ``size``."""
    return max(0, (size - 1 - first) // step + 1) if first < size else 0


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


def _margins(record: dict[str, Any] | None,
             axes: Sequence[int]) -> dict[int, tuple[int, int, bool]]:
    """Per axis: (leading pad, trailing pad, whether the padding is a constant)."""
    if record is None:
        return {}
    before = record.get("before", {})
    if record["kind"] in _WINDOW_KINDS:
        pad = before.get("padding", 0)
        if isinstance(pad, str):
            raise _Skip("padding computed from the input size")
        pads = pad if isinstance(pad, (list, tuple)) else [pad] * len(axes)
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p, p) for p in pads]
        return {ax: (lo, hi, True) for ax, (lo, hi) in zip(axes, pairs)}
    if record["kind"] == "pad" and before.get("mode", "constant") != "constant":
        amounts = before.get("pad")
        if not isinstance(amounts, (list, tuple)):
            raise _Skip("reflect or replicate padding computed from the input size")
        pairs = [(amounts[2 * k], amounts[2 * k + 1]) for k in range(len(amounts) // 2)]
        pairs = list(reversed(pairs))  # F.pad lists the last dim first
        pairs = [(0, 0)] * (len(axes) - len(pairs)) + pairs
        return {ax: (lo, hi, False) for ax, (lo, hi) in zip(axes, pairs[-len(axes):])}
    return {}


_POOLS = {"avg_pool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
          "max_pool": (F.max_pool1d, F.max_pool2d, F.max_pool3d)}


def _specialized_op(node: fx.Node, record: dict[str, Any] | None, nd: int):
    """An adaptive pool densified as what it is at the example size: the plain pool of that
    window, or the identity where it keeps the map's size (on a sub-map of another size the
    adaptive op would pick another window)."""
    name = getattr(node.target, "__name__", str(node.target))
    if "adaptive" not in name:
        return None
    if record is None:
        return lambda x: x
    if record["kind"] not in _POOLS:
        return None
    kernel = tuple(record["before"]["kernel"])
    stride = tuple(record["before"]["stride"])
    pool = _POOLS[record["kind"]][nd - 1]
    return lambda x: pool(x, kernel, stride)


def _baseline_op(node: fx.Node, env: dict[str, Any], maps: list[str]):
    """The baseline node as a function of its map arguments (in the order of ``maps``)."""

    def op(*values: torch.Tensor):
        given = dict(zip(maps, values))
        args = fx.node.map_arg(node.args, lambda n: given.get(n.name, env.get(n.name)))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: given.get(n.name, env.get(n.name)))
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    return op


def _apply(op, subs: list[torch.Tensor], count: int) -> torch.Tensor:
    """``op`` on each of ``count`` stacked sub-maps (leading dim): vectorized where the op
    allows (``torch.vmap``), one call each otherwise."""
    if count > 1:
        try:
            out = torch.vmap(op)(*subs)
            if isinstance(out, torch.Tensor):
                return out
        except Exception:  # noqa: BLE001  an op vmap cannot batch: call it per sub-map
            pass
    outs = []
    for k in range(count):
        try:
            out = op(*(t[k] for t in subs))
        except Exception as e:  # noqa: BLE001  the op rejects this sub-map: say which
            raise _Skip(f"the baseline op rejects a phase sub-map ({describe(e, 80)})") from e
        if not isinstance(out, torch.Tensor):
            raise _Skip("the op does not return one tensor")
        outs.append(out)
    return torch.stack(outs)
