"""Pointwise layers: the same function at every position (unary ops, Dropout,
Quantize/DequantizeLinear), binary ops with broadcasting, Expand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from econv_convert.core import rules
from econv_convert.core.lattice import phase_blocks
from econv_convert.core.layout import Layout
from econv_convert.onnx.rewrite.frame import RULES, OnnxRewriter, Val, _norm, attrs, rule

# ONNX ops that are the same function at every position (the first input carries the map;
# further inputs, if any, are broadcast like the binary ops)
UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Softplus",
    "Softsign", "Mish", "Clip", "Identity", "Cast", "CastLike", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Tan", "Not", "IsNaN", "IsInf", "ThresholdedRelu", "Shrink", "Swish",
    "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
}
BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
}


# -- pointwise ------------------------------------------------------------------------------


# ops whose further inputs are scalar parameters, not operands to broadcast
_SCALAR_PARAMS = {"Clip", "CastLike"}


def _unary(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([i for i in node.input if i]) > 1 and node.op_type not in _SCALAR_PARAMS:
        return _broadcast(rw, node)
    for i in node.input[1:]:
        if i and (rw.v(i).spatial_size or not rw.lay(i).is_plain):
            rules.refuse_kind("varies_over_positions", what=f"{node.op_type} with a parameter")
    x = node.input[0]
    v = rw.v(x)
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(layout=v.layout, sizes=v.sizes, spatial=v.spatial)
    if v.layout is not None and v.layout.base != rw.shapes.get(node.output[0], v.layout.base):
        rw.env[node.output[0]] = Val(layout=Layout.plain(rw.shapes[node.output[0]]))


@rule("Dropout")
def _dropout(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        rules.refuse_kind("dropout_mask")
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = rw.v(node.input[0])


def _broadcast(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Element-wise ops with numpy broadcasting (:func:`rules.broadcast`)."""
    vals = [rw.v(i) for i in node.input if i]
    if any(v.spatial_size for v in vals):
        for o in node.output:
            rw.set(o, Layout.plain(rw.shapes[o]) if o in rw.shapes else None, spatial=True)
        rw.emit(node, list(node.input))
        return
    lays = [v.layout for v in vals]
    unknown = [i for i, v in zip((i for i in node.input if i), vals) if v.layout is None]
    if unknown:
        rules.refuse_kind("no_shape", name=unknown[0])
    if all(lay.is_plain for lay in lays):
        return rw._same(node)
    names = [i for i in node.input if i]
    out = node.output[0]
    plan = rules.broadcast(lays, len(rw.base_shape(out)))
    for k, action in enumerate(plan.actions):
        if isinstance(action, rules.Spread):
            names[k] = _phase_to_map(rw, names[k], lays[k], action, names[action.like],
                                     lays[action.like])
        elif isinstance(action, int):
            n = len(lays[k].dims)
            names[k] = rw.b.unsqueeze(names[k], list(range(n, n + action)))
    rw.emit(node, _with_gaps(node.input, names))
    for o in node.output:
        rw.set(o, Layout(rw.base_shape(o), plan.out_dims + plan.extras, len(plan.extras)))


def _with_gaps(original: Sequence[str], names: Sequence[str]) -> list[str]:
    """``names`` for the non-empty entries of ``original``; empty (omitted) inputs kept."""
    it = iter(names)
    return [next(it) if i else "" for i in original]


def _phase_to_map(rw: OnnxRewriter, name: str, lay: Layout, spread: rules.Spread,
                  like_name: str, like: Layout) -> str:
    """Replace the size-1 dims of a phase-pooled tensor by its phase dims, tiled over the
    dense size of the map it meets: dense position ``q`` gets phase ``q % step``."""
    b = rw.b
    rank = lay.base_ndim
    order = list(range(rank))
    for k, t in enumerate(spread.targets):
        order[t] = rank + k  # the phase dim takes the place of the pooled size-1 dim
    y = b.transpose(name, order + list(spread.targets))
    y = b.squeeze(y, list(range(rank, rank + len(spread.targets))))
    repeats: list = [1] * rank
    ends: list = []
    for t, j in zip(spread.targets, spread.like_dims):
        H = b.dim(like_name, j)
        s = like.base_dims[j].step
        repeats[t] = phase_blocks(H, s)
        ends.append(H)
    y = b.op1("Tile", [y, b.ints(repeats)])
    return b.slice(y, list(spread.targets), [0] * len(spread.targets), ends)


@rule("QuantizeLinear", "DequantizeLinear")
def _quantize(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """(De)quantization per tensor or per channel (its ``axis``): pointwise on a map."""
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain and not rw.v(x).spatial_size:
        return rw._same(node)
    scale = rw.base_shape(node.input[1]) if node.input[1] in rw.shapes else ()
    for i in node.input[1:]:
        if i and not rw.lay(i).is_plain:
            rules.refuse_kind("varies_over_positions", what="quantization parameters")
    a = attrs(node)
    if scale and math.prod(scale) > 1:
        axis = _norm(int(a.get("axis", 1)), lay.base_ndim)
        if len(scale) > 1:
            rules.refuse_kind("varies_over_positions", what="blocked quantization parameters")
        rules.channel_axes(lay, [axis], "per-channel quantization")
        rw.emit(node, list(node.input), axis=axis)
    else:
        rules.channel_axes(lay, [], "quantization")
        rw.emit(node, list(node.input))
    rw.set(node.output[0], lay)


@rule("Expand")
def _expand(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """``y.expand_as(x)`` before an element-wise op with the map: the target shape comes from
    the map's shape. Broadcasting in that op does the same, so the value passes as it is; a
    value that is itself spatial is not expanded over positions."""
    v, target = rw.v(node.input[0]), rw.v(node.input[1])
    if not target.spatial_size and (v.layout is None or v.layout.is_plain):
        return rw._same(node)
    lay = rw.lay(node.input[0])
    if lay.fold or any(d.spatial for d in lay.base_dims):
        rules.refuse_kind("expand")
    if not target.spatial_size:
        rules.refuse_kind("expand_extra")
    out = rw.base_shape(node.output[0])
    if len(out) != lay.base_ndim or any(a != b and a != 1 for a, b in zip(lay.base, out)):
        rules.refuse_kind("expand_shape", base=lay.base, out=out)
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = Val(layout=lay)


# every op that is the same function at every position, unless a rule of its own says more
for _op in UNARY:
    RULES.setdefault(_op, _unary)
for _op in BINARY:
    RULES.setdefault(_op, _broadcast)
