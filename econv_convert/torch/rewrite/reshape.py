"""Indexing and reshaping: getitem and slices, view/reshape/flatten, permute, (un)squeeze,
cat/split, slice_scatter, padding.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.torch import ops
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, rule


@rule(operator.getitem)
def _getitem(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    idx = node.args[1]
    if x.sizes is not None:
        if isinstance(idx, int):
            return Val(rw.same(node), spatial=x.sizes[idx].spatial)
        if isinstance(idx, slice):
            return Val(rw.same(node), sizes=x.sizes[idx])
        rules.refuse_kind("size_index")
    if x.items is not None:
        if not isinstance(idx, int):
            rules.refuse_kind("list_slice")
        item = x.items[idx]
        return Val(rw.same(node), item.layout, spatial=item.spatial)
    if x.layout is None:
        return Val(rw.same(node), spatial=x.spatial or rw.v(idx).spatial)
    return _slice(rw, node, x, idx)


def _slice(rw: Rewriter, node: fx.Node, x: Val, idx) -> Val:
    lay = x.layout
    if lay.is_plain:
        return rw.wrap(node, rw.same(node))
    if lay.fold:
        rules.refuse_kind("flatten_positions", what="indexing")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node) for i in items) or any(
            isinstance(i, slice) and isinstance(i.step, fx.Node) for i in items):
        rules.refuse_kind("computed_index")
    # computed slice bounds (from sizes, which read as the baseline's) are used as they are
    items = [slice(*(rw.v(v).node if isinstance(v, fx.Node) else v
                     for v in (i.start, i.stop, i.step))) if isinstance(i, slice) else i
             for i in items]
    if sum(i is Ellipsis for i in items) > 1:
        rules.refuse_kind("two_ellipses")
    if Ellipsis in items:
        e = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:e] + [slice(None)] * (lay.base_ndim - used) + items[e + 1:]
    dense_index: list[Any] = []
    out_dims: list[Dim] = []
    d = 0
    cur = x.node
    spatial_slices = []
    for it in items:
        if it is None:
            dense_index.append(None)
            out_dims.append(PLAIN)
            continue
        dim = lay.base_dims[d]
        if dim.spatial:
            if isinstance(it, int):
                rules.refuse_kind("single_position")
            if not isinstance(it, slice):
                rules.refuse_kind("advanced_index_space")
            if it != slice(None):
                spatial_slices.append((d, it))
            dense_index.append(slice(None))
            out_dims.append(rules.spatial_slice(dim, it.step or 1))
        else:
            if not isinstance(it, (int, slice)):
                rules.refuse_kind("advanced_index")
            dense_index.append(it)
            if isinstance(it, slice):
                out_dims.append(dim)
        d += 1
    out_dims += list(lay.base_dims[d:])
    if any(i != slice(None) for i in dense_index if i is not None) or None in dense_index:
        cur = rw.graph.call_function(
            operator.getitem, (cur, tuple(dense_index) + (Ellipsis,) * bool(lay.n_extra)))
    # spatial slices, applied on the dense dims where they now sit
    fields = list(rw.field_of(node.args[0]))
    for d_base, sl in spatial_slices:
        pos = _dense_pos(items, d_base)
        step = lay.base_dims[d_base].step
        cur = rw.call(ops.spatial_slice, cur, pos, sl.start, sl.stop, sl.step or 1, step)
        axis = lay.base_dims[d_base].axis
        if axis < len(fields):
            fields[axis] = fields[axis].sliced(sl.start or 0, sl.step or 1)
    if fields:
        rw.fields[node] = tuple(fields)
    rw.rewritten.has_padding = True
    return Val(cur, Layout(tuple(rw.base(node).shape), tuple(out_dims) + lay.extras,
                           lay.n_extra))


def _dense_pos(items, d_base: int) -> int:
    """Position in the result of baseline dim ``d_base`` after an index with None/int items."""
    pos = 0
    d = 0
    for it in items:
        if it is None:
            pos += 1
            continue
        if d == d_base:
            return pos
        if isinstance(it, slice):
            pos += 1
        d += 1
    return pos + (d_base - d)


@rule(torch.flatten, "flatten", "view", "reshape", torch.reshape)
def _reshape(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    base_out = tuple(rw.base(node).shape)
    plan = rules.reshape(x.layout, tuple(rw.base(node.args[0]).shape), base_out)
    if plan.kind == "same":
        return Val(x.node, x.layout)
    if plan.kind == "plain":
        return rw.wrap(node, rw.same(node))
    if plan.kind in ("merge", "fold"):
        return Val(x.node, plan.layout)
    if plan.kind == "unfold":
        steps = {d: x.layout.base_dims[d].step for d in plan.blocks}
        n = rw.call(ops.unfold_blocks, x.node, tuple(plan.blocks.items()),
                    tuple(steps[d] for d in plan.blocks))
        rw.rewritten.has_padding = True  # its baseline needs whole blocks: the far border differs
        return Val(n, plan.layout)
    n = rw.call(ops.reshape, x.node, _shape_args(rw, node), list(plan.from_dims),
                x.layout.n_extra)
    return Val(n, plan.layout)


def _shape_args(rw: Rewriter, node: fx.Node) -> Any:
    """The baseline's target shape, with each entry as a dense node or constant."""
    base_out = tuple(rw.base(node).shape)
    if node.target in (torch.flatten, "flatten"):
        # keep the batch dynamic: -1 for the first entry, the others as traced
        return [-1] + list(base_out[1:])
    shape = list(node.args[1:]) if node.target != torch.reshape else [node.args[1]]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = list(shape[0])
    if "shape" in node.kwargs or "size" in node.kwargs:
        shape = list(node.kwargs.get("shape", node.kwargs.get("size")))
    if len(shape) == 1 and isinstance(shape[0], fx.Node) and rw.v(shape[0]).sizes is not None:
        # a shape taken from a tensor (x.reshape(y.shape[:2])): its spatial entries, if any,
        # are replaced by the dense sizes like those of a shape written out
        return rw.v(shape[0]).node
    return [rw.v(s).node for s in shape]


