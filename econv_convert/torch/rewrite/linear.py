"""Linear layers: over channels (kept), and heads over a flattened map (a convolution per the
core's linear plan).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from econv_convert.core import rules
from econv_convert.core.layout import Layout
from econv_convert.torch import ops, targets
from econv_convert.torch.rewrite.frame import Rewriter, Val, _arg, rule


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
