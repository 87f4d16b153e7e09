"""Normalizations and other ops along the channel axis: they may not read across positions."""

from __future__ import annotations

from collections.abc import Sequence

from econv_convert.core.layout import Layout
from econv_convert.core.rules.common import refuse_kind


def channel_axes(x: Layout, axes: Sequence[int], what: str) -> None:
    """A layer that reads along ``axes`` (softmax, normalizations, LRN, a channel-wise
    statistic): those must not be spatial, or the layer mixes positions."""
    if x.fold:
        refuse_kind("on_flatten", what=f"{what} on")
    if any(x.base_dims[a].spatial for a in axes):
        refuse_kind("over_spatial_dim", what=what)


def statistics_over_space(x: Layout, what: str) -> None:
    """GroupNorm, InstanceNorm: statistics over spatial positions differ between the lattice
    and the dense map."""
    if x.has_space:
        refuse_kind("spatial_statistics", what=what)
