"""Graphs as data: a torch.fx graph written as JSON and read back without running code.

Call targets are stored by qualified name and resolved on load through
:func:`econv_convert.torch.targets.resolve`: the functions the rewrite can emit, and PyTorch's own
tensor namespaces minus names that touch files, the network or global state. A dense
checkpoint therefore loads with ``torch.load(weights_only=True)`` and builds its module from
that data alone. Writing does not check names; whoever writes a file reads it back first
(:func:`econv_convert.torch.storage.save_dense`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from econv_convert.core.records import DenseInfo, info
from econv_convert.errors import InvalidInputError, describe
from econv_convert.files import atomic_write
from econv_convert.torch.module import DenseModule
from econv_convert.torch.state import restore_keys, set_tensor, set_versions
from econv_convert.torch.targets import qualified_name, resolve

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
            raise InvalidInputError(f"unknown dtype {v!r} in graph")
        return dt
    if tag == "$device":
        return torch.device(v)
    if tag == "$fn":
        return resolve(v)
    raise InvalidInputError(f"unknown tag {tag!r} in graph")


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
                raise InvalidInputError(f"the graph calls method {target!r}, which is not allowed")
        elif op == "get_attr":
            if not _ATTR.fullmatch(target):
                raise InvalidInputError(f"bad attribute path {target!r} in graph")
        elif op == "output":
            graph.output(args[0])
            continue
        elif op != "placeholder":
            raise InvalidInputError(f"node kind {op!r} is not allowed in a stored graph")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name)
        nodes[name] = node
    graph.lint()
    return graph


# ---------------------------------------------------------------------------------------------
# Dense checkpoints

DENSE_PT2_KEY = "econv_dense.json"  # the dense record inside a dense .pt2 (its extra file)


def dense_pt2_record(path: Path) -> str | None:
    """The dense record a ``.pt2`` written by densify carries, or None (a baseline's)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + DENSE_PT2_KEY)
                     or n == "extra/" + DENSE_PT2_KEY]
            return z.read(names[0]).decode() if names else None
    except (OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        return None


FORMAT = "econv-convert/dense"
FORMAT_VERSION = 1


def build_module(graph_json: str, state: dict[str, torch.Tensor], params: Sequence[str],
           metadata: dict[str, dict[str, Any]] | None = None) -> fx.GraphModule:
    root = nn.Module()
    params = set(params)
    for name, t in state.items():
        value = nn.Parameter(t, requires_grad=t.is_floating_point()) if name in params else t
        set_tensor(root, name, value, parameter=name in params)
    graph = graph_from_json(graph_json)
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in state:
            raise InvalidInputError(f"the stored graph reads {n.target!r}, which the weights lack")
    gm = DenseModule(root, graph)
    restore_keys(gm, root)  # GraphModule copies only what its graph reads
    set_versions(gm, metadata or {})
    return gm




def save_dense(dense: nn.Module, path: str | os.PathLike) -> Path:
    """Write a dense checkpoint (``.pt``) that :func:`load_dense` reads without unpickling code.

    The file is written beside its target, read back with :func:`load_dense`, and renamed into
    place only then: a checkpoint that would not load is never written.
    """
    meta = info(dense)
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "graph": graph_to_json(dense.graph),
        "info": meta.to_json(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in dense.state_dict().items()},
    }

    def reads_back(tmp: Path) -> None:
        try:
            load_dense(tmp)
        except InvalidInputError as e:
            reason = str(e).removeprefix(f"{tmp}: ")
            raise InvalidInputError(f"{path}: not written, the dense checkpoint would not load "
                                    f"back ({reason})") from None

    atomic_write(path, lambda f: torch.save(payload, f), check=reads_back)
    return path


def is_dense_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dense checkpoint written by :func:`save_dense` (reads no code;
    any other file, readable or not, is not)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_dense(path: str | os.PathLike) -> fx.GraphModule:
    """Load a dense checkpoint written by :func:`save_dense` into a trainable module."""
    path = Path(path)
    if path.suffix.lower() == ".pt2":
        what = ("a dense torch.export program (for deployment; its weights cannot move back)"
                if dense_pt2_record(path) is not None else "a torch.export program")
        raise InvalidInputError(f"{path}: is {what}; this takes the dense checkpoint .pt "
                                "that densify writes (densify -o dense.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidInputError(
            f"{path}: not a readable dense checkpoint ({describe(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"{path}: not a dense checkpoint written by econv-convert")
    if payload.get("version") != FORMAT_VERSION:
        raise InvalidInputError(f"{path}: dense checkpoint version {payload.get('version')} "
                                f"is not supported (expected {FORMAT_VERSION})")
    try:
        meta = DenseInfo.from_json(payload["info"])
        dense = build_module(payload["graph"], payload["state_dict"], meta.params,
                       meta.state_metadata)
    except InvalidInputError as e:
        raise InvalidInputError(f"{path}: {e}") from None
    except Exception as e:  # damaged or edited by hand: one line, never a traceback
        raise InvalidInputError(f"{path}: damaged dense checkpoint ({describe(e)})") from None
    dense.econv = meta
    return dense.eval()
