"""What each layer kind becomes in the dense model: decided once, for every backend.

A backend reads its own node (an fx call, an ONNX node), says what kind of layer it is and
with which geometry (:class:`~econv_convert.core.lattice.Window` per spatial axis, the axes it
reads, its mode), and asks the function of its layer family here: :mod:`.window`,
:mod:`.global_pool`, :mod:`.pointwise`, :mod:`.norm`, :mod:`.linear`, :mod:`.reshape` (the
same family names as each backend's rewrite modules; :mod:`.common` holds refusals and
records). The answer is a small plan: the output's
:class:`~econv_convert.core.layout.Layout`, the dense window to run, the corrections to make
when the model runs, the record for reports, or a :class:`Refusal` that says why the layer has
no dense form. The backend then emits that plan in its own operations; it holds no lattice
arithmetic and no refusal reasons of its own.

Everything here is plain Python on layouts and integers (and on the symbolic integers an ONNX
graph computes with: the arithmetic of :mod:`econv_convert.core.lattice` runs on them too).
"""

from __future__ import annotations

from econv_convert.core.rules.common import (
    REFUSED,
    Record,
    Refusal,
    fields_through,
    input_layout,
    no_rule,
    on_merged,
    output_view,
    refuse,
    refuse_kind,
)
from econv_convert.core.rules.global_pool import (
    GLOBAL_MODES_NOTE,
    GlobalPlan,
    global_pool,
    merged_reduction,
    reduction,
)
from econv_convert.core.rules.linear import (
    LinearPlan,
    linear,
)
from econv_convert.core.rules.norm import (
    channel_axes,
    statistics_over_space,
)
from econv_convert.core.rules.pointwise import (
    BroadcastPlan,
    Spread,
    broadcast,
)
from econv_convert.core.rules.reshape import (
    PadPlan,
    ReshapePlan,
    concat,
    groups,
    pad,
    permute,
    reshape,
    spatial_slice,
    split,
    squeeze,
    unsqueeze,
)
from econv_convert.core.rules.window import (
    WindowPlan,
    adaptive_note,
    adaptive_pool,
    space_to_depth,
    space_to_depth_record,
    window,
)

__all__ = [
    "BroadcastPlan", "GLOBAL_MODES_NOTE", "GlobalPlan", "LinearPlan", "PadPlan", "REFUSED",
    "Record", "Refusal", "ReshapePlan", "Spread", "WindowPlan", "adaptive_note", "adaptive_pool",
    "broadcast", "channel_axes", "concat", "fields_through", "global_pool", "groups",
    "input_layout", "linear", "merged_reduction", "no_rule", "on_merged", "output_view", "pad",
    "permute", "reduction", "refuse", "refuse_kind", "reshape", "space_to_depth",
    "space_to_depth_record", "spatial_slice", "split", "squeeze", "statistics_over_space",
    "unsqueeze", "window",
]
