"""Sizes as values: size()/shape reads, symbolic sizes, the size checks torch.export records,
scalar arithmetic on them.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from econv_convert.core import rules
from econv_convert.core.layout import Dim, Layout
from econv_convert.torch import ops, outputs
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, rule


@rule(outputs.restore)
def _restore(rw: Rewriter, node: fx.Node) -> Val:
    """The model's output class, rebuilt from the tensors the graph computes."""
    leaves = rw.v(node.args[0])
    return Val(rw.call(outputs.restore, leaves.node, node.args[1]), items=leaves.items)


@rule(torch.ops.aten._assert_scalar.default)
def _size_check(rw: Rewriter, node: fx.Node) -> Val:
    """A condition on the input size that torch.export recorded where the model's Python
    code branched on a size: the dense model covers only sizes that take the same branch,
    and checks it (on the baseline's sizes) whenever it runs."""
    cond = rw.v(node.args[0])
    message = node.args[1] if len(node.args) > 1 else ""
    rw.call(ops.size_check, cond.node, message)
    return Val(None)


@rule(torch._assert)
def _assert(rw: Rewriter, node: fx.Node) -> Val:
    """A shape assertion of the baseline: on dense sizes it would fail for no reason (the
    dense model is checked by verify instead), so it is dropped."""
    return Val(None)


@rule(operator.mod, operator.lshift, operator.rshift, math.ceil, math.floor, math.sqrt,
      operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
      operator.and_, operator.or_, operator.not_, torch.sym_max, torch.sym_min, torch.sym_not,
      torch.sym_float, torch.sym_int, torch.sym_ite, math.trunc)
def _scalar_math(rw: Rewriter, node: fx.Node) -> Val:
    """Arithmetic on numbers, sizes among them: sizes are the baseline's, so the result is
    the baseline's value (marked as computed from a spatial size)."""
    vals = [rw.v(a) for a in node.args]
    if any(v.layout is not None for v in vals):
        return rw._unknown(node)
    return Val(rw.same(node), spatial=any(v.spatial for v in vals))


# -- shapes ----------------------------------------------------------------------------------


@rule("size")
def _size(rw: Rewriter, node: fx.Node) -> Val:
    """``x.size()`` reads the baseline's sizes (lattice counts of the dense sizes), so that
    any arithmetic the model does on them computes what the baseline computes."""
    x = rw.v(node.args[0])
    return _size_of(rw, x, _arg(node, 1, "dim"))


@rule(torch.ops.aten.sym_size.int)
def _sym_size(rw: Rewriter, node: fx.Node) -> Val:
    """An exported program's size query (``x.shape[d]``)."""
    return _size_of(rw, rw.v(node.args[0]), node.args[1])


def _size_of(rw: Rewriter, x: Val, dim) -> Val:
    lay = x.layout
    steps = tuple(d.step if d.kind == "space" else 1 for d in lay.base_dims)
    if dim is None:
        n = rw.call(ops.base_size, x.node, lay.base_ndim, bool(lay.fold), steps)
        return Val(n, sizes=_size_dims(lay))
    d = lay.norm_dim(dim)
    spatial = _size_dims(lay)[d].spatial
    step = steps[d] if d < len(steps) else 1
    return Val(rw.call(ops.dim_size, x.node, d, lay.base_ndim, bool(lay.fold), step),
               spatial=spatial)


def _size_dims(lay: Layout) -> tuple[Dim, ...]:
    return lay.base_dims + ((Dim("space"),) if lay.fold else ())


@rule(getattr)
def _getattr(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    attr = node.args[1]
    if x.layout is None:
        return Val(rw.same(node), spatial=x.spatial)
    if attr == "shape":
        return _size_of(rw, x, None)
    if attr in ("dtype", "device", "is_cuda", "requires_grad"):
        return Val(rw.same(node))
    if attr == "ndim":
        return Val(x.layout.base_ndim)
    rules.refuse_kind("tensor_attribute", what=attr)


@rule("dim")
def _ndim(rw: Rewriter, node: fx.Node) -> Val:
    return Val(rw.v(node.args[0]).layout.base_ndim)
