"""The one walk every backend's rewriter runs over a baseline graph.

A backend's frame (``torch/rewrite/frame.py``, ``onnx/rewrite/frame.py``) says how to read
its graph: which nodes, in order (:meth:`Walk.nodes`); a node's name as reports show it
(:meth:`Walk.label`); how one node is rewritten (:meth:`Walk.rewrite`, which dispatches to
the layer families' rules); which values a rewritten node made and what their dense dims mean
(:meth:`Walk.made`); and which ``until`` would densify the part before a refused node
(:meth:`Walk.until_hint`). The walk does the rest, once for both backends: it turns the
core's refusals into one-line errors naming the node (with what the user can do), turns an
argument no rule foresaw into a refusal instead of a crash, and keeps the record every
consumer reads (:class:`~econv_convert.core.records.Rewritten`: the largest dense tensor for
the memory guard, every value that carries a map for the per-node proof).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from econv_convert.core.layout import Layout
from econv_convert.core.records import Rewritten
from econv_convert.core.rules import Refusal
from econv_convert.errors import UnsupportedLayerError

# the layer families every backend groups its rules by, one module each, named alike in
# ``core/rules/`` (``shape_values`` has no core decisions: sizes are values, not maps)
FAMILIES = ("window", "global_pool", "pointwise", "norm", "linear", "reshape", "shape_values")

# what a rule reading arguments it did not foresee raises: a refusal of that node, not a crash
UNFORESEEN = (KeyError, IndexError, TypeError, ValueError)


class Walk:
    """The walk; a backend's frame subclasses it. ``rewritten`` is the record it fills."""

    rewritten: Rewritten
    node: Any = None  # the node being rewritten (rules read it for their records)

    def nodes(self) -> Iterable[Any]:
        raise NotImplementedError

    def label(self, node: Any) -> str:
        raise NotImplementedError

    def rewrite(self, node: Any) -> None:
        raise NotImplementedError

    def made(self, node: Any) -> Iterable[tuple[str, str | None, Layout | None]]:
        """``(value name, its dense value's name or None, layout)`` for each value ``node``
        made."""
        raise NotImplementedError

    def until_hint(self, refused: Any) -> str:
        return ""

    def walk(self) -> None:
        for node in self.nodes():
            self.node = node
            try:
                self.rewrite(node)
            except Refusal as r:
                raise UnsupportedLayerError(self.label(node), r.reason,
                                            r.hint or self.until_hint(node)) from None
            except UnsupportedLayerError:
                raise
            except UNFORESEEN as e:
                raise UnsupportedLayerError(
                    self.label(node), f"unexpected arguments ({type(e).__name__}: {e})") from e
            for name, dense, layout in self.made(node):
                self.note(name, dense, layout, self.label(node))

    def note(self, name: str, dense: str | None, lay: Layout | None, label: str) -> None:
        """Keep what the memory guard and the per-node proof need of one value."""
        if lay is None:
            return
        if lay.dense_numel() > self.rewritten.peak_elements:
            self.rewritten.peak_elements, self.rewritten.peak_node = lay.dense_numel(), label
        if dense is not None and (lay.has_space or lay.n_extra):
            self.rewritten.nodes[name] = {
                "dense": dense, "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                "n_extra": lay.n_extra, "flat": bool(lay.fold or lay.merged)}
