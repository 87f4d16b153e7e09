"""What every capture shares: the captured graph's record, the capturing wrapper, node names and
module paths for messages, shape propagation, rebuilding a graph on the model's own attributes.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from econv_convert.errors import InvalidModelError, describe
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
                 hooks: bool, keep: bool = False) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.until = until
        self.hooks = hooks  # torch.export runs forward hooks; fx tracing reports to captured
        # eagerly, a copy of the hooked output: an in-place op after ``until`` (DenseNet's
        # ``F.relu(features, inplace=True)``) changes the tensor the hook saw
        self.keep = keep
        self.captured: list[Any] = []
        self.spec: outputs.Spec | None = None

    def forward(self, x):
        handle = None
        if self.until is not None and self.hooks:
            handle = self.model.get_submodule(self.until).register_forward_hook(
                lambda m, args, out: self.captured.append(
                    torch.utils._pytree.tree_map(_copy, out) if self.keep else out))
        try:
            out = self.model(**{self.input_name: x}) if self.input_name else self.model(x)
        finally:
            if handle is not None:
                handle.remove()
        if self.until is not None:
            if not self.captured:
                raise InvalidModelError(
                    f"until={self.until}: module '{self.until}' is never called")
            out = self.captured[0]
        leaves, self.spec = outputs.flatten(out)
        return tuple(leaves)


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _short(e: BaseException) -> str:
    return str(e).removeprefix("cannot trace the model with torch.fx").removeprefix(
        "the torch.fx capture ")


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


def differs(captured: Captured, example: torch.Tensor,
            want: tuple[list[torch.Tensor], bool] | None) -> str | None:
    """Why the captured graph does not compute ``want``, the model's outputs on ``example``
    (:func:`eager_outputs`; the graph runs on a copy, in float64 where the model did), or
    None where it does. A capture runs the model's Python code once, symbolically or at the
    example: a branch on ``torch.jit.isinstance`` that torch.fx takes the other way, a view
    that becomes invalid, leave a graph that fails or computes something else, which is not
    the model's failure. None too where the model itself does not run on ``example``
    eagerly (``want`` None: nothing to compare with; the graph's own run then names the
    error)."""
    if want is None:
        return None
    want, wide = want
    try:
        gm = copy.deepcopy(captured.gm)
        if wide:
            gm = gm.double()
        with torch.no_grad():
            flat, _ = outputs.flatten(gm(example.double() if wide else example))
        got = [t for t in flat if isinstance(t, torch.Tensor)]
    except Exception as e:
        return f"cannot run ({describe(e, 200)})"
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return (f"returns other outputs than the model ({[tuple(t.shape) for t in got]} "
                f"against {[tuple(t.shape) for t in want]})")
    for i, (g, w) in enumerate(zip(got, want)):
        if not g.is_floating_point():
            same = torch.equal(g, w)
        else:
            scale = float(w.abs().max()) if w.numel() else 0.0
            tol = (1e-6, 1e-9 * scale + 1e-12) if wide else (1e-3, 1e-4 * scale + 1e-6)
            same = torch.allclose(g.to(w.dtype), w, rtol=tol[0], atol=tol[1], equal_nan=True)
        if not same:
            return (f"computes other values than the model (output {i}): a branch the model "
                    "takes is not in the graph")
    return None


def eager_outputs(model: nn.Module, example: torch.Tensor, until: str | None,
                  input_name: str | None) -> tuple[list[torch.Tensor], bool] | None:
    """The model's outputs (those a capture's graph returns: module ``until``'s with
    ``until``) on ``example``, run eagerly on a copy: in float64 where the model runs so
    (``True``), else in its own dtype (``False``); None where it does not run at all."""
    for wide in (True, False):
        m = copy.deepcopy(model)
        if wide:
            m = m.double()
        wrapper = _Capture(m, input_name, until, hooks=True, keep=True)
        try:
            with torch.no_grad():
                out = wrapper(example.double() if wide else example)
        except Exception:  # in float64: try the model's own dtype; else the model's failure
            continue
        return [t for t in out if isinstance(t, torch.Tensor)], wide
    return None
