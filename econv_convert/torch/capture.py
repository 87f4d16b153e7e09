"""Tracing a PyTorch model into a functional torch.fx graph.

``torch.nn`` layers are traced as leaves and then *lowered* to the functional calls they stand
for (``nn.MaxPool2d`` -> ``F.max_pool2d``, parameters as ``get_attr`` nodes). The rewrite rules
then see one form for ``nn.Conv2d`` and ``F.conv2d`` alike. A leaf module with no lowering stays
a ``call_module`` node, and the rules refuse it by name.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import operator
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _symbolic_trace
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.errors import InvalidInputError, InvalidModelError, describe
from econv_convert.torch import ops, outputs

NAME = "econv_name"  # node.meta key: the module path a node came from, for messages


PREFIX = "model."  # the captured model's attributes, inside the capturing wrapper


@dataclass
class Captured:
    """A model as a lowered, functional graph, and how it was captured."""

    gm: fx.GraphModule  # attribute paths are the model's own
    method: str  # "torch.fx" or "torch.export"
    output_spec: outputs.Spec  # the model's output structure (the graph returns its tensors)
    notes: list[str] = field(default_factory=list)


class _Capture(nn.Module):
    """The model called the way it takes its image (positionally, or by keyword
    ``input_name``), cut after module ``until``, its output flattened to a tuple of tensors
    (the structure is kept in ``spec``)."""

    def __init__(self, model: nn.Module, input_name: str | None, until: str | None,
                 hooks: bool) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.until = until
        self.hooks = hooks  # torch.export runs forward hooks; fx tracing reports to captured
        self.captured: list[Any] = []
        self.spec: outputs.Spec | None = None

    def forward(self, x):
        handle = None
        if self.until is not None and self.hooks:
            handle = self.model.get_submodule(self.until).register_forward_hook(
                lambda m, args, out: self.captured.append(out))
        try:
            out = self.model(**{self.input_name: x}) if self.input_name else self.model(x)
        finally:
            if handle is not None:
                handle.remove()
        if self.until is not None:
            if not self.captured:
                raise InvalidModelError(f"--until: module '{self.until}' is never called")
            out = self.captured[0]
        leaves, self.spec = outputs.flatten(out)
        return tuple(leaves)


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


CAPTURES = ("auto", "torch.fx", "torch.export")


def capture(model: nn.Module, example: torch.Tensor, *, until: str | None = None,
            input_name: str | None = None, method: str = "auto") -> Captured:
    """``model`` (in eval mode) as a lowered, functional graph of its computation on
    ``example``-like inputs.

    torch.fx first: it traces every input size symbolically and keeps module calls. A model
    whose ``forward()`` branches on sizes or values cannot be traced so; then
    ``torch.export`` (non-strict, spatial and batch sizes dynamic), which runs the Python
    code at the example input: where a branch depends on the input size, the size condition
    it took is kept in the graph and checked whenever the dense model runs. Only when both
    fail is the model refused, with torch.fx's reason first.

    With ``until``, the graph returns the output of module ``until`` (a name from
    ``named_modules()``). With ``input_name``, the model is called as
    ``model(**{input_name: x})``. ``method`` ``torch.fx`` or ``torch.export`` uses that
    capture only (``auto``: the order above).
    """
    if method not in CAPTURES:
        raise InvalidInputError(f"capture '{method}' is not one of {', '.join(CAPTURES)}")
    if until is not None and until not in dict(model.named_modules()):
        raise InvalidModelError(f"--until: the model has no module named '{until}'")
    drops, off = stochastic_depth(model, example, input_name)
    if method == "torch.export":
        captured = _capture_export(model, example, until, input_name)
        captured.notes += _export_notes(drops) + off
        return captured
    try:
        captured = _capture_fx(model, until, input_name, drops)
        captured.notes += [
            f"'{d.name}' is stochastic depth (drop rate {d.p:.4g} per "
            f"{'sample' if d.per_sample else 'batch'}): it drops when the dense model trains"
            for d in drops.values()] + off
        return captured
    except InvalidModelError as e:
        if e.__cause__ is None or method == "torch.fx":
            raise  # ours (--until, outputs): the same with any capture
        fx_error = e
    try:
        captured = _capture_export(model, example, until, input_name)
    except InvalidModelError as e:
        raise InvalidModelError(
            f"{fx_error}; torch.export fails too ({e}). Make the forward() of that module "
            "depend on attributes rather than on tensor values, or stop before it with "
            "--until") from fx_error
    captured.notes.append(
        f"torch.fx could not trace the model ({_short(fx_error)}); captured with "
        "torch.export: Python control flow is fixed at the example input, and where it "
        "depends on the input size the dense model checks that the size takes the same "
        "branch")
    captured.notes += _export_notes(drops) + off
    return captured


def _export_notes(drops: dict[int, Drop]) -> list[str]:
    if not drops:
        return []
    return [f"stochastic depth in {', '.join(repr(d.name) for d in drops.values())} stays "
            "off when the dense model trains: torch.export captures the eval branch only"]


def _short(e: BaseException) -> str:
    return str(e).removeprefix("cannot trace the model with torch.fx")


@dataclass(frozen=True)
class Drop:
    """A module recognized as stochastic depth: the identity in eval mode; in training, its
    input times a random factor per sample (or per batch) that is 0 with probability ``p`` and
    ``1 / (1 - p)`` otherwise."""

    name: str
    p: float
    per_sample: bool

    def lower(self, m, x, attr) -> tuple:
        return ops.drop_path, (x, self.p, False, self.per_sample), {}


_PROBE_DRAWS = 32


def stochastic_depth(model: nn.Module, example: torch.Tensor, input_name: str | None
                     ) -> tuple[dict[int, Drop], list[str]]:
    """Stochastic depth in ``model``, recognized by behaviour rather than by name.

    Traced in eval mode, a drop-path module (``DropPath``, ``StochasticDepth``, ...) is the
    identity and leaves no trace, so the dense model could never drop. Modules of the model's
    own code with no parameters, buffers or children that return their input unchanged at the
    example (eval mode) are run in training mode on a probe batch (float64, positive, under a
    forked RNG): one whose output is its input times a per-sample (or per-batch) factor that
    is 0 or one constant ``c`` is stochastic depth with drop rate ``1 - 1/c``, kept in the
    graph as :func:`ops.drop_path`. One that does something else in training, or drops
    without rescaling (its rate cannot be read off), stays off.
    Returns the recognized modules by ``id`` and notes on those that stay off.
    """
    candidates = {
        name: m for name, m in model.named_modules()
        if name and type(m) not in _LOWER and not type(m).__module__.startswith("torch.nn")
        and next(m.children(), None) is None
        and next(m.parameters(recurse=False), None) is None
        and next(m.buffers(recurse=False), None) is None
    }
    if not candidates:
        return {}, []
    seen: dict[str, Any] = {}

    def hook(name):
        def record(m, args, out):
            x = args[0] if len(args) == 1 else None
            same = (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                    and x.is_floating_point() and x.dim() >= 2
                    and (out is x or (out.shape == x.shape and torch.equal(out, x))))
            if name not in seen:
                seen[name] = x if same else None
            elif not same:
                seen[name] = None
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad(), _quiet():
            model(**{input_name: example}) if input_name else model(example)
    except Exception:
        return {}, []  # the capture that follows reports the model's error
    finally:
        for h in handles:
            h.remove()
    drops: dict[int, Drop] = {}
    notes: list[str] = []
    for name, x in seen.items():
        if x is None:
            continue
        m = candidates[name]
        verdict = _probe(m, x, name)
        if isinstance(verdict, Drop):
            drops[id(m)] = verdict
        elif verdict:
            notes.append(f"'{name}' is the identity in eval mode and {verdict} in training: "
                         "the dense model keeps it off when training")
    return drops, notes


def _probe(m: nn.Module, example: torch.Tensor, name: str) -> Drop | str | None:
    """``m`` run in training mode: a :class:`Drop`, None when it is the identity there too,
    or what else it does (a phrase for a note). One draw is held at a time; the probe batch
    is at most about 32 MiB (float64) unless 8 samples are larger."""
    per = example[:1].numel()
    batch = max(8, min(64, 2**22 // max(per, 1)))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *example.shape[1:]), generator=gen, dtype=torch.float64) + 0.5
    mode = m.training
    factors = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m.train()
            for _ in range(_PROBE_DRAWS):
                o = m(x)
                if not isinstance(o, torch.Tensor) or o.shape != x.shape:
                    return "changes its output's shape"
                r = (o / x).flatten(1)
                if not torch.allclose(r, r[:, :1].expand_as(r), rtol=1e-12, atol=0):
                    return "random per position, not per sample"
                factors.append(r[:, 0])
    except Exception:
        return "fails on a float64 probe"
    finally:
        m.train(mode)
    f = torch.stack(factors)
    if bool((f == 1).all()):
        return None
    kept = f[f != 0]
    if len(kept) == 0 or not torch.allclose(kept, kept[:1].expand_as(kept), rtol=1e-12,
                                            atol=0):
        return "a random factor that is not 0 or one constant"
    scale = float(kept[0])
    if scale <= 1.0:
        return "drops without rescaling (its rate cannot be read off)"
    mixed = bool(((f == 0).any(1) & (f != 0).any(1)).any())
    uniform = bool(((f == 0).all(1) | (f != 0).all(1)).all())
    per_sample = mixed or not (uniform and bool((f == 0).any()))
    return Drop(name, 1.0 - 1.0 / scale, per_sample)


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


def _capture_export(model: nn.Module, example: torch.Tensor, until: str | None,
                    input_name: str | None) -> Captured:
    from torch.export import Dim

    batched = example.expand(max(2, example.shape[0]), *example.shape[1:]).contiguous()
    dynamic = ({i: Dim.AUTO for i in range(example.dim()) if i != 1},)
    notes = []
    first: Exception | None = None
    for args, dims in (((batched,), dynamic), ((example,), None)):
        wrapper = _Capture(model, input_name, until, hooks=True)
        deciders: dict[str, str] = {}
        try:
            with _quiet(), _size_decisions(deciders):
                program = torch.export.export(
                    wrapper, args, strict=False, dynamic_shapes=dims,
                    prefer_deferred_runtime_asserts_over_guards=True)
            break
        except InvalidModelError:
            raise
        except Exception as e:
            first = first or e
    else:
        raise InvalidModelError(f"torch.export{module_of_error(first, model)}: "
                                f"{_export_reason(first)}") from first
    if dims is None:
        notes.append("torch.export could only capture the model at the example size: sizes "
                     "computed in forward() are fixed to it")
    # the output structure, from one eager call (torch.export does not keep what forward()
    # records on the module)
    with torch.no_grad():
        wrapper.captured.clear()
        wrapper(example)
    spec = wrapper.spec or {"t": "tuple", "items": []}
    # in-place ops (``x += y``, ``relu_``, ``inplace=True``) as their functional forms: an
    # empty decomposition table decomposes nothing else
    gm = from_exported(program.run_decompositions({}))
    notes += _keep_model_branches(gm.graph, deciders)
    _strip_prefix(gm.graph, input_name)
    _structure_output(gm.graph, spec)
    return Captured(_rebuild_on(model, gm), "torch.export", spec, notes)


@contextlib.contextmanager
def _size_decisions(deciders: dict[str, str]):
    """Record who decided each size condition torch.export defers to run time: ``"model"``
    when the model's own Python code forced a size into a branch (``if h % 2``, ``int(h /
    2)``), ``"torch"`` when the shape rules inside a PyTorch operator did (a ceil-mode
    pool's last window, a view's size checks). Keyed by the condition as the graph's
    ``_assert_scalar`` message prints it."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, canonicalize_bool_expr

    original = ShapeEnv.guard_or_defer_runtime_assert

    def record(self, orig_expr, msg, fx_node=None):
        try:
            deciders.setdefault(str(canonicalize_bool_expr(orig_expr)),
                                _decider(traceback.extract_stack()[:-1]))
        except Exception:  # bookkeeping only: a condition not recorded is kept
            pass
        return original(self, orig_expr, msg, fx_node)

    ShapeEnv.guard_or_defer_runtime_assert = record
    try:
        yield
    finally:
        ShapeEnv.guard_or_defer_runtime_assert = original


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# where a Python size becomes a decision: the SymInt/SymBool conversions themselves
_SYMBOLIC = tuple(os.path.join(_TORCH_DIR, f) for f in (
    "__init__.py", os.path.join("fx", "experimental", "sym_node.py"),
    os.path.join("fx", "experimental", "symbolic_shapes.py")))


