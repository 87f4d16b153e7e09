"""The PyTorch rewrite: a lowered baseline graph in, a dense graph out.

One pass over the nodes in order. Each baseline node is mapped to a dense node and a
:class:`~econv_convert.core.layout.Layout` saying what the dense tensor's dims mean. Rules are keyed
by the function (or tensor method) a node calls; the geometry they apply comes from
:mod:`econv_convert.core.lattice` and the work at run time is done by :mod:`econv_convert.torch.ops`.
A node with no rule is refused by name unless nothing spatial reaches it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core.lattice import (
    Field,
    Window,
    covered_limit,
    covers_input,
    keeps_stride,
    same_padding,
    window_geometry,
)
from econv_convert.core.layout import PLAIN, Dim, Layout, LayoutError
from econv_convert.core.records import GLOBAL_POOL_MODES, HEAD_KIND, LayerRecord
from econv_convert.errors import UnsupportedLayerError
from econv_convert.torch import ops, outputs, targets
from econv_convert.torch.capture import node_name


@dataclass
class Val:
    """A dense value: the dense graph's node (or a constant) and what it means."""

    node: Any
    layout: Layout | None = None  # tensors
    items: tuple[Val, ...] | None = None  # tuples and lists (chunk, split, ...)
    sizes: tuple[Dim, ...] | None = None  # torch.Size: what each entry measures
    spatial: bool = False  # a number that depends on a spatial size


@dataclass
class Plan:
    records: list[LayerRecord] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # lattice views per output
    notes: list[str] = field(default_factory=list)
    has_padding: bool = False  # any zero/reflect padding or ceil-mode window: no shift check
    global_pools: int = 0
    specialized: dict[str, list[int]] = field(default_factory=dict)  # node -> traced size
    peak_elements: int = 0  # the largest dense tensor at the example input
    peak_node: str = ""
    kept_stride: tuple[int, ...] = ()  # cumulative stride kept under an output stride

    @property
    def total_step(self) -> tuple[int, ...]:
        steps = [tuple(d[1] for d in o["dims"] if d[0] == "space") for o in self.outputs]
        return max(steps, key=lambda s: math.prod(s)) if steps else ()


# helpers the rules emit besides their own targets and the run-time ops
_EMITTED = (torch.mean, torch.sum, torch.amax, torch.unsqueeze, torch.squeeze, torch.permute,
            F.pad, operator.getitem, torch.chunk, torch.tensor_split, torch.unbind)
targets.register(*_EMITTED)


