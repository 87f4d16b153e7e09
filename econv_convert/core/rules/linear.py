"""Fully connected layers: over channels (kept as they are), or a head over a flattened map (a
convolution over the map).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from econv_convert.core.lattice import (
    Field,
    Window,
)
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.records import HEAD_KIND
from econv_convert.core.rules.common import Record, refuse_kind

# -- fully connected layers --------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPlan:
    """``kind``: ``plain``, ``head`` (a Flatten + fully connected over a C x k... map: a
    dilated convolution of kernel ``kernel`` whose positions become extra dims), ``per_position``
    (after global pooling or a head: the layer at each extra position), ``channels`` (over a
    channels-last map: positions untouched)."""

    kind: str
    kernel: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    out_dims: tuple[Dim, ...] = ()  # base dims of a head's output, then its extras
    n_extra: int = 0
    record: Record | None = None
    fields: tuple[Field, ...] = ()


def linear(x: Layout, in_features: int, fields: Sequence[Field] = ()) -> LinearPlan:
    """A fully connected layer (``Linear``, ``Gemm``, ``MatMul`` by a weight) on ``x``."""
    if x.is_plain:
        return LinearPlan("plain")
    if x.fold:
        folded = x.fold_dims
        if x.base_ndim != 2 or folded[0].spatial or any(not d.spatial for d in folded[1:]):
            refuse_kind("linear_flatten_order")
        space = folded[1:]
        kernel = tuple(x.fold_shape)
        steps = tuple(d.step for d in space)
        out_fields = tuple(f.through(Window(k)) for f, k in zip(fields, kernel)) \
            if fields else ()
        record = Record(HEAD_KIND, {"in_features": in_features},
                        {"kernel": kernel, "dilation": steps}, steps, steps,
                        tuple(f.size for f in out_fields),
                        "Flatten + fully connected as a dilated convolution", in_features)
        extras = tuple(Dim("space", d.axis, d.step) for d in space)
        return LinearPlan("head", kernel, steps, (PLAIN, PLAIN) + extras, len(extras), record,
                          out_fields)
    if x.base_dims[-1].spatial:
        refuse_kind("over_spatial_dim", what="a fully connected layer")
    if x.n_extra:
        if x.has_space:
            refuse_kind("with_extra_dims", what="a fully connected layer on")
        return LinearPlan("per_position")
    return LinearPlan("channels")