def _decider(stack: list[traceback.FrameSummary]) -> str:
    """``"model"`` or ``"torch"`` (see ``_size_decisions``), from the innermost frame outside
    PyTorch and what it called."""
    for i in range(len(stack) - 1, -1, -1):
        if not stack[i].filename.startswith(_TORCH_DIR):
            callee = stack[i + 1].filename if i + 1 < len(stack) else ""
            return "model" if callee.startswith(_SYMBOLIC) or not callee else "torch"
    return "model"


def _keep_model_branches(graph: fx.Graph, deciders: dict[str, str]) -> list[str]:
    """Drop the size conditions PyTorch's own shape rules recorded, where nothing in the
    graph depends on them; keep the model's own branches (checked whenever the dense model
    runs). Returns notes saying at which sizes the dense model is valid.

    A condition from inside an operator (which way a ceil-mode pool rounds at this size)
    does not change the graph: the operator computes its own output size whenever it runs.
    It matters only where torch.export wrote into the graph a size it derived under that
    condition (the size of an intermediate map that the model's Python code read, as an
    expression of the input size). Such a size is read off the map itself when the graph
    runs wherever that map can be found (``_sizes_from_maps``); if one is left, every
    condition stays."""
    checks = [n for n in graph.nodes if n.op == "call_function"
              and n.target is torch.ops.aten._assert_scalar.default]
    if not checks:
        return []
    derived = {n for n in graph.nodes if n.op == "call_function"
               and n.target is not torch.ops.aten.sym_size.int
               and "runtime_assert.py" in (n.meta.get("stack_trace") or "")}
    only_checks = _sizes_from_maps(graph, checks, derived)
    sizes_derived = any(n not in only_checks and n.users for n in derived)
    kept = []
    for node in checks:
        decider = deciders.get(_condition(node))
        if decider == "torch" and not sizes_derived:
            graph.erase_node(node)
        else:
            kept.append(node)
    graph.eliminate_dead_code()
    conditions = list(dict.fromkeys(_readable(_condition(n), graph) for n in kept
                                    if _condition(n)))
    if not conditions:
        return []
    shown = "; ".join(conditions[:3]) + (f"; and {len(conditions) - 3} more"
                                         if len(conditions) > 3 else "")
    return [f"the dense model covers the input sizes that take the branches the example "
            f"size took (other sizes are refused with SizeNotCovered): {shown}"]