class _Refuse(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse(reason: str):
    raise _Refuse(reason)


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        if len(v) != n:
            _refuse(f"expected {n} values, got {v}")
        return tuple(int(x) for x in v)
    return tuple(int(v) for _ in range(n))


class Rewriter:
    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any], global_pool: str,
                 output_stride: int | None = None):
        if global_pool not in GLOBAL_POOL_MODES:
            raise ValueError(global_pool)
        self.output_stride = output_stride
        self.gm = gm
        self.values = values
        self.mode = global_pool
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Val] = {}
        self.fields: dict[fx.Node, tuple[Field, ...]] = {}
        self.plan = Plan()
        self.node: fx.Node | None = None

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> tuple[fx.Graph, Plan]:
        for node in self.gm.graph.nodes:
            self.node = node
            try:
                self.env[node] = val = self._rewrite(node)
                if self.plan.records and self.plan.records[-1].fx_name == node.name \
                        and val.layout is not None:
                    r = self.plan.records[-1]
                    r.base_shape = val.layout.base
                    r.dense_shape = val.layout.dense_shape()
                if val.layout is not None and val.layout.dense_numel() > self.plan.peak_elements:
                    self.plan.peak_elements = val.layout.dense_numel()
                    self.plan.peak_node = node_name(node)
                if node not in self.fields:
                    self.fields[node] = self._inherited_field(node)
            except _Refuse as r:
                raise UnsupportedLayerError(node_name(node), r.reason) from None
            except UnsupportedLayerError:
                raise
            except (IndexError, TypeError, ValueError) as e:
                raise UnsupportedLayerError(
                    node_name(node), f"unexpected arguments ({type(e).__name__}: {e})"
                ) from e
        self.graph.lint()
        return self.graph, self.plan

    def _inherited_field(self, node: fx.Node) -> tuple[Field, ...]:
        """A layer with no window sees what its inputs see (the largest, per axis)."""
        found = [self.fields[n] for n in node.all_input_nodes if self.fields.get(n)]
        if not found:
            return ()
        return tuple(max(fs, key=lambda f: f.size) for fs in zip(*found))

    def _rewrite(self, node: fx.Node) -> Val:
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            v = self.values[node]
            n = self.graph.get_attr(node.target)
            return Val(n, Layout.plain(v.shape) if isinstance(v, torch.Tensor) else None)
        if node.op == "output":
            return self._output(node)
        if node.op == "call_module":
            _refuse(_module_reason(self.gm.get_submodule(node.target)))
        if node.op == "call_function":
            rule = FUNCTIONS.get(node.target)
        else:
            rule = METHODS.get(node.target)
        if rule is not _unary and any(
                v.layout is not None and v.layout.merged for v in self.tensor_inputs(node)):
            return _on_merged(self, node)
        if rule is not None:
            return rule(self, node)
        return self._unknown(node)

    # -- helpers --------------------------------------------------------------------------

    def v(self, a: Any) -> Val:
        """The dense value of a baseline argument (constants pass through)."""
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            items = tuple(self.v(x) for x in a)
            return Val(type(a)(i.node for i in items), items=items,
                       spatial=any(i.spatial for i in items))
        return Val(a)

    def dense_args(self, a: Any) -> Any:
        """Baseline args with nodes replaced by dense nodes (constants unchanged)."""
        return fx.node.map_arg(a, lambda n: self.env[n].node)

    def lay(self, a: Any) -> Layout:
        val = self.v(a)
        if val.layout is None:
            _refuse("expected a tensor argument")
        return val.layout

    def base(self, node: fx.Node) -> Any:
        return self.values[node]

    def call(self, fn: Callable, *args, **kwargs) -> fx.Node:
        """Emit a call of ``fn``, which must be a registered target (:mod:`targets`): what a
        rule emits is what a dense checkpoint can store."""
        assert fn in _EMITTED or targets.admits(fn), f"{fn} is not a registered target"
        return self.graph.call_function(fn, args, kwargs)

    def same(self, node: fx.Node) -> fx.Node:
        """Emit the baseline node unchanged (with dense arguments)."""
        args, kwargs = self.dense_args(node.args), self.dense_args(node.kwargs)
        return self.graph.create_node(node.op, node.target, args, kwargs, node.name)

    def result(self, node: fx.Node, dense: Any, dims: Sequence[Dim],
               like: Layout | None = None) -> Val:
        """Wrap a tensor result: baseline shape from the trace, the given base dims, and the
        extras of ``like``."""
        base = self.base(node)
        if not isinstance(base, torch.Tensor):
            _refuse("expected a tensor result")
        extras = like.extras if like is not None else ()
        dims = tuple(dims) + tuple(extras)
        return Val(dense, Layout(tuple(base.shape), dims, len(extras)))

    def field_of(self, a: Any) -> tuple[Field, ...]:
        return self.fields.get(a, ()) if isinstance(a, fx.Node) else ()

    def record(self, dense: fx.Node, kind: str, before: dict, after: dict, step_in, step_out,
               rf, note: str = "", cost: int = 0):
        """Note a rewritten layer. ``cost``: multiply-adds (or comparisons) per output element."""
        node = self.node
        self.plan.records.append(LayerRecord(
            node_name(node), kind, before, after, tuple(step_in), tuple(step_out),
            tuple(f.size for f in rf), node.name, dense.name, note, int(cost)))

    def tensor_inputs(self, node: fx.Node) -> list[Val]:
        found: list[Val] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.env[n]))
        return found

    # -- placeholders and outputs ---------------------------------------------------------

    def _placeholder(self, node: fx.Node) -> Val:
        v = self.base(node)
        n = self.graph.placeholder(node.target)
        if not isinstance(v, torch.Tensor) or v.dim() < 3:
            _refuse("the model input must be a batched tensor (N, C, spatial...) with 1 to 3 "
                    "spatial dims")
        dims = (PLAIN, PLAIN) + tuple(Dim("space", i, 1) for i in range(v.dim() - 2))
        self.fields[node] = tuple(Field() for _ in range(v.dim() - 2))
        return Val(n, Layout(tuple(v.shape), dims))

    def _output(self, node: fx.Node) -> Val:
        outputs = []

        def visit(a):
            val = self.v(a)
            if val.items is not None and isinstance(a, fx.Node):  # a model's output class
                for item in val.items:
                    visit_val(item)
                return val.node
            visit_val(val)
            return val.node

        def visit_val(val):
            if val.layout is not None:
                lay = val.layout
                if lay.fold:
                    _refuse("the output is a flatten over spatial positions; only a Linear "
                            "layer may consume such a flatten")
                if lay.merged:
                    _refuse("the output merges spatial positions into one dim; only a "
                            "reduction over them may consume it")
                outputs.append({
                    "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                    "base_ndim": lay.base_ndim,
                })

        args = fx.node.map_aggregate(node.args[0], visit)
        self.plan.outputs = outputs
        self.graph.output(args)
        return Val(None)

    # -- the default: nothing spatial reaches the node ------------------------------------

    def _unknown(self, node: fx.Node) -> Val:
        """Nothing spatial reaches the node: it computes what it computes in the baseline.
        (Sizes read off a map are the baseline's sizes, so a value computed from them is the
        baseline's value too; a tensor made from them is refused where it meets a map.)"""
        ins = self.tensor_inputs(node)
        what = _describe(node)
        if any(i.layout is not None and not i.layout.is_plain for i in ins):
            _refuse(f"no rule for {what} on a spatial map; it may mix positions, which would "
                    "break equivalence on the lattice")
        return self.wrap(node, self.same(node), spatial=any(i.spatial for i in ins))

    def wrap(self, node: fx.Node, dense: fx.Node, spatial: bool = False) -> Val:
        """A value that is the same in the baseline and the dense model (``spatial``: a
        number computed from a spatial size)."""
        base = self.base(node)
        if isinstance(base, torch.Tensor):
            return Val(dense, Layout.plain(base.shape))
        if isinstance(base, (tuple, list)) and all(isinstance(b, torch.Tensor) for b in base):
            items = tuple(Val(None, Layout.plain(b.shape)) for b in base)
            return Val(dense, items=items)
        return Val(dense, spatial=spatial)


# ---------------------------------------------------------------------------------------------
# Rules

FUNCTIONS: dict[Any, Callable[[Rewriter, fx.Node], Val]] = {}
METHODS: dict[str, Callable[[Rewriter, fx.Node], Val]] = {}


