"""Pointwise layers: unary functions, softmax over channels, binary operators with broadcasting,
expand.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.layout import Layout
from econv_convert.torch import ops
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, _describe, rule

# -- pointwise -------------------------------------------------------------------------------

_UNARY_FUNCTIONS = [
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.threshold,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    ops.drop_path, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.erf,
    torch.sign, torch.nn.functional.hardshrink, torch.nn.functional.softshrink, F.relu_, F.elu_,
    F.leaky_relu_, F.hardtanh_, F.threshold_, torch.clamp_min, torch.clamp_max,
    torch.reciprocal, torch.floor, torch.round, torch.ceil, operator.neg, operator.pos,
    torch.nan_to_num, torch.sin, torch.cos,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt",
    "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "square", "contiguous",
    "clone", "detach", "float", "double", "half", "type_as", "to", "reciprocal", "erf",
    "hardtanh", "hardtanh_", "floor", "round", "sign", "requires_grad_", "sin", "cos",
]


def _bindings(fns):
    """The functions and their C bindings (``torch._C._nn.hardswish`` behind ``F.hardswish``),
    which ``torch.export`` programs call."""
    out = list(fns)
    for fn in fns:
        name = getattr(fn, "__name__", None)
        for ns in (torch._C._nn, torch):
            alias = getattr(ns, name, None) if name else None
            if callable(alias) and alias not in out:
                out.append(alias)
    return out


# what the rules below register, by kind (:mod:`econv_convert.run.trim` runs them trimmed:
# position by position, they compute the same on any part of a map)
UNARY_FUNCTIONS = tuple(_bindings(_UNARY_FUNCTIONS))
UNARY_METHODS = tuple(_UNARY_METHODS)


@rule(*UNARY_FUNCTIONS, *UNARY_METHODS, merged=True)
def _unary(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    others = [rw.v(a) for a in list(node.args[1:]) + list(node.kwargs.values())]
    if any(o.layout is not None or o.spatial for o in others):
        rules.refuse_kind("scalar_expected", what=_describe(node))
    if x.layout is None:
        return Val(rw.same(node), spatial=x.spatial)
    return Val(rw.same(node), x.layout)


@rule(F.softmax, F.log_softmax, "softmax", "log_softmax", torch.softmax, torch.log_softmax)
def _softmax(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    dim = _arg(node, 1, "dim")
    if dim is None:
        rules.refuse_kind("softmax_no_dim")
    if lay.fold:
        rules.refuse_kind("flatten_positions", what="softmax over")
    d = lay.norm_dim(dim)
    rules.channel_axes(lay, [d], "softmax (attention over positions)")
    fn = node.target if callable(node.target) else getattr(F, node.target)
    return Val(rw.call(fn, x.node, d), lay)


_BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
    torch.true_divide, torch.where, torch.lerp, torch.addcmul,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
    "where",
]


BINARY_FUNCTIONS = tuple(b for b in _BINARY if not isinstance(b, str))
BINARY_METHODS = tuple(b for b in _BINARY if isinstance(b, str))


@rule(*_BINARY)
def _binary(rw: Rewriter, node: fx.Node) -> Val:
    """Elementwise with broadcasting (:func:`rules.broadcast`)."""
    vals = [rw.v(a) for a in node.args]
    kw = {k: rw.v(a) for k, a in node.kwargs.items()}
    tensors = [(i, v) for i, v in enumerate(vals) if v.layout is not None]
    tensors += [(k, v) for k, v in kw.items() if v.layout is not None]
    if not tensors:
        spatial = any(v.spatial for v in vals + list(kw.values()))
        return Val(rw.same(node), spatial=spatial)
    base = rw.base(node)
    plan = rules.broadcast([v.layout for _, v in tensors], base.dim())
    args = list(rw.dense_args(node.args))
    kwargs = dict(rw.dense_args(node.kwargs))
    for (key, v), action in zip(tensors, plan.actions):
        dense = args[key] if isinstance(key, int) else kwargs[key]
        if isinstance(action, rules.Spread):
            like = tensors[action.like][1]
            dense = rw.call(ops.phase_to_map_like, dense, like.node, action.targets,
                            action.like_dims)
        elif isinstance(action, int):
            dense = rw.call(ops.append_extras, dense, action)
        if isinstance(key, int):
            args[key] = dense
        else:
            kwargs[key] = dense
    n = rw.graph.create_node(node.op, node.target, tuple(args), kwargs)
    return Val(n, Layout(tuple(base.shape), plan.out_dims + plan.extras, len(plan.extras)))


@rule("expand_as", "expand")
def _expand(rw: Rewriter, node: fx.Node) -> Val:
    """``s.expand_as(x)`` (or ``s.expand(b, c, h, w)`` with the map's sizes) consumed only by
    element-wise ops: they broadcast ``s`` by themselves, so it passes as it is (a
    squeeze-excitation scale, phase-pooled or not)."""
    y = rw.v(node.args[0])
    target_spatial = (rw.lay(node.args[1]).has_space if node.target == "expand_as" else
                      any(rw.v(a).spatial for a in node.args[1:]))
    if y.layout is None or (y.layout.is_plain and not target_spatial):
        return rw.wrap(node, rw.same(node))
    if y.layout.has_space or y.layout.fold:
        rules.refuse_kind("expand")
    binary = {t for t in _BINARY if not isinstance(t, str)}
    if not all((u.op == "call_function" and u.target in binary)
               or (u.op == "call_method" and u.target in _BINARY) for u in node.users):
        rules.refuse_kind("expanded_use")
    return Val(y.node, y.layout)