@rule("permute", torch.permute, "transpose", torch.transpose, "t")
def _permute(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    nb = lay.base_ndim
    if node.target in ("transpose", torch.transpose):
        a, b = lay.norm_dim(_arg(node, 1, "dim0")), lay.norm_dim(_arg(node, 2, "dim1"))
        perm = list(range(nb))
        perm[a], perm[b] = perm[b], perm[a]
    elif node.target == "t":
        perm = list(reversed(range(nb)))
    else:
        perm = node.args[1:] if node.target == "permute" else node.args[1]
        if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
            perm = perm[0]
        perm = [lay.norm_dim(p) for p in perm]
    dims = rules.permute(lay, perm)
    n = rw.call(torch.permute, x.node, list(perm) + list(range(nb, nb + lay.n_extra)))
    return rw.result(node, n, dims, like=lay)


@rule("unsqueeze", torch.unsqueeze)
def _unsqueeze(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    d = _arg(node, 1, "dim") % (lay.base_ndim + 1)
    dims = rules.unsqueeze(lay, [d])
    return rw.result(node, rw.call(torch.unsqueeze, x.node, d), dims, like=lay)


@rule("squeeze", torch.squeeze)
def _squeeze(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    d = _arg(node, 1, "dim")
    if d is None:
        ds = [i for i, n in enumerate(lay.base) if n == 1]
    else:
        ds = [lay.norm_dim(i) for i in (d if isinstance(d, (list, tuple)) else [d])]
        ds = [i for i in ds if lay.base[i] == 1]
    dims = rules.squeeze(lay, ds)
    n = rw.call(torch.squeeze, x.node, tuple(ds)) if ds else x.node
    return rw.result(node, n, dims, like=lay)


@rule(torch.slice_scatter)
def _slice_scatter(rw: Rewriter, node: fx.Node) -> Val:
    """``out = x; out[..., a:b] = src`` along a dim that is not spatial (what torch.export
    makes of an in-place change of a channel slice): every position as in the baseline. Along
    a spatial dim only over the whole axis (the result is ``src``)."""
    x, src = rw.v(node.args[0]), rw.v(_arg(node, 1, "src"))
    lay = x.layout
    d = lay.norm_dim(_arg(node, 2, "dim", 0))
    if lay.base_dims[d].spatial:
        # a write over the whole spatial axis (what torch.export makes of ``y = x[:, :c, :,
        # :]; y += s``: one write per dim of the view, the spatial ones full range) leaves
        # nothing of ``x``: the result is ``src``
        start, end = _arg(node, 3, "start"), _arg(node, 4, "end")
        whole = (start in (None, 0) and _arg(node, 5, "step", 1) == 1
                 and (end is None or (isinstance(end, int) and end >= lay.base[d])))
        if not whole:
            rules.refuse_kind("write_positions")
        if src.layout is None or src.layout.dims != lay.dims or src.layout.base != lay.base:
            rules.refuse_kind("write_other_lattice")
        return Val(src.node, src.layout)
    if src.layout is None or [dd for i, dd in enumerate(src.layout.dims) if i != d] != \
            [dd for i, dd in enumerate(lay.dims) if i != d]:
        rules.refuse_kind("write_other_lattice")
    return Val(rw.same(node), lay)


@rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(rw: Rewriter, node: fx.Node) -> Val:
    parts = [rw.v(p) for p in node.args[0]]
    dim = _arg(node, 1, "dim", 0)
    if any(p.layout is None for p in parts):
        rules.refuse_kind("concat_non_tensor")
    stack = node.target is torch.stack
    first = parts[0].layout
    d = dim % (first.base_ndim + (1 if stack else 0))
    out = rules.concat([p.layout for p in parts], d, stack)
    n = rw.call(node.target, [p.node for p in parts], d)
    return rw.result(node, n, out.base_dims, like=first)


@rule("chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind, "tensor_split")
def _split(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = _arg(node, 1 if name == "unbind" else 2, "dim", 0)
    if lay.fold:
        rules.refuse_kind("flatten_positions", what="a split of")
    d = lay.norm_dim(dim)
    rules.split(lay, d, name)
    args = list(rw.dense_args(node.args))
    kwargs = dict(rw.dense_args(node.kwargs))
    if name == "unbind":
        args = args[:1] + [d]
        kwargs.pop("dim", None)
    elif len(args) > 2:
        args[2] = d
    else:
        kwargs["dim"] = d
    n = rw.call(getattr(torch, name), *args, **kwargs)
    dims = [dd for i, dd in enumerate(lay.base_dims) if not (name == "unbind" and i == d)]
    items = tuple(Val(None, Layout(tuple(b.shape), tuple(dims) + lay.extras, lay.n_extra))
                  for b in rw.base(node))
    return Val(n, items=items)


@rule(F.pad, torch._C._nn.pad)
def _pad(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    amounts = list(_arg(node, 1, "pad"))
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", None)
    if lay.is_plain:
        return rw.wrap(node, rw.same(node))
    nb = lay.base_ndim
    dims = [nb - 1 - j for j in range(len(amounts) // 2)]  # F.pad: last dim first
    computed = any(isinstance(p, fx.Node) for p in amounts)
    plan = rules.pad(lay, dims, mode, [] if computed else amounts,
                     tuple(f.size for f in rw.field_of(node.args[0])))
    if computed:
        # padding computed from sizes in forward() (TensorFlow's "same" done by hand): the
        # amounts are computed when the dense model runs, from the baseline's sizes, as the
        # baseline computes them, and scaled by the step of each axis
        n = rw.call(ops.pad, x.node, [rw.v(p).node for p in amounts],
                    [s for s in plan.scales for _ in range(2)], mode, value)
        rw.rewritten.has_padding = True
    else:
        kwargs = {"mode": mode} | ({"value": value} if value is not None else {})
        n = rw.call(F.pad, x.node, [a * s for a, s in zip(amounts, _pairs(plan.scales))],
                    **kwargs)
        rw.rewritten.has_padding |= any(p > 0 for p in amounts)
    rw.record(n, plan.record)
    fields = list(rw.field_of(node.args[0]))
    for k, d in enumerate(dims):
        dim = lay.base_dims[d]
        if dim.kind == "space" and dim.axis < len(fields):
            fields[dim.axis] = fields[dim.axis].padded(amounts[2 * k], amounts[2 * k + 1])
    rw.fields[node] = tuple(fields)
    return rw.result(node, n, lay.base_dims)


def _pairs(scales: Sequence[int]) -> list[int]:
    return [s for s in scales for _ in range(2)]
