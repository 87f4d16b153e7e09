"""Normalization layers: BatchNormalization on running statistics, ops over the channel axis
(Softmax, LRN, ...), Instance/GroupNormalization, LayerNormalization.
"""

from __future__ import annotations

import numpy as np
import onnx

from econv_convert.core import rules
from econv_convert.onnx.rewrite.frame import OnnxRewriter, _norm, _per_extra, attrs, rule


@rule("BatchNormalization")
def _batch_norm(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    if len([o for o in node.output if o]) > 1 or attrs(node).get("training_mode", 0):
        rules.refuse_kind("batchnorm_training")
    lay = rw.lay(node.input[0])
    rules.channel_axes(lay, [1] if lay.base_ndim > 1 else [], "batch normalization")
    rw.emit(node, list(node.input))
    rw.set(node.output[0], lay)


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


@rule("InstanceNormalization", "GroupNormalization")
def _statistics(rw: OnnxRewriter, node: onnx.NodeProto) -> None:
    lay = rw.lay(node.input[0])
    if lay.is_plain:
        return rw._same(node)
    rules.statistics_over_space(lay, node.op_type)
    _per_extra(rw, node, node.input[0], lay)


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
        rules.refuse_kind("norm_statistics")
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
