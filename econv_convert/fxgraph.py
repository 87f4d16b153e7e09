"""Tracing a PyTorch model into a functional torch.fx graph.

``torch.nn`` layers are traced as leaves and then *lowered* to the functional calls they stand
for (``nn.MaxPool2d`` -> ``F.max_pool2d``, parameters as ``get_attr`` nodes). The rewrite rules
then see one form for ``nn.Conv2d`` and ``F.conv2d`` alike. A leaf module with no lowering stays
a ``call_module`` node, and the rules refuse it by name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.errors import InvalidModelError, describe

NAME = "econv_name"  # node.meta key: the module path a node came from, for messages


class _Tracer(fx.Tracer):
    """Default fx tracing that also remembers the output of module ``until``."""

    def __init__(self, until: str | None) -> None:
        super().__init__()
        self.until = until
        self.until_value: Any = None

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if self.until is not None and self.path_of_module(m) == self.until:
            self.until_value = out
        return out


def trace(model: nn.Module, until: str | None = None) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into a lowered, functional GraphModule.

    With ``until``, the graph returns the output of module ``until`` (a name from
    ``named_modules()``) instead of the model's output.
    """
    if until is not None and until not in dict(model.named_modules()):
        raise InvalidModelError(f"--until: the model has no module named '{until}'")
    tracer = _Tracer(until)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
        raise InvalidModelError(
            f"cannot trace the model with torch.fx{module_of_error(e, model)} "
            f"({describe(e, None)}); data-dependent control flow in a forward() must be made "
            "static to densify"
        ) from e
    gm = fx.GraphModule(model, graph)
    if until is not None:
        if not isinstance(tracer.until_value, fx.Proxy):
            raise InvalidModelError(f"--until: module '{until}' is never called on a tensor")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = (tracer.until_value.node,)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    _lower(gm)
    return gm


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
    args = (x, attr("running_mean"), attr("running_var"), w, b, False, 0.0, m.eps)
    return F.batch_norm, args, {}


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


def _identity(m, x, attr):
    return None if m.training else ("identity", (x,), {})


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
    nn.MaxPool1d: _maxpool, nn.MaxPool2d: _maxpool, nn.MaxPool3d: _maxpool,
    nn.AvgPool1d: _avgpool, nn.AvgPool2d: _avgpool, nn.AvgPool3d: _avgpool,
    nn.Identity: lambda m, x, attr: ("identity", (x,), {}),
    nn.Flatten: lambda m, x, attr: (torch.flatten, (x, m.start_dim, m.end_dim), {}),
    nn.Unflatten: lambda m, x, attr: ("method:unflatten", (x, m.dim, tuple(m.unflattened_size)), {}),
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
    _LOWER[_cls] = _identity


def _lower(gm: fx.GraphModule) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        node.meta[NAME] = node.target
        m = modules[node.target]
        rule = _LOWER.get(type(m))
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


def node_name(node: fx.Node) -> str:
    """A node's name for people: the module path where it came from a module."""
    if node.meta.get(NAME):
        return node.meta[NAME]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"{node.name}' in module '{next(reversed(stack))}"
    return node.name


def is_getitem(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


def from_exported(program: Any) -> fx.GraphModule:
    """A ``torch.export`` program as a module the tracer can read.

    Its ``aten`` operators are replaced by the ``torch`` bindings of the same operators (same
    positional signatures), which the rules know; the shape guards of the export, which pin
    the example size, are dropped (verification checks other sizes instead). An operator with
    no binding stays as it is and is refused by name if it touches a spatial map.
    """
    gm = program.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            fn = _binding(node.target)
            if fn is not None:
                node.target = fn
    graph.eliminate_dead_code()
    graph.lint()
    # a plain GraphModule: the exported module's own class refuses .eval()
    return fx.GraphModule(gm, graph).eval()


def _binding(op: torch._ops.OpOverload) -> Callable | None:
    name = op._schema.name.split("::", 1)[1]
    if op._schema.name.split("::", 1)[0] != "aten" or op._overloadname not in (
            "default", "Tensor", "Scalar", "dim", "using_ints", "int", "self"):
        return None
    for ns in (torch._C._nn, torch):
        fn = getattr(ns, name, None)
        if callable(fn):
            return fn
    return None
