"""What every rule shares: refusals (a reason, and what the user can do) and the words both
backends use for them, the record a rewritten layer leaves for reports, receptive fields
through windows, the model input's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from econv_convert.core.lattice import (
    Field,
    Window,
)
from econv_convert.core.layout import PLAIN, Dim, Layout
from econv_convert.core.records import Record  # noqa: F401  (rules return it)
from econv_convert.core.rules.reasons import HINTS, REFUSED


class Refusal(Exception):
    """A layer with no dense form; ``reason`` says why and ``hint`` what the user can do,
    where an option helps (the backend adds the node's name, and by default suggests
    densifying the part before it)."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def refuse(reason: str, hint: str = "") -> NoReturn:
    raise Refusal(reason, hint)


def refuse_kind(kind: str, **names: Any) -> NoReturn:
    """Refuse with the core's words for ``kind`` (:mod:`.reasons`), ``names`` filled in."""
    refuse(REFUSED[kind].format(**names), HINTS.get(kind, "").format(**names))


# -- refusals every backend words the same way: the backend names the node ------------------


def no_rule(what: str) -> NoReturn:
    """A node with no rule that a map reaches."""
    refuse_kind("no_rule", what=what)


def on_merged(what: str) -> NoReturn:
    """A node other than a reduction over spatial positions merged into one dim (a
    flatten(2) before a mean, say)."""
    refuse_kind("on_merged", what=what)


def output_view(x: Layout, linear_layer: str) -> dict[str, Any]:
    """What each dim of a model output means (kind, lattice step, input axis): the lattice
    view of the dense output. Refused: outputs that are no map (a flatten over positions
    that only ``linear_layer``, the backend's linear layer, may consume; positions merged into one
    dim)."""
    if x.fold:
        refuse_kind("output_flatten", linear_layer=linear_layer)
    if x.merged:
        refuse_kind("output_merged")
    return {"dims": [(d.kind, d.step, d.axis) for d in x.dims], "base_ndim": x.base_ndim}


def fields_through(fields: Sequence[Field], windows: Sequence[Window]) -> tuple[Field, ...]:
    """Receptive fields and steps after window layers ``windows`` (one per spatial axis)."""
    fields = fields or tuple(Field() for _ in windows)
    return tuple(f.through(w) for f, w in zip(fields, windows, strict=True))


def input_layout(shape: Sequence[int], channels_last: bool = False) -> Layout:
    """The model input: batch, channels, and every other dim spatial on lattice step 1
    (``channels_last``: batch, spatial..., channels)."""
    nd = len(shape) - 2
    space = tuple(Dim("space", i, 1) for i in range(nd))
    dims = (PLAIN, *space, PLAIN) if channels_last else (PLAIN, PLAIN, *space)
    return Layout(tuple(shape), dims)
