"""Global pooling and reductions over space: the five --global-pool modes, and reductions over
merged or channel dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.fx as fx

from econv_convert.core import rules
from econv_convert.core.layout import PLAIN, Layout
from econv_convert.torch import ops
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, _describe, hook, rule

_REDUCE_FNS = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax}
_REDUCE_NAMES = {"mean": "mean", "sum": "sum", "amax": "max", torch.mean: "mean",
                 torch.sum: "sum", torch.amax: "max"}


# -- global pooling ----------------------------------------------------------------------------


def _global(rw: Rewriter, node: fx.Node, x: Val, dims: Sequence[int], reduce: str,
            keepdim: bool, base: tuple[int, ...] | None = None) -> Val:
    """Reduction over whole spatial dims: global pooling in the chosen mode."""
    plan = rules.global_pool(x.layout, dims, reduce, rw.mode, keepdim,
                             rw.field_of(node.args[0]))
    return _emit_global(rw, node, x, plan, base)


@hook("global_pool")
def _emit_global(rw: Rewriter, node: fx.Node, x: Val, plan: rules.GlobalPlan,
                 base: tuple[int, ...] | None = None) -> Val:
    reduce = "amax" if plan.reduce == "max" else plan.reduce
    extra = {"extent": list(plan.extent)} if plan.extent else {}
    n = rw.call(ops.global_pool, x.node, list(plan.space), list(plan.steps), plan.mode, reduce,
                True, **extra)
    if plan.fields:
        rw.fields[node] = plan.fields
    if plan.support:
        rw.rewritten.support = [list(s) for s in plan.support]
    # the remaining (non-spatial) dims are reduced as the baseline does; the pooled dims have
    # size 1 now: they are squeezed (a view), not reduced again (a pass over the whole output)
    if plan.others:
        n = rw.call(_REDUCE_FNS[plan.reduce], n, tuple(sorted(plan.others)), keepdim=True)
    if not plan.keepdim:
        n = rw.call(torch.squeeze, n, tuple(sorted(plan.space + plan.others)))
    rw.rewritten.global_pools += 1
    rw.record(n, plan.record)
    base_shape = tuple(rw.base(node).shape) if base is None else base
    return Val(n, Layout(base_shape, plan.out_dims, plan.n_extra))


@hook("on_merged")
def _on_merged(rw: Rewriter, node: fx.Node) -> Val:
    """A node reading merged spatial positions (``x.view(n, c, -1)``): a mean, sum or amax
    over the merged dim is global pooling over the spatial dims; anything else is refused."""
    name = _REDUCE_NAMES.get(node.target)
    x = rw.v(node.args[0])
    lay = x.layout
    if name is None or lay is None or not lay.merged or any(
            v.layout is not None and v.layout.merged for v in rw.tensor_inputs(node)[1:]):
        rules.on_merged(_describe(node))
    if node.kwargs.get("dtype"):
        rules.refuse_kind("dtype_over", what=_describe(node), where="merged spatial positions")
    rank = lay.base_ndim - lay.merged + 1  # the baseline's rank
    space = rules.merged_reduction(lay, _reduce_dims(node), rank)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    val = _global(rw, node, Val(x.node, replace(lay, merged=0)), space, name, keepdim=False,
                  base=tuple(rw.base(node).shape[:rank - 1]))
    if not keepdim:
        return val
    out = val.layout
    n = rw.call(torch.unsqueeze, val.node, rank - 1)
    return Val(n, Layout(tuple(rw.base(node).shape), out.base_dims + (PLAIN,) + out.extras,
                         out.n_extra))


def _reduce_dims(node: fx.Node):
    dim = _arg(node, 1, "dim", None)
    if dim is None:
        return None
    return (dim,) if isinstance(dim, int) else tuple(dim)


@rule("mean", "sum", "amax", torch.mean, torch.sum, torch.amax)
def _reduction(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    dims = _reduce_dims(node)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    name = _REDUCE_NAMES[node.target]
    kind = rules.reduction(lay, dims, _describe(node))
    if kind == "plain":
        return rw.wrap(node, rw.same(node))
    nd = [lay.norm_dim(d) for d in dims]
    if kind == "global":
        if node.kwargs.get("dtype") is not None:
            rules.refuse_kind("dtype_over", what=_describe(node), where="spatial dims")
        return _global(rw, node, x, nd, name, keepdim)
    # over non-spatial dims: positions untouched
    n = rw.call(_REDUCE_FNS[name], x.node, tuple(nd), keepdim=keepdim)
    kept = [d for i, d in enumerate(lay.base_dims) if keepdim or i not in nd]
    return rw.result(node, n, kept, like=lay)
