"""The ONNX rewrite: a baseline ONNX graph in, its dense equivalent out, on the ONNX IR itself.

The same one pass as the PyTorch rewrite (:mod:`econv_convert.torch.rewrite`): every node in order is
mapped to dense nodes and a :class:`~econv_convert.core.layout.Layout` per output saying what the
dense tensor's dims mean. The geometry comes from :mod:`econv_convert.core.lattice`; the run-time
corrections (tight crops, ceil-mode ends, average-pool divisors, phase counts) are emitted as
ONNX arithmetic on the input's actual size through :class:`~econv_convert.onnx.graph.SymInt`,
so the dense graph is exact for any input size, with dynamic spatial axes.

Every node keeps its output names, and the model's initializers are not touched (new
constants are ``Constant`` nodes), so weights move back by name (:func:`onnx_api.inverse`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from econv_convert.core.lattice import (
    Field,
    Window,
    covered_limit,
    covers_input,
    dense_out,
    dense_window,
    keeps_stride,
    window_geometry,
)
from econv_convert.core.layout import PLAIN, Dim, Layout, LayoutError
from econv_convert.core.records import GLOBAL_POOL_MODES, HEAD_KIND, LayerRecord
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
REFUSED = {
    "Resize": "resizing is not translation-equivariant on the lattice",
    "Upsample": "upsampling is not translation-equivariant on the lattice",
    "ConvTranspose": "a transposed convolution is not translation-equivariant on the lattice",
    "DepthToSpace": "depth-to-space moves channels into positions",
    "SpaceToDepth": "space-to-depth moves positions into channels",
    "Col2Im": "col2im moves channels into positions",
    "InstanceNormalization": "instance normalization normalizes over space",
    "GroupNormalization": "group normalization normalizes over space",
    "MaxRoiPool": "region pooling reads absolute positions",
    "RoiAlign": "region pooling reads absolute positions",
    "GridSample": "grid sampling reads absolute positions",
    "MaxUnpool": "unpooling writes absolute positions",
    "NonMaxSuppression": "detection post-processing reads absolute positions",
    "If": "a subgraph (If/Loop/Scan) is not supported",
    "Loop": "a subgraph (If/Loop/Scan) is not supported",
    "Scan": "a subgraph (If/Loop/Scan) is not supported",
}
_SHAPE_PLUMBING = {"Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Identity", "Reshape",
                   "Flatten"}
_REDUCE = {"ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceSum": "sum",
           "GlobalAveragePool": "mean", "GlobalMaxPool": "max"}
_BIG = 2**62


class _Refuse(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse(reason: str):
    raise _Refuse(reason)


@dataclass
class Val:
    """A value of the dense graph: its layout, or, for a shape-derived integer tensor, which
    of its entries are spatial sizes (those differ in the dense graph)."""

    layout: Layout | None
    sizes: tuple[bool, ...] | None = None  # per entry of a 1-D shape tensor: a spatial size?
    tainted: bool = False  # computed from a spatial size
    merged: int = 0  # >0: the last baseline dim merges this many trailing spatial dims

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


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"{name} ({node.op_type})"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxRewriter:
    """Rewrite ``model`` (opset >= 13, default domain) whose baseline shapes at the example
    input are ``shapes`` and whose constant tensors are ``consts``."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 types: dict[str, int], consts: dict[str, np.ndarray], global_pool: str,
                 output_stride: int | None = None) -> None:
        if global_pool not in GLOBAL_POOL_MODES:
            raise ValueError(global_pool)
        self.model = model
        self.g = model.graph
        self.shapes = shapes
        self.types = types
        self.consts = consts
        self.mode = global_pool
        self.output_stride = output_stride
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
        dims = (PLAIN, PLAIN) + tuple(Dim("space", i, 1) for i in range(len(shape) - 2))
        self.env[x.name] = Val(Layout(shape, dims))
        self.fields[x.name] = tuple(Field() for _ in shape[2:])
        consumed = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        for node in self.g.node:
            node = _without_unused_outputs(node, consumed, self.b.opset)
            self.node = node
            try:
                self._rewrite(node)
            except _Refuse as r:
                raise UnsupportedLayerError(node_label(node), r.reason) from None
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
        self._outputs()
        self.result.graph.node.extend(self.b.nodes)
        return self.result

    def _rewrite(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            if self._any_spatial(node):
                _refuse(f"operator {node.domain}::{node.op_type} has no rule on a spatial map")
            return self._same(node)
        op = node.op_type
        vals = [self.v(i) for i in node.input if i]
        if any(v.merged for v in vals):
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
            if self._any_spatial(node) or op in ("If", "Loop", "Scan"):
                _refuse(REFUSED[op])
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
            _refuse(f"input '{name}' is not produced by any node")
        return self.env[name]

    def lay(self, name: str) -> Layout:
        val = self.v(name)
        if val.layout is None:
            _refuse(f"input '{name}' has no known shape")
        return val.layout

    def base_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            _refuse(f"shape inference could not find the shape of '{name}' at the example input")
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def need_const(self, name: str, what: str) -> np.ndarray:
        c = self.const(name)
        if c is None:
            _refuse(f"{what} must be a constant")
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
                _refuse(f"no rule for {node.op_type} on a spatial map; it may mix positions, "
                        "which would break equivalence on the lattice")
            if v.spatial_size:
                _refuse(f"{node.op_type} uses a spatial size, which differs in the dense model")
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
            f = tuple(max(fs, key=lambda f: f.size) for fs in zip(*found))
            for o in node.output:
                self.fields.setdefault(o, f)

    def record(self, kind: str, before: dict, after: dict, step_in, step_out,
               rf: Sequence[Field], note: str = "", cost: int = 0) -> None:
        node = self.node
        out = node.output[0]
        lay = self.env[out].layout if out in self.env else None
        self.result.records.append(LayerRecord(
            node_label(node), kind, before, after, tuple(step_in), tuple(step_out),
            tuple(f.size for f in rf), node.name, out, note, int(cost),
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
            self.result.outputs.append({
                "name": o.name,
                "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                "base_ndim": lay.base_ndim,
            })


# ops whose number of outputs is their mode, read or not: a BatchNormalization with its
# statistics outputs runs in training mode (the spec before opset 14; onnxruntime does so too)
_OUTPUTS_SET_THE_MODE = {"BatchNormalization"}


def _without_unused_outputs(node: onnx.NodeProto, consumed: set[str],
                            opset: int) -> onnx.NodeProto:
    """The node without the optional outputs that nothing consumes: old exporters name them
    (a Dropout's mask, a MaxPool's indices, BatchNormalization's training statistics) though
    nothing reads them, and a rule need not refuse what is never used."""
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


def _map_geometry(rw: OnnxRewriter, lay: Layout, nd: int) -> tuple[str, tuple[int, ...],
                                                                 tuple[int, ...]]:
    """Classify a window layer's input (:meth:`Layout.window_input`)."""
    try:
        return lay.window_input(nd)
    except LayoutError as e:
        _refuse(str(e))


def _ints(a: dict, key: str, n: int, default: int) -> tuple[int, ...]:
    v = a.get(key)
    return tuple(int(x) for x in v) if v else (default,) * n


def _window_attrs(rw: OnnxRewriter, node: onnx.NodeProto, kernel: Sequence[int], h):
    """Per-axis Windows of a Conv/pool node, with ``auto_pad`` resolved. SAME padding with a
    stride depends on the input size: the pads are then SymInts computed at run time."""
    a = attrs(node)
    nd = len(kernel)
    stride = _ints(a, "strides", nd, 1)
    dil = _ints(a, "dilations", nd, 1)
    ceil = bool(a.get("ceil_mode", 0))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
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
        _refuse(f"auto_pad '{auto}'")
    return [Window(k, t, p, q, d, ceil) for k, t, p, q, d in
            zip(kernel, stride, lo, hi, dil, strict=True)]


def _static(v) -> bool:
    return not isinstance(v, SymInt)


def _fields(rw: OnnxRewriter, x: str, ws: Sequence[Window]) -> tuple[Field, ...]:
    rf = rw.field_of(x) or tuple(Field() for _ in ws)
    return tuple(f.through(Window(w.kernel, w.stride, 0, 0, w.dilation)) for f, w in zip(rf, ws))


def _dense_windows(rw: OnnxRewriter, node, x: str, kernel, kind: str, cost: int,
                   covering: str | None = None):
    """Shared start of every window rule: geometry, the plain and kept-stride cases, the
    record. Returns (steps, windows, dense windows, record arguments), or None when the node
    was emitted otherwise (nothing spatial, extra dims only, a kept stride, or, for a pool
    that reduces by ``covering``, a window that covers its whole input: a global pool)."""
    lay = rw.lay(x)
    nd = len(kernel)
    form, steps, axes = _map_geometry(rw, lay, nd)
    if form == "plain":
        rw._same(node)
        return None
    if form == "extra":
        _per_extra(rw, node, x, lay)
        return None
    auto = attrs(node).get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    h = [_lattice_size(rw, x, i, s) if auto.startswith("SAME") else 0
         for i, s in enumerate(steps)]
    ws = _window_attrs(rw, node, kernel, h)
    rw.result.has_padding |= any(not _static(w.pad_lo) or w.pad_lo or w.pad_hi
                                 or w.ceil_mode for w in ws)
    rf = _fields(rw, x, ws)
    rw.fields[node.output[0]] = rf
    out_steps = tuple(s * w.stride for s, w in zip(steps, ws))
    in_fields = rw.field_of(x) or tuple(Field() for _ in ws)
    if keeps_stride(steps, in_fields, [w.stride for w in ws], rw.output_stride):
        if any(w.stride > 1 for w in ws):
            rw.result.kept_stride = tuple(f.step for f in rf)
        rw._same(node)
        rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), (PLAIN, PLAIN) + tuple(
            Dim("space", a, 1) for a in axes)))
        rw.record(kind, window_geometry(ws), {"stride": tuple(w.stride for w in ws)}, steps,
                  steps, rf, f"stride kept (output stride {rw.output_stride})", cost)
        return None
    h = lay.base[2:]
    counted_pads = attrs(node).get("count_include_pad", 0) and any(
        not _static(w.pad_lo) or w.pad_lo or w.pad_hi for w in ws)
    if covering and not counted_pads and all(
            _static(w.pad_lo) and covers_input(n, w) for n, w in zip(h, ws)):
        _covering_pool(rw, node, x, steps, ws, covering)
        return None
    dws = [dense_window(w, s) for w, s in zip(ws, steps)]
    out_dims = (PLAIN, PLAIN) + tuple(Dim("space", a, t) for a, t in zip(axes, out_steps))
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), out_dims))
    record = (kind, window_geometry(ws), window_geometry(ws, steps), steps, out_steps, rf, "",
              cost)
    return steps, ws, dws, record


