"""Capture by torch.fx symbolic tracing: a tracer that keeps library layers whole where tracing
through them would fail, and in-place operations made functional.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _symbolic_trace
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.errors import InvalidModelError, describe
from econv_convert.torch.capture.common import (
    PREFIX,
    Captured,
    Drop,
    _Capture,
    _strip_prefix,
    _structure_output,
    module_of_error,
)
from econv_convert.torch.capture.lower import _lower


class _Tracer(fx.Tracer):
    """fx tracing that reports the output of module ``until`` to the capturing wrapper."""

    def __init__(self, wrapper: _Capture, leaves: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.until = None if wrapper.until is None else PREFIX + wrapper.until
        self.leaves = leaves  # ids of modules kept as calls (stochastic depth)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if self.until is not None and self.path_of_module(m) == self.until:
            self.wrapper.captured.append(out)
        return out

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)


class _InPlaceProxy(fx.Proxy):
    """A traced value whose augmented assignments (``x += y``) are recorded as the in-place
    ops they are on tensors (``operator.iadd``), not as ``x = x + y``: another name for the
    same tensor sees the change, which :func:`_functional` makes explicit."""

    def _in_place(self, op, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._in_place(operator.iadd, other)

    def __isub__(self, other):
        return self._in_place(operator.isub, other)

    def __imul__(self, other):
        return self._in_place(operator.imul, other)

    def __itruediv__(self, other):
        return self._in_place(operator.itruediv, other)


@contextlib.contextmanager
def _through_wrapped_functions():
    """Trace through functions a library registered as fx leaves (``torch.fx.wrap``): as a
    leaf, a stochastic-depth function or a padding helper is a call the rules do not know;
    traced through, it is the tensor operations it is made of. torch's own stay leaves."""
    table = _symbolic_trace._wrapped_fns_to_patch
    saved = dict(table)
    for key, frame in saved.items():
        if not str(frame.get("__name__", "")).startswith("torch."):
            del table[key]
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def _capture_fx(model: nn.Module, until: str | None, input_name: str | None,
                drops: dict[int, Drop] | None = None) -> Captured:
    drops = drops or {}
    wrapper = _Capture(model, input_name, until, hooks=False)
    tracer = _Tracer(wrapper, frozenset(drops))
    try:
        with _through_wrapped_functions():
            graph = tracer.trace(wrapper)
    except InvalidModelError:
        raise
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
        raise InvalidModelError(
            f"cannot trace the model with torch.fx{module_of_error(e, model)} "
            f"({describe(e, None)})") from e
    spec = wrapper.spec or {"t": "tuple", "items": []}
    _strip_prefix(graph, input_name)
    _structure_output(graph, spec)
    gm = fx.GraphModule(model, graph)
    _functional(gm.graph, dict(gm.named_modules()), at_cut=until is not None)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    _lower(gm, drops)
    return Captured(gm, "torch.fx", spec)


_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                       operator.imul: operator.mul, operator.itruediv: operator.truediv,
                       operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
                       operator.iand: operator.and_, operator.ior: operator.or_}
_NOT_IN_PLACE = {"requires_grad_", "share_memory_", "retain_grad_"}
_VIEWS = {"view", "view_as", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
          "transpose", "permute", "t", "narrow", "expand", "expand_as", "select", "unbind",
          "split", "chunk", "contiguous", "detach", "as_strided", "getitem", "unfold",
          "tensor_split", "movedim", "swapaxes", "diagonal"}


def _functional(graph: fx.Graph, modules: dict[str, nn.Module], at_cut: bool = False) -> None:
    """Every in-place call of a traced graph as its out-of-place form, every later use of
    the value it changed reading its result: ``x.add_(y)`` (result unused), ``x += y``,
    ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``. Tracing keeps no trace of a
    mutation, so without this a later use of ``x`` reads the value from before it, and a
    call whose result is unused is dropped as dead code. An in-place call on a view (which
    changes the tensor it views) is refused: torch.export functionalizes through views.
    ``at_cut``: the graph returns a module's output as it was when the module returned
    (``--until``), so the output keeps reading that value."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        target = _in_place(node, modules)
        if target is None:
            continue
        changed = node.args[0] if node.args else None
        if not isinstance(changed, fx.Node):
            continue
        if _is_view(changed) or any(_is_view(u) and u is not node for u in changed.users
                                    if order[u] < order[node]):
            raise InvalidModelError(
                f"'{node.name}' changes a view of another tensor in place (torch.fx cannot "
                "follow the change to the tensor it views)") from ValueError(node.name)
        if target is not True:
            node.target = target
        if "inplace" in node.kwargs:
            node.kwargs = {**node.kwargs, "inplace": False}
        for user in list(changed.users):
            if user is not node and order[user] > order[node] and not (
                    at_cut and user.op == "output"):
                user.replace_input_with(changed, node)


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """For an in-place call: the out-of-place target to call instead (True: keep the target,
    only its ``inplace`` argument changes); None otherwise."""
    if node.op == "call_method":
        name = node.target
        if (name.endswith("_") and not name.startswith("_") and name not in _NOT_IN_PLACE
                and hasattr(torch.Tensor, name[:-1])):
            return name[:-1]
        return None
    if node.op == "call_module":
        return True if getattr(modules.get(node.target), "inplace", False) is True else None
    if node.op != "call_function":
        return None
    if node.target in _IN_PLACE_OPERATORS:
        return _IN_PLACE_OPERATORS[node.target]
    if node.kwargs.get("inplace") is True:
        return True
    where = _inplace_position(node.target)
    if where is not None and len(node.args) > where and node.args[where] is True:
        node.args = (*node.args[:where], False, *node.args[where + 1:])
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        for namespace in (F, torch):
            if getattr(namespace, name, None) is node.target and callable(
                    getattr(namespace, name[:-1], None)):
                return getattr(namespace, name[:-1])
    return None


@functools.lru_cache(maxsize=None)
def _inplace_position(fn: Any) -> int | None:
    """The position of an ``inplace`` parameter of ``fn`` (``F.relu(x, True)``), if any."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may be a view of another tensor (changing it changes that one)."""
    if node.op == "call_method":
        return node.target in _VIEWS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name in _VIEWS
    return False
