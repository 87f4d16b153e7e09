"""The ONNX backend's emitter: a baseline ONNX graph in, its dense equivalent out.

The same one pass as the PyTorch emitter (:mod:`econv_convert.torch.rewrite`): every node in
order is mapped to dense nodes and a :class:`~econv_convert.core.layout.Layout` per output
saying what the dense tensor's dims mean. What each layer kind becomes is decided by
:mod:`econv_convert.core.rules`; this module reads ONNX nodes (op type, attributes, constant
inputs) and emits the plan as ONNX nodes. The run-time corrections (tight crops, ceil-mode
ends, average-pool divisors, phase counts) are ONNX arithmetic on the input's actual size
through :class:`~econv_convert.onnx.graph.SymInt`, running the same formulas of
:mod:`econv_convert.core.lattice`, so the dense graph is exact for any input size, with
dynamic spatial axes.

Every node keeps its output names, and the model's initializers are not touched (new
constants are ``Constant`` nodes), so weights move back by name (:func:`onnx_api.inverse`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from econv_convert.core import rules
from econv_convert.core.lattice import Field, Window, dense_out
from econv_convert.core.layout import PLAIN, Layout, LayoutError
from econv_convert.core.records import GLOBAL_POOL_MODES, LayerRecord
from econv_convert.core.rules import Refusal, refuse
from econv_convert.errors import UnsupportedLayerError
from econv_convert.onnx.graph import Builder, SymInt

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
# ops with no dense form whatever their geometry (the reasons are the core's)
REFUSED = {
    "Resize": "upsampling", "Upsample": "upsampling", "ConvTranspose": "transposed_convolution",
    "DepthToSpace": "depth_to_space", "Col2Im": "col2im", "MaxRoiPool": "region_pooling",
    "RoiAlign": "region_pooling", "GridSample": "sampling", "MaxUnpool": "unpooling",
    "NonMaxSuppression": "detection", "If": "subgraph", "Loop": "subgraph", "Scan": "subgraph",
}
_SHAPE_PLUMBING = {"Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Identity", "Reshape",
                   "Flatten"}
_REDUCE = {"ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceSum": "sum",
           "GlobalAveragePool": "mean", "GlobalMaxPool": "max"}
_REDUCE_OPS = {"mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin", "sum": "ReduceSum"}
_BIG = 2**62


@dataclass
class Val:
    """A value of the dense graph: its layout, or, for a shape-derived integer tensor, which
    of its entries are spatial sizes (a size query reads the baseline's sizes, so these are
    the baseline's values)."""

    layout: Layout | None
    sizes: tuple[bool, ...] | None = None  # per entry of a 1-D shape tensor: a spatial size?
    tainted: bool = False  # computed from a spatial size

    @property
    def spatial_size(self) -> bool:
        return self.tainted or bool(self.sizes and any(self.sizes))


@dataclass
class Result:
    graph: onnx.GraphProto
    records: list[LayerRecord] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_padding: bool = False
    global_pools: int = 0
    kept_stride: tuple[int, ...] = ()
    peak_elements: int = 0
    peak_node: str = ""
    # per input axis, the outputs' receptive field: [size, step, reach lo, reach hi]
    out_field: list[list[int]] = field(default_factory=list)
    support: list[list[int]] = field(default_factory=list)  # window pooling's, if any
    # value -> its dense value and dims, for every value that carries a map (DenseInfo.nodes)
    nodes: dict[str, dict] = field(default_factory=dict)


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"{name} ({node.op_type})"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxRewriter:
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
        self.result = Result(onnx.GraphProto())
        self.node: onnx.NodeProto | None = None

    # -- driver -------------------------------------------------------------------------

    def run(self) -> Result:
        for init in self.g.initializer:
            self.env[init.name] = Val(Layout.plain(tuple(init.dims)))
        inputs = [i for i in self.g.input if i.name not in self.env]
        if len(inputs) != 1:
            raise UnsupportedLayerError(
                "graph inputs", f"expected one image input, found {len(inputs)}: "
                + ", ".join(i.name for i in inputs))
        x = inputs[0]
        shape = self.shapes[x.name]
        if len(shape) < 3:
            raise UnsupportedLayerError(x.name, "the model input must be N, C, spatial... with "
                                        "1 to 3 spatial dims")
        self.env[x.name] = Val(rules.input_layout(shape, self.channels_last))
        self.fields[x.name] = tuple(Field() for _ in shape[2:])
        self._note_value(x.name)
        consumed = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        for node in self.g.node:
            node = _without_unused_outputs(node, consumed, self.b.opset)
            self.node = node
            try:
                self._rewrite(node)
            except Refusal as r:
                raise UnsupportedLayerError(node_label(node), r.reason,
                                            r.hint or self._until_hint(node)) from None
            except UnsupportedLayerError:
                raise
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise UnsupportedLayerError(
                    node_label(node), f"unexpected attributes or inputs ({type(e).__name__}: "
                    f"{e})") from e
            for out in node.output:
                v = self.env.get(out)
                if v is not None and v.layout is not None and not v.layout.is_plain:
                    n = v.layout.dense_numel()
                    if n > self.result.peak_elements:
                        self.result.peak_elements, self.result.peak_node = n, node_label(node)
                self._note_value(out)
        self._outputs()
        self.result.graph.node.extend(self.b.nodes)
        return self.result

    def _note_value(self, name: str) -> None:
        """The node map the per-node proof reads: a value that carries a map, and what its
        dense dims mean (its dense value has the same name)."""
        v = self.env.get(name)
        lay = v.layout if v is not None else None
        if lay is None or not (lay.has_space or lay.n_extra):
            return
        self.result.nodes[name] = {
            "dense": name, "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
            "n_extra": lay.n_extra, "flat": bool(lay.fold or lay.merged)}

    def _until_hint(self, refused: onnx.NodeProto) -> str:
        """``--until`` the map the refused node reads (or the last map before it, for a
        flatten of positions), where a node makes it."""
        producer = {o: n for n in self.g.node for o in n.output}
        x = next((i for i in refused.input if i in self.env and i in producer
                  and self.env[i].layout is not None and not self.env[i].layout.is_plain),
                 None)
        while x is not None and (self.env[x].layout.merged or self.env[x].layout.fold):
            x = producer[x].input[0] if x in producer else None
            x = x if x in producer and x in self.env else None
        return f"densify the part before it with --until {x}" if x else ""

    def _rewrite(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            if self._any_spatial(node):
                refuse(f"operator {node.domain}::{node.op_type} has no rule on a spatial map")
            return self._same(node)
        op = node.op_type
        vals = [self.v(i) for i in node.input if i]
        if any(v.layout is not None and v.layout.merged for v in vals):
            return _on_merged(self, node)
        if op in _SHAPE_PLUMBING and vals and vals[0].tainted and vals[0].layout is not None \
                and vals[0].layout.is_plain:
            # integer plumbing on a value computed from spatial sizes: it stays such a value
            self.emit(node, list(node.input))
            for o in node.output:
                self.set(o, Layout.plain(self.shapes[o]) if o in self.shapes else None,
                         tainted=True)
            return None
        if op in REFUSED:
            if self._any_spatial(node) or REFUSED[op] == "subgraph":
                rules.refuse_kind(REFUSED[op])
            return self._same(node)
        rule = RULES.get(op)
        if rule is not None:
            return rule(self, node)
        if op in UNARY:
            return _unary(self, node)
        if op in BINARY:
            return _broadcast(self, node)
        return self._unknown(node)

    # -- helpers ------------------------------------------------------------------------

    def v(self, name: str) -> Val:
        if name == "":
            return Val(None)
        if name not in self.env:
            if name in self.consts:
                return Val(Layout.plain(self.consts[name].shape))
            refuse(f"input '{name}' is not produced by any node")
        return self.env[name]

    def lay(self, name: str) -> Layout:
        val = self.v(name)
        if val.layout is None:
            refuse(f"input '{name}' has no known shape")
        return val.layout

    def base_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            refuse(f"shape inference could not find the shape of '{name}' at the example input")
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def need_const(self, name: str, what: str) -> np.ndarray:
        c = self.const(name)
        if c is None:
            refuse(f"{what} must be a constant")
        return c

    def set(self, name: str, layout: Layout | None, **kw) -> None:
        self.env[name] = Val(layout, **kw)

    def set_plain(self, name: str) -> None:
        self.env[name] = Val(Layout.plain(self.shapes[name]) if name in self.shapes else None)

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
            v = self.v(i) if i else Val(None)
            if v.layout is not None and not v.layout.is_plain:
                refuse(f"no rule for {node.op_type} on a spatial map; it may mix positions, "
                       "which would break equivalence on the lattice")
            if v.spatial_size:
                refuse(f"{node.op_type} makes a tensor from a spatial size (a tensor indexed by "
                       "positions is not translation-equivariant)")
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

    def record(self, rec: rules.Record) -> None:
        """Note a rewritten layer (the core's record, with this graph's names and shapes)."""
        node = self.node
        out = node.output[0]
        lay = self.env[out].layout if out in self.env else None
        self.result.records.append(LayerRecord(
            node_label(node), rec.kind, rec.before, rec.after, tuple(rec.step_in),
            tuple(rec.step_out), tuple(rec.field), node.name, out, rec.note, int(rec.cost),
            lay.base if lay else (), lay.dense_shape() if lay else ()))

    def fill(self, name: str, value: float) -> str:
        """A scalar of ``name``'s element type (a Pad value)."""
        return self.b.scalar(value, self.types.get(name, TensorProto.FLOAT))

    def _outputs(self) -> None:
        for o in self.g.output:
            lay = self.lay(o.name)
            if lay.fold:
                raise UnsupportedLayerError(o.name, "the output is a flatten over spatial "
                                            "positions; only Gemm/MatMul may consume it")
            if lay.merged:
                raise UnsupportedLayerError(o.name, "the output merges spatial positions into "
                                            "one dim; only a reduction over them may "
                                            "consume it")
            self.result.outputs.append({
                "name": o.name,
                "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                "base_ndim": lay.base_ndim,
            })
        found = [self.fields[o.name] for o in self.g.output if self.fields.get(o.name)]
        self.result.out_field = [list(astuple(Field.merge(fs))) for fs in zip(*found)]


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
            ext = dil[i] * (kernel[i] - 1) + 1
            if stride[i] == 1:
                total = ext - 1
            else:  # depends on the input size (TensorFlow's SAME)
                total = rw.b.maximum(((h[i] + stride[i] - 1) // stride[i] - 1) * stride[i]
                                     + ext - h[i], 0)
            small = total // 2
            big = total - small
            lo[i], hi[i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto != "NOTSET":
        refuse(f"auto_pad '{auto}'")
    return [Window(k, t, p, q, d, ceil) for k, t, p, q, d in
            zip(kernel, stride, lo, hi, dil, strict=True)]


def _auto_pad(node: onnx.NodeProto) -> str:
    auto = attrs(node).get("auto_pad", b"NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def _static(v) -> bool:
    return not isinstance(v, SymInt)


def _window_layer(rw: OnnxRewriter, node: onnx.NodeProto, kind: str, kernel: Sequence[int],
                  cost: int, **kw) -> rules.WindowPlan | None:
    """Shared start of every window rule: the core's plan, with the plain, extra, kept-stride
    and global forms emitted here. Returns the plan when the dense form is the rule's to emit
    (its output layout is set and recorded by :func:`_done`), else None."""
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
    if plan.form == "plain":
        rw._same(node)
        return None
    if plan.form == "extra":
        _per_extra(rw, node, x, lay)
        return None
    rw.result.has_padding |= plan.padded
    if plan.form == "global":
        _covering_pool(rw, node, x, plan)
        return None
    rw.fields[node.output[0]] = plan.fields
    if plan.form == "kept":
        if plan.kept_stride is not None:
            rw.result.kept_stride = plan.kept_stride
        rw._same(node)
        _done(rw, node, plan)
        return None
    return plan


def _done(rw: OnnxRewriter, node: onnx.NodeProto, plan: rules.WindowPlan) -> None:
    out = node.output[0]
    rw.set(out, Layout(rw.base_shape(out), plan.out_dims))
    rw.record(plan.record)


def _covering_pool(rw: OnnxRewriter, node: onnx.NodeProto, x: str, plan: rules.WindowPlan):
    """A pool whose one window covers its whole input is a global pool while the map fits in
    the kernel; past that the output is NaN (ONNX has no assertion to stop the run with)."""
    b = rw.b
    pooled = b.fresh("pooled")
    _emit_global(rw, x, plan.pool, pooled, rw.base_shape(node.output[0]))
    fits = None
    for i, (s, limit) in enumerate(zip(plan.steps, plan.limits)):
        n = _lattice_size(rw, x, i, s)
        ok = b.op1("LessOrEqual", [b.int_tensor(n), b.const([limit])])
        fits = ok if fits is None else b.op1("And", [fits, ok])
    dtype = rw.types.get(x, TensorProto.FLOAT)
    out = node.output[0]
    b.op1("Where", [fits, pooled, b.scalar(math.nan, dtype)], out)
    rw.env[out] = rw.env[pooled]
    rw.fields[out] = rw.field_of(x)
    rw.result.notes.append(f"{node_label(node)}: {plan.note} (NaN past that)")


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


def _lattice_size(rw: OnnxRewriter, x: str, i: int, step: int):
    """The baseline size of spatial axis ``i`` of dense map ``x``, when the graph runs."""
    H = rw.b.dim(x, 2 + i)
    return (H - 1) // step + 1


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


def _effective_dilation(kernel, dws) -> list[int]:
    return [d.dilation if k > 1 else 1 for k, d in zip(kernel, dws)]


@rule("Conv")
def _conv(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w_name = node.input[0], node.input[1]
    wshape = rw.base_shape(w_name) if w_name in rw.shapes else rw.lay(w_name).base
    kernel = tuple(wshape[2:])
    if rw.v(w_name).layout is not None and not rw.v(w_name).layout.is_plain:
        refuse("the convolution's weight depends on positions")
    plan = _window_layer(rw, node, "conv", kernel, wshape[1] * math.prod(kernel))
    if plan is None:
        return
    nd = len(kernel)
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
                 dilations=_effective_dilation(kernel, plan.dense),
                 group=int(attrs(node).get("group", 1)))
    _crop(rw, y, x, plan.steps, plan.windows, node.output[0] if strided else None)
    _done(rw, node, plan)


@rule("MaxPool")
def _max_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        refuse("max pooling with indices (the indices are positions, not features)")
    kernel = tuple(int(k) for k in attrs(node)["kernel_shape"])
    plan = _window_layer(rw, node, "max_pool", kernel, math.prod(kernel), reduce="max")
    if plan is None:
        return
    x = node.input[0]
    nd = len(kernel)
    lo, hi = _pad_lists(plan.dense)
    # explicit padding (pooling pads must stay below the kernel in onnxruntime) with the
    # lowest finite value: onnxruntime's max over a window of padding only is that, not -inf
    lowest = float(np.finfo(helper.tensor_dtype_to_np_dtype(
        rw.types.get(x, TensorProto.FLOAT))).min)
    src = rw.b.pad(x, nd + 2, list(range(2, 2 + nd)), lo, hi, rw.fill(x, lowest)) \
        if _nonzero(lo + hi) else x
    strided = any(w.stride > 1 for w in plan.windows)
    y = rw.b.op1("MaxPool", [src], None if strided else node.output[0],
                 kernel_shape=list(kernel), strides=[1] * nd, pads=[0] * (2 * nd),
                 dilations=[d.dilation for d in plan.dense])
    _crop(rw, y, x, plan.steps, plan.windows, node.output[0] if strided else None)
    _done(rw, node, plan)


def _window_sum(rw: OnnxRewriter, src: str, channels: int, kernel, dws, dtype: int) -> str:
    """Sum over each dilated window: a depthwise convolution with a kernel of ones."""
    nd = len(kernel)
    ones = rw.b.const(np.ones((channels, 1, *kernel)), dtype)
    return rw.b.op1("Conv", [src, ones], kernel_shape=list(kernel), strides=[1] * nd,
                    pads=[0] * (2 * nd), dilations=[d.dilation for d in dws], group=channels)


@rule("AveragePool", "LpPool")
def _avg_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Average (and Lp) pooling as a depthwise convolution of ones, dilated, divided by a
    divisor map: the same window sum applied to a map of ones padded the way the baseline
    counts (the padding too with ``count_include_pad``, never the ceil-mode extension). Runs
    in every opset (AveragePool has ``dilations`` only from opset 19)."""
    a = attrs(node)
    lp = node.op_type == "LpPool"
    kernel = tuple(int(k) for k in a["kernel_shape"])
    include = bool(a.get("count_include_pad", 0))
    plan = _window_layer(rw, node, "lp_pool" if lp else "avg_pool", kernel, math.prod(kernel),
                         reduce=None if lp else "mean", count_include_pad=include)
    if plan is None:
        return
    x = node.input[0]
    steps, ws, dws = plan.steps, plan.windows, plan.dense
    nd = len(kernel)
    channels = rw.lay(x).base[1]
    dtype = rw.types.get(x, TensorProto.FLOAT)
    axes = list(range(2, 2 + nd))
    lo, hi = _pad_lists(dws)
    src = x
    if lp:
        p = float(a.get("p", 2))
        src = rw.b.op1("Pow", [rw.b.op1("Abs", [x]), rw.b.scalar(p, dtype)])
    if _nonzero(lo + hi):
        src = rw.b.pad(src, nd + 2, axes, lo, hi, rw.fill(x, 0.0))
    total = _crop(rw, _window_sum(rw, src, channels, kernel, dws, dtype), x, steps, ws, None)
    if lp:
        rw.b.op1("Pow", [total, rw.b.scalar(1.0 / p, dtype)], node.output[0])
        _done(rw, node, plan)
        return
    # the divisor map, from a map of ones shaped like one channel of x
    one_shape = rw.b.op1("Concat", [rw.b.const([1, 1]), rw.b.shape_slice(x, 2, 2 + nd)], axis=0)
    ones = rw.b.op1("ConstantOfShape", [one_shape],
                    value=helper.make_tensor("one", dtype, [1], [1]))
    if include:
        real_hi = [w.pad_hi * s for w, s in zip(ws, steps)]
        ones = rw.b.pad(ones, nd + 2, axes, lo, real_hi, rw.fill(x, 1.0)) \
            if _nonzero(lo + real_hi) else ones
        ceil_extra = [h - r for h, r in zip(hi, real_hi)]
        if _nonzero(ceil_extra):
            ones = rw.b.pad(ones, nd + 2, axes, [0] * nd, ceil_extra, rw.fill(x, 0.0))
    elif _nonzero(lo + hi):
        ones = rw.b.pad(ones, nd + 2, axes, lo, hi, rw.fill(x, 0.0))
    count = _crop(rw, _window_sum(rw, ones, 1, kernel, dws, dtype), x, steps, ws, None)
    rw.b.op1("Div", [total, count], node.output[0])
    _done(rw, node, replace(plan, record=replace(
        plan.record, note="depthwise Conv of ones / divisor map (any opset)")))


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
    sizes = [(_lattice_size(rw, x, i, s) // r - 1) * (s * r) + 1 for i, s in enumerate(steps)]
    taps = []
    for i in range(r):
        for j in range(r):
            taps.append(b.slice(x, [2, 3], [i * steps[0], j * steps[1]],
                                [i * steps[0] + sizes[0], j * steps[1] + sizes[1]]))
    b.op1("Concat", taps, node.output[0], axis=1)
    rec, fields = rules.space_to_depth_record(lay, r, rw.field_of(x))
    rw.fields[node.output[0]] = fields
    rw.result.has_padding = True  # the baseline drops the rows a block does not fill
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), out.dims))
    rw.record(rec)


# -- global pooling ------------------------------------------------------------------------


def _global(rw: OnnxRewriter, node: onnx.NodeProto, x: str, axes: Sequence[int], reduce: str,
            keepdims: bool) -> None:
    """Reduction over whole spatial axes: global pooling in the chosen mode."""
    plan = rules.global_pool(rw.lay(x), axes, reduce, rw.mode, keepdims,
                             rw.field_of(x))
    _emit_global(rw, x, plan, node.output[0], rw.base_shape(node.output[0]))


def _emit_global(rw: OnnxRewriter, x: str, plan: rules.GlobalPlan, out: str,
                 base_shape: Sequence[int]) -> None:
    lay = rw.lay(x)
    b = rw.b
    space, steps = list(plan.space), list(plan.steps)
    axes = sorted(plan.space + plan.others)
    op = _REDUCE_OPS[plan.reduce]
    rank = len(lay.dims)
    if plan.mode in ("lattice", "dense"):
        src = x
        if plan.mode == "lattice" and any(s > 1 for s in steps):
            src = b.slice(x, space, [0] * len(space), [_BIG] * len(space), steps)
        b.reduce(op, src, axes, plan.keepdim, out)
    elif plan.mode == "window":
        # per pooled axis, the window's m taps (s apart) as m slices of the map, combined
        # element-wise (a separable reduction); an input smaller than the window gives empty
        # slices, which the checks report as an empty output
        y = x
        combine = {"mean": "Sum", "sum": "Sum", "max": "Max", "min": "Min"}[plan.reduce]
        for d, s, m in zip(space, steps, plan.extent):
            taps = [b.slice(y, [d], [k * s], [-(m - 1 - k) * s if k < m - 1 else _BIG])
                    for k in range(m)]
            y = b.op1(combine, taps) if m > 1 else taps[0]
            if plan.reduce == "mean" and m > 1:
                y = b.op1("Mul", [y, rw.fill(x, 1.0 / m)])
        # the positions go to the end; the pooled dims stay with size 1, then are reduced
        # (with the other reduced dims) as the baseline does
        k = len(space)
        y = b.unsqueeze(y, list(range(rank, rank + k)))
        perm = list(range(rank + k))
        for j, d in enumerate(space):
            perm[d], perm[rank + j] = perm[rank + j], perm[d]
        y = b.transpose(y, perm)
        b.reduce(op, y, axes, plan.keepdim, out)
        rw.fields[out] = plan.fields
    else:
        fill = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}[plan.reduce]
        # pad each pooled axis to a multiple of its step, split it into (count, step), and
        # reduce the counts: what is left is one value per phase
        sizes = [b.dim(x, d) for d in space]
        blocks = [(H + s - 1) // s for H, s in zip(sizes, steps)]
        ends = [n * s - H for n, s, H in zip(blocks, steps, sizes)]
        src = b.pad(x, rank, space, [0] * len(space), ends, rw.fill(x, fill))
        target: list = []
        reduced = []
        for d in range(rank):
            if d in axes:
                reduced.append(len(target))
            if d in space:
                k = space.index(d)
                target += [blocks[k], steps[k]]
            else:
                target.append(b.dim(x, d))
        y = b.reshape(src, target)
        y = b.reduce("ReduceSum" if plan.reduce == "mean" else op, y, reduced, False)
        # now: the dims in order, each spatial one replaced by its phases; phases go last
        left = [d for d in range(rank) if d not in axes or d in space]
        y = b.transpose(y, [i for i, d in enumerate(left) if d not in space]
                        + [i for i, d in enumerate(left) if d in space])
        if plan.keepdim:
            y = b.unsqueeze(y, list(axes))
        if plan.reduce in ("mean", "max", "min"):
            r = [b.const(np.arange(s)) for s in steps]
            counts = [b.op1("Div", [b.op1("Sub", [b.int_tensor(H - 1 + s), rr]),
                                    b.const([s])]) for H, s, rr in zip(sizes, steps, r)]
            count = counts[0]
            for c in counts[1:]:
                count = b.op1("Mul", [b.unsqueeze(count, [-1]), c])
            dtype = rw.types.get(x, TensorProto.FLOAT)
            if plan.reduce == "mean":
                y = b.op1("Div", [y, b.op1("Cast", [count], to=dtype)], out)
            else:
                empty = b.op1("Equal", [count, b.const([0])])
                y = b.op1("Where", [empty, b.scalar(math.nan, dtype), y], out)
        else:
            b.op1("Identity", [y], out)
    rw.set(out, Layout(tuple(base_shape), plan.out_dims, plan.n_extra))
    if plan.support:
        rw.result.support = [list(s) for s in plan.support]
    rw.result.global_pools += 1
    rw.result.records.append(LayerRecord(
        node_label(rw.node), plan.record.kind, plan.record.before, plan.record.after,
        plan.record.step_in, plan.record.step_out, plan.record.field, rw.node.name, out,
        plan.record.note))


@rule("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    _global(rw, node, node.input[0], range(2, lay.base_ndim), _REDUCE[node.op_type], True)


def _axes_of(rw: OnnxRewriter, node: onnx.NodeProto, a: dict,
             input_index: int) -> list[int] | None:
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        return [int(v) for v in rw.need_const(node.input[input_index], "the axes").reshape(-1)]
    return None


def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        refuse(f"axis {axis} out of range for rank {rank}")
    return axis % rank


@rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
      "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
def _reduction(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    keepdims = bool(a.get("keepdims", 1))
    if node.op_type.startswith("Arg"):
        axes = [int(a.get("axis", 0))]
    else:
        axes = _axes_of(rw, node, a, 1)
    if axes is None and a.get("noop_with_empty_axes", 0):
        return rw._same(node)
    kind = rules.reduction(lay, axes, node.op_type)
    axes = sorted(_norm(d, lay.base_ndim) for d in axes)
    if kind == "global":
        if node.op_type not in _REDUCE:
            refuse(f"{node.op_type} over spatial dims (only mean, max, min and sum pools have "
                   "a rule)")
        return _global(rw, node, x, axes, _REDUCE[node.op_type], keepdims)
    # over channels: positions untouched
    if node.op_type.startswith("Arg"):
        rw.emit(node, [x], axis=axes[0])
    elif "axes" in a:
        rw.emit(node, [x], axes=axes)
    else:
        rw.emit(node, [x, rw.b.const(axes)])
    kept = [d for i, d in enumerate(lay.base_dims) if keepdims or i not in axes]
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(kept) + lay.extras,
                                  lay.n_extra))


def _on_merged(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Nodes reading a value whose spatial dims were merged into one (``x.view(n, c, -1)``):
    pointwise ops keep the merge; a mean/max/min/sum over the merged dim is global pooling;
    anything else is refused."""
    x = node.input[0]
    lay = rw.lay(x)
    others = [rw.v(i) for i in node.input[1:] if i]
    op = node.op_type
    if not lay.merged or any(o.layout is None or o.layout.merged or not o.layout.is_plain
                             or o.spatial_size for o in others):
        refuse("an op that combines merged spatial positions with other tensors")
    if op in UNARY or op == "Dropout":
        if op not in _SCALAR_PARAMS and others:
            refuse(f"{op} with a parameter on merged spatial positions")
        if op == "Dropout":
            if len(node.output) > 1 and node.output[1]:
                refuse("dropout's mask output is used")
            rw.b.op1("Identity", [x], node.output[0])
        else:
            rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(lay)
        return
    if op not in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"):
        refuse(f"{op} on merged spatial positions (only a mean, max, min or sum over them "
               "has a rule)")
    rank = lay.base_ndim - lay.merged + 1  # the baseline's rank
    a = attrs(node)
    space = rules.merged_reduction(lay, _axes_of(rw, node, a, 1), rank)
    keepdims = bool(a.get("keepdims", 1))
    tmp = rw.b.fresh("pooled")
    plan = rules.global_pool(replace(lay, merged=0), space, _REDUCE[op], rw.mode, False,
                             rw.field_of(x))
    _emit_global(rw, x, plan, tmp, lay.base[:rank - 1])
    pooled = rw.env[tmp].layout
    out = node.output[0]
    if keepdims:
        rw.b.unsqueeze(tmp, [rank - 1], out)
        dims = pooled.base_dims + (PLAIN,)
    else:
        rw.b.op1("Identity", [tmp], out)
        dims = pooled.base_dims
    rw.set(out, Layout(rw.base_shape(out), dims + pooled.extras, pooled.n_extra))
    rw.fields[out] = rw.field_of(x)


# -- pointwise ------------------------------------------------------------------------------


# ops whose further inputs are scalar parameters, not operands to broadcast
_SCALAR_PARAMS = {"Clip", "CastLike"}


def _unary(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([i for i in node.input if i]) > 1 and node.op_type not in _SCALAR_PARAMS:
        return _broadcast(rw, node)
    for i in node.input[1:]:
        if i and (rw.v(i).spatial_size or not rw.lay(i).is_plain):
            refuse(f"{node.op_type} with a parameter that varies over positions")
    x = node.input[0]
    v = rw.v(x)
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(v.layout, v.sizes, v.tainted)
    if v.layout is not None and v.layout.base != rw.shapes.get(node.output[0], v.layout.base):
        rw.env[node.output[0]] = Val(Layout.plain(rw.shapes[node.output[0]]))
    rw.inherit_field(node)


@rule("Dropout")
def _dropout(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        refuse("dropout's mask output is used")
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = rw.v(node.input[0])
    rw.inherit_field(node)


@rule("BatchNormalization")
def _batch_norm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([o for o in node.output if o]) > 1 or attrs(node).get("training_mode", 0):
        refuse("batch normalization in training mode (its statistics outputs make onnxruntime "
               "normalize with the batch's statistics, which differ between the lattice and "
               "the dense map); export the model in eval mode, with one output")
    lay = rw.lay(node.input[0])
    rules.channel_axes(lay, [1] if lay.base_ndim > 1 else [], "batch normalization")
    rw.emit(node, list(node.input))
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


def _broadcast(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Element-wise ops with numpy broadcasting (:func:`rules.broadcast`)."""
    vals = [rw.v(i) for i in node.input if i]
    if any(v.spatial_size for v in vals):
        for o in node.output:
            rw.set(o, Layout.plain(rw.shapes[o]) if o in rw.shapes else None, tainted=True)
        rw.emit(node, list(node.input))
        return
    lays = [v.layout for v in vals]
    if any(lay is None for lay in lays):
        refuse("an input has no known shape")
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
    rw.inherit_field(node)


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
        repeats[t] = (H + s - 1) // s
        ends.append(H)
    y = b.op1("Tile", [y, b.ints(repeats)])
    return b.slice(y, list(spread.targets), [0] * len(spread.targets), ends)


# -- channels: axes that must not be spatial ---------------------------------------------------


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LRN")
def _channel_axis(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    axis = 1 if node.op_type == "LRN" else _norm(int(a.get("axis", -1)), lay.base_ndim)
    rules.channel_axes(lay, [axis], node.op_type)
    if node.op_type == "LRN":
        if lay.n_extra:
            _per_extra(rw, node, node.input[0], lay)
            return
        rw.emit(node, list(node.input))
    else:
        rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


@rule("InstanceNormalization", "GroupNormalization")
def _statistics(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    rules.statistics_over_space(lay, node.op_type)
    _per_extra(rw, node, node.input[0], lay)


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
            refuse("quantization parameters that vary over positions")
    a = attrs(node)
    if scale and math.prod(scale) > 1:
        axis = _norm(int(a.get("axis", 1)), lay.base_ndim)
        if len(scale) > 1:
            refuse("quantization parameters that vary over positions (blocked quantization)")
        rules.channel_axes(lay, [axis], "per-channel quantization")
        rw.emit(node, list(node.input), axis=axis)
    else:
        rules.channel_axes(lay, [], "quantization")
        rw.emit(node, list(node.input))
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


@rule("LayerNormalization")
def _layer_norm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Normalization over the trailing dims from ``axis``: they must not be spatial; extra
    dims are moved in front of them and back."""
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    r = lay.base_ndim
    axis = _norm(int(attrs(node).get("axis", -1)), r)
    rules.channel_axes(lay, range(axis, r), "layer normalization")
    if len([o for o in node.output if o]) > 1:
        refuse("layer normalization's mean/inv-std outputs are used")
    if not lay.n_extra:
        rw.emit(node, list(node.input))
    else:
        e = lay.n_extra
        perm = list(range(axis)) + list(range(r, r + e)) + list(range(axis, r))
        inv = list(np.argsort(perm))
        y = rw.b.transpose(x, perm)
        z = rw.b.op1("LayerNormalization", [y, *node.input[1:]], axis=axis + e,
                     epsilon=float(attrs(node).get("epsilon", 1e-5)))
        rw.b.transpose(z, inv, node.output[0])
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


# -- reshapes and heads: Flatten / Reshape + Gemm / MatMul ---------------------------------------


def _reshape_to(rw: OnnxRewriter, node: onnx.NodeProto, x: str, out_shape) -> None:
    """A reshape as the core plans it; its target is rebuilt from the baseline's shapes (a
    target computed from Shape nodes holds the baseline's sizes where the dense map has its
    own), with each dim the reshape leaves alone taken from the dense map."""
    lay = rw.lay(x)
    out = node.output[0]
    plan = rules.reshape(lay, lay.base, out_shape)
    b = rw.b
    if plan.kind == "plain":
        return rw._same(node)
    if plan.kind in ("same", "merge", "fold"):
        b.op1("Identity", [x], out)
        rw.env[out] = Val(plan.layout)
        rw.inherit_field(node)
        return
    if plan.kind == "unfold":
        y = x
        for d in sorted(plan.blocks, reverse=True):  # later dims first: indices stay put
            r, s = plan.blocks[d], lay.base_dims[d].step
            n = (((b.dim(y, d) - 1) // s + 1) // r - 1) * (s * r) + 1
            taps = [b.unsqueeze(b.slice(y, [d], [o * s], [o * s + n]), [d + 1])
                    for o in range(r)]
            y = b.op1("Concat", taps, axis=d + 1)
        b.op1("Identity", [y], out)
        rw.result.has_padding = True  # its baseline needs whole blocks: the far border differs
        rw.set(out, plan.layout)
        rw.inherit_field(node)
        return
    target = [b.dim(x, d) if d is not None else int(n)
              for d, n in zip(plan.from_dims, out_shape)]
    target += [b.dim(x, lay.base_ndim + k) for k in range(lay.n_extra)]
    b.reshape(x, target, out)
    rw.set(out, plan.layout)
    rw.inherit_field(node)


@rule("Flatten")
def _flatten(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    _reshape_to(rw, node, node.input[0], rw.base_shape(node.output[0]))


@rule("Reshape")
def _reshape(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    target = rw.v(node.input[1])
    if lay.is_plain and not target.spatial_size:
        return rw._same(node)
    if lay.is_plain:
        refuse("a reshape to a shape computed from a spatial size (a tensor shaped by positions)")
    _reshape_to(rw, node, node.input[0], rw.base_shape(node.output[0]))


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
        refuse("a fully connected layer on a tensor of rank other than 2 with extra dims")
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
    rw.inherit_field(node)


@rule("Gemm")
def _gemm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    if a.get("transA", 0):
        refuse("Gemm with transA on a spatial map")
    if not rw.lay(w).is_plain or (bias and not rw.lay(bias).is_plain):
        refuse("Gemm weights that depend on positions")
    trans = bool(a.get("transB", 0))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    plan = rules.linear(lay, lay.base[-1], rw.field_of(x))
    if plan.kind == "head":
        return _head_conv(rw, node, x, plan, _weight_as_conv(rw, w, trans, lay, alpha), bias,
                          beta)
    if plan.kind == "channels":
        refuse("Gemm on a map (Gemm takes 2-D inputs)")
    _per_position(rw, node, x, lay, w, trans, alpha, bias, beta)


@rule("MatMul")
def _matmul(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w = node.input
    lay, wl = rw.lay(x), rw.lay(w)
    if lay.is_plain and wl.is_plain:
        return rw._same(node)
    if not wl.is_plain or len(wl.base) != 2:
        refuse("MatMul of two tensors that vary over positions (attention-like)")
    plan = rules.linear(lay, lay.base[-1], rw.field_of(x))
    if plan.kind == "head":
        return _head_conv(rw, node, x, plan, _weight_as_conv(rw, w, False, lay, 1.0), None,
                          1.0)
    if plan.kind == "per_position":
        return _per_position(rw, node, x, lay, w, False, 1.0, None, 1.0)
    rw.emit(node, [x, w])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims[:-1] + (PLAIN,)))
    rw.inherit_field(node)


# -- dims: transpose, concat, split, slice, pad, squeeze ------------------------------------------


@rule("Transpose")
def _transpose(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    r = lay.base_ndim
    perm = [int(p) for p in attrs(node).get("perm", list(range(r))[::-1])]
    dims = rules.permute(lay, perm)
    rw.emit(node, list(node.input), perm=perm + list(range(r, r + lay.n_extra)))
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), dims + lay.extras,
                                  lay.n_extra))
    rw.inherit_field(node)


@rule("Concat")
def _concat(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    vals = [rw.v(i) for i in node.input]
    if any(v.sizes is not None or v.tainted for v in vals):
        return _shape_concat(rw, node, vals)
    lays = [rw.lay(i) for i in node.input]
    if all(lay.is_plain for lay in lays):
        return rw._same(node)
    axis = _norm(int(attrs(node)["axis"]), lays[0].base_ndim)
    out = rules.concat(lays, axis)
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), out.dims, out.n_extra))
    rw.inherit_field(node)


@rule("Split")
def _split(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        refuse("a split of a flatten of spatial positions")
    axis = _norm(int(attrs(node).get("axis", 0)), lay.base_ndim)
    rules.split(lay, axis)
    rw.emit(node, list(node.input), axis=axis)
    for o in node.output:
        if o:
            rw.set(o, Layout(rw.base_shape(o), lay.base_dims + lay.extras, lay.n_extra))
    rw.inherit_field(node)


def _computed(rw: OnnxRewriter, name: str, i: int):
    """Entry ``i`` of a 1-D int tensor: a constant, or a SymInt when it is computed."""
    c = rw.const(name)
    if c is not None:
        return int(c.reshape(-1)[i])
    return SymInt(rw.b, rw.b.op1("Gather", [name, rw.b.const([i])]))


@rule("Slice")
def _slice(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x = node.input[0]
    v = rw.v(x)
    if v.sizes is not None:
        return _shape_slice(rw, node, v)
    lay = rw.lay(x)
    if lay.is_plain and not v.tainted:
        return rw._same(node)
    if v.tainted:
        refuse("slicing a value computed from a spatial size")
    if lay.fold:
        refuse("a slice of a flatten of spatial positions")
    n_axes = len(rw.base_shape(node.input[1])) and rw.base_shape(node.input[1])[0]
    axes = (rw.need_const(node.input[3], "Slice axes").reshape(-1).tolist()
            if len(node.input) > 3 and node.input[3] else list(range(n_axes)))
    axes = [_norm(int(a), lay.base_ndim) for a in axes]
    if not any(lay.base_dims[a].spatial for a in axes):
        # channels only: starts/ends may be computed (from channel counts), as they are
        if any(rw.v(i).spatial_size for i in node.input[1:] if i):
            refuse("a slice bound computed from a spatial size on a channel dim")
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[3] = rw.b.const(axes)
        rw.emit(node, [i for i in inputs if i] if len(node.input) <= 4 else inputs)
        rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims + lay.extras,
                                      lay.n_extra))
        rw.inherit_field(node)
        return
    steps = (rw.need_const(node.input[4], "Slice steps").reshape(-1).tolist()
             if len(node.input) > 4 and node.input[4] else [1] * len(axes))
    b = rw.b
    dims = list(lay.base_dims)
    fields = list(rw.field_of(x))
    new_starts, new_ends, new_steps = [], [], []
    for k, (a, sp) in enumerate(zip(axes, steps)):
        st, en = _computed(rw, node.input[1], k), _computed(rw, node.input[2], k)
        d = lay.base_dims[a]
        if not d.spatial:
            new_starts.append(st)
            new_ends.append(en)
            new_steps.append(sp)
            continue
        dims[a] = rules.spatial_slice(d, int(sp))
        if a < 2:
            refuse("a spatial slice of dim 0 or 1")
        h = _lattice_size(rw, x, a - 2, d.step)
        start = _bound(b, st, h)
        end = h if _static(en) and en >= min(_BIG, 2**31 - 1) else _bound(b, en, h)
        n = (b.maximum(end - start, 0) + (sp - 1)) // sp
        new_starts.append(start * d.step)
        new_ends.append(start * d.step + (n - 1) * (d.step * sp) + 1)
        new_steps.append(1)
        rw.result.has_padding = True  # a crop: shifted windows differ at the borders
        if d.axis < len(fields):
            fields[d.axis] = fields[d.axis].sliced(st if _static(st) else None, int(sp))
    b.slice(x, axes, new_starts, new_ends, new_steps, output=node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))
    if fields:
        rw.fields[node.output[0]] = tuple(fields)


def _bound(b: Builder, v, h):
    """A slice bound clamped to ``[0, h]`` (negative: from the end), statically or not."""
    if _static(v):
        return b.minimum(v, h) if v >= 0 else b.maximum(h + v, 0)
    # a computed bound (from the baseline's sizes): where(v < 0, max(h + v, 0), min(v, h))
    neg = b.op1("Less", [v.name, b.const([0])])
    lo = b.int_tensor(b.maximum(h + v, 0))
    hi = b.int_tensor(b.minimum(v, h))
    return SymInt(b, b.op1("Where", [neg, lo, hi]))


@rule("Pad")
def _pad(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    r = lay.base_ndim
    axes = (rw.need_const(node.input[3], "Pad axes").reshape(-1).tolist()
            if len(node.input) > 3 and node.input[3] else list(range(r)))
    axes = [_norm(int(v), r) for v in axes]
    value = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if "pads" in a:  # opset < 11 form
        pads = [int(p) for p in a["pads"]]
        value = rw.fill(x, float(a.get("value", 0.0))) if mode == "constant" else None
    elif rw.const(node.input[1]) is not None:
        pads = [int(p) for p in rw.const(node.input[1]).reshape(-1)]
    else:
        pads = None  # computed from sizes (TensorFlow's "same" in a dynamic export)
    plan = rules.pad(lay, axes, mode, [] if pads is None else _pairs_of(pads, len(axes)),
                     tuple(f.size for f in rw.field_of(x)))
    if pads is None:
        # the baseline's amounts, computed from the baseline's sizes, times each axis's step
        scale = rw.b.const(list(plan.scales) * 2)
        dense_pads = rw.b.op1("Mul", [node.input[1], scale])
        inputs = [x, dense_pads] + ([value] if value else [])
        if len(node.input) > 3 and node.input[3]:
            inputs += [""] * (3 - len(inputs)) + [rw.b.const(axes)]
        rw.b.op1("Pad", inputs, node.output[0], mode=mode)
        rw.result.has_padding = True
    else:
        lo, hi = pads[:len(axes)], pads[len(axes):]
        rw.b.pad(x, len(lay.dims), axes, [p * s for p, s in zip(lo, plan.scales)],
                 [q * s for q, s in zip(hi, plan.scales)], value, mode, node.output[0])
        rw.result.has_padding |= any(lo) or any(hi)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims + lay.extras,
                                  lay.n_extra))
    fields = list(rw.field_of(x))
    for k, a in enumerate(axes):  # the padding's reach, in input pixels
        d = lay.base_dims[a]
        if d.kind == "space" and d.axis < len(fields):
            lo_hi = (None, None) if pads is None else (pads[k], pads[len(axes) + k])
            fields[d.axis] = fields[d.axis].padded(*lo_hi)
    if fields:
        rw.fields[node.output[0]] = tuple(fields)
    rw.record(plan.record)


def _pairs_of(pads: Sequence[int], n: int) -> list[int]:
    """ONNX pads (all begins, then all ends) as (lo, hi) pairs per axis, as the core records
    them."""
    return [v for i in range(n) for v in (pads[i], pads[n + i])]


@rule("Squeeze", "Unsqueeze")
def _squeeze(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    v = rw.v(node.input[0])
    if v.sizes is not None:
        rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(Layout.plain(rw.shapes.get(node.output[0], ())),
                                     sizes=v.sizes, tainted=v.tainted)
        return
    lay = rw.lay(node.input[0])
    if lay.is_plain and not v.tainted:
        return rw._same(node)
    if v.tainted:
        refuse(f"{node.op_type} of a value computed from a spatial size")
    axes = _axes_of(rw, node, attrs(node), 1)
    if node.op_type == "Squeeze":
        if axes is None:
            axes = [i for i, n in enumerate(lay.base) if n == 1]
        axes = sorted(_norm(x, lay.base_ndim) for x in axes)
        dims = rules.squeeze(lay, axes)
    else:
        out_rank = lay.base_ndim + len(axes)
        axes = sorted(_norm(x, out_rank) for x in axes)
        dims = rules.unsqueeze(lay, axes)
    rw.b.op1(node.op_type, [node.input[0], rw.b.const(axes)], node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), dims + lay.extras,
                                  lay.n_extra))
    rw.inherit_field(node)


# -- shape tensors: sizes read as the baseline's ------------------------------------------------


@rule("Shape")
def _shape(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """The shape of a dense map as the baseline has it: each spatial entry is the lattice
    count of the dense size, so arithmetic on it computes the baseline's values."""
    lay = rw.lay(node.input[0])
    a = attrs(node)
    r = lay.base_ndim
    start = _norm(int(a.get("start", 0)), r) if a.get("start", 0) else 0
    end = a.get("end")
    end = r if end is None else (int(end) if int(end) >= 0 else r + int(end))
    end = min(end, r)
    if lay.fold:
        refuse("the shape of a flatten of spatial positions")
    x = node.input[0]
    entries = []
    for d in range(start, end):
        dim = lay.base_dims[d]
        size = rw.b.dim(x, d)
        entries.append((size - 1) // dim.step + 1 if dim.kind == "space" and dim.step > 1
                       else size)
    rw.b.op1("Identity", [rw.b.ints(entries)], node.output[0])
    sizes = tuple(d.spatial for d in lay.base_dims[start:end])
    rw.env[node.output[0]] = Val(Layout.plain((end - start,)), sizes=sizes)


def _shape_slice(rw: OnnxRewriter, node: onnx.NodeProto, v: Val) -> None:
    starts = rw.const(node.input[1])
    ends = rw.const(node.input[2])
    sizes = v.sizes
    picked = None
    if starts is not None and ends is not None and len(node.input) <= 4:
        picked = sizes[slice(int(starts.reshape(-1)[0]), int(min(ends.reshape(-1)[0], _BIG)))]
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(Layout.plain(rw.shapes.get(node.output[0], ())),
                                 sizes=picked, tainted=picked is None and any(sizes))


@rule("Gather")
def _gather(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    v = rw.v(node.input[0])
    if v.sizes is not None:
        idx = rw.const(node.input[1])
        picked = None
        if idx is not None:
            picked = tuple(v.sizes[int(i)] for i in idx.reshape(-1))
        rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(Layout.plain(rw.shapes.get(node.output[0], ())),
                                     sizes=picked, tainted=picked is None and any(v.sizes))
        return
    lay = rw.lay(node.input[0])
    if lay.is_plain and not v.tainted:
        return rw._same(node)
    axis = _norm(int(attrs(node).get("axis", 0)), lay.base_ndim)
    if lay.fold or lay.base_dims[axis].spatial or not rw.lay(node.input[1]).is_plain:
        refuse("gathering along a spatial dim reads absolute positions")
    idx = rw.base_shape(node.input[1]) if node.input[1] in rw.shapes else ()
    dims = list(lay.base_dims[:axis]) + [PLAIN] * len(idx) + list(lay.base_dims[axis + 1:])
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))


def _shape_concat(rw: OnnxRewriter, node: onnx.NodeProto, vals: list[Val]) -> None:
    sizes: list[bool] | None = []
    for i, v in zip(node.input, vals):
        if v.sizes is not None:
            sizes += v.sizes
        elif v.tainted:
            sizes = None
            break
        else:
            shape = rw.shapes.get(i)
            if shape is None or len(shape) != 1:
                sizes = None
                break
            sizes += [False] * shape[0]
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(Layout.plain(rw.shapes.get(node.output[0], ())),
                                 sizes=tuple(sizes) if sizes is not None else None,
                                 tainted=sizes is None)


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
        refuse("expanding a spatial map")
    if not target.spatial_size:
        refuse("expanding a value with extra dims to a fixed shape")
    out = rw.base_shape(node.output[0])
    if len(out) != lay.base_ndim or any(a != b and a != 1 for a, b in zip(lay.base, out)):
        refuse(f"expanding {lay.base} to {out} changes more than size-1 dims")
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = Val(lay)


@rule("Constant")
def _constant(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    rw._same(node)