def _covering_pool(rw: OnnxRewriter, node: onnx.NodeProto, x: str, steps, ws, reduce: str):
    """A pool whose one window covers its whole input (a kernel larger than the map) is a
    global pool while the map fits in the kernel; past that the output is NaN (ONNX has no
    assertion to stop the run with)."""
    b = rw.b
    limits = tuple(covered_limit(w) for w in ws)
    h = rw.lay(x).base[2:]
    pooled = b.fresh("pooled")
    rw.shapes[pooled] = rw.base_shape(node.output[0])
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    inner.output[0] = pooled
    _global(rw, inner, x, range(2, 2 + len(ws)), reduce, True)
    fits = None
    for i, (s, limit) in enumerate(zip(steps, limits)):
        n = _lattice_size(rw, x, i, s)
        ok = b.op1("LessOrEqual", [b.int_tensor(n), b.const([limit])])
        fits = ok if fits is None else b.op1("And", [fits, ok])
    dtype = rw.types.get(x, TensorProto.FLOAT)
    out = node.output[0]
    b.op1("Where", [fits, pooled, b.scalar(math.nan, dtype)], out)
    rw.env[out] = rw.env[pooled]
    rw.fields[out] = rw.field_of(x)
    rw.result.notes.append(
        f"{node_label(node)}: a pool of kernel {tuple(w.kernel for w in ws)} reads all of its "
        f"{tuple(h)} input: a global pool while that map stays within {limits} positions "
        "(NaN past that)")


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
        _refuse("the convolution's weight depends on positions")
    plan = _dense_windows(rw, node, x, kernel, "conv", wshape[1] * math.prod(kernel))
    if plan is None:
        return
    steps, ws, dws, record = plan
    nd = len(kernel)
    lo, hi = _pad_lists(dws)
    src = x
    if all(_static(v) for v in lo + hi):
        conv_pads = lo + hi
    else:
        src = rw.b.pad(x, nd + 2, list(range(2, 2 + nd)), lo, hi)
        conv_pads = [0] * (2 * nd)
    a = attrs(node)
    y = rw.b.op1("Conv", [src, *node.input[1:]],
                 None if any(w.stride > 1 for w in ws) else node.output[0],
                 kernel_shape=list(kernel), strides=[1] * nd, pads=conv_pads,
                 dilations=_effective_dilation(kernel, dws), group=int(a.get("group", 1)))
    _crop(rw, y, x, steps, ws, node.output[0] if any(w.stride > 1 for w in ws) else None)
    rw.record(*record)


