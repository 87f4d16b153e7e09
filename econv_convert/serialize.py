"""Graphs as data: a torch.fx graph written as JSON and read back without running code.

Call targets are stored by qualified name and resolved on load through an allow-list
(namespaces of tensor functions, ``operator``, ``math`` and :mod:`econv_convert.ops`), with
names that touch files, the network or global state denied. A dense checkpoint therefore loads
with ``torch.load(weights_only=True)`` and builds its module from that data alone.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from econv_convert.errors import InvalidInputError, describe

_NAMESPACES = {
    "torch": torch,
    "torch.nn.functional": torch.nn.functional,
    "torch._C._nn": torch._C._nn,
    "torch.special": torch.special,
    "_operator": operator,
    "operator": operator,
    "math": math,
}
_DENIED = re.compile(
    r"load|save|file|hub|set_|seed|compile|export|jit|library|cuda|mps|distributed|"
    r"backends|use_|_dynamo|storage|from_numpy|frombuffer|^_"
)
_BUILTINS = {"getattr": builtins.getattr, "torch._assert": torch._assert}
_METHOD = re.compile(r"[a-z][a-z0-9_]*")
_METHOD_DENIED = {"numpy", "register_hook", "backward", "share_memory_", "apply_", "map_",
                  "map2_", "storage", "untyped_storage", "tolist", "data_ptr", "pin_memory"}


def resolve(name: str) -> Any:
    """The function called ``name``, if the allow-list admits it."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name.startswith("econv_convert.ops."):
        from econv_convert import ops

        short = name.rsplit(".", 1)[1]
        fn = getattr(ops, short, None)
        if callable(fn) and not short.startswith("_"):
            return fn
    module, _, short = name.rpartition(".")
    ns = _NAMESPACES.get(module)
    if ns is not None and not _DENIED.search(short):
        fn = getattr(ns, short, None)
        if callable(fn) and not isinstance(fn, type):
            return fn
    raise InvalidInputError(f"the graph calls '{name}', which a dense checkpoint may not call")


def qualified_name(fn: Any) -> str:
    """The name a graph stores for ``fn``; refuses what the loader would not resolve."""
    name = _get_qualified_name(fn)
    resolve(name)  # never write what could not be read back
    return name


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"$n": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return {"$f": repr(a)}
    if isinstance(a, torch.Size):
        return {"$t": [_enc(x) for x in a]}
    if isinstance(a, tuple):
        return {"$t": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        return {"$d": [[k, _enc(v)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"$s": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if a is Ellipsis:
        return {"$e": 1}
    if isinstance(a, torch.dtype):
        return {"$dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"$device": str(a)}
    if callable(a):
        return {"$fn": qualified_name(a)}
    raise InvalidInputError(f"cannot store a graph argument of type {type(a).__name__}")


def _dec(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "$n":
        if v not in nodes:
            raise InvalidInputError(f"the stored graph refers to unknown node {v!r}")
        return nodes[v]
    if tag == "$f":
        return float(v)
    if tag == "$t":
        return tuple(_dec(x, nodes) for x in v)
    if tag == "$d":
        return {k: _dec(x, nodes) for k, x in v}
    if tag == "$s":
        return slice(*(_dec(x, nodes) for x in v))
    if tag == "$e":
        return Ellipsis
    if tag == "$dtype":
        dt = getattr(torch, v, None)
        if not isinstance(dt, torch.dtype):
            raise InvalidInputError(f"unknown dtype '{v}' in graph")
        return dt
    if tag == "$device":
        return torch.device(v)
    if tag == "$fn":
        return resolve(v)
    raise InvalidInputError(f"unknown tag '{tag}' in graph")


def graph_to_json(graph: fx.Graph) -> str:
    nodes = []
    for n in graph.nodes:
        if n.op == "call_function":
            target = qualified_name(n.target)
        elif n.op == "call_module":
            raise InvalidInputError(f"node '{n.name}' calls a module; cannot store it as data")
        else:
            target = n.target
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _enc(n.args), "kwargs": _enc(n.kwargs)})
    return json.dumps({"nodes": nodes})


def graph_from_json(text: str) -> fx.Graph:
    """Rebuild a stored graph; any malformed entry is an :class:`InvalidInputError`."""
    try:
        return _graph_from_json(text)
    except InvalidInputError:
        raise
    except Exception as e:  # a damaged or hand-edited file: say so in one line
        raise InvalidInputError(f"the stored graph is damaged ({describe(e, 160)})") from None


def _graph_from_json(text: str) -> fx.Graph:
    data = json.loads(text)
    specs = data["nodes"]
    if not isinstance(specs, list):
        raise InvalidInputError("the stored graph has no node list")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in specs:
        op, target, name = spec["op"], spec["target"], spec["name"]
        if not all(isinstance(v, str) for v in (op, target, name)):
            raise InvalidInputError(f"stored node {name!r} has a malformed op or target")
        args = _dec(spec["args"], nodes)
        kwargs = _dec(spec["kwargs"], nodes)
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise InvalidInputError(f"stored node {name!r} has malformed arguments")
        if op == "call_function":
            target = resolve(target)
        elif op == "call_method":
            if not _METHOD.fullmatch(target) or target in _METHOD_DENIED:
                raise InvalidInputError(f"the graph calls method '{target}', which is not allowed")
        elif op == "get_attr":
            if not re.fullmatch(r"\w+(\.\w+)*", target):
                raise InvalidInputError(f"bad attribute path '{target}' in graph")
        elif op == "output":
            graph.output(args[0])
            continue
        elif op != "placeholder":
            raise InvalidInputError(f"node kind '{op}' is not allowed in a stored graph")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name)
        nodes[name] = node
    graph.lint()
    return graph
