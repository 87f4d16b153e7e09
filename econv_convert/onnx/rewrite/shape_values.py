"""Sizes as values: Shape, the slices, gathers and concatenations of sizes, Constant."""

from __future__ import annotations

import onnx

from econv_convert.core import rules
from econv_convert.core.lattice import lattice_count
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.onnx.rewrite.frame import _BIG, OnnxRewriter, Val, _norm, attrs, rule

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
        rules.refuse_kind("flatten_positions", what="the shape of")
    x = node.input[0]
    entries = []
    for d in range(start, end):
        dim = lay.base_dims[d]
        size = rw.b.dim(x, d)
        entries.append(lattice_count(size, dim.step) if dim.kind == "space" and dim.step > 1
                       else size)
    rw.b.op1("Identity", [rw.b.ints(entries)], node.output[0])
    sizes = lay.base_dims[start:end]
    rw.env[node.output[0]] = Val(layout=Layout.plain((end - start,)), sizes=sizes)


def _shape_slice(rw: OnnxRewriter, node: onnx.NodeProto, v: Val) -> None:
    starts = rw.const(node.input[1])
    ends = rw.const(node.input[2])
    sizes = v.sizes
    picked = None
    if starts is not None and ends is not None and len(node.input) <= 4:
        picked = sizes[slice(int(starts.reshape(-1)[0]), int(min(ends.reshape(-1)[0], _BIG)))]
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(layout=Layout.plain(rw.shapes.get(node.output[0], ())),
                                 sizes=picked, spatial=picked is None and v.spatial_size)


@rule("Gather")
def _gather(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    v = rw.v(node.input[0])
    if v.sizes is not None:
        idx = rw.const(node.input[1])
        picked = None
        if idx is not None:
            picked = tuple(v.sizes[int(i)] for i in idx.reshape(-1))
        rw.emit(node, list(node.input))
        rw.env[node.output[0]] = Val(layout=Layout.plain(rw.shapes.get(node.output[0], ())),
                                     sizes=picked, spatial=picked is None and v.spatial_size)
        return
    lay = rw.lay(node.input[0])
    if lay.is_plain and not v.spatial:
        return rw._same(node)
    axis = _norm(int(attrs(node).get("axis", 0)), lay.base_ndim)
    if lay.fold or lay.base_dims[axis].spatial or not rw.lay(node.input[1]).is_plain:
        rules.refuse_kind("gather_spatial")
    idx = rw.base_shape(node.input[1]) if node.input[1] in rw.shapes else ()
    dims = list(lay.base_dims[:axis]) + [PLAIN] * len(idx) + list(lay.base_dims[axis + 1:])
    rw.emit(node, list(node.input), axis=axis)
    rw.set(node.output[0], Layout(rw.base_shape(node.output[0]), tuple(dims) + lay.extras,
                                  lay.n_extra))


def _shape_concat(rw: OnnxRewriter, node: onnx.NodeProto, vals: list[Val]) -> None:
    sizes: list[Dim] | None = []
    for i, v in zip(node.input, vals):
        if v.sizes is not None:
            sizes += v.sizes
        elif v.spatial:
            sizes = None
            break
        else:
            shape = rw.shapes.get(i)
            if shape is None or len(shape) != 1:
                sizes = None
                break
            sizes += [PLAIN] * shape[0]
    rw.emit(node, list(node.input))
    rw.env[node.output[0]] = Val(layout=Layout.plain(rw.shapes.get(node.output[0], ())),
                                 sizes=tuple(sizes) if sizes is not None else None,
                                 spatial=sizes is None)


@rule("Constant")
def _constant(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    rw._same(node)