@rule("MaxPool")
def _max_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        _refuse("max pooling with indices (the indices are positions, not features)")
    a = attrs(node)
    kernel = tuple(int(k) for k in a["kernel_shape"])
    plan = _dense_windows(rw, node, node.input[0], kernel, "max_pool", math.prod(kernel),
                          covering="max")
    if plan is None:
        return
    steps, ws, dws, record = plan
    x = node.input[0]
    nd = len(kernel)
    lo, hi = _pad_lists(dws)
    # explicit padding (pooling pads must stay below the kernel in onnxruntime) with the
    # lowest finite value: onnxruntime's max over a window of padding only is that, not -inf
    lowest = float(np.finfo(helper.tensor_dtype_to_np_dtype(
        rw.types.get(x, TensorProto.FLOAT))).min)
    src = rw.b.pad(x, nd + 2, list(range(2, 2 + nd)), lo, hi, rw.fill(x, lowest)) \
        if _nonzero(lo + hi) else x
    strided = any(w.stride > 1 for w in ws)
    y = rw.b.op1("MaxPool", [src], None if strided else node.output[0],
                 kernel_shape=list(kernel), strides=[1] * nd, pads=[0] * (2 * nd),
                 dilations=[d.dilation for d in dws])
    _crop(rw, y, x, steps, ws, node.output[0] if strided else None)
    rw.record(*record)


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
    plan = _dense_windows(rw, node, node.input[0], kernel, "lp_pool" if lp else "avg_pool",
                          math.prod(kernel), covering=None if lp else "mean")
    if plan is None:
        return
    steps, ws, dws, record = plan
    x = node.input[0]
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
        rw.record(*record)
        return
    # the divisor map, from a map of ones shaped like one channel of x
    one_shape = rw.b.op1("Concat", [rw.b.const([1, 1]), rw.b.shape_slice(x, 2, 2 + nd)], axis=0)
    ones = rw.b.op1("ConstantOfShape", [one_shape],
                    value=helper.make_tensor("one", dtype, [1], [1]))
    if a.get("count_include_pad", 0):
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
    rw.record(*record[:6], "depthwise Conv of ones / divisor map (any opset)", record[7])


# -- global pooling ------------------------------------------------------------------------


def _global(rw: OnnxRewriter, node: onnx.NodeProto, x: str, axes: Sequence[int], reduce: str,
            keepdims: bool) -> None:
    """Reduction over whole spatial axes: global pooling in the chosen mode."""
    lay = rw.lay(x)
    if lay.n_extra or lay.fold:
        _refuse("global pooling of a map that already has extra dims")
    axes = sorted(axes)
    dims = lay.base_dims
    if any(dims[d].kind != "space" and lay.base[d] != 1 for d in axes):
        _refuse("a reduction over spatial and non-spatial dims together")
    space = [d for d in axes if dims[d].kind == "space"]  # the rest have size 1
    steps = [dims[d].step for d in space]
    b = rw.b
    op = {"mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin", "sum": "ReduceSum"}[reduce]
    out = node.output[0]
    rank = len(lay.dims)
    if rw.mode in ("lattice", "dense"):
        src = x
        if rw.mode == "lattice" and any(s > 1 for s in steps):
            src = b.slice(x, space, [0] * len(space), [_BIG] * len(space), steps)
        b.reduce(op, src, axes, keepdims, out)
        extras: tuple[Dim, ...] = ()
    else:
        fill = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}[reduce]
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
        y = b.reduce("ReduceSum" if reduce == "mean" else op, y, reduced, False)
        # now: the dims in order, each spatial one replaced by its phases; phases go last
        left = [d for d in range(rank) if d not in axes or d in space]
        y = b.transpose(y, [i for i, d in enumerate(left) if d not in space]
                        + [i for i, d in enumerate(left) if d in space])
        if keepdims:
            y = b.unsqueeze(y, list(axes))
        if reduce in ("mean", "max", "min"):
            r = [b.const(np.arange(s)) for s in steps]
            counts = [b.op1("Div", [b.op1("Sub", [b.int_tensor(H - 1 + s), rr]),
                                    b.const([s])]) for H, s, rr in zip(sizes, steps, r)]
            count = counts[0]
            for c in counts[1:]:
                count = b.op1("Mul", [b.unsqueeze(count, [-1]), c])
            dtype = rw.types.get(x, TensorProto.FLOAT)
            if reduce == "mean":
                y = b.op1("Div", [y, b.op1("Cast", [count], to=dtype)], out)
            else:
                empty = b.op1("Equal", [count, b.const([0])])
                y = b.op1("Where", [empty, b.scalar(math.nan, dtype), y], out)
        else:
            b.op1("Identity", [y], out)
        extras = tuple(Dim("phase", dims[d].axis, dims[d].step) for d in space)
    kept = [PLAIN for i, d in enumerate(dims) if keepdims or i not in axes]
    kept = [PLAIN if d.spatial else d for d in kept]
    rw.set(out, Layout(rw.base_shape(out), tuple(kept) + extras, len(extras)))
    rw.result.global_pools += 1
    rw.record(f"global_{reduce}", {"dims": tuple(axes)}, {"mode": rw.mode}, steps,
              [1] * len(steps), rw.field_of(x),
              {"phase": "one output per lattice phase (phase 0 = baseline)",
               "lattice": "pools lattice points only (= baseline)",
               "dense": "pools every position: NOT the baseline function"}[rw.mode])


