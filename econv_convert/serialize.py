"""Graphs as data: a torch.fx graph written as JSON and read back without running code.

Call targets are stored by qualified name and resolved on load through
:func:`econv_convert.targets.resolve`: the functions the rewrite can emit, and PyTorch's own
tensor namespaces minus names that touch files, the network or global state. A dense
checkpoint therefore loads with ``torch.load(weights_only=True)`` and builds its module from
that data alone. Writing does not check names; whoever writes a file reads it back first
(:func:`econv_convert.api.save_dense`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import torch.fx as fx

from econv_convert.errors import InvalidInputError, describe
from econv_convert.targets import qualified_name, resolve

_METHOD = re.compile(r"[a-z][a-z0-9_]*")
_METHOD_DENIED = {"numpy", "register_hook", "backward", "share_memory_", "apply_", "map_",
                  "map2_", "storage", "untyped_storage", "tolist", "data_ptr", "pin_memory"}
# an attribute path: names PyTorch accepts for modules (anything but "." and empty), minus the
# characters that could break out of the string in the code fx generates for the path
_ATTR_PART = r"[^.\"'\\\x00-\x1f]+"
_ATTR = re.compile(rf"{_ATTR_PART}(\.{_ATTR_PART})*")


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
            if not _ATTR.fullmatch(target):
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
