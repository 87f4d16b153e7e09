"""Linear layers: Gemm and MatMul over channels (kept), and heads over a flattened map (a
convolution per the core's linear plan).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto

from econv_convert.core import rules
from econv_convert.core.layout import PLAIN, Layout
from econv_convert.onnx.rewrite.frame import OnnxRewriter, attrs, rule


def _weight_as_conv(rw: OnnxRewriter, w: str, trans: bool, lay: Layout, alpha: float) -> str:
    """A fully connected weight (out, C * prod(kernel)) viewed as a convolution kernel,
    reshaped inside the graph so the initializer keeps its name and shape."""
    b = rw.b
    if not trans:
        w = b.transpose(w, [1, 0])
    channels = lay.base[-1] // max(1, math.prod(lay.fold_shape))
    kernel = b.reshape(w, [0, channels, *lay.fold_shape])
    if alpha != 1.0:
        kernel = b.op1("Mul", [kernel, rw.b.scalar(alpha, rw.types.get(w, TensorProto.FLOAT))])
    return kernel


def _head_conv(rw: OnnxRewriter, node: onnx.NodeProto, x: str, plan: rules.LinearPlan,
               kernel: str, bias: str | None, beta: float) -> None:
    """Flatten + fully connected over a k x k map: a k x k convolution dilated by the map's
    step; its output positions become extra dims."""
    b = rw.b
    nd = len(plan.kernel)
    y = b.op1("Conv", [x, kernel], kernel_shape=list(plan.kernel), strides=[1] * nd,
              pads=[0] * (2 * nd), dilations=[s if k > 1 else 1 for s, k in
                                               zip(plan.steps, plan.kernel)])
    out = node.output[0]
    if bias:
        bb = b.reshape(bias, [-1] + [1] * nd)
        if beta != 1.0:
            bb = b.op1("Mul", [bb, b.scalar(beta, rw.types.get(bias, TensorProto.FLOAT))])
        b.op1("Add", [y, bb], out)
    else:
        b.op1("Identity", [y], out)
    rw.set(out, Layout(rw.base_shape(out), plan.out_dims, plan.n_extra))
    rw.fields[out] = plan.fields
    rw.record(plan.record)


def _per_position(rw: OnnxRewriter, node: onnx.NodeProto, x: str, lay: Layout, w: str,
                  trans: bool, alpha: float, bias: str | None, beta: float) -> None:
    """A fully connected layer applied at every extra position: features moved last, a
    MatMul, and back."""
    b = rw.b
    r, e = lay.base_ndim, lay.n_extra
    if r != 2:
        rules.refuse_kind("linear_extra_rank")
    perm = [0] + list(range(2, 2 + e)) + [1]
    y = b.transpose(x, perm)
    wt = b.transpose(w, [1, 0]) if trans else w
    y = b.op1("MatMul", [y, wt])
    dtype = rw.types.get(x, TensorProto.FLOAT)
    if alpha != 1.0:
        y = b.op1("Mul", [y, b.scalar(alpha, dtype)])
    if bias:
        bb = bias if beta == 1.0 else b.op1("Mul", [bias, b.scalar(beta, dtype)])
        y = b.op1("Add", [y, bb])
    b.transpose(y, list(np.argsort(perm)), node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), (PLAIN, PLAIN) + lay.extras, e))


@rule("Gemm")
def _gemm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    if a.get("transA", 0):
        rules.refuse_kind("linear_transposed_input")
    if not rw.lay(w).is_plain or (bias and not rw.lay(bias).is_plain):
        rules.refuse_kind("varies_over_positions", what="Gemm weights")
    trans = bool(a.get("transB", 0))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    plan = rules.linear(lay, lay.base[-1], rw.field_of(x))
    if plan.kind == "head":
        return _head_conv(rw, node, x, plan, _weight_as_conv(rw, w, trans, lay, alpha), bias,
                          beta)
    if plan.kind == "channels":
        rules.refuse_kind("linear_on_map", what="Gemm")
    _per_position(rw, node, x, lay, w, trans, alpha, bias, beta)


@rule("MatMul")
def _matmul(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w = node.input
    lay, wl = rw.lay(x), rw.lay(w)
    if lay.is_plain and wl.is_plain:
        return rw._same(node)
    if not wl.is_plain or len(wl.base) != 2:
        rules.refuse_kind("product_of_maps")
    plan = rules.linear(lay, lay.base[-1], rw.field_of(x))
    if plan.kind == "head":
        return _head_conv(rw, node, x, plan, _weight_as_conv(rw, w, False, lay, 1.0), None,
                          1.0)
    if plan.kind == "per_position":
        return _per_position(rw, node, x, lay, w, False, 1.0, None, 1.0)
    rw.emit(node, [x, w])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims[:-1] + (PLAIN,)))
