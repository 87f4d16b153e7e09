"""Capture by torch.export: the size decisions export records (which are the model's branches,
which PyTorch's own shape rules), and export's aten graph brought to the functions the rules
know.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.errors import InvalidModelError
from econv_convert.torch.capture.common import (
    Captured,
    _Capture,
    _quiet,
    _rebuild_on,
    _strip_prefix,
    _structure_output,
    module_of_error,
)


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
            key = str(canonicalize_bool_expr(orig_expr))
            if key not in deciders:  # the first decider; the stack's files only (reading
                # every frame's source line, as traceback does, cost seconds a model)
                deciders[key] = _decider(_files(sys._getframe(1)))
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


def _files(frame) -> list[str]:
    """The file of each frame from the outermost to ``frame``."""
    files = []
    while frame is not None:
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return files[::-1]


def _decider(stack: list[str]) -> str:
    """``"model"`` or ``"torch"`` (see ``_size_decisions``), from the innermost frame outside
    PyTorch and what it called (``stack``: the frames' files, outermost first)."""
    for i in range(len(stack) - 1, -1, -1):
        if not stack[i].startswith(_TORCH_DIR):
            callee = stack[i + 1] if i + 1 < len(stack) else ""
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
