"""The ONNX backend's frame: one pass over a baseline ONNX graph, in order.

The same one pass as the PyTorch backend's (:mod:`econv_convert.torch.rewrite`, both running
:class:`~econv_convert.core.walk.Walk`): every node in
order is mapped to dense nodes and a :class:`~econv_convert.core.layout.Layout` per output
saying what the dense tensor's dims mean. What each layer kind becomes is decided by
:mod:`econv_convert.core.rules`; the rules (the family modules beside this one, named as the
PyTorch backend's) read ONNX nodes (op type, attributes, constant inputs) and emit the plan
as ONNX nodes. The run-time corrections (tight crops, ceil-mode
ends, average-pool divisors, phase counts) are ONNX arithmetic on the input's actual size
through :class:`~econv_convert.onnx.graph.SymInt`, running the same formulas of
:mod:`econv_convert.core.lattice`, so the dense graph is exact for any input size, with
dynamic spatial axes.

Every node keeps its output names, and the model's initializers are not touched (new
constants are ``Constant`` nodes), so weights move back by name (:func:`onnx_api.inverse`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import astuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from econv_convert.core import rules
from econv_convert.core.lattice import Field
from econv_convert.core.layout import PLAIN, Layout
from econv_convert.core.records import GLOBAL_POOL_MODES, LayerRecord, Rewritten
from econv_convert.core.rules import Refusal
from econv_convert.core.walk import Val, Walk, registrar
from econv_convert.errors import UnsupportedLayerError
from econv_convert.onnx.graph import Builder

# ops with no dense form whatever their geometry (the reasons are the core's)
REFUSED = {
    "Resize": "upsampling", "Upsample": "upsampling", "ConvTranspose": "transposed_convolution",
    "DepthToSpace": "depth_to_space", "Col2Im": "col2im", "MaxRoiPool": "region_pooling",
    "RoiAlign": "region_pooling", "GridSample": "sampling", "MaxUnpool": "unpooling",
    "NonMaxSuppression": "detection", "If": "subgraph", "Loop": "subgraph", "Scan": "subgraph",
}
_SHAPE_PLUMBING = {"Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Identity", "Reshape",
                   "Flatten"}
_BIG = 2**62


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"{name} ({node.op_type})"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxRewriter(Walk[onnx.NodeProto, None]):
    """Rewrite ``model`` (opset >= 13, default domain) whose baseline shapes at the example
    input are ``shapes`` and whose constant tensors are ``consts``. ``channels_last``: the
    image input is (N, spatial..., C)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 types: dict[str, int], consts: dict[str, np.ndarray], global_pool: str,
                 output_stride: int | None = None, channels_last: bool = False) -> None:
        if global_pool not in GLOBAL_POOL_MODES:
            raise ValueError(global_pool)
        self.model = model
        self.g = model.graph
        self.shapes = shapes
        self.types = types
        self.consts = consts
        self.mode = global_pool
        self.output_stride = output_stride
        self.channels_last = channels_last
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        used = {n for node in self.g.node for n in (*node.input, *node.output)}
        used |= {i.name for i in self.g.initializer} | {i.name for i in self.g.input}
        used |= {n.name for n in self.g.node}
        self.b = Builder(used, opset)
        self.env: dict[str, Val] = {}
        self.fields: dict[str, tuple[Field, ...]] = {}
        self.rewritten = Rewritten(graph=onnx.GraphProto())
        self.node: onnx.NodeProto | None = None

    # -- driver -------------------------------------------------------------------------

    def run(self) -> Rewritten:
        for init in self.g.initializer:
            self.env[init.name] = Val(layout=Layout.plain(tuple(init.dims)))
        # one image input: onnx/model.py refused any other graph before the walk
        (x,) = [i for i in self.g.input if i.name not in self.env]
        shape = self.shapes[x.name]
        if len(shape) < 3:
            raise UnsupportedLayerError(x.name, rules.REFUSED["model_input"])
        self.env[x.name] = Val(layout=rules.input_layout(shape, self.channels_last))
        self.fields[x.name] = tuple(Field() for _ in shape[2:])
        self.note(x.name, x.name, self.env[x.name].layout, x.name)
        self.walk()
        self._outputs()
        self.rewritten.graph.node.extend(self.b.nodes)
        return self.rewritten

    # -- what the walk asks of a backend (core/walk.py) ----------------------------------

    def nodes(self):
        consumed = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        for node in self.g.node:
            yield _without_unused_outputs(node, consumed, self.b.opset)

    def label(self, node: onnx.NodeProto) -> str:
        return node_label(node)

    def rewrite(self, node: onnx.NodeProto) -> None:
        self._rewrite(node)
        self.inherit_field(node)  # a layer with no window of its own sees what its inputs see

    def made(self, node: onnx.NodeProto):
        for out in node.output:
            v = self.env.get(out)
            yield out, out, v.layout if v is not None else None  # dense values keep names

    def until_hint(self, refused: onnx.NodeProto) -> str:
        """``until=`` the map the refused node reads (or the last map before it, for a
        flatten of positions), where a node makes it."""
        producer = {o: n for n in self.g.node for o in n.output}
        x = next((i for i in refused.input if i in self.env and i in producer
                  and self.env[i].layout is not None and not self.env[i].layout.is_plain),
                 None)
        while x is not None and (self.env[x].layout.merged or self.env[x].layout.fold):
            x = producer[x].input[0] if x in producer else None
            x = x if x in producer and x in self.env else None
        return f"densify the part before it with until={x}" if x else ""

    # -- what the window switch asks (core/walk.py) -------------------------------------

    def as_is(self, node: onnx.NodeProto) -> None:
        self._same(node)

    def per_extra(self, node: onnx.NodeProto) -> None:
        _per_extra(self, node, node.input[0], self.lay(node.input[0]))

    def covering_pool(self, node: onnx.NodeProto, plan: rules.WindowPlan) -> None:
        HOOKS["covering_pool"](self, node, plan)

    def kept(self, node: onnx.NodeProto) -> str:
        self._same(node)
        return node.output[0]

    def window_done(self, node: onnx.NodeProto, dense: str, plan: rules.WindowPlan) -> None:
        self.set(dense, Layout(self.base_shape(dense), plan.out_dims))
        self.record(plan.record, dense)

    def set_fields(self, node: onnx.NodeProto, fields: tuple[Field, ...]) -> None:
        self.fields[node.output[0]] = fields

    def _rewrite(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            if self._any_spatial(node):
                rules.refuse_kind("domain_op", what=f"{node.domain}::{node.op_type}")
            return self._same(node)
        op = node.op_type
        vals = [self.v(i) for i in node.input if i]
        if any(v.layout is not None and v.layout.merged for v in vals):
            return HOOKS["on_merged"](self, node)
        if op in _SHAPE_PLUMBING and vals and vals[0].spatial and vals[0].layout is not None \
                and vals[0].layout.is_plain:
            # integer plumbing on a value computed from spatial sizes: it stays such a value
            self.emit(node, list(node.input))
            for o in node.output:
                self.set(o, Layout.plain(self.shapes[o]) if o in self.shapes else None,
                         spatial=True)
            return None
        if op in REFUSED:
            if self._any_spatial(node) or REFUSED[op] == "subgraph":
                rules.refuse_kind(REFUSED[op])
            return self._same(node)
        rule = RULES.get(op)  # pointwise ops too (:mod:`.pointwise` registers them)
        if rule is not None:
            return rule(self, node)
        return self._unknown(node)

    # -- helpers ------------------------------------------------------------------------

    def v(self, name: str) -> Val:
        if name == "":
            return Val()
        if name not in self.env:
            if name in self.consts:
                return Val(layout=Layout.plain(self.consts[name].shape))
            rules.refuse_kind("not_produced", name=name)
        return self.env[name]

    def lay(self, name: str) -> Layout:
        val = self.v(name)
        if val.layout is None:
            rules.refuse_kind("no_shape", name=name)
        return val.layout

    def base_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            rules.refuse_kind("no_inferred_shape", name=name)
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def need_const(self, name: str, what: str) -> np.ndarray:
        c = self.const(name)
        if c is None:
            rules.refuse_kind("needs_constant", what=what)
        return c

    def set(self, name: str, layout: Layout | None, **kw) -> None:
        self.env[name] = Val(layout=layout, **kw)

    def set_plain(self, name: str) -> None:
        self.set(name, Layout.plain(self.shapes[name]) if name in self.shapes else None)

    def _any_spatial(self, node: onnx.NodeProto) -> bool:
        for i in node.input:
            if i:
                v = self.v(i)
                if v.spatial_size or (v.layout is not None and not v.layout.is_plain):
                    return True
        return False

    def _same(self, node: onnx.NodeProto) -> None:
        """The node as it is; its outputs are what they are in the baseline."""
        self.b.nodes.append(node)
        for o in node.output:
            if o:
                self.set_plain(o)

    def _unknown(self, node: onnx.NodeProto) -> None:
        for i in node.input:
            v = self.v(i) if i else Val()
            if v.layout is not None and not v.layout.is_plain:
                rules.no_rule(node.op_type)
            if v.spatial_size:
                rules.refuse_kind("tensor_from_size", what=node.op_type)
        self._same(node)

    def emit(self, node: onnx.NodeProto, inputs: Sequence[str], **attr_overrides) -> None:
        """The node with new inputs and attributes, keeping its name and outputs."""
        a = attrs(node)
        a.update(attr_overrides)
        a = {k: v for k, v in a.items() if v is not None}
        self.b.nodes.append(helper.make_node(node.op_type, list(inputs), list(node.output),
                                             name=node.name or None, **a))

    def field_of(self, name: str) -> tuple[Field, ...]:
        return self.fields.get(name, ())

    def inherit_field(self, node: onnx.NodeProto) -> None:
        found = [self.fields[i] for i in node.input if self.fields.get(i)]
        if found:
            f = tuple(Field.merge(fs) for fs in zip(*found))
            for o in node.output:
                self.fields.setdefault(o, f)

    def record(self, rec: rules.Record, out: str | None = None) -> None:
        """Note a rewritten layer (the core's record, with this graph's names and shapes);
        ``out``: the value it made, if not the node's first output."""
        node = self.node
        out = out or node.output[0]
        lay = self.env[out].layout if out in self.env else None
        self.rewritten.records.append(LayerRecord.named(
            rec, node_label(node), node.name, out, lay.base if lay else (),
            lay.dense_shape() if lay else ()))

    def fill(self, name: str, value: float) -> str:
        """A scalar of ``name``'s element type (a Pad value)."""
        return self.b.scalar(value, self.types.get(name, TensorProto.FLOAT))

    def _outputs(self) -> None:
        for o in self.g.output:
            try:
                view = rules.output_view(self.lay(o.name), "Gemm or MatMul")
            except Refusal as r:
                raise UnsupportedLayerError(o.name, r.reason) from None
            self.rewritten.outputs.append({"name": o.name, **view})
        found = [self.fields[o.name] for o in self.g.output if self.fields.get(o.name)]
        self.rewritten.out_field = [list(astuple(Field.merge(fs))) for fs in zip(*found)]


# ops whose number of outputs is their mode, read or not: a BatchNormalization with its
# statistics outputs runs in training mode (the spec before opset 14; onnxruntime does so too)
_OUTPUTS_SET_THE_MODE = {"BatchNormalization"}


def _without_unused_outputs(node: onnx.NodeProto, consumed: set[str],
                            opset: int) -> onnx.NodeProto:
    """The node without the optional outputs that nothing consumes: old exporters name them
    (a Dropout's mask, a MaxPool's indices) though nothing reads them, and a rule need not
    refuse what is never used."""
    if len(node.output) < 2 or node.domain not in ("", "ai.onnx") or \
            node.op_type in _OUTPUTS_SET_THE_MODE:
        return node
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except Exception:  # an op the installed onnx does not know: leave it to the rules
        return node
    formal = schema.outputs
    outs = list(node.output)
    for i in range(1, len(outs)):
        param = formal[min(i, len(formal) - 1)]
        optional = param.option == onnx.defs.OpSchema.FormalParameterOption.Optional
        if outs[i] and outs[i] not in consumed and optional:
            outs[i] = ""
    while len(outs) > 1 and not outs[-1]:
        outs.pop()
    if outs == list(node.output):
        return node
    trimmed = onnx.NodeProto()
    trimmed.CopyFrom(node)
    del trimmed.output[:]
    trimmed.output.extend(outs)
    return trimmed


RULES: dict[str, Callable[[OnnxRewriter, onnx.NodeProto], None]] = {}


def rule(*ops: str):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return register


# what the frame calls in its rule modules, registered by them (the frame imports none):
# "covering_pool" (rw, node, plan) for a pool whose one window covers its input, "on_merged"
# (rw, node) for a node reading a value whose phases a global pool merged
HOOKS: dict[str, Callable[..., None]] = {}

hook = registrar(HOOKS)  # ``@hook(name)`` on a rule module's function


def _per_extra(rw: OnnxRewriter, node: onnx.NodeProto, x: str, lay: Layout) -> None:
    """A layer on a map with extra dims (a squeeze-and-excitation branch after phase pooling,
    convolutions after a head): the node as it is, with the extra dims moved into the batch
    and back."""
    b = rw.b
    r, e = lay.base_ndim, lay.n_extra
    perm = [0, *range(r, r + e), *range(1, r)]
    y = b.reshape(b.transpose(x, perm), [-1] + [b.dim(x, i) for i in range(1, r)])
    z = b.op1(node.op_type, [y, *node.input[1:]], **attrs(node))
    z = b.reshape(z, [b.dim(x, 0)] + [b.dim(x, r + k) for k in range(e)]
                  + [b.dim(z, i) for i in range(1, r)])
    b.transpose(z, list(np.argsort(perm)), node.output[0])
    out = node.output[0]
    rw.set(out, Layout(rw.base_shape(out), tuple(PLAIN for _ in range(r)) + lay.extras, e))


def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        rules.refuse_kind("axis_range", axis=axis, rank=rank)
    return axis % rank