@rule("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    _global(rw, node, node.input[0], range(2, lay.base_ndim), _REDUCE[node.op_type], True)


def _axes_of(rw: OnnxRewriter, node: onnx.NodeProto, a: dict, input_index: int) -> list[int] | None:
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        return [int(v) for v in rw.need_const(node.input[input_index], "the axes").reshape(-1)]
    return None


def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        _refuse(f"axis {axis} out of range for rank {rank}")
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
    if axes is None:
        if a.get("noop_with_empty_axes", 0):
            return rw._same(node)
        _refuse(f"{node.op_type} over every dim, batch included")
    if lay.fold:
        _refuse("a reduction over a flatten of spatial positions")
    axes = sorted(_norm(d, lay.base_ndim) for d in axes)
    if any(lay.base_dims[d].spatial for d in axes):
        if node.op_type not in _REDUCE:
            _refuse(f"{node.op_type} over spatial dims (only mean, max, min and sum pools "
                    "have a rule)")
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


# -- pointwise ------------------------------------------------------------------------------


# ops whose further inputs are scalar parameters, not operands to broadcast
_SCALAR_PARAMS = {"Clip", "CastLike"}


def _unary(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([i for i in node.input if i]) > 1 and node.op_type not in _SCALAR_PARAMS:
        return _broadcast(rw, node)
    for i in node.input[1:]:
        if i and (rw.v(i).spatial_size or not rw.lay(i).is_plain):
            _refuse(f"{node.op_type} with a parameter that varies over positions")
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
        _refuse("dropout's mask output is used")
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = rw.v(node.input[0])
    rw.inherit_field(node)


@rule("BatchNormalization")
def _batch_norm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([o for o in node.output if o]) > 1 or attrs(node).get("training_mode", 0):
        _refuse("batch normalization in training mode (its statistics outputs make onnxruntime "
                "normalize with the batch's statistics, which differ between the lattice and "
                "the dense map); export the model in eval mode, with one output")
    lay = rw.lay(node.input[0])
    if lay.fold or (lay.base_ndim > 1 and lay.base_dims[1].spatial):
        _refuse("batch normalization over a dim that is not channels")
    rw.emit(node, list(node.input))
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


def _broadcast(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Element-wise ops with numpy broadcasting. Base dims are matched from the right: two
    spatial dims must be on the same lattice, a spatial dim broadcasts only against size 1.
    Operands with fewer extra dims get trailing ones; a phase-pooled operand (squeeze-and-
    excitation) is spread over the map so that each position gets its phase's value."""
    vals = [rw.v(i) for i in node.input if i]
    if any(v.spatial_size for v in vals):
        for o in node.output:
            rw.set(o, Layout.plain(rw.shapes[o]) if o in rw.shapes else None, tainted=True)
        rw.emit(node, list(node.input))
        return
    lays = [v.layout for v in vals]
    if any(lay is None for lay in lays):
        _refuse("an input has no known shape")
    if all(lay.is_plain for lay in lays):
        return rw._same(node)
    if any(lay.fold for lay in lays):
        _refuse("an element-wise op with several inputs on a flatten of spatial positions")
    names = [i for i in node.input if i]
    # spread phase-pooled operands over the map they are combined with
    maps = [lay for lay in lays if any(d.kind == "space" for d in lay.base_dims)]
    for k, lay in enumerate(lays):
        if maps and lay.extras and all(d.kind == "phase" for d in lay.extras):
            like = lays.index(maps[0])
            names[k], lays[k] = _phase_to_map(rw, names[k], lay, maps[0], names[like])
    rank = max(lay.base_ndim for lay in lays)
    out_dims: list[Dim] = []
    for i in range(rank):
        found = []
        for lay in lays:
            j = i - (rank - lay.base_ndim)
            if j >= 0:
                found.append((lay.base_dims[j], lay.base[j]))
        space = {d for d, _ in found if d.spatial}
        if len(space) > 1:
            _refuse("operands on different lattices (their strides differ)")
        if space:
            if any(not d.spatial and n != 1 for d, n in found):
                _refuse("a spatial map combined with a tensor that varies over positions (a "
                        "position-dependent constant such as a positional embedding)")
            out_dims.append(space.pop())
        else:
            out_dims.append(PLAIN)
    extras = max((lay.extras for lay in lays), key=len)
    for k, lay in enumerate(lays):
        if lay.extras and lay.extras != extras:
            _refuse("operands with different extra dims")
        if not lay.extras and extras:
            n = len(lay.dims)
            names[k] = rw.b.unsqueeze(names[k], list(range(n, n + len(extras))))
    rw.emit(node, _with_gaps(node.input, names))
    for o in node.output:
        rw.set(o, Layout(rw.base_shape(o), tuple(out_dims) + extras, len(extras)))
    rw.inherit_field(node)


def _with_gaps(original: Sequence[str], names: Sequence[str]) -> list[str]:
    """``names`` for the non-empty entries of ``original``; empty (omitted) inputs kept."""
    it = iter(names)
    return [next(it) if i else "" for i in original]


def _phase_to_map(rw: OnnxRewriter, name: str, lay: Layout, like: Layout, like_name: str):
    """Replace the size-1 dims of a phase-pooled tensor by its phase dims, tiled over the
    dense size of the map it meets: dense position ``q`` gets phase ``q % step``."""
    b = rw.b
    offset = like.base_ndim - lay.base_ndim
    targets = []
    for e in lay.extras:
        for j, d in enumerate(like.base_dims):
            if d.kind == "space" and d.axis == e.axis:
                if d.step != e.step:
                    _refuse("a phase-pooled value meets a map on another lattice")
                t = j - offset
                if t < 0 or lay.base[t] != 1:
                    _refuse("a phase-pooled value meets a map along a dim it was not pooled over")
                targets.append((t, j))
                break
        else:
            _refuse("a phase-pooled value meets a map without that spatial axis")
    rank = lay.base_ndim
    order = list(range(rank))
    for k, (t, _) in enumerate(targets):
        order[t] = rank + k  # the phase dim takes the place of the pooled size-1 dim
    y = b.transpose(name, order + [t for t, _ in targets])
    y = b.squeeze(y, list(range(rank, rank + len(targets))))
    repeats: list = [1] * rank
    ends: list = []
    for t, j in targets:
        H = b.dim(like_name, j)
        s = like.base_dims[j].step
        repeats[t] = (H + s - 1) // s
        ends.append(H)
    y = b.op1("Tile", [y, b.ints(repeats)])
    y = b.slice(y, [t for t, _ in targets], [0] * len(targets), ends)
    dims = list(lay.base_dims)
    for t, j in targets:
        dims[t] = like.base_dims[j]
    return y, Layout(lay.base, tuple(dims))


def _on_merged(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """Nodes reading a value whose spatial dims were merged into one (``x.view(n, c, -1)``):
    pointwise ops keep the merge; a mean/max/min/sum over the merged dim is global pooling;
    anything else is refused."""
    x = node.input[0]
    v = rw.v(x)
    others = [rw.v(i) for i in node.input[1:] if i]
    op = node.op_type
    if not v.merged or any(o.merged or not o.layout.is_plain or o.spatial_size for o in others):
        _refuse("an op that combines merged spatial positions with other tensors")
    if op in UNARY or op == "Dropout":
        if op not in _SCALAR_PARAMS and others:
            _refuse(f"{op} with a parameter on merged spatial positions")
        if op == "Dropout":
            if len(node.output) > 1 and node.output[1]:
                _refuse("dropout's mask output is used")
            rw.b.op1("Identity", [x], node.output[0])
        else:
            rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(v.layout, merged=v.merged)
        return
    lay = v.layout
    rank = lay.base_ndim - v.merged + 1  # the baseline's rank
    a = attrs(node)
    if op not in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"):
        _refuse(f"{op} on merged spatial positions (only a mean, max, min or sum over them "
                "has a rule)")
    axes = _axes_of(rw, node, a, 1)
    if axes is None or [_norm(d, rank) for d in axes] != [rank - 1]:
        _refuse(f"{op} over other dims than the merged spatial positions")
    keepdims = bool(a.get("keepdims", 1))
    tmp = rw.b.fresh("pooled")
    rw.shapes[tmp] = tuple(lay.base[:rank - 1])
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    inner.output[0] = tmp
    _global(rw, inner, x, list(range(rank - 1, lay.base_ndim)), _REDUCE[op], False)
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


# -- channels: axes that must not be spatial ---------------------------------------------------


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LRN")
def _channel_axis(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        _refuse("a flatten of spatial positions")
    a = attrs(node)
    axis = 1 if node.op_type == "LRN" else _norm(int(a.get("axis", -1)), lay.base_ndim)
    if lay.base_dims[axis].spatial:
        _refuse(f"{node.op_type} over a spatial dim mixes positions")
    if node.op_type == "LRN":
        if lay.n_extra:
            _refuse("local response normalization of a map with extra dims")
        rw.emit(node, list(node.input))
    else:
        rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], lay)
    rw.inherit_field(node)


@rule("QuantizeLinear", "DequantizeLinear")
def _quantize(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """(De)quantization per tensor or per channel (its ``axis``): pointwise on a map."""
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain and not rw.v(x).spatial_size:
        return rw._same(node)
    if lay.fold:
        _refuse("quantization of a flatten of spatial positions")
    scale = rw.base_shape(node.input[1]) if node.input[1] in rw.shapes else ()
    for i in node.input[1:]:
        if i and not rw.lay(i).is_plain:
            _refuse("quantization parameters that vary over positions")
    a = attrs(node)
    if scale and math.prod(scale) > 1:
        axis = _norm(int(a.get("axis", 1)), lay.base_ndim)
        if lay.base_dims[axis].spatial or len(scale) > 1:
            _refuse("quantization parameters that vary over positions (blocked or spatial axis)")
        rw.emit(node, list(node.input), axis=axis)
    else:
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
    if lay.fold:
        _refuse("layer normalization of a flatten of spatial positions")
    r = lay.base_ndim
    axis = _norm(int(attrs(node).get("axis", -1)), r)
    if any(d.spatial for d in lay.base_dims[axis:]):
        _refuse("layer normalization over spatial dims mixes positions")
    if len([o for o in node.output if o]) > 1:
        _refuse("layer normalization's mean/inv-std outputs are used")
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


# -- heads: Flatten / Reshape + Gemm / MatMul ---------------------------------------------------


def _fold_or_reshape(rw: OnnxRewriter, node: onnx.NodeProto, x: str, out_shape) -> None:
    lay = rw.lay(x)
    out = node.output[0]
    if lay.fold:
        _refuse("a reshape of a flatten of spatial positions")
    base_in = lay.base
    sp = [i for i, d in enumerate(lay.base_dims) if d.spatial]
    if not sp:
        # nothing spatial in the base dims: reshape them, keep the extras behind
        target = [-1, *out_shape[1:]] if out_shape else []
        extras = [rw.b.dim(x, lay.base_ndim + k) for k in range(lay.n_extra)]
        rw.b.reshape(x, list(target) + extras, out)
        rw.set(out, Layout(tuple(out_shape), tuple(PLAIN for _ in out_shape) + lay.extras,
                           lay.n_extra))
        return
    a, z = sp[0], sp[-1] + 1
    if sp != list(range(a, z)):
        _refuse("spatial dims that are not next to each other")
    block = base_in[a:z]
    pre = math.prod(base_in[:a])
    post = math.prod(base_in[z:])
    # a reshape that leaves the spatial block alone (channel split, channel shuffle)
    for j in range(len(out_shape) - len(block) + 1):
        if tuple(out_shape[j:j + len(block)]) == tuple(block) and \
                math.prod(out_shape[:j]) == pre and math.prod(out_shape[j + len(block):]) == post:
            target = [-1 if i == 0 and lay.base_dims[0] == PLAIN else n
                      for i, n in enumerate(out_shape[:j])]
            target += [rw.b.dim(x, a + k) for k in range(len(block))]
            target += list(out_shape[j + len(block):])
            target += [rw.b.dim(x, lay.base_ndim + k) for k in range(lay.n_extra)]
            if not j:
                _refuse("a reshape that merges the batch into space")
            rw.b.reshape(x, target, out)
            tail = len(out_shape) - j - len(block)
            dims = [PLAIN] * j + list(lay.base_dims[a:z]) + [PLAIN] * tail
            rw.set(out, Layout(tuple(out_shape), tuple(dims) + lay.extras, lay.n_extra))
            rw.inherit_field(node)
            return
    # all spatial dims merged into one, last (x.view(n, c, -1)): only a reduction over it
    if (z == len(base_in) and a >= 1 and not lay.n_extra and
            tuple(out_shape) == tuple(base_in[:a]) + (math.prod(block),)):
        rw.b.op1("Identity", [x], out)
        rw.env[out] = Val(lay, merged=len(block))
        rw.inherit_field(node)
        return
    # a flatten of channels and space that only Gemm/MatMul may consume
    if (len(out_shape) == a and z == len(base_in) and a >= 2 and
            tuple(out_shape[:a - 1]) == tuple(base_in[:a - 1]) and not lay.n_extra):
        rw.b.op1("Identity", [x], out)
        dims = tuple(lay.base_dims[:a - 1]) + tuple(lay.base_dims[a - 1:])
        rw.set(out, Layout(tuple(out_shape), dims, fold=len(base_in) - a + 1,
                           fold_shape=tuple(block)))
        rw.inherit_field(node)
        return
    _refuse(f"a reshape from {tuple(base_in)} to {tuple(out_shape)} mixes spatial positions "
            "with other dims (only channel reshapes and a flatten before Gemm/MatMul have a "
            "rule)")


@rule("Flatten")
def _flatten(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    _fold_or_reshape(rw, node, node.input[0], rw.base_shape(node.output[0]))


@rule("Reshape")
def _reshape(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    target = rw.v(node.input[1])
    if lay.is_plain and not target.spatial_size:
        return rw._same(node)
    if lay.is_plain:
        _refuse("a reshape to a shape computed from a spatial size")
    # the target is rebuilt from the baseline's shapes: a target computed from Shape nodes
    # would hold dense sizes where the baseline had its own
    _fold_or_reshape(rw, node, node.input[0], rw.base_shape(node.output[0]))


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


def _head_conv(rw: OnnxRewriter, node: onnx.NodeProto, x: str, lay: Layout, kernel: str,
               bias: str | None, beta: float) -> None:
    """Flatten + fully connected over a k x k map: a k x k convolution dilated by the map's
    step; its output positions become extra dims."""
    b = rw.b
    space = lay.fold_dims[1:]
    nd = len(space)
    y = b.op1("Conv", [x, kernel], kernel_shape=list(lay.fold_shape), strides=[1] * nd,
              pads=[0] * (2 * nd), dilations=[d.step if k > 1 else 1 for d, k in
                                               zip(space, lay.fold_shape)])
    out = node.output[0]
    if bias:
        bb = b.reshape(bias, [-1] + [1] * nd)
        if beta != 1.0:
            bb = b.op1("Mul", [bb, b.scalar(beta, rw.types.get(bias, TensorProto.FLOAT))])
        b.op1("Add", [y, bb], out)
    else:
        b.op1("Identity", [y], out)
    extras = tuple(Dim("space", d.axis, d.step) for d in space)
    rw.set(out, Layout(rw.base_shape(out), tuple(lay.base_dims) + (PLAIN,) + extras, nd))
    rf = rw.field_of(x)
    if rf:
        rw.fields[out] = tuple(f.through(Window(k)) for f, k in zip(rf, lay.fold_shape))
    rw.record(HEAD_KIND, {"in_features": lay.base[-1]},
              {"kernel": tuple(lay.fold_shape), "dilation": tuple(d.step for d in space)},
              tuple(d.step for d in space), tuple(d.step for d in space),
              rw.fields.get(out, ()), "Flatten + fully connected as a dilated convolution",
              cost=lay.base[-1])


def _per_position(rw: OnnxRewriter, node: onnx.NodeProto, x: str, lay: Layout, w: str,
                  trans: bool, alpha: float, bias: str | None, beta: float) -> None:
    """A fully connected layer applied at every extra position: features moved last, a
    MatMul, and back."""
    b = rw.b
    r, e = lay.base_ndim, lay.n_extra
    if r != 2:
        _refuse("a fully connected layer on a tensor of rank other than 2 with extra dims")
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
        _refuse("Gemm with transA on a spatial map")
    if not rw.lay(w).is_plain or (bias and not rw.lay(bias).is_plain):
        _refuse("Gemm weights that depend on positions")
    trans = bool(a.get("transB", 0))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if lay.fold:
        return _head_conv(rw, node, x, lay, _weight_as_conv(rw, w, trans, lay, alpha), bias,
                          beta)
    if lay.has_space:
        _refuse("Gemm over a spatial dim")
    _per_position(rw, node, x, lay, w, trans, alpha, bias, beta)


@rule("MatMul")
def _matmul(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x, w = node.input
    lay, wl = rw.lay(x), rw.lay(w)
    if lay.is_plain and wl.is_plain:
        return rw._same(node)
    if not wl.is_plain or len(wl.base) != 2:
        _refuse("MatMul of two tensors that vary over positions (attention-like)")
    if lay.fold:
        return _head_conv(rw, node, x, lay, _weight_as_conv(rw, w, False, lay, 1.0), None, 1.0)
    if lay.base_dims[-1].spatial:
        _refuse("MatMul over a spatial dim mixes positions (attention-like)")
    if lay.n_extra:
        if lay.has_space:
            _refuse("MatMul on a map with extra dims")
        return _per_position(rw, node, x, lay, w, False, 1.0, None, 1.0)
    rw.emit(node, [x, w])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims[:-1] + (PLAIN,)))
    rw.inherit_field(node)


# -- shape plumbing ------------------------------------------------------------------------------


@rule("Transpose")
def _transpose(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        _refuse("a transpose of a flatten of spatial positions")
    r = lay.base_ndim
    perm = [int(p) for p in attrs(node).get("perm", list(range(r))[::-1])]
    dense_perm = perm + list(range(r, r + lay.n_extra))
    rw.emit(node, list(node.input), perm=dense_perm)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]),
                                  tuple(lay.base_dims[p] for p in perm) + lay.extras, lay.n_extra))
    rw.inherit_field(node)


@rule("Concat")
def _concat(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    vals = [rw.v(i) for i in node.input]
    if any(v.sizes is not None or v.tainted for v in vals):
        return _shape_concat(rw, node, vals)
    lays = [rw.lay(i) for i in node.input]
    if all(lay.is_plain for lay in lays):
        return rw._same(node)
    first = lays[0]
    axis = _norm(int(attrs(node)["axis"]), first.base_ndim)
    for lay in lays:
        if lay.fold or lay.base_ndim != first.base_ndim or lay.extras != first.extras:
            _refuse("concatenation of tensors with different layouts")
        for i, (d, e) in enumerate(zip(lay.base_dims, first.base_dims)):
            if i != axis and d != e:
                _refuse("concatenation of maps on different lattices")
    if first.base_dims[axis].spatial:
        _refuse("concatenation along a spatial dim")
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), first.base_dims + first.extras,
                                  first.n_extra))
    rw.inherit_field(node)