def _check_only(graph: fx.Graph, checks: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose values feed nothing but size checks."""
    only = set(checks)
    for n in reversed(graph.nodes):
        if n.users and all(u in only for u in n.users):
            only.add(n)
    return only


def _sizes_from_maps(graph: fx.Graph, checks: list[fx.Node], derived: set[fx.Node]
                     ) -> set[fx.Node]:
    """Each derived size the computation reads (not only checks) that equals one dim of a
    map feeding the op that uses it, read off that map with ``sym_size`` instead: the
    nearest such map, so the size is the one the model's code read. Returns the nodes left
    feeding only checks."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    while True:
        only = _check_only(graph, checks)
        changed = False
        for d in sorted(derived, key=order.get):
            readers = [u for u in d.users if u not in only and u not in derived]
            val = d.meta.get("val")
            if not readers or not isinstance(val, torch.SymInt):
                continue
            found = _map_with_size(readers, val.node.expr)
            if found is None or any(order[r] <= order[found[0]] for r in readers):
                continue
            tensor, first, end = found
            with graph.inserting_after(tensor):
                size = graph.call_function(torch.ops.aten.sym_size.int, (tensor, first))
            for dim in range(first + 1, end):
                with graph.inserting_after(size):
                    one = graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
                with graph.inserting_after(one):
                    size = graph.call_function(operator.mul, (size, one))
            size.meta["val"] = val
            for r in readers:
                r.replace_input_with(d, size)
            order = {n: i for i, n in enumerate(graph.nodes)}
            changed = True
        if not changed:
            return only


def _map_with_size(readers: list[fx.Node], expr: Any) -> tuple[fx.Node, int, int] | None:
    """The (map, first, end) whose size is ``expr`` nearest above the tensor ops the readers feed,
    the same for all of them; None if there is none or they disagree."""
    found = set()
    for reader in readers:
        ops, seen, frontier = [], {reader}, [reader]
        while frontier:  # forward through size arithmetic to the ops that take the size
            n = frontier.pop()
            if isinstance(n.meta.get("val"), (torch.Tensor, tuple, list)) or n.op == "output":
                ops.append(n)
                continue
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    frontier.append(u)
        for op in ops:
            hit = _nearest_map(op, expr)
            if hit is None:
                return None
            found.add(hit)
    return found.pop() if len(found) == 1 else None


def _nearest_map(op: fx.Node, expr: Any) -> tuple[fx.Node, int, int] | None:
    """(map, first, end): the map nearest above ``op`` whose dims ``first:end`` multiply to
    ``expr`` (one dim, or the dims a flatten merges)."""
    import sympy

    queue, seen = [a for a in op.all_input_nodes], set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            sizes = [s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(s)
                     for s in val.shape]
            for first in range(len(sizes)):
                for end in range(first + 1, len(sizes) + 1):
                    product = sympy.Mul(*sizes[first:end])
                    if product.free_symbols and (product == expr
                                                 or sympy.expand(product - expr) == 0):
                        return n, first, end
            queue.extend(n.all_input_nodes)
    return None


def _condition(node: fx.Node) -> str:
    message = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], str) else ""
    m = re.match(r"Runtime assertion failed for expression (.*) on node '[^']*'$", message)
    return m.group(1) if m else ""


