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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from econv_convert.core.layout import Dim, Layout
from econv_convert.core.records import Rewritten
from econv_convert.core.rules import Refusal
from econv_convert.core.rules.window import WindowPlan
from econv_convert.errors import InvalidInputError, UnsupportedLayerError

# the layer families every backend groups its rules by, one module each, named alike in
# ``core/rules/`` (``shape_values`` has no core decisions: sizes are values, not maps)
FAMILIES = ("window", "global_pool", "pointwise", "norm", "linear", "reshape", "shape_values")

# what a rule reading arguments it did not foresee raises: a refusal of that node, not a crash
UNFORESEEN = (KeyError, IndexError, TypeError, ValueError)


@dataclass
class Val:
    """A value of the dense graph and what it means, as both backends keep it.

    ``node``: the dense graph's node (PyTorch: an fx node, or a constant passed through; ONNX
    values keep their baseline names, so it stays None there). ``layout``: what a tensor's
    dense dims mean. ``items``: the values of a tuple or list (chunk, split, a model's output
    class). ``sizes``: a shape read off a map (a ``torch.Size``, an ONNX ``Shape``), what each
    entry measures; a size query reads the baseline's sizes, so these are the baseline's
    values. ``spatial``: a number computed from a spatial size."""

    node: Any = None
    layout: Layout | None = None
    items: tuple[Val, ...] | None = None
    sizes: tuple[Dim, ...] | None = None
    spatial: bool = False

    @property
    def spatial_size(self) -> bool:
        """A spatial size, or computed from one."""
        return self.spatial or any(d.spatial for d in self.sizes or ())


Node = TypeVar("Node")  # a baseline graph's node: an ``fx.Node``, an ``onnx.NodeProto``
Made = TypeVar("Made")  # what a rule returns: PyTorch's rules a :class:`Val`, ONNX's None
# (they set the value in the frame's env)


class Walk(Generic[Node, Made]):
    """The walk; a backend's frame subclasses it as ``Walk[its node type, what its rules
    return]`` and implements the hooks below. ``rewritten`` is the record it fills."""

    rewritten: Rewritten
    node: Node | None = None  # the node being rewritten (rules read it for their records)
    fields: dict  # each value's receptive fields, per spatial axis

    def reached(self, output_stride: int | None) -> None:
        """Refuse an ``output_stride`` the walk did not reach: the kept strides must make it,
        and it must divide the total stride (the reachable ones are named)."""
        if output_stride is None:
            return
        cumulative = {max(f.step for f in fs) for fs in self.fields.values() if fs} | {1}
        total = max(cumulative)
        kept = max(self.rewritten.kept_stride or (), default=1)
        k = output_stride
        if total % k or kept != min(k, total) or k > total:
            raise InvalidInputError(
                f"output_stride={k} cannot be reached: the model's total stride is {total}; "
                f"reachable output strides: {', '.join(map(str, sorted(cumulative)))}")

    def nodes(self) -> Iterable[Node]:
        raise NotImplementedError

    def label(self, node: Node) -> str:
        raise NotImplementedError

    def rewrite(self, node: Node) -> None:
        raise NotImplementedError

    def made(self, node: Node) -> Iterable[tuple[str, str | None, Layout | None]]:
        """``(value name, its dense value's name or None, layout)`` for each value ``node``
        made."""
        raise NotImplementedError

    def until_hint(self, refused: Node) -> str:
        return ""

    # what the window switch asks of a backend: each returns what the backend's rules return
    def as_is(self, node: Node) -> Made:
        """The node unchanged: nothing spatial reaches it."""
        raise NotImplementedError

    def per_extra(self, node: Node) -> Made:
        """The node unchanged at each extra position (phase dims, head positions)."""
        raise NotImplementedError

    def covering_pool(self, node: Node, plan: WindowPlan) -> Made:
        """A pool covering its whole map: ``plan.pool``, which stops the run past
        ``plan.limits`` (:data:`~econv_convert.core.rules.window.PAST_COVER`)."""
        raise NotImplementedError

    def kept(self, node: Node) -> Any:
        """Emit the node unchanged (its stride kept); returns the dense value."""
        raise NotImplementedError

    def window_done(self, node: Node, dense: Any, plan: WindowPlan) -> Made:
        """Record the rewritten layer and its output's layout, ``plan.out_dims``."""
        raise NotImplementedError

    def set_fields(self, node: Node, fields: tuple) -> None:
        raise NotImplementedError

    def window_layer(self, node: Node, plan: WindowPlan, emit: Callable[[WindowPlan], Any]
                     ) -> Made:
        """A convolution or pool in the form the core planned (:func:`rules.window`), for
        every backend: as it is (plain), at each extra position, a global pool (a window
        covering its map), its stride kept (under an output stride), or dense (stride 1, the
        dense windows: ``emit(plan)`` emits it and returns the dense value)."""
        if plan.form == "plain":
            return self.as_is(node)
        if plan.form == "extra":
            return self.per_extra(node)
        self.rewritten.has_padding |= plan.padded
        if plan.form == "global":
            self.rewritten.notes.append(f"{self.label(node)}: {plan.note} (the run stops "
                                        "past that)")
            return self.covering_pool(node, plan)
        self.set_fields(node, plan.fields)
        if plan.form == "kept":
            if plan.kept_stride is not None:
                self.rewritten.kept_stride = plan.kept_stride
            dense = self.kept(node)
        else:
            dense = emit(plan)
        return self.window_done(node, dense, plan)

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
        # the maps (what grows with the input's area; a weight does not)
        if (lay.has_space or lay.n_extra) and lay.dense_numel() > self.rewritten.peak_elements:
            self.rewritten.peak_elements, self.rewritten.peak_node = lay.dense_numel(), label
        if dense is not None and (lay.has_space or lay.n_extra):
            self.rewritten.nodes[name] = {
                "dense": dense, "dims": [(d.kind, d.step, d.axis) for d in lay.dims],
                "n_extra": lay.n_extra, "flat": bool(lay.fold or lay.merged)}


def registrar(table: dict[str, Callable]) -> Callable[[str], Callable]:
    """A decorator factory that registers a function in ``table`` under a name: how a frame
    lets its rule modules give it the functions it calls (the frame imports none of them)."""
    def named(name: str) -> Callable[[Callable], Callable]:
        def register(fn: Callable) -> Callable:
            table[name] = fn
            return fn

        return register

    return named


def require_output_stride(output_stride: int | None) -> None:
    """An output stride, if given, is a positive integer (both backends, before any work)."""
    if output_stride is not None and (not isinstance(output_stride, int) or output_stride < 1):
        raise InvalidInputError(f"output_stride={output_stride}: must be a positive integer")
