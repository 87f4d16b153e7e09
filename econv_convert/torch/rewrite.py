"""The PyTorch backend's emitter: a lowered baseline graph in, a dense graph out.

One pass over the nodes in order. Each baseline node is mapped to a dense node and a
:class:`~econv_convert.core.layout.Layout` saying what the dense tensor's dims mean. This
module only translates: it reads a node's arguments (what kind of layer, which geometry),
asks :mod:`econv_convert.core.rules` what the layer becomes, and emits that as fx nodes whose
run-time work is done by :mod:`econv_convert.torch.ops`. Rules are keyed by the function (or
tensor method) a node calls. A node with no rule is refused by name unless nothing spatial
reaches it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.lattice import Field, Window, same_padding
from econv_convert.core.layout import PLAIN, Dim, Layout, LayoutError
from econv_convert.core.records import GLOBAL_POOL_MODES, LayerRecord
from econv_convert.core.rules import Refusal, refuse
from econv_convert.errors import UnsupportedLayerError
from econv_convert.torch import ops, outputs, targets
from econv_convert.torch.capture import module_path, node_name

_REDUCE_FNS = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax}
_REDUCE_NAMES = {"mean": "mean", "sum": "sum", "amax": "max", torch.mean: "mean",
                 torch.sum: "sum", torch.amax: "max"}

# helpers the rules emit besides their own targets and the run-time ops
_EMITTED = (torch.mean, torch.sum, torch.amax, torch.unsqueeze, torch.squeeze, torch.permute,
            F.pad, operator.getitem, torch.chunk, torch.tensor_split, torch.unbind)
targets.register(*_EMITTED)


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
    # baseline node -> the dense node holding its value and what each dense dim means, for
    # every value that carries a map (the per-node phase proof reads it)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per input axis, the outputs' receptive field, step and padding reach (size, step, lo, hi)
    out_field: list[list[int]] = field(default_factory=list)
    support: list[list[int]] = field(default_factory=list)  # window pooling's, if any

    @property
    def total_step(self) -> tuple[int, ...]:
        steps = [tuple(d[1] for d in o["dims"] if d[0] == "space") for o in self.outputs]
        return max(steps, key=lambda s: math.prod(s)) if steps else ()


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        if len(v) != n:
            refuse(f"expected {n} values, got {v}")
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
                self._note_node(node, val)
            except Refusal as r:
                raise UnsupportedLayerError(node_name(node), r.reason,
                                            r.hint or self._until_hint(node)) from None
            except UnsupportedLayerError:
                raise
            except (IndexError, TypeError, ValueError) as e:
                raise UnsupportedLayerError(
                    node_name(node), f"unexpected arguments ({type(e).__name__}: {e})"
                ) from e
        self.graph.lint()
        return self.graph, self.plan

    def _note_node(self, node: fx.Node, val: Val) -> None:
        lay = val.layout
        if lay is None or not isinstance(val.node, fx.Node) or not (lay.has_space or lay.n_extra):
            return
        self.plan.nodes[node.name] = {
            "dense": val.node.name, "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
            "n_extra": lay.n_extra, "flat": bool(lay.fold or lay.merged)}

    def _until_hint(self, refused: fx.Node) -> str:
        """``--until`` the last top-level module that ran before the refused node (and does
        not contain it): its output is a dense feature map the user can have."""
        inside = module_path(refused).split(".")[0]
        last = ""
        for node in self.gm.graph.nodes:
            if node is refused:
                break
            top = module_path(node).split(".")[0]
            if top and top != inside:
                last = top
        if not last:
            return ""
        return f"densify the part before it with --until {last}"

    def _inherited_field(self, node: fx.Node) -> tuple[Field, ...]:
        """A layer with no window sees what its inputs see (the largest, per axis)."""
        found = [self.fields[n] for n in node.all_input_nodes if self.fields.get(n)]
        if not found:
            return ()
        return tuple(Field.merge(fs) for fs in zip(*found))

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
            refuse(_module_reason(self.gm.get_submodule(node.target)))
        if node.op == "call_function":
            rule = FUNCTIONS.get(node.target) or _refused_by_name(node.target)
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
            refuse("expected a tensor argument")
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
            refuse("expected a tensor result")
        extras = like.extras if like is not None else ()
        dims = tuple(dims) + tuple(extras)
        return Val(dense, Layout(tuple(base.shape), dims, len(extras)))

    def field_of(self, a: Any) -> tuple[Field, ...]:
        return self.fields.get(a, ()) if isinstance(a, fx.Node) else ()

    def record(self, dense: fx.Node, rec: rules.Record) -> None:
        """Note a rewritten layer (the core's record, with this graph's names)."""
        node = self.node
        self.plan.records.append(LayerRecord(
            node_name(node), rec.kind, rec.before, rec.after, tuple(rec.step_in),
            tuple(rec.step_out), tuple(rec.field), node.name, dense.name, rec.note,
            int(rec.cost)))

    def tensor_inputs(self, node: fx.Node) -> list[Val]:
        found: list[Val] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.env[n]))
        return found

    # -- placeholders and outputs ---------------------------------------------------------

    def _placeholder(self, node: fx.Node) -> Val:
        v = self.base(node)
        n = self.graph.placeholder(node.target)
        if not isinstance(v, torch.Tensor) or v.dim() < 3:
            refuse("the model input must be a batched tensor (N, C, spatial...) with 1 to 3 "
                   "spatial dims")
        self.fields[node] = tuple(Field() for _ in range(v.dim() - 2))
        return Val(n, rules.input_layout(tuple(v.shape)))

    def _output(self, node: fx.Node) -> Val:
        found = []

        def visit(a):
            val = self.v(a)
            if val.items is not None and isinstance(a, fx.Node):  # a model's output class
                for item in val.items:
                    visit_val(item)
                return val.node
            if val.layout is not None and val.layout.fold:
                val = self._flat_output(val)
            visit_val(val)
            return val.node

        def visit_val(val):
            if val.layout is not None:
                lay = val.layout
                if lay.fold:
                    refuse("the output is a flatten over spatial positions; only a Linear "
                           "layer may consume such a flatten")
                if lay.merged:
                    refuse("the output merges spatial positions into one dim; only a "
                           "reduction over them may consume it")
                found.append({
                    "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                    "base_ndim": lay.base_ndim,
                })

        args = fx.node.map_aggregate(node.args[0], visit)
        self.plan.outputs = found
        self.plan.out_field = [list(astuple(f)) for f in self._inherited_field(node)]
        self.graph.output(args)
        return Val(None)

    def _flat_output(self, val: Val) -> Val:
        """An output that flattens a map of one position at the example (``x.view(n, -1)``
        after a pool as large as the map): with ``window`` pooling, one output per window
        position (the flattened dims become trailing positions, as a window-pooled head's
        do); with ``lattice``, the baseline's own flatten of the lattice points, at every
        size. Other modes have no form for it."""
        lay = val.layout
        if any(n != 1 for n in lay.fold_shape):
            return val  # refused by the caller: a flatten over several positions
        if self.mode == "window":
            self.plan.global_pools += 1  # a window pool of one position
            return Val(val.node, Layout(lay.base, lay.dims, lay.fold))
        if self.mode == "lattice":
            steps = tuple(d.step for d in lay.fold_dims)
            n = self.call(ops.lattice_flatten, val.node, steps)
            return Val(n, Layout.plain(lay.base))
        refuse(f"the output flattens a map of one position at the example (--global-pool "
               f"{self.mode} has no form for it: at larger inputs it has more positions)",
               "--global-pool window gives one output per window position; lattice gives "
               "the baseline's own output")

    # -- the default: nothing spatial reaches the node ------------------------------------

    def _unknown(self, node: fx.Node) -> Val:
        """Nothing spatial reaches the node: it computes what it computes in the baseline.
        (Sizes read off a map are the baseline's sizes, so a value computed from them is the
        baseline's value too; a tensor made from them is refused where it meets a map.)"""
        ins = self.tensor_inputs(node)
        what = _describe(node)
        if any(i.layout is not None and not i.layout.is_plain for i in ins):
            refuse(f"no rule for {what} on a spatial map; it may mix positions, which would "
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


def _per_extra(rw: Rewriter, node: fx.Node, x: Val) -> Val:
    """Apply the baseline op unchanged at each extra position (phase dims, head positions)."""
    args = list(rw.dense_args(node.args))
    n = rw.call(ops.per_position, targets.qualified_name(node.target), args[0],
                x.layout.n_extra, *args[1:], **rw.dense_args(node.kwargs))
    base = rw.base(node)
    return Val(n, Layout(tuple(base.shape), tuple(PLAIN for _ in base.shape) + x.layout.extras,
                         x.layout.n_extra))


# -- window layers ------------------------------------------------------------------------------


def _window_layer(rw: Rewriter, node: fx.Node, kind: str, windows: Sequence[Window],
                  cost: int, emit: Callable[[rules.WindowPlan], fx.Node], **kw) -> Val:
    """A convolution or pool: the core's plan, emitted in this graph; ``emit(plan)`` emits
    the dense form."""
    x = rw.v(node.args[0])
    plan = rules.window(kind, x.layout, windows, rw.field_of(node.args[0]),
                        output_stride=rw.output_stride, cost=cost, mode=rw.mode, **kw)
    if plan.form == "plain":
        return rw.wrap(node, rw.same(node))
    if plan.form == "extra":
        return _per_extra(rw, node, x)
    rw.plan.has_padding |= plan.padded
    if plan.form == "global":
        checked = rw.call(ops.within, x.node, plan.steps, plan.limits, node_name(node))
        rw.plan.notes.append(f"{node_name(node)}: {plan.note}")
        return _emit_global(rw, node, Val(checked, x.layout), plan.pool)
    rw.fields[node] = plan.fields
    if plan.form == "kept":
        if plan.kept_stride is not None:
            rw.plan.kept_stride = plan.kept_stride
        n = rw.same(node)
    else:
        n = emit(plan)
    rw.record(n, plan.record)
    return rw.result(node, n, plan.out_dims)


@rule(F.conv1d, F.conv2d, F.conv3d)
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


@rule(F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
      torch.max_pool3d)
def _max_pool(rw: Rewriter, node: fx.Node) -> Val:
    nd = len(rw.lay(node.args[0]).base) - 2
    if _arg(node, 6, "return_indices", False):
        refuse("max pooling with return_indices (the indices are positions, not features)")
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


@rule(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)
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


_ADAPTIVE_AVG = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


@rule(*_ADAPTIVE_AVG, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
      torch.adaptive_avg_pool1d, torch._C._nn.adaptive_avg_pool2d,
      torch._C._nn.adaptive_avg_pool3d)
def _adaptive(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    nd = len(x.layout.base) - 2
    avg = "avg" in getattr(node.target, "__name__", "")
    if not avg and _arg(node, 2, "return_indices", False):
        refuse("adaptive max pooling with return_indices")
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
    rw.plan.notes.append(f"{node_name(node)}: {note}")
    rw.plan.specialized[node.name] = list(h)
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
    rw.plan.has_padding = True  # its baseline drops the rows a block does not fill
    rw.record(n, rec)
    return rw.result(node, n, out.base_dims)


# -- global pooling ----------------------------------------------------------------------------


def _global(rw: Rewriter, node: fx.Node, x: Val, dims: Sequence[int], reduce: str,
            keepdim: bool, base: tuple[int, ...] | None = None) -> Val:
    """Reduction over whole spatial dims: global pooling in the chosen mode."""
    plan = rules.global_pool(x.layout, dims, reduce, rw.mode, keepdim,
                             rw.field_of(node.args[0]))
    return _emit_global(rw, node, x, plan, base)


def _emit_global(rw: Rewriter, node: fx.Node, x: Val, plan: rules.GlobalPlan,
                 base: tuple[int, ...] | None = None) -> Val:
    reduce = "amax" if plan.reduce == "max" else plan.reduce
    extra = {"extent": list(plan.extent)} if plan.extent else {}
    n = rw.call(ops.global_pool, x.node, list(plan.space), list(plan.steps), plan.mode, reduce,
                True, **extra)
    if plan.fields:
        rw.fields[node] = plan.fields
    if plan.support:
        rw.plan.support = [list(s) for s in plan.support]
    if plan.others or not plan.keepdim:
        # the remaining (non-spatial) dims are reduced as the baseline does; pooled dims
        # have size 1 now, and reducing them again changes nothing
        dims = sorted(plan.space + plan.others)
        n = rw.call(_REDUCE_FNS[plan.reduce], n, tuple(dims), keepdim=plan.keepdim)
    rw.plan.global_pools += 1
    rw.record(n, plan.record)
    base_shape = tuple(rw.base(node).shape) if base is None else base
    return Val(n, Layout(base_shape, plan.out_dims, plan.n_extra))


def _on_merged(rw: Rewriter, node: fx.Node) -> Val:
    """A node reading merged spatial positions (``x.view(n, c, -1)``): a mean, sum or amax
    over the merged dim is global pooling over the spatial dims; anything else is refused."""
    name = _REDUCE_NAMES.get(node.target)
    x = rw.v(node.args[0])
    lay = x.layout
    if name is None or lay is None or not lay.merged or any(
            v.layout is not None and v.layout.merged for v in rw.tensor_inputs(node)[1:]):
        refuse(f"{_describe(node)} on merged spatial positions (only a mean, sum or amax over "
               "them has a rule: global pooling)")
    if node.kwargs.get("dtype"):
        refuse(f"{_describe(node)} with a dtype over merged spatial positions")
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
            refuse(f"{_describe(node)} with a dtype over spatial dims")
        return _global(rw, node, x, nd, name, keepdim)
    # over non-spatial dims: positions untouched
    n = rw.call(_REDUCE_FNS[name], x.node, tuple(nd), keepdim=keepdim)
    kept = [d for i, d in enumerate(lay.base_dims) if keepdim or i not in nd]
    return rw.result(node, n, kept, like=lay)


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


@rule(*_bindings(_UNARY_FUNCTIONS), *_UNARY_METHODS)
def _unary(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    others = [rw.v(a) for a in list(node.args[1:]) + list(node.kwargs.values())]
    if any(o.layout is not None or o.spatial for o in others):
        refuse(f"{_describe(node)}: a second tensor argument where an elementwise op "
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
        refuse("softmax without dim")
    if lay.fold:
        refuse("softmax over a flatten of spatial positions")
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
        refuse("expanding a spatial map")
    binary = {t for t in _BINARY if not isinstance(t, str)}
    if not all((u.op == "call_function" and u.target in binary)
               or (u.op == "call_method" and u.target in _BINARY) for u in node.users):
        refuse("an expanded value used by something other than an element-wise op")
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


@rule(F.batch_norm, ops.batch_norm, torch.batch_norm, F.prelu, F.local_response_norm,
      F.channel_shuffle, torch.channel_shuffle, F.normalize)
def _channelwise(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    axes = [lay.norm_dim(_arg(node, 2, "dim", 1))] if node.target is F.normalize else [1]
    rules.channel_axes(lay, axes if lay.base_ndim > 1 else [], "a channel-wise layer")
    if lay.n_extra and node.target is F.local_response_norm:
        return _per_extra(rw, node, x)
    return Val(rw.same(node), lay)


@rule(F.layer_norm, torch.layer_norm)
def _layer_norm(rw: Rewriter, node: fx.Node) -> Val:
    x = rw.v(node.args[0])
    lay = x.layout
    shape = tuple(_arg(node, 1, "normalized_shape"))
    rules.channel_axes(lay, range(lay.base_ndim - len(shape), lay.base_ndim),
                       "LayerNorm (only channels-last LayerNorm over channels is "
                       "translation-equivariant)")
    if lay.n_extra:
        args = rw.dense_args(node.args)
        return Val(rw.call(ops.last_dims, targets.qualified_name(node.target), args[0],
                           lay.n_extra, *args[1:], **rw.dense_args(node.kwargs)), lay)
    return Val(rw.same(node), lay)


@rule(F.group_norm, F.instance_norm, torch.group_norm, torch.instance_norm)
def _group_norm(rw: Rewriter, node: fx.Node) -> Val:
    """Group and instance norm normalize with statistics over positions; an instance norm on
    its running statistics (``use_input_stats=False``: eval mode with tracked statistics) is
    a channel-wise affine map, like BatchNorm in eval mode."""
    x = rw.v(node.args[0])
    name = getattr(node.target, "__name__", str(node.target))
    if name == "instance_norm" and _arg(node, 5, "use_input_stats", True) is False:
        rules.channel_axes(x.layout, [1] if x.layout.base_ndim > 1 else [],
                           "a channel-wise layer")
        return Val(rw.same(node), x.layout)
    rules.statistics_over_space(x.layout, name)
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
    plan = rules.linear(lay, rw.base(node.args[0]).shape[-1], rw.field_of(node.args[0]))
    if plan.kind == "head":
        # Flatten + Linear over a C x k x k map: a dilated k x k convolution with the same
        # Parameter, reshaped at run time
        nd = len(plan.kernel)
        n = rw.call(ops.conv, x.node, w, b, plan.steps, (1,) * nd, (0,) * nd, (0,) * nd,
                    (1,) * nd, 1, plan.kernel)
        rw.fields[node] = plan.fields
        rw.record(n, plan.record)
        return Val(n, Layout(tuple(rw.base(node).shape), plan.out_dims, plan.n_extra))
    if plan.kind == "per_position":
        n = rw.call(ops.last_dims, targets.qualified_name(F.linear), x.node, lay.n_extra, w, b)
        return Val(n, lay.with_base(rw.base(node).shape, lay.base_dims))
    return Val(rw.same(node), lay.with_base(rw.base(node).shape, lay.base_dims))


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
    refuse(f"tensor attribute '{attr}'")


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
        refuse("indexing a size with a computed index")
    if x.items is not None:
        if not isinstance(idx, int):
            refuse("indexing a list of tensors with a slice")
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
        refuse("indexing a flatten of spatial positions")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node) for i in items) or any(
            isinstance(i, slice) and isinstance(i.step, fx.Node) for i in items):
        refuse("indexing with a computed index or step")
    # computed slice bounds (from sizes, which read as the baseline's) are used as they are
    items = [slice(*(rw.v(v).node if isinstance(v, fx.Node) else v
                     for v in (i.start, i.stop, i.step))) if isinstance(i, slice) else i
             for i in items]
    if sum(i is Ellipsis for i in items) > 1:
        refuse("indexing with two ellipses")
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
                refuse("indexing a single spatial position")
            if not isinstance(it, slice):
                refuse("advanced indexing over space")
            if it != slice(None):
                spatial_slices.append((d, it))
            dense_index.append(slice(None))
            out_dims.append(rules.spatial_slice(dim, it.step or 1))
        else:
            if not isinstance(it, (int, slice)):
                refuse("advanced indexing")
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
    rw.plan.has_padding = True
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
        rw.plan.has_padding = True  # its baseline needs whole blocks: the far border differs
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
    makes of an in-place change of a channel slice): every position as in the baseline."""
    x, src = rw.v(node.args[0]), rw.v(_arg(node, 1, "src"))
    lay = x.layout
    d = lay.norm_dim(_arg(node, 2, "dim", 0))
    if lay.base_dims[d].spatial:
        refuse("writing into a slice of spatial positions")
    if src.layout is None or [dd for i, dd in enumerate(src.layout.dims) if i != d] != \
            [dd for i, dd in enumerate(lay.dims) if i != d]:
        refuse("writing a value into a map on another lattice")
    return Val(rw.same(node), lay)


@rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(rw: Rewriter, node: fx.Node) -> Val:
    parts = [rw.v(p) for p in node.args[0]]
    dim = _arg(node, 1, "dim", 0)
    if any(p.layout is None for p in parts):
        refuse("concatenating something that is not a tensor")
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
        refuse("splitting a flatten of spatial positions")
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
        rw.plan.has_padding = True
    else:
        kwargs = {"mode": mode} | ({"value": value} if value is not None else {})
        n = rw.call(F.pad, x.node, [a * s for a, s in zip(amounts, _pairs(plan.scales))],
                    **kwargs)
        rw.plan.has_padding |= any(p > 0 for p in amounts)
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


# -- refusals with reasons -------------------------------------------------------------------

_REFUSED = {
    F.interpolate: "upsampling", F.upsample: "upsampling", F.grid_sample: "sampling",
    F.pixel_shuffle: "depth_to_space", F.conv_transpose1d: "transposed_convolution",
    F.conv_transpose2d: "transposed_convolution", F.conv_transpose3d: "transposed_convolution",
    F.scaled_dot_product_attention: "attention", F.multi_head_attention_forward: "attention",
    F.unfold: "im2col", F.fold: "col2im", F.lp_pool1d: "lp_pool", F.lp_pool2d: "lp_pool",
    F.fractional_max_pool2d: "random_pooling",
}


def _refused(kind):
    return lambda rw, node: rules.refuse_kind(kind)


for _fn, _kind in _REFUSED.items():
    FUNCTIONS[_fn] = _refused(_kind)

# the same layers as torch.export spells them (aten operators, or their torch bindings), by
# name: one reason per kind of layer, whichever capture met it
_REFUSED_NAMES = (("upsample", "upsampling"), ("_upsample", "upsampling"),
                  ("conv_transpose", "transposed_convolution"),
                  ("pixel_shuffle", "depth_to_space"), ("grid_sampler", "sampling"),
                  ("scaled_dot_product", "attention"), ("_scaled_dot_product", "attention"),
                  ("_native_multi_head_attention", "attention"), ("im2col", "im2col"),
                  ("col2im", "col2im"), ("fractional_max_pool", "random_pooling"))


def _refused_by_name(target: Any) -> Callable | None:
    name = (target._schema.name.split("::", 1)[-1] if isinstance(target, torch._ops.OpOverload)
            else getattr(target, "__name__", ""))
    for prefix, kind in _REFUSED_NAMES:
        if name.startswith(prefix):
            return _refused(kind)
    return None


def _module_reason(m) -> str:
    """Why a module left as a module (no lowering) is refused."""
    name = type(m).__name__
    kinds = {nn.ConvTranspose1d: "transposed_convolution", nn.ConvTranspose2d:
             "transposed_convolution", nn.ConvTranspose3d: "transposed_convolution",
             nn.Upsample: "upsampling", nn.UpsamplingNearest2d: "upsampling",
             nn.UpsamplingBilinear2d: "upsampling", nn.MultiheadAttention: "attention",
             nn.PixelShuffle: "depth_to_space", nn.Fold: "col2im", nn.Unfold: "im2col"}
    kind = next((k for cls, k in kinds.items() if isinstance(m, cls)), None)
    if kind is not None:
        return f"{name}: {rules.REFUSED[kind]}"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{name} without running statistics normalizes over positions"
    return f"no rule for module type {name}"


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"method '{node.target}'"
    t = node.target
    return f"'{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}'".replace("'.", "'")