def _readable(expr: str, graph: fx.Graph) -> str:
    """A condition on the input's symbols in the input's dim names (``s53`` -> ``H``)."""
    names = {}
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            dims = ["N", "C", "H", "W"] if val.dim() == 4 else [f"dim{d}" for d in
                                                               range(val.dim())]
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_symbol:
                    names.setdefault(str(size.node.expr), dims[d])
    return re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), expr)


def _export_reason(e: BaseException) -> str:
    """One line on why torch.export failed (its messages are pages of graph code)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    text = str(e)
    code = next((line.split("code:", 1)[1].strip() for line in text.splitlines()
                 if "code:" in line), "")
    where = f" at `{code[:100]}`" if code else ""
    if isinstance(e, GuardOnDataDependentSymNode):
        return f"Python control flow depends on the values of a tensor{where}"
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.startswith((" ", "def ", "#"))]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:160]}{where}"


@contextlib.contextmanager
def _quiet():
    """torch.export logs its symbolic reasoning at warning level; none of it is for users."""
    import logging
    import warnings

    names = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
             "torch._export", "torch._subclasses")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _structure_output(graph: fx.Graph, spec: outputs.Spec) -> None:
    """Make the graph return what the model returns: its lone tensor, its tuple, or its
    output structure rebuilt by :func:`outputs.restore` (the wrapper returned the tensors)."""
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = out.args[0]
    if spec["t"] == "tensor":
        out.args = (leaves[0],)
    elif not outputs.is_plain(spec):
        with graph.inserting_before(out):
            out.args = (graph.call_function(outputs.restore, (tuple(leaves), spec)),)


def _strip_prefix(graph: fx.Graph, input_name: str | None) -> None:
    """Attribute paths relative to the model (not the capturing wrapper), and the image input
    named as the model names it."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target.startswith(PREFIX):
            node.target = node.target[len(PREFIX):]
        if node.op == "placeholder" and input_name:
            node.target = input_name
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (_relative(v[0]), *v[1:]) for k, v in stack.items()}


