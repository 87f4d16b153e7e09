"""Global pooling and reductions over space: GlobalAverage/MaxPool and Reduce* in the five
--global-pool modes, and reductions over merged or channel dims.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto

from econv_convert.core import rules
from econv_convert.core.lattice import phase_blocks, phase_count
from econv_convert.core.layout import PLAIN, Layout
from econv_convert.onnx.graph import SymInt
from econv_convert.onnx.rewrite.frame import (
    _BIG,
    OnnxRewriter,
    Val,
    _norm,
    _per_extra,
    attrs,
    hook,
    rule,
)
from econv_convert.onnx.rewrite.pointwise import _SCALAR_PARAMS, UNARY

_REDUCE = {"ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceSum": "sum",
           "GlobalAveragePool": "mean", "GlobalMaxPool": "max"}
_REDUCE_OPS = {"mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin", "sum": "ReduceSum"}


# -- global pooling ------------------------------------------------------------------------


def _global(rw: OnnxRewriter, node: onnx.NodeProto, x: str, axes: Sequence[int], reduce: str,
            keepdims: bool) -> None:
    """Reduction over whole spatial axes: global pooling in the chosen mode."""
    plan = rules.global_pool(rw.lay(x), axes, reduce, rw.mode, keepdims,
                             rw.field_of(x))
    _emit_global(rw, x, plan, node.output[0], rw.base_shape(node.output[0]))


def _emit_global(rw: OnnxRewriter, x: str, plan: rules.GlobalPlan, out: str,
                 base_shape: Sequence[int]) -> None:
    lay = rw.lay(x)
    b = rw.b
    space, steps = list(plan.space), list(plan.steps)
    axes = sorted(plan.space + plan.others)
    op = _REDUCE_OPS[plan.reduce]
    rank = len(lay.dims)
    if plan.mode in ("lattice", "dense"):
        src = x
        if plan.mode == "lattice" and any(s > 1 for s in steps):
            src = b.slice(x, space, [0] * len(space), [_BIG] * len(space), steps)
        b.reduce(op, src, axes, plan.keepdim, out)
    elif plan.mode == "window":
        # per pooled axis, the window's m taps (s apart) as m slices of the map, combined
        # element-wise (a separable reduction); an input smaller than the window gives empty
        # slices, which the checks report as an empty output
        y = x
        combine = {"mean": "Sum", "sum": "Sum", "max": "Max", "min": "Min"}[plan.reduce]
        for d, s, m in zip(space, steps, plan.extent):
            taps = [b.slice(y, [d], [k * s], [-(m - 1 - k) * s if k < m - 1 else _BIG])
                    for k in range(m)]
            y = b.op1(combine, taps) if m > 1 else taps[0]
            if plan.reduce == "mean" and m > 1:
                y = b.op1("Mul", [y, rw.fill(x, 1.0 / m)])
        # the positions go to the end; the pooled dims stay with size 1; the other reduced
        # dims are reduced as the baseline does, and the pooled ones squeezed (not reduced
        # again: a pass over the whole output)
        k = len(space)
        y = b.unsqueeze(y, list(range(rank, rank + k)))
        perm = list(range(rank + k))
        for j, d in enumerate(space):
            perm[d], perm[rank + j] = perm[rank + j], perm[d]
        y = b.transpose(y, perm)
        if plan.keepdim:
            if plan.others:
                b.reduce(op, y, sorted(plan.others), True, out)
            else:
                b.op1("Identity", [y], out)
        else:
            if plan.others:
                y = b.reduce(op, y, sorted(plan.others), True)
            b.squeeze(y, axes, out)
        rw.fields[out] = plan.fields
    else:
        fill = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}[plan.reduce]
        # pad each pooled axis to a multiple of its step, split it into (count, step), and
        # reduce the counts: what is left is one value per phase
        sizes = [b.dim(x, d) for d in space]
        blocks = [phase_blocks(H, s) for H, s in zip(sizes, steps)]
        ends = [n * s - H for n, s, H in zip(blocks, steps, sizes)]
        src = b.pad(x, rank, space, [0] * len(space), ends, rw.fill(x, fill))
        target: list = []
        reduced = []
        for d in range(rank):
            if d in axes:
                reduced.append(len(target))
            if d in space:
                k = space.index(d)
                target += [blocks[k], steps[k]]
            else:
                target.append(b.dim(x, d))
        y = b.reshape(src, target)
        y = b.reduce("ReduceSum" if plan.reduce == "mean" else op, y, reduced, False)
        # now: the dims in order, each spatial one replaced by its phases; phases go last
        left = [d for d in range(rank) if d not in axes or d in space]
        y = b.transpose(y, [i for i, d in enumerate(left) if d not in space]
                        + [i for i, d in enumerate(left) if d in space])
        if plan.keepdim:
            y = b.unsqueeze(y, list(axes))
        if plan.reduce in ("mean", "max", "min"):
            counts = [b.int_tensor(phase_count(H, s, SymInt(b, b.const(np.arange(s)))))
                      for H, s in zip(sizes, steps)]
            count = counts[0]
            for c in counts[1:]:
                count = b.op1("Mul", [b.unsqueeze(count, [-1]), c])
            dtype = rw.types.get(x, TensorProto.FLOAT)
            if plan.reduce == "mean":
                y = b.op1("Div", [y, b.op1("Cast", [count], to=dtype)], out)
            else:
                empty = b.op1("Equal", [count, b.const([0])])
                y = b.op1("Where", [empty, b.scalar(math.nan, dtype), y], out)
        else:
            b.op1("Identity", [y], out)
    rw.set(out, Layout(tuple(base_shape), plan.out_dims, plan.n_extra))
    if plan.support:
        rw.rewritten.support = [list(s) for s in plan.support]
    rw.rewritten.global_pools += 1
    rw.record(plan.record, out)


@rule("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.n_extra and not lay.has_space and not lay.fold:
        # no position left, only extra dims (a pool that covered its map kept its phases):
        # the pool at each extra position, as PyTorch's adaptive pool to 1 does there
        return _per_extra(rw, node, node.input[0], lay)
    _global(rw, node, node.input[0], range(2, lay.base_ndim), _REDUCE[node.op_type], True)


def _axes_of(rw: OnnxRewriter, node: onnx.NodeProto, a: dict,
             input_index: int) -> list[int] | None:
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        return [int(v) for v in rw.need_const(node.input[input_index], "the axes").reshape(-1)]
    return None


@rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
      "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
def _reduction(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    keepdims = bool(a.get("keepdims", 1))
    if node.op_type.startswith("Arg"):
        axes = [int(a.get("axis", 0))]
    else:
        axes = _axes_of(rw, node, a, 1)
    if axes is None and a.get("noop_with_empty_axes", 0):
        return rw._same(node)
    kind = rules.reduction(lay, axes, node.op_type)
    axes = sorted(_norm(d, lay.base_ndim) for d in axes)
    if kind == "global":
        if node.op_type not in _REDUCE:
            rules.refuse_kind("spatial_reduction", what=node.op_type)
        return _global(rw, node, x, axes, _REDUCE[node.op_type], keepdims)
    # over channels: positions untouched
    if node.op_type.startswith("Arg"):
        rw.emit(node, [x], axis=axes[0])
    elif "axes" in a:
        rw.emit(node, [x], axes=axes)
    else:
        rw.emit(node, [x, rw.b.const(axes)])
    kept = [d for i, d in enumerate(lay.base_dims) if keepdims or i not in axes]
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(kept) + lay.extras,
                                  lay.n_extra))


@hook("on_merged")
def _on_merged(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Nodes reading a value whose spatial dims were merged into one (``x.view(n, c, -1)``):
    pointwise ops keep the merge; a mean/max/min/sum over the merged dim is global pooling;
    anything else is refused."""
    x = node.input[0]
    lay = rw.lay(x)
    others = [rw.v(i) for i in node.input[1:] if i]
    op = node.op_type
    if not lay.merged or any(o.layout is None or o.layout.merged or not o.layout.is_plain
                             or o.spatial_size for o in others):
        rules.refuse_kind("merged_with_others")
    if op in UNARY or op == "Dropout":
        if op not in _SCALAR_PARAMS and others:
            rules.refuse_kind("merged_parameter", what=op)
        if op == "Dropout":
            if len(node.output) > 1 and node.output[1]:
                rules.refuse_kind("dropout_mask")
            rw.b.op1("Identity", [x], node.output[0])
        else:
            rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(layout=lay)
        return
    if op not in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"):
        rules.on_merged(op)
    rank = lay.base_ndim - lay.merged + 1  # the baseline's rank
    a = attrs(node)
    space = rules.merged_reduction(lay, _axes_of(rw, node, a, 1), rank)
    keepdims = bool(a.get("keepdims", 1))
    tmp = rw.b.fresh("pooled")
    plan = rules.global_pool(replace(lay, merged=0), space, _REDUCE[op], rw.mode, False,
                             rw.field_of(x))
    _emit_global(rw, x, plan, tmp, lay.base[:rank - 1])
    pooled = rw.env[tmp].layout
    out = node.output[0]
    if keepdims:
        rw.b.unsqueeze(tmp, [rank - 1], out)
        dims = pooled.base_dims + (PLAIN,)
    else:
        rw.b.op1("Identity", [tmp], out)
        dims = pooled.base_dims
    rw.set(out, Layout(rw.base_shape(out), dims + pooled.extras, pooled.n_extra))
    rw.fields[out] = rw.field_of(x)
