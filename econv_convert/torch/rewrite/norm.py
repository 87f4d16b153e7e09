"""Normalization layers: channel-wise (BatchNorm on running statistics, PReLU, LRN), LayerNorm,
GroupNorm and InstanceNorm.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.torch import ops, targets
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, _per_extra, rule

# -- channel-wise layers ---------------------------------------------------------------------


# layers acting on each position's channels alone (also what :mod:`econv_convert.run.trim`
# runs trimmed)
CHANNELWISE = (F.batch_norm, ops.batch_norm, torch.batch_norm, F.prelu, F.local_response_norm,
               F.channel_shuffle, torch.channel_shuffle, F.normalize)


@rule(*CHANNELWISE)
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