def _relative(path: Any) -> Any:
    """A module path inside the capturing wrapper as a path inside the model."""
    if not isinstance(path, str):
        return path
    if path == PREFIX[:-1]:
        return ""
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def _rebuild_on(model: nn.Module, gm: fx.GraphModule) -> fx.GraphModule:
    """The exported graph on the model's own parameters and buffers (so the state dict keeps
    its keys); constants that torch.export lifted out of forward() come along as
    non-persistent buffers."""
    # torch.export keeps a constant where forward() made it: under the capturing wrapper's
    # prefix, which the graph's attribute paths no longer carry
    lifted = {n.target: _get_attr(gm, n.target if _has_attr(gm, n.target) else PREFIX + n.target)
              for n in gm.graph.nodes if n.op == "get_attr" and not _has_attr(model, n.target)}
    root: nn.Module = model
    if lifted:
        root = copy.copy(model)  # shares every parameter; only the copy gets the constants
        root._buffers = dict(model._buffers)
        for name, value in lifted.items():
            if "." in name:
                raise InvalidModelError(f"torch.export lifted a constant at '{name}'")
            root.register_buffer(name, value, persistent=False)
    out = fx.GraphModule(root, gm.graph)
    out.graph.lint()
    return out


def _has_attr(model: nn.Module, target: str) -> bool:
    obj: Any = model
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# Lowering of torch.nn leaves to functionals


def _conv(m: nn.Module, x, attr) -> tuple:
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(m.kernel_size)]
    padding = m.padding
    if m.padding_mode != "zeros":
        x = (F.pad, (x, tuple(m._reversed_padding_repeated_twice)), {"mode": m.padding_mode})
        padding = 0
    bias = attr("bias") if m.bias is not None else None
    return fn, (x, attr("weight"), bias, m.stride, padding, m.dilation, m.groups), {}


def _bn(m: nn.Module, x, attr) -> tuple:
    if not m.track_running_stats or m.running_mean is None:
        return None  # batch statistics: refused by the rules as an unknown module
    w = attr("weight") if m.affine else None
    b = attr("bias") if m.affine else None
    tracked = attr("num_batches_tracked") if m.num_batches_tracked is not None else None
    args = (x, attr("running_mean"), attr("running_var"), w, b, False, m.momentum, m.eps,
            tracked)
    return ops.batch_norm, args, {}


def _instance_norm(m: nn.Module, x, attr) -> tuple:
    """In eval mode with running statistics a channel-wise affine map; otherwise it normalizes
    with each sample's statistics over positions (the rules say which)."""
    running = m.track_running_stats and m.running_mean is not None
    args = (x, attr("running_mean") if running else None,
            attr("running_var") if running else None,
            attr("weight") if m.affine else None, attr("bias") if m.affine else None,
            not running, m.momentum if m.momentum is not None else 0.1, m.eps)
    return F.instance_norm, args, {}


def _dropout(m, x, attr):
    """Dropout stays in the graph, off (captured in eval mode); ``train()`` turns it on."""
    fn = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d,
          nn.Dropout3d: F.dropout3d, nn.AlphaDropout: F.alpha_dropout}[type(m)]
    return fn, (x, m.p, False, False), {}