@rule("Split")
def _split(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        _refuse("a split of a flatten of spatial positions")
    axis = _norm(int(attrs(node).get("axis", 0)), lay.base_ndim)
    if lay.base_dims[axis].spatial:
        _refuse("a split along a spatial dim")
    rw.emit(node, list(node.input), axis=axis)
    for o in node.output:
        if o:
            rw.set(o, Layout(rw.base_shape(o), lay.base_dims + lay.extras, lay.n_extra))
    rw.inherit_field(node)


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
        _refuse("slicing a value computed from a spatial size")
    if lay.fold:
        _refuse("a slice of a flatten of spatial positions")
    n_axes = len(rw.base_shape(node.input[1])) and rw.base_shape(node.input[1])[0]
    axes = (rw.need_const(node.input[3], "Slice axes").reshape(-1).tolist()
            if len(node.input) > 3 and node.input[3] else list(range(n_axes)))
    axes = [_norm(int(a), lay.base_ndim) for a in axes]
    if not any(lay.base_dims[a].spatial for a in axes):
        # channels only: starts/ends may be computed (from channel counts), as they are
        if any(rw.v(i).spatial_size for i in node.input[1:] if i):
            _refuse("a slice bound computed from a spatial size")
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[3] = rw.b.const(axes)
        rw.emit(node, [i for i in inputs if i] if len(node.input) <= 4 else inputs)
        rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims + lay.extras,
                                      lay.n_extra))
        rw.inherit_field(node)
        return
    starts = rw.need_const(node.input[1], "Slice starts").reshape(-1).tolist()
    ends = rw.need_const(node.input[2], "Slice ends").reshape(-1).tolist()
    steps = (rw.need_const(node.input[4], "Slice steps").reshape(-1).tolist()
             if len(node.input) > 4 and node.input[4] else [1] * len(starts))
    axes = [_norm(int(a), lay.base_ndim) for a in axes]
    b = rw.b
    dims = list(lay.base_dims)
    new_starts, new_ends, new_steps = [], [], []
    for a, st, en, sp in zip(axes, starts, ends, steps):
        d = lay.base_dims[a]
        if not d.spatial:
            new_starts.append(st)
            new_ends.append(en)
            new_steps.append(sp)
            continue
        if sp < 1:
            _refuse("a spatial slice with a negative step")
        h = _lattice_size(rw, x, a - 2, d.step) if a >= 2 else _refuse("slice of dim 0/1")
        start = b.minimum(st, h) if st >= 0 else b.maximum(h + st, 0)
        end = h if en >= _BIG or en >= 2**31 - 1 else (b.minimum(en, h) if en >= 0
                                                       else b.maximum(h + en, 0))
        n = (b.maximum(end - start, 0) + (sp - 1)) // sp
        new_starts.append(start * d.step)
        new_ends.append(start * d.step + (n - 1) * (d.step * sp) + 1)
        new_steps.append(1)
        dims[a] = Dim("space", d.axis, d.step * sp)
        rw.result.has_padding = True  # a crop: shifted windows differ at the borders
    b.slice(x, axes, new_starts, new_ends, new_steps, output=node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))
    rw.inherit_field(node)


