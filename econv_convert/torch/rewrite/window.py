"""Window layers: convolutions, max and average pools (adaptive ones too) and space to depth, as
the core's window plans say.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.lattice import Window, same_padding
from econv_convert.core.layout import Layout, LayoutError
from econv_convert.core.rules import refuse
from econv_convert.torch import ops
from econv_convert.torch.capture import node_name
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, _per_extra, _tuple, rule
from econv_convert.torch.rewrite.global_pool import _global

# -- window layers ------------------------------------------------------------------------------


def _window_layer(rw: Rewriter, node: fx.Node, kind: str, windows: Sequence[Window],
                  cost: int, emit: Callable[[rules.WindowPlan], fx.Node], **kw) -> Val:
    """A convolution or pool: the core's plan, in the form the walk picks; ``emit(plan)``
    emits the dense form."""
    plan = rules.window(kind, rw.lay(node.args[0]), windows, rw.field_of(node.args[0]),
                        output_stride=rw.output_stride, cost=cost, mode=rw.mode, **kw)
    return rw.window_layer(node, plan, emit)


# the registered targets, by kind (also what :mod:`econv_convert.run.trim` runs trimmed where
# a layer keeps its stride below an output stride: the dense graph calls them as they are)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d,
                      torch.max_pool2d, torch.max_pool3d)
AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)


@rule(*CONV_FUNCTIONS)
def _conv(rw: Rewriter, node: fx.Node) -> Val:
    weight = rw.base(node.args[1]) if isinstance(node.args[1], fx.Node) else node.args[1]
    nd = weight.dim() - 2
    k = tuple(weight.shape[2:])
    stride = _tuple(_arg(node, 3, "stride", 1), nd)
    padding = _arg(node, 4, "padding", 0)
    dilation = _tuple(_arg(node, 5, "dilation", 1), nd)
    groups = int(_arg(node, 6, "groups", 1))
    if padding == "same":
        lo, hi = zip(*(same_padding(kk, d) for kk, d in zip(k, dilation, strict=True)),
                     strict=True)
    elif padding == "valid":
        lo = hi = (0,) * nd
    else:
        lo = hi = _tuple(padding, nd)
    windows = [Window(kk, t, a, b, d) for kk, t, a, b, d in zip(k, stride, lo, hi, dilation)]
    bias = _arg(node, 2, "bias")

    def emit(plan: rules.WindowPlan) -> fx.Node:
        return rw.call(ops.conv, rw.v(node.args[0]).node, rw.v(node.args[1]).node,
                       rw.v(bias).node if bias is not None else None, plan.steps, stride, lo,
                       hi, dilation, groups)

    return _window_layer(rw, node, "conv", windows, weight.shape[1] * math.prod(k), emit)


def _pool_params(node: fx.Node, nd: int, avg: bool):
    k = _tuple(_arg(node, 1, "kernel_size"), nd)
    stride = _arg(node, 2, "stride", None)
    stride = k if stride is None or stride == [] or stride == () else _tuple(stride, nd)
    padding = _tuple(_arg(node, 3, "padding", 0), nd)
    if avg:
        return k, stride, padding
    dilation = _tuple(_arg(node, 4, "dilation", 1), nd)
    return k, stride, padding, dilation


@rule(*MAX_POOL_FUNCTIONS)
def _max_pool(rw: Rewriter, node: fx.Node) -> Val:
    nd = len(rw.lay(node.args[0]).base) - 2
    if _arg(node, 6, "return_indices", False):
        rules.refuse_kind("pool_indices", what="max pooling")
    k, stride, padding, dilation = _pool_params(node, nd, avg=False)
    ceil = bool(_arg(node, 5, "ceil_mode", False))
    windows = [Window(kk, t, p, p, d, ceil) for kk, t, p, d in zip(k, stride, padding, dilation)]
    return _max_pool_of(rw, node, windows)


def _max_pool_of(rw: Rewriter, node: fx.Node, windows: Sequence[Window], note: str = "") -> Val:
    def emit(plan: rules.WindowPlan) -> fx.Node:
        w = plan.windows
        return rw.call(ops.max_pool, rw.v(node.args[0]).node, plan.steps,
                       tuple(x.kernel for x in w), tuple(x.stride for x in w),
                       tuple(x.pad_lo for x in w), tuple(x.pad_hi for x in w),
                       tuple(x.dilation for x in w), any(x.ceil_mode for x in w))

    return _window_layer(rw, node, "max_pool", windows, math.prod(w.kernel for w in windows),
                         emit, reduce="max", note=note)


@rule(*AVG_POOL_FUNCTIONS)
def _avg_pool(rw: Rewriter, node: fx.Node) -> Val:
    nd = len(rw.lay(node.args[0]).base) - 2
    k, stride, padding = _pool_params(node, nd, avg=True)
    ceil = bool(_arg(node, 4, "ceil_mode", False))
    include = bool(_arg(node, 5, "count_include_pad", True))
    divisor = _arg(node, 6, "divisor_override", None)
    windows = [Window(kk, t, p, p, 1, ceil) for kk, t, p in zip(k, stride, padding)]
    return _avg_pool_of(rw, node, windows, include, divisor)


def _avg_pool_of(rw: Rewriter, node: fx.Node, windows: Sequence[Window], include: bool,
                 divisor: int | None, note: str = "") -> Val:
    def emit(plan: rules.WindowPlan) -> fx.Node:
        w = plan.windows
        return rw.call(ops.avg_pool, rw.v(node.args[0]).node, plan.steps,
                       tuple(x.kernel for x in w), tuple(x.stride for x in w),
                       tuple(x.pad_lo for x in w), any(x.ceil_mode for x in w), include,
                       divisor)

    return _window_layer(rw, node, "avg_pool", windows, math.prod(w.kernel for w in windows),
                         emit, reduce="mean", count_include_pad=include,
                         divisor_override=bool(divisor), note=note)


@rule(F.lp_pool1d, F.lp_pool2d, F.lp_pool3d)
def _lp_pool(rw: Rewriter, node: fx.Node) -> Val:
    """Power-average pooling: a window of no padding whose dense form pools ``x ** p``."""
    nd = len(rw.lay(node.args[0]).base) - 2
    p = _arg(node, 1, "norm_type")
    if not isinstance(p, (int, float)):
        rules.refuse_kind("computed_norm_type")
    k = _tuple(_arg(node, 2, "kernel_size"), nd)
    stride = _arg(node, 3, "stride", None)
    stride = k if stride is None or stride == [] or stride == () else _tuple(stride, nd)
    ceil = bool(_arg(node, 4, "ceil_mode", False))
    windows = [Window(kk, t, 0, 0, 1, ceil) for kk, t in zip(k, stride)]

    def emit(plan: rules.WindowPlan) -> fx.Node:
        return rw.call(ops.lp_pool, rw.v(node.args[0]).node, plan.steps, p, k, stride, ceil)

    return _window_layer(rw, node, "lp_pool", windows, math.prod(k), emit)


_ADAPTIVE_AVG = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


@rule(*_ADAPTIVE_AVG, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
      torch.adaptive_avg_pool1d, torch._C._nn.adaptive_avg_pool2d,
      torch._C._nn.adaptive_avg_pool3d)
def _adaptive(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    nd = len(x.layout.base) - 2
    avg = "avg" in getattr(node.target, "__name__", "")
    if not avg and _arg(node, 2, "return_indices", False):
        rules.refuse_kind("pool_indices", what="adaptive max pooling")
    form, _, _ = _window_input(x.layout, nd)
    if form == "plain":
        return rw.wrap(node, rw.same(node))
    if form == "extra":
        return _per_extra(rw, node, x)
    size = _arg(node, 1, "output_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size,) * nd
    if len(size) == 1 and nd > 1:
        size = size * nd
    if any(isinstance(s, fx.Node) for s in size):
        size = _computed_output_size(rw, node, size)
    how, k = rules.adaptive_pool(x.layout, size)
    if how == "global":
        return _global(rw, node, x, range(2, 2 + nd), "mean" if avg else "max", keepdim=True)
    h = x.layout.base[2:]
    note = rules.adaptive_note(h, k)
    rw.rewritten.notes.append(f"{node_name(node)}: {note}")
    rw.rewritten.specialized[node.name] = list(h)
    if all(kk == 1 for kk in k):
        rw.fields[node] = rw.field_of(node.args[0])
        return Val(x.node, x.layout.with_base(rw.base(node).shape, x.layout.base_dims))
    windows = [Window(kk, kk) for kk in k]
    if avg:
        return _avg_pool_of(rw, node, windows, True, None, note)
    return _max_pool_of(rw, node, windows, note)


def _computed_output_size(rw: Rewriter, node: fx.Node, size: tuple) -> tuple[int, ...]:
    """An output size computed in ``forward()`` from the input's size: the pool is
    specialized to its value at the example, and the dense model checks, whenever it runs,
    that the baseline would compute the same value (else ``SizeNotCovered``). With window
    pooling every window is the example's size, so there is nothing to check."""
    example = tuple(rw.base(node).shape[2:])
    if rw.mode == "window":
        return example
    for s, value in zip(size, example):
        if isinstance(s, fx.Node):
            same = rw.call(operator.eq, rw.v(s).node, value)
            rw.call(ops.size_fixed, same,
                    f"the output size of adaptive pool '{node_name(node)}', computed from the "
                    f"input size, is {value} at the example and differs at this size")
    return example


def _window_input(x: Layout, nd: int):
    try:
        return x.window_input(nd)
    except LayoutError as e:
        refuse(str(e))


@rule(F.pixel_unshuffle, torch.pixel_unshuffle)
def _pixel_unshuffle(rw: Rewriter, node: fx.Node) -> Val:
    """Space to depth: a stride-r window whose r x r taps become channels."""
    x = rw.v(node.args[0])
    r = int(_arg(node, 1, "downscale_factor"))
    out = rules.space_to_depth(x.layout, r)
    if out.is_plain:
        return rw.wrap(node, rw.same(node))
    steps = tuple(d.step for d in x.layout.base_dims[2:])
    n = rw.call(ops.space_to_depth, x.node, r, steps, "channels_first")
    rec, fields = rules.space_to_depth_record(x.layout, r, rw.field_of(node.args[0]))
    rw.fields[node] = fields
    rw.rewritten.has_padding = True  # its baseline drops the rows a block does not fill
    rw.record(n, rec)
    return rw.result(node, n, out.base_dims)