def _maxpool(m, x, attr):
    fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
    args = (x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    return fn[type(m)], args, {}


def _avgpool(m, x, attr):
    if isinstance(m, nn.AvgPool1d):
        return F.avg_pool1d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad), {}
    fn = F.avg_pool2d if isinstance(m, nn.AvgPool2d) else F.avg_pool3d
    args = (x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
            m.divisor_override)
    return fn, args, {}


def _adaptive(m, x, attr):
    fn = {
        nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d,
        nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
        nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d,
        nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
        nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
        nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d,
    }[type(m)]
    if getattr(m, "return_indices", False):
        return None
    return fn, (x, m.output_size), {}


def _attrs(fn: Callable, *names: str) -> Callable:
    """A lowering that calls ``fn(x, **{name: module.name})``."""
    return lambda m, x, attr: (fn, (x,), {n: getattr(m, n) for n in names})


def _pad(m, x, attr):
    mode = {
        nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
        nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
        nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
        nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
    }.get(type(m), "constant")
    kwargs = {"mode": mode}
    if mode == "constant":
        kwargs["value"] = m.value
    return F.pad, (x, tuple(m.padding)), kwargs


_LOWER: dict[type, Callable] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.Linear: lambda m, x, attr: (
        F.linear, (x, attr("weight"), attr("bias") if m.bias is not None else None), {}),
    nn.BatchNorm1d: _bn, nn.BatchNorm2d: _bn, nn.BatchNorm3d: _bn,
    nn.InstanceNorm1d: _instance_norm, nn.InstanceNorm2d: _instance_norm,
    nn.InstanceNorm3d: _instance_norm,
    nn.MaxPool1d: _maxpool, nn.MaxPool2d: _maxpool, nn.MaxPool3d: _maxpool,
    nn.AvgPool1d: _avgpool, nn.AvgPool2d: _avgpool, nn.AvgPool3d: _avgpool,
    nn.Identity: lambda m, x, attr: ("identity", (x,), {}),
    nn.Flatten: lambda m, x, attr: (torch.flatten, (x, m.start_dim, m.end_dim), {}),
    nn.Unflatten: lambda m, x, attr: ("method:unflatten", (x, m.dim, tuple(m.unflattened_size)),
                                      {}),
    nn.ReLU: lambda m, x, attr: (F.relu, (x,), {}),
    nn.ReLU6: lambda m, x, attr: (F.relu6, (x,), {}),
    nn.SiLU: lambda m, x, attr: (F.silu, (x,), {}),
    nn.Sigmoid: lambda m, x, attr: (torch.sigmoid, (x,), {}),
    nn.Tanh: lambda m, x, attr: (torch.tanh, (x,), {}),
    nn.Hardswish: lambda m, x, attr: (F.hardswish, (x,), {}),
    nn.Hardsigmoid: lambda m, x, attr: (F.hardsigmoid, (x,), {}),
    nn.Mish: lambda m, x, attr: (F.mish, (x,), {}),
    nn.SELU: lambda m, x, attr: (F.selu, (x,), {}),
    nn.LeakyReLU: _attrs(F.leaky_relu, "negative_slope"),
    nn.ELU: _attrs(F.elu, "alpha"),
    nn.CELU: _attrs(F.celu, "alpha"),
    nn.GELU: _attrs(F.gelu, "approximate"),
    nn.Hardtanh: _attrs(F.hardtanh, "min_val", "max_val"),
    nn.Softplus: _attrs(F.softplus, "beta", "threshold"),
    nn.Softmax: _attrs(F.softmax, "dim"),
    nn.LogSoftmax: _attrs(F.log_softmax, "dim"),
    nn.PReLU: lambda m, x, attr: (F.prelu, (x, attr("weight")), {}),
    nn.LayerNorm: lambda m, x, attr: (
        F.layer_norm,
        (x, tuple(m.normalized_shape),
         attr("weight") if m.weight is not None else None,
         attr("bias") if m.bias is not None else None, m.eps), {}),
    nn.GroupNorm: lambda m, x, attr: (
        F.group_norm, (x, m.num_groups, attr("weight") if m.affine else None,
                       attr("bias") if m.affine else None, m.eps), {}),
    nn.LocalResponseNorm: lambda m, x, attr: (
        F.local_response_norm, (x, m.size, m.alpha, m.beta, m.k), {}),
    nn.ChannelShuffle: lambda m, x, attr: (F.channel_shuffle, (x, m.groups), {}),
    nn.PixelUnshuffle: lambda m, x, attr: (F.pixel_unshuffle, (x, m.downscale_factor), {}),
    nn.PixelShuffle: lambda m, x, attr: (F.pixel_shuffle, (x, m.upscale_factor), {}),
    nn.ZeroPad1d: _pad, nn.ZeroPad2d: _pad, nn.ZeroPad3d: _pad,
    nn.ConstantPad1d: _pad, nn.ConstantPad2d: _pad, nn.ConstantPad3d: _pad,
    nn.ReflectionPad1d: _pad, nn.ReflectionPad2d: _pad, nn.ReflectionPad3d: _pad,
    nn.ReplicationPad1d: _pad, nn.ReplicationPad2d: _pad, nn.ReplicationPad3d: _pad,
    nn.CircularPad1d: _pad, nn.CircularPad2d: _pad, nn.CircularPad3d: _pad,
}
for _cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    _LOWER[_cls] = _adaptive
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
    _LOWER[_cls] = _dropout