@rule("Pad")
def _pad(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    x = node.input[0]
    lay = rw.lay(x)
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        _refuse("padding a flatten of spatial positions")
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "wrap":
        _refuse("circular padding is not translation-equivariant on the lattice")
    if "pads" not in a and rw.v(node.input[1]).spatial_size:
        _refuse("padding computed from the input size (TensorFlow-style 'same' padding); "
                "export the model at a fixed input size, where the pads are constants")
    pads = [int(p) for p in (a["pads"] if "pads" in a else
                             rw.need_const(node.input[1], "Pad pads").reshape(-1))]
    r = lay.base_ndim
    axes = (rw.need_const(node.input[3], "Pad axes").reshape(-1).tolist()
            if len(node.input) > 3 and node.input[3] else list(range(r)))
    axes = [_norm(int(v), r) for v in axes]
    lo, hi = pads[:len(axes)], pads[len(axes):]
    dense_lo, dense_hi = [], []
    for ax, p, q in zip(axes, lo, hi):
        d = lay.base_dims[ax]
        s = d.step if d.kind == "space" else 1
        dense_lo.append(p * s)
        dense_hi.append(q * s)
    if any(lo) or any(hi):
        rw.result.has_padding = True
    value = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if "pads" in a:  # opset < 11 form
        value = rw.fill(x, float(a.get("value", 0.0))) if mode == "constant" else None
    rw.b.pad(x, len(lay.dims), axes, dense_lo, dense_hi, value, mode, node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims + lay.extras,
                                  lay.n_extra))
    rw.inherit_field(node)


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
        _refuse(f"{node.op_type} of a value computed from a spatial size")
    if lay.fold:
        _refuse(f"{node.op_type} of a flatten of spatial positions")
    a = attrs(node)
    axes = _axes_of(rw, node, a, 1)
    dims = list(lay.base_dims)
    if node.op_type == "Squeeze":
        if axes is None:
            axes = [i for i, n in enumerate(lay.base) if n == 1]
        axes = sorted(_norm(x, lay.base_ndim) for x in axes)
        if any(dims[i].spatial for i in axes):
            _refuse("squeezing a spatial dim")
        dims = [d for i, d in enumerate(dims) if i not in axes]
    else:
        out_rank = lay.base_ndim + len(axes)
        axes = sorted(_norm(x, out_rank) for x in axes)
        for i in axes:
            dims.insert(i, PLAIN)
    rw.b.op1(node.op_type, [node.input[0], rw.b.const(axes)], node.output[0])
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))
    rw.inherit_field(node)


