"""Window layers: Conv, MaxPool, AveragePool and LpPool, SpaceToDepth, as the core's window plans
say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from econv_convert.core import rules
from econv_convert.core.lattice import (
    Window,
    avg_tap_counts,
    dense_out,
    effective_dilation,
    lattice_count,
    same_split,
    tf_same_padding,
    tight,
)
from econv_convert.core.layout import Layout, LayoutError
from econv_convert.core.rules import refuse
from econv_convert.core.rules.window import PAST_COVER
from econv_convert.onnx.graph import SymInt
from econv_convert.onnx.rewrite.frame import OnnxRewriter, attrs, hook, node_label, rule
from econv_convert.onnx.rewrite.global_pool import _emit_global

# -- window layers -----------------------------------------------------------------------


def _ints(a: dict, key: str, n: int, default: int) -> tuple[int, ...]:
    v = a.get(key)
    return tuple(int(x) for x in v) if v else (default,) * n


def _window_attrs(rw: OnnxRewriter, node: onnx.NodeProto, kernel: Sequence[int], h):
    """Per-axis Windows of a Conv/pool node, with ``auto_pad`` resolved. SAME padding with a
    stride depends on the input size: the pads are then SymInts computed at run time from the
    baseline sizes ``h``."""
    a = attrs(node)
    nd = len(kernel)
    stride = _ints(a, "strides", nd, 1)
    dil = _ints(a, "dilations", nd, 1)
    ceil = bool(a.get("ceil_mode", 0))
    auto = _auto_pad(node)
    pads = _ints(a, "pads", 2 * nd, 0)
    lo, hi = list(pads[:nd]), list(pads[nd:])
    if auto == "VALID":
        lo, hi = [0] * nd, [0] * nd
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(nd):
            total = tf_same_padding(h[i], kernel[i], stride[i], dil[i], rw.b.maximum)
            lo[i], hi[i] = same_split(total, auto == "SAME_UPPER")
    elif auto != "NOTSET":
        rules.refuse_kind("auto_pad", what=auto)
    return [Window(k, t, p, q, d, ceil) for k, t, p, q, d in
            zip(kernel, stride, lo, hi, dil, strict=True)]


def _auto_pad(node: onnx.NodeProto) -> str:
    auto = attrs(node).get("auto_pad", b"NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def _static(v) -> bool:
    return not isinstance(v, SymInt)


def _window_layer(rw: OnnxRewriter, node: onnx.NodeProto, kind: str, kernel: Sequence[int],
                  cost: int, emit: Callable[[rules.WindowPlan], str], **kw) -> None:
    """A Conv or pool: the core's plan, in the form the walk picks; ``emit(plan)`` emits the
    dense form (the node's output) and returns its name."""
    x = node.input[0]
    lay = rw.lay(x)
    nd = len(kernel)
    try:
        form, steps, _ = lay.window_input(nd)
    except LayoutError as e:
        refuse(str(e))
    h = [_lattice_size(rw, x, i, s) for i, s in enumerate(steps)] \
        if form == "dense" and _auto_pad(node).startswith("SAME") else [0] * nd
    windows = _window_attrs(rw, node, kernel, h)
    plan = rules.window(kind, lay, windows, rw.field_of(x), output_stride=rw.output_stride,
                        cost=cost, mode=rw.mode, **kw)
    rw.window_layer(node, plan, emit)


@hook("covering_pool")
def covering_pool(rw: OnnxRewriter, node: onnx.NodeProto, plan: rules.WindowPlan) -> None:
    """A pool whose one window covers its whole input is a global pool while the map fits in
    the kernel; past that the run stops (:data:`~econv_convert.core.rules.window.PAST_COVER`):
    ONNX has no assertion, so a Reshape to an impossible shape (two -1s) named after the node
    and its limits fails there."""
    x = node.input[0]
    b = rw.b
    pooled = b.fresh("pooled")
    _emit_global(rw, x, plan.pool, pooled, rw.base_shape(node.output[0]))
    fits = None
    for i, (s, limit) in enumerate(zip(plan.steps, plan.limits)):
        n = _lattice_size(rw, x, i, s)
        ok = b.op1("LessOrEqual", [b.int_tensor(n), b.const([limit])])
        fits = ok if fits is None else b.op1("And", [fits, ok])
    out = node.output[0]
    shape = b.op1("Shape", [pooled])  # past the limit: every dim -1 (rank >= 3), impossible
    stop = b.op1("Sub", [b.op1("Mul", [shape, b.const([0])]), b.const([1])])
    shape = b.op1("Where", [fits, shape, stop])
    b.op("Reshape", [pooled, shape], [out])
    b.nodes[-1].name = b.fresh(f"{PAST_COVER}|{node_label(node)}|"
                               + ",".join(map(str, plan.limits)) + "|")
    rw.env[out] = rw.env[pooled]
    rw.fields[out] = rw.field_of(x)


def _lattice_size(rw: OnnxRewriter, x: str, i: int, step: int):
    """The baseline size of spatial axis ``i`` of dense map ``x``, when the graph runs."""
    return lattice_count(rw.b.dim(x, 2 + i), step)


def _crop(rw: OnnxRewriter, y: str, x: str, steps, ws, output: str | None) -> str:
    """Crop a stride-1 dense output ``y`` to the tight size of the strided baseline output
    (sizes from the unpadded input ``x``); nothing to do without stride."""
    if all(w.stride == 1 for w in ws):
        return rw.b.op1("Identity", [y], output) if output else y
    nd = len(ws)
    ends = [dense_out(rw.b.dim(x, 2 + i), s, w, rw.b.minimum)
            for i, (s, w) in enumerate(zip(steps, ws))]
    return rw.b.slice(y, list(range(2, 2 + nd)), [0] * nd, ends, output=output)


def _pad_lists(dws):
    return [d.pad_lo for d in dws], [d.pad_hi for d in dws]


def _nonzero(values) -> bool:
    return any(not _static(v) or v for v in values)


@rule("Conv")
def _conv(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w_name = node.input[0], node.input[1]
    wshape = rw.base_shape(w_name) if w_name in rw.shapes else rw.lay(w_name).base
    kernel = tuple(wshape[2:])
    if rw.v(w_name).layout is not None and not rw.v(w_name).layout.is_plain:
        rules.refuse_kind("varies_over_positions", what="a convolution weight")
    nd = len(kernel)

    def emit(plan: rules.WindowPlan) -> str:
        lo, hi = _pad_lists(plan.dense)
        src = x
        if all(_static(v) for v in lo + hi):
            conv_pads = lo + hi
        else:
            src = rw.b.pad(x, nd + 2, list(range(2, 2 + nd)), lo, hi)
            conv_pads = [0] * (2 * nd)
        strided = any(w.stride > 1 for w in plan.windows)
        y = rw.b.op1("Conv", [src, *node.input[1:]], None if strided else node.output[0],
                     kernel_shape=list(kernel), strides=[1] * nd, pads=conv_pads,
                     dilations=effective_dilation(kernel, plan.dense),
                     group=int(attrs(node).get("group", 1)))
        return _crop(rw, y, x, plan.steps, plan.windows, node.output[0] if strided else None)

    _window_layer(rw, node, "conv", kernel, wshape[1] * math.prod(kernel), emit)


@rule("MaxPool")
def _max_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        rules.refuse_kind("pool_indices", what="max pooling")
    kernel = tuple(int(k) for k in attrs(node)["kernel_shape"])
    x = node.input[0]
    nd = len(kernel)

    def emit(plan: rules.WindowPlan) -> str:
        lo, hi = _pad_lists(plan.dense)
        # explicit padding (pooling pads must stay below the kernel in onnxruntime) with the
        # lowest finite value: onnxruntime's max over a window of padding only is that, not
        # -inf
        lowest = float(np.finfo(helper.tensor_dtype_to_np_dtype(
            rw.types.get(x, TensorProto.FLOAT))).min)
        src = rw.b.pad(x, nd + 2, list(range(2, 2 + nd)), lo, hi, rw.fill(x, lowest)) \
            if _nonzero(lo + hi) else x
        strided = any(w.stride > 1 for w in plan.windows)
        y = rw.b.op1("MaxPool", [src], None if strided else node.output[0],
                     kernel_shape=list(kernel), strides=[1] * nd, pads=[0] * (2 * nd),
                     dilations=[d.dilation for d in plan.dense])
        return _crop(rw, y, x, plan.steps, plan.windows, node.output[0] if strided else None)

    _window_layer(rw, node, "max_pool", kernel, math.prod(kernel), emit, reduce="max")


def _window_sum(rw: OnnxRewriter, src: str, channels: int, kernel, dws, dtype: int) -> str:
    """Sum over each dilated window: a depthwise convolution with a kernel of ones."""
    nd = len(kernel)
    ones = rw.b.const(np.ones((channels, 1, *kernel)), dtype)
    return rw.b.op1("Conv", [src, ones], kernel_shape=list(kernel), strides=[1] * nd,
                    pads=[0] * (2 * nd), dilations=[d.dilation for d in dws], group=channels)


@rule("AveragePool", "LpPool")
def _avg_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Average (and Lp) pooling as a depthwise convolution of ones, dilated, divided by the
    taps each window counts (:func:`~econv_convert.core.lattice.avg_tap_counts`, on graph
    values). Runs in every opset (AveragePool has ``dilations`` only from opset 19)."""
    a = attrs(node)
    lp = node.op_type == "LpPool"
    kernel = tuple(int(k) for k in a["kernel_shape"])
    include = bool(a.get("count_include_pad", 0))
    x = node.input[0]
    nd = len(kernel)

    def emit(plan: rules.WindowPlan) -> str:
        steps, ws, dws = plan.steps, plan.windows, plan.dense
        channels = rw.lay(x).base[1]
        dtype = rw.types.get(x, TensorProto.FLOAT)
        lo, hi = _pad_lists(dws)
        src = x
        if lp:
            p = float(a.get("p", 2))
            src = rw.b.op1("Pow", [rw.b.op1("Abs", [x]), rw.b.scalar(p, dtype)])
        if _nonzero(lo + hi):
            src = rw.b.pad(src, nd + 2, list(range(2, 2 + nd)), lo, hi, rw.fill(x, 0.0))
        total = _crop(rw, _window_sum(rw, src, channels, kernel, dws, dtype), x, steps, ws,
                      None)
        if lp:
            return rw.b.op1("Pow", [total, rw.b.scalar(1.0 / p, dtype)], node.output[0])
        # the divisor: how many taps of each window the baseline counts, per axis (the
        # core's formula, on graph values), multiplied over the axes
        divisor = None
        for i, (w, s) in enumerate(zip(ws, steps)):
            q = SymInt(rw.b, _arange(rw, rw.b.dim(total, 2 + i)))
            count = avg_tap_counts(q, _lattice_size(rw, x, i, s), w, s, include,
                                   minimum=rw.b.minimum, maximum=rw.b.maximum)
            shape = [1] * (nd + 2)
            shape[2 + i] = -1
            c = rw.b.reshape(rw.b.op1("Cast", [rw.b.int_tensor(count)], to=dtype), shape)
            divisor = c if divisor is None else rw.b.op1("Mul", [divisor, c])
        return rw.b.op1("Div", [total, divisor], node.output[0])

    _window_layer(rw, node, "lp_pool" if lp else "avg_pool", kernel, math.prod(kernel), emit,
                  reduce=None if lp else "mean", count_include_pad=include,
                  note="" if lp else "depthwise Conv of ones / taps counted (any opset)")


def _arange(rw: OnnxRewriter, n: SymInt | int) -> str:
    """``0, 1, ..., n - 1`` as a 1-D int64 tensor, when the graph runs."""
    scalar = rw.b.op1("Squeeze", [rw.b.int_tensor(n)])
    return rw.b.op1("Range", [rw.b.const(0, shape=()), scalar, rw.b.const(1, shape=())])


@rule("SpaceToDepth")
def _space_to_depth(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Space to depth: a stride-r window whose r x r taps become channels (the tap index
    before the channel: (i * r + j) * C + c)."""
    x = node.input[0]
    lay = rw.lay(x)
    r = int(attrs(node)["blocksize"])
    out = rules.space_to_depth(lay, r)
    if out.is_plain:
        return rw._same(node)
    b = rw.b
    steps = tuple(d.step for d in lay.base_dims[2:])
    sizes = [tight(_lattice_size(rw, x, i, s) // r, s * r) for i, s in enumerate(steps)]
    taps = []
    for i in range(r):
        for j in range(r):
            taps.append(b.slice(x, [2, 3], [i * steps[0], j * steps[1]],
                                [i * steps[0] + sizes[0], j * steps[1] + sizes[1]]))
    b.op1("Concat", taps, node.output[0], axis=1)
    rec, fields = rules.space_to_depth_record(lay, r, rw.field_of(x))
    rw.fields[node.output[0]] = fields
    rw.rewritten.has_padding = True  # the baseline drops the rows a block does not fill
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), out.dims))
    rw.record(rec)
