"""Indexing and reshaping: Reshape, Flatten, Transpose, Concat, Split, Slice, Pad, Squeeze and
Unsqueeze.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from econv_convert.core import rules
from econv_convert.core.lattice import lattice_count, slice_count, tight
from econv_convert.core.layout import Layout
from econv_convert.onnx.graph import Builder, SymInt
from econv_convert.onnx.rewrite.frame import _BIG, OnnxRewriter, Val, _norm, attrs, rule
from econv_convert.onnx.rewrite.global_pool import _axes_of
from econv_convert.onnx.rewrite.shape_values import _shape_concat, _shape_slice
from econv_convert.onnx.rewrite.window import _lattice_size, _static

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
        rw.env[out] = Val(layout=plan.layout)
        return
    if plan.kind == "unfold":
        y = x
        for d in sorted(plan.blocks, reverse=True):  # later dims first: indices stay put
            r, s = plan.blocks[d], lay.base_dims[d].step
            n = tight(lattice_count(b.dim(y, d), s) // r, s * r)
            taps = [b.unsqueeze(b.slice(y, [d], [o * s], [o * s + n]), [d + 1])
                    for o in range(r)]
            y = b.op1("Concat", taps, axis=d + 1)
        b.op1("Identity", [y], out)
        rw.rewritten.has_padding = True  # its baseline needs whole blocks: the far border differs
        rw.set(out, plan.layout)
        return
    target = [b.dim(x, d) if d is not None else int(n)
              for d, n in zip(plan.from_dims, out_shape)]
    target += [b.dim(x, lay.base_ndim + k) for k in range(lay.n_extra)]
    b.reshape(x, target, out)
    rw.set(out, plan.layout)


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
        rules.refuse_kind("reshape_from_size")
    _reshape_to(rw, node, node.input[0], rw.base_shape(node.output[0]))


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


@rule("Concat")
def _concat(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    vals = [rw.v(i) for i in node.input]
    if any(v.sizes is not None or v.spatial for v in vals):
        return _shape_concat(rw, node, vals)
    lays = [rw.lay(i) for i in node.input]
    if all(lay.is_plain for lay in lays):
        return rw._same(node)
    axis = _norm(int(attrs(node)["axis"]), lays[0].base_ndim)
    out = rules.concat(lays, axis)
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), out.dims, out.n_extra))


@rule("Split")
def _split(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    if lay.fold:
        rules.refuse_kind("flatten_positions", what="a split of")
    axis = _norm(int(attrs(node).get("axis", 0)), lay.base_ndim)
    rules.split(lay, axis)
    rw.emit(node, list(node.input), axis=axis)
    for o in node.output:
        if o:
            rw.set(o, Layout(rw.base_shape(o), lay.base_dims + lay.extras, lay.n_extra))


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
    if lay.is_plain and not v.spatial:
        return rw._same(node)
    if v.spatial:
        rules.refuse_kind("computed_from_size", what="slicing")
    if lay.fold:
        rules.refuse_kind("flatten_positions", what="a slice of")
    n_axes = len(rw.base_shape(node.input[1])) and rw.base_shape(node.input[1])[0]
    axes = (rw.need_const(node.input[3], "Slice axes").reshape(-1).tolist()
            if len(node.input) > 3 and node.input[3] else list(range(n_axes)))
    axes = [_norm(int(a), lay.base_ndim) for a in axes]
    if not any(lay.base_dims[a].spatial for a in axes):
        # channels only: starts/ends may be computed (from channel counts), as they are
        if any(rw.v(i).spatial_size for i in node.input[1:] if i):
            rules.refuse_kind("slice_bound_from_size")
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[3] = rw.b.const(axes)
        rw.emit(node, [i for i in inputs if i] if len(node.input) <= 4 else inputs)
        rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), lay.base_dims + lay.extras,
                                      lay.n_extra))
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
            rules.refuse_kind("spatial_batch_slice")
        h = _lattice_size(rw, x, a - 2, d.step)
        start = _bound(b, st, h)
        end = h if _static(en) and en >= min(_BIG, 2**31 - 1) else _bound(b, en, h)
        n = slice_count(start, end, sp, b.maximum)
        new_starts.append(start * d.step)
        new_ends.append(start * d.step + (n - 1) * (d.step * sp) + 1)
        new_steps.append(1)
        rw.rewritten.has_padding = True  # a crop: shifted windows differ at the borders
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
        rw.rewritten.has_padding = True
    else:
        lo, hi = pads[:len(axes)], pads[len(axes):]
        rw.b.pad(x, len(lay.dims), axes, [p * s for p, s in zip(lo, plan.scales)],
                 [q * s for q, s in zip(hi, plan.scales)], value, mode, node.output[0])
        rw.rewritten.has_padding |= any(lo) or any(hi)
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
        rw.env[node.output[0]] = Val(layout=Layout.plain(rw.shapes.get(node.output[0], ())),
                                     sizes=v.sizes, spatial=v.spatial)
        return
    lay = rw.lay(node.input[0])
    if lay.is_plain and not v.spatial:
        return rw._same(node)
    if v.spatial:
        rules.refuse_kind("computed_from_size", what=f"{node.op_type} of")
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