# -- shape tensors: which entries are spatial sizes -------------------------------------------


@rule("Shape")
def _shape(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    a = attrs(node)
    r = lay.base_ndim
    start = _norm(int(a.get("start", 0)), r) if a.get("start", 0) else 0
    end = a.get("end")
    end = r if end is None else (int(end) if int(end) >= 0 else r + int(end))
    end = min(end, r)
    if lay.fold:
        _refuse("the shape of a flatten of spatial positions")
    if rw.b.opset >= 15:
        rw.b.op1("Shape", [node.input[0]], node.output[0], start=start, end=end)
    else:
        rw.b.slice(rw.b.op1("Shape", [node.input[0]]), [0], [start], [end], output=node.output[0])
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
        _refuse("gathering along a spatial dim reads absolute positions")
    idx = rw.base_shape(node.input[1]) if node.input[1] in rw.shapes else ()
    dims = list(lay.base_dims[:axis]) + [PLAIN] * len(idx) + list(lay.base_dims[axis + 1:])
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))


def _shape_concat(rw: OnnxRewriter, node: onnx.NodeProto, vals: list[Val]) -> None:
    sizes: list[bool] = []
    for i, v in zip(node.input, vals):
        if v.sizes is not None:
            sizes += v.sizes
        elif v.tainted:
            sizes = None  # type: ignore[assignment]
            break
        else:
            shape = rw.shapes.get(i)
            if shape is None or len(shape) != 1:
                sizes = None  # type: ignore[assignment]
                break
            sizes += [False] * shape[0]
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(Layout.plain(rw.shapes.get(node.output[0], ())),
                                 sizes=tuple(sizes) if sizes is not None else None,
                                 tainted=sizes is None)


@rule("Expand")
def _expand(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    """``y.expand_as(x)`` before an element-wise op with the map: the target shape comes from
    the map's (dense) shape. Broadcasting in that op does the same, so the value passes as it
    is; a value that is itself spatial is not expanded over positions."""
    v, target = rw.v(node.input[0]), rw.v(node.input[1])
    if not target.spatial_size and (v.layout is None or v.layout.is_plain):
        return rw._same(node)
    lay = rw.lay(node.input[0])
    if lay.fold or any(d.spatial for d in lay.base_dims):
        _refuse("expanding a spatial map")
    if not target.spatial_size:
        _refuse("expanding a value with extra dims to a fixed shape")
    out = rw.base_shape(node.output[0])
    if len(out) != lay.base_ndim or any(a != b and a != 1 for a, b in zip(lay.base, out)):
        _refuse(f"expanding {lay.base} to {out} changes more than size-1 dims")
    rw.b.op1("Identity", [node.input[0]], node.output[0])
    rw.env[node.output[0]] = Val(lay)


@rule("Constant")
def _constant(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    rw._same(node)
