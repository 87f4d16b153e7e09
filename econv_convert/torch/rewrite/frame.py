"""The PyTorch backend's frame: one pass over a lowered baseline graph, in order.

Each baseline node is mapped to a dense node and a :class:`~econv_convert.core.layout.Layout`
saying what the dense tensor's dims mean. The frame reads nodes, keeps each value's record
(:class:`Val`), looks up the rule registered for what a node calls (:func:`rule`: the family
modules beside this one, named as the ONNX backend's) and refuses, by name, a node with no rule
that something spatial reaches. Rules ask :mod:`econv_convert.core.rules` what a layer
becomes and emit that as fx nodes whose run-time work is done by
:mod:`econv_convert.torch.ops`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import astuple
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.lattice import Field
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.records import GLOBAL_POOL_MODES, LayerRecord, Rewritten
from econv_convert.core.rules import refuse
from econv_convert.core.walk import Val, Walk, registrar
from econv_convert.torch import ops, targets
from econv_convert.torch.capture import MODULES, module_path, node_name

# helpers the rules emit besides their own targets and the run-time ops
_EMITTED = (torch.mean, torch.sum, torch.amax, torch.unsqueeze, torch.squeeze, torch.permute,
            F.pad, operator.getitem, torch.chunk, torch.tensor_split, torch.unbind)
targets.register(*_EMITTED)


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        if len(v) != n:
            rules.refuse_kind("argument_count", n=n, got=v)
        return tuple(int(x) for x in v)
    return tuple(int(v) for _ in range(n))


class Rewriter(Walk[fx.Node, Val]):
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
        self.rewritten = Rewritten()
        self.node: fx.Node | None = None

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> tuple[fx.Graph, Rewritten]:
        self.walk()
        self.graph.lint()
        return self.graph, self.rewritten

    # -- what the walk asks of a backend (core/walk.py) ----------------------------------

    def nodes(self):
        return self.gm.graph.nodes

    def label(self, node: fx.Node) -> str:
        return node_name(node)

    def rewrite(self, node: fx.Node) -> None:
        self.env[node] = val = self._rewrite(node)
        if self.rewritten.records and self.rewritten.records[-1].fx_name == node.name \
                and val.layout is not None:
            r = self.rewritten.records[-1]
            r.base_shape = val.layout.base
            r.dense_shape = val.layout.dense_shape()
        if node not in self.fields:
            self.fields[node] = self._inherited_field(node)

    def made(self, node: fx.Node):
        val = self.env[node]
        dense = val.node.name if isinstance(val.node, fx.Node) else None
        yield node.name, dense, val.layout

    def until_hint(self, refused: fx.Node) -> str:
        """``until=`` the last top-level module that ran before the refused node (and does
        not contain it): its output is a dense feature map the user can have."""
        inside = module_path(refused).split(".")[0]
        names = self.gm.meta.get(MODULES)  # the model's own (not a name from the capture)
        last = ""
        for node in self.gm.graph.nodes:
            if node is refused:
                break
            top = module_path(node).split(".")[0]
            if top and top != inside and (names is None or top in names):
                last = top
        if not last:
            return ""
        return f"densify the part before it with until={last}"

    # -- what the window switch asks (core/walk.py) -------------------------------------

    def as_is(self, node: fx.Node) -> Val:
        return self.wrap(node, self.same(node))

    def per_extra(self, node: fx.Node) -> Val:
        return _per_extra(self, node, self.v(node.args[0]))

    def covering_pool(self, node: fx.Node, plan: rules.WindowPlan) -> Val:
        x = self.v(node.args[0])
        checked = self.call(ops.within, x.node, plan.steps, plan.limits, node_name(node))
        return HOOKS["global_pool"](self, node, Val(checked, x.layout), plan.pool)

    def kept(self, node: fx.Node) -> fx.Node:
        return self.same(node)

    def window_done(self, node: fx.Node, dense: fx.Node, plan: rules.WindowPlan) -> Val:
        self.record(dense, plan.record)
        return self.result(node, dense, plan.out_dims)

    def set_fields(self, node: fx.Node, fields: tuple[Field, ...]) -> None:
        self.fields[node] = fields

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
        if rule not in ON_MERGED and any(
                v.layout is not None and v.layout.merged for v in self.tensor_inputs(node)):
            return HOOKS["on_merged"](self, node)
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
            rules.refuse_kind("not_a_tensor", what="argument")
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
            rules.refuse_kind("not_a_tensor", what="result")
        extras = like.extras if like is not None else ()
        dims = tuple(dims) + tuple(extras)
        return Val(dense, Layout(tuple(base.shape), dims, len(extras)))

    def field_of(self, a: Any) -> tuple[Field, ...]:
        return self.fields.get(a, ()) if isinstance(a, fx.Node) else ()

    def record(self, dense: fx.Node, rec: rules.Record) -> None:
        """Note a rewritten layer (the core's record, with this graph's names)."""
        node = self.node
        self.rewritten.records.append(
            LayerRecord.named(rec, node_name(node), node.name, dense.name))

    def tensor_inputs(self, node: fx.Node) -> list[Val]:
        found: list[Val] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.env[n]))
        return found

    # -- placeholders and outputs ---------------------------------------------------------

    def _placeholder(self, node: fx.Node) -> Val:
        v = self.base(node)
        n = self.graph.placeholder(node.target)
        if not isinstance(v, torch.Tensor) or v.dim() < 3:
            rules.refuse_kind("model_input")
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
                found.append(rules.output_view(val.layout, "a Linear layer"))

        args = fx.node.map_aggregate(node.args[0], visit)
        self.rewritten.outputs = found
        self.rewritten.out_field = [list(astuple(f)) for f in self._inherited_field(node)]
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
            self.rewritten.global_pools += 1  # a window pool of one position
            return Val(val.node, Layout(lay.base, lay.dims, lay.fold))
        if self.mode == "lattice":
            steps = tuple(d.step for d in lay.fold_dims)
            n = self.call(ops.lattice_flatten, val.node, steps)
            return Val(n, Layout.plain(lay.base))
        rules.refuse_kind("flat_output", mode=self.mode)

    # -- the default: nothing spatial reaches the node ------------------------------------

    def _unknown(self, node: fx.Node) -> Val:
        """Nothing spatial reaches the node: it computes what it computes in the baseline.
        (Sizes read off a map are the baseline's sizes, so a value computed from them is the
        baseline's value too; a tensor made from them is refused where it meets a map.)"""
        ins = self.tensor_inputs(node)
        what = _describe(node)
        if any(i.layout is not None and not i.layout.is_plain for i in ins):
            rules.no_rule(what)
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
ON_MERGED: set[Callable] = set()  # rules that take inputs with merged phase dims as they are
# what the frame calls in its rule modules, registered by them (the frame imports none):
# "global_pool" (rw, node, x, plan) emits a covering pool, "on_merged" (rw, node) runs an op
# on inputs whose phases a global pool merged
HOOKS: dict[str, Callable[..., Val]] = {}

hook = registrar(HOOKS)  # ``@hook(name)`` on a rule module's function


def rule(*handled, merged: bool = False):
    """Register a rule for call targets (functions, or tensor method names). A rule may emit
    its target as it is, so each function is also admitted in dense graphs. ``merged``: the
    rule takes inputs whose phase dims a global pool merged as they are (elementwise ops);
    other rules see such inputs through the ``on_merged`` hook."""
    def register(fn):
        if merged:
            ON_MERGED.add(fn)
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


# -- refusals with reasons -------------------------------------------------------------------

_REFUSED = {
    F.interpolate: "upsampling", F.upsample: "upsampling", F.grid_sample: "sampling",
    F.pixel_shuffle: "depth_to_space", F.conv_transpose1d: "transposed_convolution",
    F.conv_transpose2d: "transposed_convolution", F.conv_transpose3d: "transposed_convolution",
    F.scaled_dot_product_attention: "attention", F.multi_head_attention_forward: "attention",
    F.unfold: "im2col", F.fold: "col2im",
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
        return rules.REFUSED["batchnorm_no_statistics"].format(what=name)
    return rules.REFUSED["no_module_rule"].format(what=name)


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"method '{node.target}'"
    t = node.target
    return f"'{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}'".replace("'.", "'")