def _lower(gm: fx.GraphModule, drops: dict[int, Drop] | None = None) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        node.meta[NAME] = node.target
        m = modules[node.target]
        rule = _LOWER.get(type(m))
        if drops and id(m) in drops:
            rule = drops[id(m)].lower
        if rule is None or len(node.args) != 1 or node.kwargs:
            continue
        with graph.inserting_before(node):

            def attr(name: str, _prefix: str = node.target) -> fx.Node:
                return graph.get_attr(f"{_prefix}.{name}")

            lowered = rule(m, node.args[0], attr)
            if lowered is None:
                continue
            before = set(graph.nodes)
            new = _emit(graph, *lowered)
        for n in set(graph.nodes) - before:
            n.meta[NAME] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _emit(graph: fx.Graph, fn, args, kwargs) -> fx.Node:
    args = tuple(_emit(graph, *a) if isinstance(a, tuple) and len(a) == 3 and callable(a[0])
                 else a for a in args)
    if fn == "identity":
        return args[0]
    if isinstance(fn, str) and fn.startswith("method:"):
        return graph.call_method(fn.split(":", 1)[1], args, kwargs)
    return graph.call_function(fn, args, kwargs)


def shape_prop(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[fx.Node, Any]:
    """Run ``gm`` and return every node's value (the baseline's shapes at the example input)."""
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    except Exception as e:
        raise InvalidModelError(
            f"the model fails on an input of shape {tuple(inputs[0].shape)}"
            f"{module_of_error(e, gm)} ({describe(e, None)})"
        ) from e
    return values


def module_of_error(e: BaseException, model: nn.Module) -> str:
    """`` in module 'NAME' (Class)`` for the innermost module of ``model`` whose code was
    running when ``e`` was raised, or "" if none was."""
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    tb = e.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            name = names[id(owner)] or "(the model itself)"
            found = f" in module '{name}' ({type(owner).__name__})"
        tb = tb.tb_next
    return found


def module_path(node: fx.Node) -> str:
    """The path of the module whose code made ``node`` ("" for the model's own forward)."""
    if node.meta.get(NAME):
        return node.meta[NAME]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""
    return ""


def node_name(node: fx.Node) -> str:
    """A node's name for people: the module path where it came from a module."""
    if node.meta.get(NAME):
        return node.meta[NAME]
    path = module_path(node)
    return f"{node.name}' in module '{path}" if path else node.name


def from_exported(program: Any) -> fx.GraphModule:
    """A ``torch.export`` program as a module the rewrite can read.

    Its ``aten`` operators are replaced by the ``torch`` bindings of the same operators (same
    positional signatures), which the rules know. Its input guards (checks of the sizes it
    was exported at) are dropped: the dense model runs at other sizes by design, and
    verification checks them. The size conditions recorded in the graph itself (which branch
    of the Python code a size takes) stay. An operator with no binding stays as it is and is
    refused by name if it touches a spatial map.
    """
    gm = program.module()
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()  # plain arguments and outputs, no pytree specs
    _check_input_ranges(graph, program.range_constraints)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name
            if name in _DROPPED and not node.users:
                graph.erase_node(node)
            elif name == "aten::_native_batch_norm_legit_no_training":
                _batch_norm_from_core(graph, node)
            elif name == "aten::slice":
                _slice_as_index(node)
            elif name in _AS_METHOD:
                node.op, node.target = "call_method", _AS_METHOD[name]
                # layout-only arguments: the values are the same without them
                node.kwargs = {k: v for k, v in node.kwargs.items()
                               if k not in ("implicit", "memory_format")}
            elif name in _WITH_INDICES:
                _values_only(graph, node, _WITH_INDICES[name])
            else:
                fn = _binding(node.target)
                if fn is not None:
                    node.target = fn
    graph.eliminate_dead_code()
    graph.lint()
    # a plain GraphModule: the exported module's own class refuses .eval()
    return fx.GraphModule(gm, graph).eval()


def _batch_norm_from_core(graph: fx.Graph, node: fx.Node) -> None:
    """Functionalized programs spell eval-mode BatchNorm as its core op, which returns the
    output and two statistics; only the output is read in eval mode. As ``torch.batch_norm``
    (what the rules know) with its output read directly."""
    x, weight, bias, mean, var, momentum, eps = node.args
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        raise InvalidModelError(f"'{node.name}': a BatchNorm whose statistics are read")
    with graph.inserting_before(node):
        bn = graph.call_function(torch.batch_norm,
                                 (x, weight, bias, mean, var, False, momentum, eps, True))
    bn.meta = dict(node.meta)
    for u in list(node.users):
        u.replace_all_uses_with(bn)
        graph.erase_node(u)
    graph.erase_node(node)


def _values_only(graph: fx.Graph, node: fx.Node, fn: Callable) -> None:
    """An operator returning (values, indices) whose indices nothing reads, as the function
    returning the values (``F.adaptive_max_pool2d``), which the rules know. Read indices
    keep the operator, refused by name."""
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return
    with graph.inserting_before(node):
        values = graph.call_function(fn, node.args, dict(node.kwargs))
    values.meta = dict(node.meta)
    for u in list(node.users):
        u.replace_all_uses_with(values)
        graph.erase_node(u)
    graph.erase_node(node)


def _slice_as_index(node: fx.Node) -> None:
    """``aten.slice(x, dim, start, end, step)`` as ``x[:, ..., start:end:step]``, the
    indexing the rules know (an unpadded network cropping its residual, ``x[..., 1:-1]``)."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    end = None if isinstance(end, int) and end >= 2**62 else end
    cut = slice(None if start == 0 else start, end, None if step == 1 else step)
    index = ((slice(None),) * dim + (cut,) if dim >= 0
             else (Ellipsis, cut) + (slice(None),) * (-dim - 1))
    node.target, node.args, node.kwargs = operator.getitem, (x, index), {}


def _check_input_ranges(graph: fx.Graph, ranges: dict) -> None:
    """Turn the export's ranges of input sizes into checks in the graph, where they come from
    the model's code (``if x.shape[-1] < 16``: the example took the branch for sizes of at
    least 16). The lower bound 2 that export assumes for every dynamic size is not such a
    range and is not checked."""
    for node in list(graph.nodes):
        if node.op != "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        for d, size in enumerate(node.meta["val"].shape):
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            bounds = ranges.get(expr) if expr is not None else None
            if bounds is None:
                continue
            lo, hi = _finite(bounds.lower), _finite(bounds.upper)
            checks = []
            if lo is not None and lo > 2:
                checks.append((operator.ge, lo, f"input dim {d} is at least {lo}"))
            if hi is not None:
                checks.append((operator.le, hi, f"input dim {d} is at most {hi}"))
            if not checks:
                continue
            with graph.inserting_after(node):
                n = graph.call_function(torch.ops.aten.sym_size.int, (node, d))
            after = n
            for op, bound, what in checks:
                with graph.inserting_after(after):
                    cond = graph.call_function(op, (n, bound))
                with graph.inserting_after(cond):
                    after = graph.call_function(torch.ops.aten._assert_scalar.default,
                                                (cond, f"expression {what} on node 'input'"))


def _finite(bound: Any) -> int | None:
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None  # an infinite bound


# range constraints of unbacked sizes: bookkeeping of the export, nothing to compute
_DROPPED = {"aten::sym_constrain_range_for_size", "aten::sym_constrain_range"}
_AS_METHOD = {"aten::contiguous": "contiguous", "aten::view": "reshape", "aten::clone": "clone",
              "aten::expand": "expand"}
_SPECIAL_OVERLOADS = {("aten::pow", "Tensor_Scalar"), ("aten::pow", "Tensor_Tensor"),
                      ("aten::sum", "dim_IntList"), ("aten::conv1d", "padding"),
                      ("aten::conv2d", "padding"), ("aten::conv3d", "padding")}
# operators returning (values, indices) whose values the rules know as the F function
_WITH_INDICES = {"aten::adaptive_max_pool1d": F.adaptive_max_pool1d,
                 "aten::adaptive_max_pool2d": F.adaptive_max_pool2d,
                 "aten::adaptive_max_pool3d": F.adaptive_max_pool3d}


def _binding(op: torch._ops.OpOverload) -> Callable | None:
    name = op._schema.name.split("::", 1)[1]
    if op._schema.name.split("::", 1)[0] != "aten" or (
            op._overloadname not in ("default", "Tensor", "Scalar", "dim", "using_ints", "int",
                                     "self")
            and (op._schema.name, op._overloadname) not in _SPECIAL_OVERLOADS):
        return None
    if name.startswith("sym_") or name.startswith("_assert"):
        return None  # size queries and checks keep their aten form (the rules know them)
    for ns in (torch._C._nn, torch):
        fn = getattr(ns, name, None)
        if callable(fn):
            return fn
    return None