def rule(*handled):
    """Register a rule for call targets (functions, or tensor method names). A rule may emit
    its target as it is, so each function is also admitted in dense graphs."""
    def register(fn):
        for t in handled:
            if isinstance(t, str):
                METHODS[t] = fn
            else:
                FUNCTIONS[t] = fn
                targets.register(t)
        return fn

    return register


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _spatial_geometry(rw: Rewriter, x: Layout, nd: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Classify a window layer's input (:meth:`Layout.window_input`)."""
    try:
        return x.window_input(nd)
    except LayoutError as e:
        _refuse(str(e))


def _keep_stride(rw: Rewriter, node: fx.Node, axes, steps, stride, kernel,
                 dilation, cost: int) -> Val | None:
    """Under ``output_stride`` K, a strided layer still on step 1 (dense == baseline there)
    keeps its stride while the cumulative stride stays within K (DeepLab style)."""
    rf = rw.field_of(node.args[0]) or tuple(Field() for _ in stride)
    if not keeps_stride(steps, rf, stride, rw.output_stride):
        return None
    fields = _fields_through(rw, node.args[0], kernel, stride, dilation)
    rw.fields[node] = fields
    if any(t > 1 for t in stride):
        rw.plan.kept_stride = tuple(f.step for f in fields)
    n = rw.same(node)
    name = getattr(node.target, "__name__", str(node.target))
    kind = "conv" if "conv" in name else "max_pool" if "max" in name else "avg_pool"
    rw.record(n, kind, {"kernel": kernel, "stride": stride}, {"stride": stride}, steps, steps,
              fields, f"stride kept (output stride {rw.output_stride})", cost)
    return rw.result(node, n, [PLAIN, PLAIN] + [Dim("space", a, 1) for a in axes])


def _window_out(axes, steps, strides) -> list[Dim]:
    return [PLAIN, PLAIN] + [Dim("space", a, s * t) for a, s, t in zip(axes, steps, strides, strict=True)]


def _per_extra(rw: Rewriter, node: fx.Node, x: Val) -> Val:
    """Apply the baseline op unchanged at each extra position (phase dims, head positions)."""
    args = list(rw.dense_args(node.args))
    n = rw.call(ops.per_position, targets.qualified_name(node.target), args[0], x.layout.n_extra, *args[1:],
                **rw.dense_args(node.kwargs))
    base = rw.base(node)
    return Val(n, Layout(tuple(base.shape), tuple(PLAIN for _ in base.shape) + x.layout.extras,
                         x.layout.n_extra))


@rule(F.conv1d, F.conv2d, F.conv3d)
def _conv(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    weight = rw.base(node.args[1]) if isinstance(node.args[1], fx.Node) else node.args[1]
    nd = weight.dim() - 2
    form, steps, axes = _spatial_geometry(rw, x.layout, nd)
    if form == "plain":
        return rw.wrap(node, rw.same(node))
    if form == "extra":
        return _per_extra(rw, node, x)
    k = tuple(weight.shape[2:])
    stride = _tuple(_arg(node, 3, "stride", 1), nd)
    padding = _arg(node, 4, "padding", 0)
    dilation = _tuple(_arg(node, 5, "dilation", 1), nd)
    groups = int(_arg(node, 6, "groups", 1))
    if padding == "same":
        lo, hi = zip(*(same_padding(kk, d) for kk, d in zip(k, dilation, strict=True)), strict=True)
    elif padding == "valid":
        lo = hi = (0,) * nd
    else:
        lo = hi = _tuple(padding, nd)
    rw.plan.has_padding |= any(lo) or any(hi)
    kept = _keep_stride(rw, node, axes, steps, stride, k, dilation,
                        weight.shape[1] * math.prod(k))
    if kept is not None:
        return kept
    wnode = rw.v(node.args[1]).node
    bias = _arg(node, 2, "bias")
    bnode = rw.v(bias).node if bias is not None else None
    n = rw.call(ops.conv, x.node, wnode, bnode, steps, stride, lo, hi, dilation, groups)
    rf = _fields_through(rw, node.args[0], k, stride, dilation)
    rw.fields[node] = rf
    ws = [Window(kk, t, a, b, d) for kk, t, a, b, d in zip(k, stride, lo, hi, dilation)]
    rw.record(n, "conv", window_geometry(ws), window_geometry(ws, steps), steps,
              [s * t for s, t in zip(steps, stride, strict=True)], rf,
              cost=weight.shape[1] * math.prod(k))
    return rw.result(node, n, _window_out(axes, steps, stride))


def _fields_through(rw: Rewriter, x_node, kernel, stride, dilation) -> tuple[Field, ...]:
    rf = rw.field_of(x_node) or tuple(Field() for _ in kernel)
    return tuple(f.through(Window(k, t, 0, 0, d)) for f, k, t, d in zip(rf, kernel, stride, dilation))


def _pool_params(node: fx.Node, nd: int, avg: bool):
    k = _tuple(_arg(node, 1, "kernel_size"), nd)
    stride = _arg(node, 2, "stride", None)
    stride = k if stride is None or stride == [] or stride == () else _tuple(stride, nd)
    padding = _tuple(_arg(node, 3, "padding", 0), nd)
    if avg:
        return k, stride, padding
    dilation = _tuple(_arg(node, 4, "dilation", 1), nd)
    return k, stride, padding, dilation


@rule(F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
      torch.max_pool3d)
def _max_pool(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    nd = len(x.layout.base) - 2
    if _arg(node, 6, "return_indices", False):
        _refuse("max pooling with return_indices (the indices are positions, not features)")
    form, steps, axes = _spatial_geometry(rw, x.layout, nd)
    if form == "plain":
        return rw.wrap(node, rw.same(node))
    if form == "extra":
        return _per_extra(rw, node, x)
    k, stride, padding, dilation = _pool_params(node, nd, avg=False)
    ceil = bool(_arg(node, 5, "ceil_mode", False))
    rw.plan.has_padding |= any(padding) or ceil
    kept = _keep_stride(rw, node, axes, steps, stride, k, dilation, math.prod(k))
    if kept is not None:
        return kept
    ws = [Window(kk, t, p, p, d, ceil) for kk, t, p, d in zip(k, stride, padding, dilation)]
    whole = _covering_pool(rw, node, x, steps, ws, "amax")
    if whole is not None:
        return whole
    n = rw.call(ops.max_pool, x.node, steps, k, stride, padding, padding, dilation, ceil)
    rf = _fields_through(rw, node.args[0], k, stride, dilation)
    rw.fields[node] = rf
    ws = [Window(kk, t, p, p, d, ceil) for kk, t, p, d in zip(k, stride, padding, dilation)]
    rw.record(n, "max_pool", window_geometry(ws), window_geometry(ws, steps), steps,
              [s * t for s, t in zip(steps, stride)], rf, cost=math.prod(k))
    return rw.result(node, n, _window_out(axes, steps, stride))


@rule(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)
def _avg_pool(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    nd = len(x.layout.base) - 2
    form, steps, axes = _spatial_geometry(rw, x.layout, nd)
    if form == "plain":
        return rw.wrap(node, rw.same(node))
    if form == "extra":
        return _per_extra(rw, node, x)
    k, stride, padding = _pool_params(node, nd, avg=True)
    ceil = bool(_arg(node, 4, "ceil_mode", False))
    include = bool(_arg(node, 5, "count_include_pad", True))
    divisor = _arg(node, 6, "divisor_override", None)
    return _emit_avg(rw, node, x, steps, axes, k, stride, padding, ceil, include, divisor)


def _emit_avg(rw, node, x, steps, axes, k, stride, padding, ceil, include, divisor, note=""):
    nd = len(k)
    rw.plan.has_padding |= any(padding) or ceil
    kept = _keep_stride(rw, node, axes, steps, stride, k, (1,) * nd, math.prod(k))
    if kept is not None:
        return kept
    if not divisor and (not include or not any(padding)):  # a mean of the real positions
        ws = [Window(kk, t, p, p, 1, ceil) for kk, t, p in zip(k, stride, padding)]
        whole = _covering_pool(rw, node, x, steps, ws, "mean")
        if whole is not None:
            return whole
    n = rw.call(ops.avg_pool, x.node, steps, k, stride, padding, ceil, include, divisor)
    rf = _fields_through(rw, node.args[0], k, stride, (1,) * nd)
    rw.fields[node] = rf
    ws = [Window(kk, t, p, p, 1, ceil) for kk, t, p in zip(k, stride, padding)]
    rw.record(n, "avg_pool", window_geometry(ws, count_include_pad=include),
              window_geometry(ws, steps, count_include_pad=include), steps,
              [s * t for s, t in zip(steps, stride)], rf, note, cost=math.prod(k))
    return rw.result(node, n, _window_out(axes, steps, stride))


def _covering_pool(rw: Rewriter, node: fx.Node, x: Val, steps, windows, reduce: str) -> Val | None:
    """A pool whose one window covers its whole input (a kernel larger than the map) is a
    global pool, while the map fits in the kernel: checked when the dense model runs."""
    h = x.layout.base[2:]
    if not all(covers_input(n, w) for n, w in zip(h, windows)):
        return None
    limits = tuple(covered_limit(w) for w in windows)
    checked = rw.call(ops.within, x.node, steps, limits, node_name(node))
    rw.plan.notes.append(
        f"{node_name(node)}: a pool of kernel {tuple(w.kernel for w in windows)} reads all of its "
        f"{tuple(h)} input: a global pool while that map stays within {limits} positions")
    return _global(rw, node, Val(checked, x.layout), range(2, 2 + len(h)), reduce, keepdim=True)


_ADAPTIVE_AVG = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


@rule(*_ADAPTIVE_AVG, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
      torch.adaptive_avg_pool1d, torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d)
def _adaptive(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    nd = len(x.layout.base) - 2
    avg = "avg" in getattr(node.target, "__name__", "")
    if not avg and _arg(node, 2, "return_indices", False):
        _refuse("adaptive max pooling with return_indices")
    form, steps, axes = _spatial_geometry(rw, x.layout, nd)
    if form == "plain":
        return rw.wrap(node, rw.same(node))
    if form == "extra":
        return _per_extra(rw, node, x)
    h = x.layout.base[2:]
    size = _arg(node, 1, "output_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size,) * nd
    if len(size) == 1 and nd > 1:
        size = size * nd
    out = tuple(hh if o is None else int(o) for o, hh in zip(size, h, strict=True))
    if all(o == 1 for o in out):
        dims = tuple(range(2, 2 + nd))
        return _global(rw, node, x, dims, "mean" if avg else "amax", keepdim=True)
    if any(hh % o for hh, o in zip(h, out)):
        _refuse(f"adaptive pooling from {tuple(h)} to {out}: the windows depend on the input "
                "size and are not translation-equivariant on the lattice")
    k = tuple(hh // o for hh, o in zip(h, out))
    note = (f"adaptive pool specialized to the example size {tuple(h)}: a plain pool of "
            f"kernel {k}; other input sizes follow the plain pool")
    rw.plan.notes.append(f"{node_name(node)}: {note}")
    rw.plan.specialized[node.name] = list(h)
    if all(kk == 1 for kk in k):
        rw.fields[node] = rw.field_of(node.args[0])
        return Val(x.node, x.layout.with_base(rw.base(node).shape, x.layout.base_dims))
    if avg:
        return _emit_avg(rw, node, x, steps, axes, k, k, (0,) * nd, False, True, None, note)
    n = rw.call(ops.max_pool, x.node, steps, k, k, (0,) * nd, (0,) * nd, (1,) * nd, False)
    rf = _fields_through(rw, node.args[0], k, k, (1,) * nd)
    rw.fields[node] = rf
    rw.record(n, "max_pool", {"kernel": k, "stride": k}, {"kernel": k, "dilation": steps},
              steps, [s * t for s, t in zip(steps, k)], rf, note, cost=math.prod(k))
    return rw.result(node, n, _window_out(axes, steps, k))


def _global(rw: Rewriter, node: fx.Node, x: Val, dims: Sequence[int], reduce: str,
            keepdim: bool, base: tuple[int, ...] | None = None) -> Val:
    """Reduction over whole spatial dims: global pooling in the chosen mode."""
    lay = x.layout
    if lay.n_extra or lay.fold:
        _refuse("global pooling of a map that already has extra dims")
    dims = sorted(lay.norm_dim(d) for d in dims)
    space = [d for d in dims if lay.base_dims[d].kind == "space"]
    steps = [lay.base_dims[d].step for d in space]
    n = rw.call(ops.global_pool, x.node, space, steps, rw.mode, reduce, True)
    if len(space) != len(dims) or not keepdim:
        # the remaining (non-spatial) dims are reduced as the baseline does; pooled dims
        # have size 1 now, and reducing them again changes nothing
        fn = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax}[reduce]
        n = rw.call(fn, n, tuple(dims), keepdim=keepdim)
    base_shape = tuple(rw.base(node).shape) if base is None else base
    kept = [d for i, d in enumerate(lay.base_dims) if keepdim or i not in dims]
    kept = [PLAIN if d.spatial else d for d in kept]
    extras = ()
    if rw.mode == "phase":
        extras = tuple(Dim("phase", lay.base_dims[d].axis, lay.base_dims[d].step) for d in space)
    rw.plan.global_pools += 1
    rw.record(n, f"global_{reduce}", {"dims": tuple(dims)}, {"mode": rw.mode},
              steps, [1] * len(steps), tuple(rw.field_of(node.args[0])),
              {"phase": "one output per lattice phase (phase 0 = baseline)",
               "lattice": "pools lattice points only (= baseline)",
               "dense": "pools every position: NOT the baseline function"}[rw.mode])
    return Val(n, Layout(base_shape, tuple(kept) + extras, len(extras)))


_MERGE_REDUCTIONS = {"mean": "mean", "sum": "sum", "amax": "amax", torch.mean: "mean",
                     torch.sum: "sum", torch.amax: "amax"}


def _on_merged(rw: Rewriter, node: fx.Node) -> Val:
    """A node reading merged spatial positions (``x.view(n, c, -1)``): a mean, sum or amax
    over the merged dim is global pooling over the spatial dims; anything else is refused."""
    name = _MERGE_REDUCTIONS.get(node.target)
    x = rw.v(node.args[0])
    lay = x.layout
    if name is None or lay is None or not lay.merged or any(
            v.layout is not None and v.layout.merged for v in rw.tensor_inputs(node)[1:]):
        _refuse(f"{_describe(node)} on merged spatial positions (only a mean, sum or amax over "
                "them has a rule: global pooling)")
    rank = lay.base_ndim - lay.merged + 1  # the baseline's rank
    dims = _reduce_dims(node, rank)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dims is None or [d % rank for d in dims] != [rank - 1] or node.kwargs.get("dtype"):
        _refuse(f"{_describe(node)} over other dims than the merged spatial positions")
    space = list(range(rank - 1, lay.base_ndim))
    val = _global(rw, node, Val(x.node, replace(lay, merged=0)), space, name, keepdim=False,
                  base=tuple(rw.base(node).shape[:rank - 1]))
    if not keepdim:
        return val
    out = val.layout
    n = rw.call(torch.unsqueeze, val.node, rank - 1)
    return Val(n, Layout(tuple(rw.base(node).shape), out.base_dims + (PLAIN,) + out.extras,
                         out.n_extra))


def _reduce_dims(node: fx.Node, ndim: int):
    dim = _arg(node, 1, "dim", None)
    if dim is None:
        return None
    return (dim,) if isinstance(dim, int) else tuple(dim)


@rule("mean", "sum", "amax", torch.mean, torch.sum, torch.amax)
def _reduction(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    dims = _reduce_dims(node, lay.base_ndim)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if lay.is_plain:
        return rw.wrap(node, rw.same(node))
    if dims is None:
        _refuse(f"{name} over every dim, batch included")
    if lay.fold:
        _refuse("reduction over a flatten of spatial positions")
    nd = [lay.norm_dim(d) for d in dims]
    if any(lay.base_dims[d].spatial for d in nd):
        if node.kwargs.get("dtype") is not None:
            _refuse(f"{name} with dtype over spatial dims")
        return _global(rw, node, x, nd, name, keepdim)
    # over non-spatial dims: positions untouched
    fn = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax}[name]
    n = rw.call(fn, x.node, tuple(nd), keepdim=keepdim)
    kept = [d for i, d in enumerate(lay.base_dims) if keepdim or i not in nd]
    return rw.result(node, n, kept, like=lay)


# -- pointwise -------------------------------------------------------------------------------

_UNARY_FUNCTIONS = [
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.threshold,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg,
    torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.erf, torch.sign,
    torch.nn.functional.hardshrink, torch.nn.functional.softshrink, F.relu_, F.elu_,
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


@rule(*_bindings(_UNARY_FUNCTIONS), *_UNARY_METHODS)
def _unary(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    others = [rw.v(a) for a in list(node.args[1:]) + list(node.kwargs.values())]
    if any(o.layout is not None or o.spatial for o in others):
        _refuse(f"{_describe(node)}: a second tensor argument where an elementwise op "
                "expects a scalar")
    if x.layout is None:
        return Val(rw.same(node), spatial=x.spatial)
    return Val(rw.same(node), x.layout)


@rule(F.softmax, F.log_softmax, "softmax", "log_softmax", torch.softmax, torch.log_softmax)
def _softmax(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    dim = _arg(node, 1, "dim")
    if dim is None:
        _refuse("softmax without dim")
    if lay.fold:
        _refuse("softmax over a flatten of spatial positions")
    d = lay.norm_dim(dim)
    if lay.base_dims[d].spatial:
        _refuse("softmax over a spatial dim (attention over positions)")
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


@rule(*_BINARY)
def _binary(rw: Rewriter, node: fx.Node) -> Val:
    """Elementwise with broadcasting: all operands must sit on the same lattice, or broadcast
    over it (size 1); a phase-pooled operand is spread over the map it scales."""
    vals = [rw.v(a) for a in node.args]
    kw = {k: rw.v(a) for k, a in node.kwargs.items()}
    tensors = [(i, v) for i, v in enumerate(vals) if v.layout is not None]
    tensors += [(k, v) for k, v in kw.items() if v.layout is not None]
    if not tensors:
        spatial = any(v.spatial for v in vals + list(kw.values()))
        return Val(rw.same(node), spatial=spatial)
    base = rw.base(node)
    out_nd = base.dim()
    out_dims: list[Dim] = [PLAIN] * out_nd
    for _, v in tensors:
        lay = v.layout
        if lay.fold:
            _refuse("elementwise op on a flatten of spatial positions")
        off = out_nd - lay.base_ndim
        for i, d in enumerate(lay.base_dims):
            o = out_dims[off + i]
            if d.spatial:
                if o.spatial and o != d:
                    _refuse(f"operands on different lattices ({o} vs {d}); their baseline "
                            "maps have equal sizes only by accident of the input size")
                out_dims[off + i] = d
    # operands whose size-1 dims meet a map dim must broadcast there; a plain dim with a size
    # above one facing a map dim would add a position-dependent tensor
    args = list(rw.dense_args(node.args))
    kwargs = dict(rw.dense_args(node.kwargs))
    extras: tuple[Dim, ...] | None = None
    converted: dict[Any, fx.Node] = {}
    for key, v in tensors:
        lay = v.layout
        off = out_nd - lay.base_ndim
        for i, d in enumerate(lay.base_dims):
            o = out_dims[off + i]
            if o.spatial and not d.spatial and lay.base[i] != 1:
                _refuse("adds or multiplies a tensor that varies over space (a positional "
                        "embedding is not translation-equivariant)")
        phase = [e for e in lay.extras if e.kind == "phase"]
        targets, like_dims = [], []
        for e in phase:
            pos = next((j for j, o in enumerate(out_dims) if o.kind == "space"
                        and o.axis == e.axis), None)
            if pos is None:
                break
            if out_dims[pos].step != e.step:
                _refuse(f"a phase-pooled tensor (step {e.step}) scales a map on step "
                        f"{out_dims[pos].step}")
            if pos - off < 0:
                _refuse("a phase-pooled tensor lacks the dims to spread over the map")
            targets.append(pos - off)
            like_dims.append(pos)
        if phase and len(targets) == len(phase) and len(phase) == lay.n_extra:
            like = _map_operand(tensors, out_nd, out_dims)
            if like is None:
                _refuse("cannot find the map a phase-pooled tensor scales")
            like_node, like_off = like
            dense = args[key] if isinstance(key, int) else kwargs[key]
            converted[key] = rw.call(ops.phase_to_map_like, dense, like_node, tuple(targets),
                                     tuple(p - like_off for p in like_dims))
            continue
        if lay.n_extra:
            if extras is not None and extras != lay.extras:
                _refuse("operands with different extra dims")
            extras = lay.extras
    for key, n in converted.items():
        if isinstance(key, int):
            args[key] = n
        else:
            kwargs[key] = n
    if extras:
        # operands without the extra dims get trailing singletons to broadcast against them
        for key, v in tensors:
            if key in converted or v.layout.n_extra:
                continue
            dense = args[key] if isinstance(key, int) else kwargs[key]
            fixed = rw.call(ops.append_extras, dense, len(extras))
            if isinstance(key, int):
                args[key] = fixed
            else:
                kwargs[key] = fixed
    n = rw.graph.create_node(node.op, node.target, tuple(args), kwargs)
    return Val(n, Layout(tuple(base.shape), tuple(out_dims) + tuple(extras or ()),
                         len(extras or ())))


def _map_operand(tensors, out_nd, out_dims):
    for key, v in tensors:
        if v.layout.n_extra == 0 and any(d.kind == "space" for d in v.layout.base_dims):
            return v.node, out_nd - v.layout.base_ndim
    return None


@rule("expand_as")
def _expand_as(rw: Rewriter, node: fx.Node) -> Val:
    """``s.expand_as(x)`` consumed only by element-wise ops: they broadcast ``s`` by
    themselves, so it passes as it is (a squeeze-excitation scale, phase-pooled or not)."""
    y = rw.v(node.args[0])
    if y.layout is None or rw.lay(node.args[1]).is_plain:
        return rw.wrap(node, rw.same(node))
    if y.layout.has_space or y.layout.fold:
        _refuse("expanding a spatial map")
    binary = {t for t in _BINARY if not isinstance(t, str)}
    if not all((u.op == "call_function" and u.target in binary)
               or (u.op == "call_method" and u.target in _BINARY) for u in node.users):
        _refuse("an expanded value used by something other than an element-wise op")
    return Val(y.node, y.layout)


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


# -- channel-wise layers ---------------------------------------------------------------------


@rule(F.batch_norm, torch.batch_norm, F.prelu, F.local_response_norm, F.channel_shuffle, torch.channel_shuffle,
      F.normalize)
def _channelwise(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    if lay.fold:
        _refuse("channel-wise layer on a flatten of spatial positions")
    if node.target is F.normalize and lay.base_dims[lay.norm_dim(_arg(node, 2, "dim", 1))].spatial:
        _refuse("normalizes over a spatial dim")
    if lay.base_ndim > 1 and lay.base_dims[1].spatial:
        _refuse("the channel dim (1) is spatial here")
    if lay.n_extra and node.target is F.local_response_norm:
        return _per_extra(rw, node, x)
    return Val(rw.same(node), lay)


@rule(F.layer_norm)
def _layer_norm(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    shape = tuple(_arg(node, 1, "normalized_shape"))
    if lay.fold or any(d.spatial for d in lay.base_dims[lay.base_ndim - len(shape):]):
        _refuse("LayerNorm over spatial positions (only channels-last LayerNorm over channels "
                "is translation-equivariant)")
    if lay.n_extra:
        args = rw.dense_args(node.args)
        return Val(rw.call(ops.last_dims, targets.qualified_name(F.layer_norm), args[0], lay.n_extra, *args[1:],
                           **rw.dense_args(node.kwargs)), lay)
    return Val(rw.same(node), lay)


@rule(F.group_norm, F.instance_norm)
def _group_norm(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    if x.layout.has_space:
        _refuse(f"{node.target.__name__} normalizes with statistics over spatial positions, "
                "which differ between the lattice and the dense map")
    if x.layout.n_extra:
        return _per_extra(rw, node, x)
    return Val(rw.same(node), x.layout)


@rule(F.linear)
def _linear(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    w = rw.v(node.args[1]).node
    bias = _arg(node, 2, "bias")
    b = rw.v(bias).node if bias is not None else None
    if lay.fold:
        return _linear_head(rw, node, x, w, b)
    if lay.base_dims[-1].spatial:
        _refuse("Linear over a spatial dim mixes positions")
    if lay.n_extra:
        n = rw.call(ops.last_dims, targets.qualified_name(F.linear), x.node, lay.n_extra, w, b)
        return Val(n, lay.with_base(rw.base(node).shape, lay.base_dims))
    return Val(rw.same(node), lay.with_base(rw.base(node).shape, lay.base_dims))


def _linear_head(rw: Rewriter, node: fx.Node, x: Val, w, b) -> Val:
    """Flatten + Linear over a C x k x k map: a dilated k x k convolution with the same
    Parameter, reshaped at run time."""
    lay = x.layout
    folded = lay.fold_dims
    if lay.base_ndim != 2 or folded[0].spatial or any(not d.spatial for d in folded[1:]):
        _refuse("Linear over a flatten that is not (N, C, spatial...) in channels-first order")
    spatial = folded[1:]
    nd = len(spatial)
    k = lay.fold_shape
    steps = tuple(d.step for d in spatial)
    n = rw.call(ops.conv, x.node, w, b, steps, (1,) * nd, (0,) * nd, (0,) * nd, (1,) * nd, 1, k)
    rf = _fields_through(rw, node.args[0], k, (1,) * nd, (1,) * nd)
    rw.fields[node] = rf
    rw.record(n, HEAD_KIND, {"in_features": rw.base(node.args[0]).shape[-1]},
              {"kernel": k, "dilation": steps}, steps, steps, rf,
              cost=rw.base(node.args[0]).shape[-1])
    base = rw.base(node)
    dims = (PLAIN, PLAIN) + tuple(Dim("space", d.axis, d.step) for d in spatial)
    return Val(n, Layout(tuple(base.shape), dims, nd))


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
    _refuse(f"tensor attribute '{attr}'")


@rule("dim")
def _ndim(rw: Rewriter, node: fx.Node) -> Val:
    return Val(rw.v(node.args[0]).layout.base_ndim)


@rule(operator.getitem)
def _getitem(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    idx = node.args[1]
    if x.sizes is not None:
        if isinstance(idx, int):
            return Val(rw.same(node), spatial=x.sizes[idx].spatial)
        if isinstance(idx, slice):
            return Val(rw.same(node), sizes=x.sizes[idx])
        _refuse("indexing a size with a computed index")
    if x.items is not None:
        if not isinstance(idx, int):
            _refuse("indexing a list of tensors with a slice")
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
        _refuse("indexing a flatten of spatial positions")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node) for i in items) or any(
            isinstance(i, slice) and isinstance(i.step, fx.Node) for i in items):
        _refuse("indexing with a computed index or step")
    # computed slice bounds (from sizes, which read as the baseline's) are used as they are
    items = [slice(*(rw.v(v).node if isinstance(v, fx.Node) else v
                     for v in (i.start, i.stop, i.step))) if isinstance(i, slice) else i
             for i in items]
    if sum(i is Ellipsis for i in items) > 1:
        _refuse("indexing with two ellipses")
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
                _refuse("indexing a single spatial position")
            if not isinstance(it, slice):
                _refuse("advanced indexing over space")
            if it != slice(None):
                spatial_slices.append((d, it))
            dense_index.append(slice(None))
            step = it.step or 1
            out_dims.append(Dim(dim.kind, dim.axis, dim.step * step))
        else:
            if not isinstance(it, (int, slice)):
                _refuse("advanced indexing")
            dense_index.append(it)
            if isinstance(it, slice):
                out_dims.append(dim)
        d += 1
    out_dims += list(lay.base_dims[d:])
    if any(i != slice(None) for i in dense_index if i is not None) or None in dense_index:
        cur = rw.graph.call_function(operator.getitem, (cur, tuple(dense_index) + (Ellipsis,) * bool(lay.n_extra)))
    # spatial slices, applied on the dense dims where they now sit
    for d_base, sl in spatial_slices:
        pos = _dense_pos(items, d_base)
        step = lay.base_dims[d_base].step
        if (sl.step or 1) < 1:
            _refuse("a negative spatial step")
        cur = rw.call(ops.spatial_slice, cur, pos, sl.start, sl.stop, sl.step or 1, step)
    rw.plan.has_padding = True
    return Val(cur, Layout(tuple(rw.base(node).shape), tuple(out_dims) + lay.extras, lay.n_extra))


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
    lay = x.layout
    base_in = tuple(rw.base(node.args[0]).shape)
    base_out = tuple(rw.base(node).shape)
    if lay.fold:
        if base_in == base_out:
            return Val(x.node, lay)
        _refuse("reshaping a flatten of spatial positions")
    if not lay.has_space:
        if lay.n_extra == 0:
            return rw.wrap(node, rw.same(node))
        n = rw.call(ops.reshape, x.node, _shape_args(rw, node), [None] * len(base_out), lay.n_extra)
        return Val(n, Layout(base_out, tuple(PLAIN for _ in base_out) + lay.extras, lay.n_extra))
    groups = _groups(base_in, base_out)
    if groups is None:
        _refuse(f"reshape {base_in} -> {base_out} cannot be matched dim by dim")
    out_dims: list[Dim] = []
    from_dims: list[int | None] = []
    identity_so_far = True
    for ins, outs in groups:
        in_space = [i for i in ins if lay.base_dims[i].spatial]
        if not in_space:
            out_dims += [PLAIN] * len(outs)
            from_dims += [None] * len(outs)
        elif len(ins) == 1 and len(outs) == 1:
            out_dims.append(lay.base_dims[ins[0]])
            from_dims.append(ins[0])
        elif not any(not lay.base_dims[i].spatial for i in ins):
            merge = len(outs) < len(ins)
            if (merge and outs == [len(base_out) - 1] and ins[-1] == len(base_in) - 1
                    and not lay.n_extra and identity_so_far):
                # all spatial dims merged into the last one: only a reduction may follow
                return Val(x.node, replace(lay, merged=len(ins)))
            _refuse(("merges spatial dims into one sequence of positions (tokens for attention)"
                     if merge else "splits a spatial dim (a window partition)")
                    + ", which is not translation-equivariant on the lattice")
        elif outs == [len(base_out) - 1] and ins[-1] == len(base_in) - 1 and not lay.n_extra:
            # flatten of (channels..., space...) into the last dim: a fold, for a Linear head
            fold_dims = tuple(lay.base_dims[i] for i in ins)
            dims = tuple(out_dims) + fold_dims
            return Val(x.node, Layout(base_out, dims, 0, len(ins),
                                      fold_shape=tuple(base_in[i] for i in ins[1:])))
        else:
            _refuse(f"reshape {base_in} -> {base_out} mixes spatial positions with other dims")
        identity_so_far &= len(ins) == 1 and len(outs) == 1
    n = rw.call(ops.reshape, x.node, _shape_args(rw, node), from_dims, lay.n_extra)
    return Val(n, Layout(base_out, tuple(out_dims) + lay.extras, lay.n_extra))


def _shape_args(rw: Rewriter, node: fx.Node) -> list:
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
    vals = [rw.v(s) for s in shape]
    return [v.node for v in vals]


def _groups(a: Sequence[int], b: Sequence[int]):
    """Match dims of shapes a and b into runs with equal products; None if impossible."""
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins, outs = [], []
        pa = pb = 1
        if i < len(a):
            ins.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            outs.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                outs.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims of the input into this run (flatten of N x C x 1 x 1)
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            ins.append(i)
            i += 1
        groups.append((ins, outs))
    return groups


@rule("permute", torch.permute, "transpose", torch.transpose, "t")
def _permute(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    if lay.fold:
        _refuse("permuting a flatten of spatial positions")
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
    full = perm + list(range(nb, nb + lay.n_extra))
    n = rw.call(torch.permute, x.node, full)
    dims = [lay.base_dims[p] for p in perm]
    return rw.result(node, n, dims, like=lay)


@rule("unsqueeze", torch.unsqueeze)
def _unsqueeze(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    if lay.fold:
        _refuse("unsqueeze of a flatten of spatial positions")
    d = _arg(node, 1, "dim")
    d = d % (lay.base_ndim + 1)
    n = rw.call(torch.unsqueeze, x.node, d)
    dims = list(lay.base_dims)
    dims.insert(d, PLAIN)
    return rw.result(node, n, dims, like=lay)


@rule("squeeze", torch.squeeze)
def _squeeze(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    if lay.fold:
        _refuse("squeeze of a flatten of spatial positions")
    d = _arg(node, 1, "dim")
    if d is None:
        ds = [i for i, n in enumerate(lay.base) if n == 1]
    else:
        ds = [lay.norm_dim(i) for i in (d if isinstance(d, (list, tuple)) else [d])]
        ds = [i for i in ds if lay.base[i] == 1]
    if any(lay.base_dims[i].spatial for i in ds):
        _refuse("squeezing a spatial dim of size 1 (its dense size can be larger)")
    n = rw.call(torch.squeeze, x.node, tuple(ds)) if ds else x.node
    dims = [dd for i, dd in enumerate(lay.base_dims) if i not in ds]
    return rw.result(node, n, dims, like=lay)


@rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(rw: Rewriter, node: fx.Node) -> Val:
    parts = [rw.v(p) for p in node.args[0]]
    dim = _arg(node, 1, "dim", 0)
    lays = [p.layout for p in parts]
    if any(lay is None or lay.fold for lay in lays):
        _refuse("concatenating a flatten of spatial positions")
    first = lays[0]
    if any(lay.dims != first.dims or lay.n_extra != first.n_extra for lay in lays[1:]):
        _refuse("concatenating maps on different lattices")
    stack = node.target is torch.stack
    d = dim % (first.base_ndim + (1 if stack else 0))
    if not stack and first.base_dims[d].spatial:
        _refuse("concatenation along a spatial dim is not translation-equivariant")
    n = rw.call(node.target, [p.node for p in parts], d)
    dims = list(first.base_dims)
    if stack:
        dims.insert(d, PLAIN)
    return rw.result(node, n, dims, like=first)


@rule("chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind, "tensor_split")
def _split(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    if lay.fold:
        _refuse("splitting a flatten of spatial positions")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    default = 0
    dim = _arg(node, 1 if name == "unbind" else 2, "dim", default)
    d = lay.norm_dim(dim)
    if lay.base_dims[d].spatial:
        _refuse(f"{name} along a spatial dim")
    args = list(rw.dense_args(node.args))
    kwargs = dict(rw.dense_args(node.kwargs))
    if name == "unbind":
        args = args[:1] + [d]
        kwargs.pop("dim", None)
    elif len(args) > 2:
        args[2] = d
    else:
        kwargs["dim"] = d
    fn = getattr(torch, name)
    n = rw.call(fn, *args, **kwargs)
    dims = [dd for i, dd in enumerate(lay.base_dims) if not (name == "unbind" and i == d)]
    items = tuple(Val(None, Layout(tuple(b.shape), tuple(dims) + lay.extras, lay.n_extra))
                  for b in rw.base(node))
    return Val(n, items=items)


@rule(F.pad, torch._C._nn.pad)
def _pad(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    pad = list(_arg(node, 1, "pad"))
    if any(isinstance(p, fx.Node) for p in pad):
        return _computed_pad(rw, node, x, pad)
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", None)
    if lay.is_plain:
        return rw.wrap(node, rw.same(node))
    if lay.fold or lay.n_extra:
        _refuse("padding a map with extra dims")
    nb = lay.base_ndim
    dense = []
    steps = []
    for j in range(len(pad) // 2):
        dim = lay.base_dims[nb - 1 - j]
        s = dim.step if dim.spatial else 1
        if dim.spatial and (pad[2 * j] or pad[2 * j + 1]):
            steps.append(s)
        dense += [pad[2 * j] * s, pad[2 * j + 1] * s]
    if mode == "circular" and any(p for p in pad) and any(s > 1 for s in steps):
        _refuse("circular padding of a map on a lattice wraps to the wrong phase")
    kwargs = {"mode": mode}
    if value is not None:
        kwargs["value"] = value
    n = rw.call(F.pad, x.node, dense, **kwargs)
    rw.plan.has_padding |= any(p > 0 for p in pad)
    rw.record(n, "pad", {"pad": tuple(pad), "mode": mode}, {"pad": tuple(dense)},
              steps or [1], steps or [1], tuple(rw.field_of(node.args[0])))
    rw.fields[node] = rw.field_of(node.args[0])
    return rw.result(node, n, lay.base_dims)


def _computed_pad(rw: Rewriter, node: fx.Node, x: Val, pad: list) -> Val:
    """Padding computed from sizes in ``forward()`` (TensorFlow's "same" done by hand): the
    amounts are computed when the dense model runs, from the baseline's sizes, as the
    baseline computes them, and scaled by the lattice step of each axis."""
    lay = x.layout
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", None)
    if lay.is_plain:
        return rw.wrap(node, rw.same(node))
    if lay.fold or lay.n_extra:
        _refuse("padding a map with extra dims")
    nb = lay.base_ndim
    scales = []
    for j in range(len(pad) // 2):
        dim = lay.base_dims[nb - 1 - j]
        scales += [dim.step if dim.spatial else 1] * 2
    if mode == "circular" and any(s > 1 for s in scales):
        _refuse("circular padding of a map on a lattice wraps to the wrong phase")
    amounts = [rw.v(p).node for p in pad]
    n = rw.call(ops.pad, x.node, amounts, scales, mode, value)
    rw.plan.has_padding = True
    steps = sorted({s for s in scales if s > 1}) or [1]
    rw.record(n, "pad", {"pad": "computed from sizes", "mode": mode},
              {"pad": "computed when run, times the step"}, steps, steps,
              tuple(rw.field_of(node.args[0])))
    rw.fields[node] = rw.field_of(node.args[0])
    return rw.result(node, n, lay.base_dims)


# -- refusals with reasons -------------------------------------------------------------------

_REFUSED = {
    F.interpolate: "upsampling is not translation-equivariant on the lattice",
    F.upsample: "upsampling is not translation-equivariant on the lattice",
    F.grid_sample: "sampling at computed positions is not translation-equivariant",
    F.pixel_shuffle: "pixel shuffle moves channels into space",
    F.pixel_unshuffle: "pixel unshuffle moves space into channels",
    F.conv_transpose1d: "transposed convolution upsamples",
    F.conv_transpose2d: "transposed convolution upsamples",
    F.conv_transpose3d: "transposed convolution upsamples",
    F.scaled_dot_product_attention: "attention over positions mixes the whole map",
    F.multi_head_attention_forward: "attention over positions mixes the whole map",
    F.unfold: "unfold moves space into channels",
    F.fold: "fold moves channels into space",
    F.lp_pool1d: "LpPool has no rule yet",
    F.lp_pool2d: "LpPool has no rule yet",
    F.fractional_max_pool2d: "fractional pooling is random and not equivariant",
}


def _refused(reason):
    return lambda rw, node: _refuse(reason)


for _fn, _reason in _REFUSED.items():
    FUNCTIONS[_fn] = _refused(_reason)


def _module_reason(m) -> str:
    name = type(m).__name__
    if "Transpose" in name:
        return f"{name}: transposed convolution upsamples"
    if "Upsample" in name:
        return f"{name}: upsampling is not translation-equivariant on the lattice"
    if "Attention" in name:
        return f"{name}: attention over positions mixes the whole map"
    if "BatchNorm" in name:
        return f"{name} without running statistics normalizes over positions"
    return f"no rule for module type {name}"


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"method '{node.target}'"
    t = node.target
    return f"'{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}'".replace("'.", "'")
