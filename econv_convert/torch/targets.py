"""The callables a dense graph may call, by name.

One registry, filled by the code that builds dense graphs: every function a rewrite rule
handles (it may be emitted as it is), every helper a rule emits, and the run-time ops. Dense
checkpoints store call targets by these names and resolve them through :func:`resolve`, so
what storage admits is exactly what the rewrite can emit, and a model that densifies can be
written and read back.

Values that nothing spatial reaches pass through the rewrite unchanged, whatever function
computes them; for those, names in PyTorch's own tensor namespaces (``torch``,
``torch.nn.functional``, ``torch.ops.aten``, ``operator``, ``math``...) are admitted too, minus
names that touch files, the network or global state. Nothing here imports a module by a name
read from a file.
"""

from __future__ import annotations

import builtins
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.fx.node import _get_qualified_name

from econv_convert.errors import InvalidInputError

_REGISTRY: dict[str, Callable[..., Any]] = {}

_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.nn.functional": torch.nn.functional,
    "torch._C._nn": torch._C._nn,
    "torch.special": torch.special,
    "torch.functional": torch.functional,
    "_operator": operator,
    "operator": operator,
    "math": math,
}
_DENIED = re.compile(
    r"load|save|file|hub|set_|seed|compile|export|jit|library|cuda|mps|distributed|"
    r"backends|use_|_dynamo|storage|from_numpy|frombuffer|^_"
)
_BUILTINS = {"getattr": builtins.getattr}


def qualified_name(fn: Callable[..., Any]) -> str:
    """The name a stored graph uses for ``fn``."""
    return _get_qualified_name(fn)


def register(*fns: Callable[..., Any]) -> None:
    """Admit ``fns`` in dense graphs (called at import time by the modules that emit them)."""
    for fn in fns:
        _REGISTRY[qualified_name(fn)] = fn


def register_as(name: str, fn: Callable[..., Any]) -> None:
    """Admit ``fn`` under another name too: the name it had when older versions of this
    package wrote their dense checkpoints (so those still load)."""
    _REGISTRY[name] = fn


def registered() -> dict[str, Callable[..., Any]]:
    """Every registered target by name (for tests: each must round-trip through storage)."""
    return dict(_REGISTRY)


def _aten(name: str) -> Any:
    """``torch.ops.aten.NAME.OVERLOAD`` (an exported program's operators), if not denied."""
    parts = name.split(".")
    if len(parts) != 5 or _DENIED.search(parts[3].lstrip("_")) or parts[3] == "from_file":
        return None
    packet = getattr(torch.ops.aten, parts[3], None)
    return getattr(packet, parts[4], None) if packet is not None else None


def resolve(name: str) -> Callable[..., Any]:
    """The function called ``name``, if dense graphs may call it; else InvalidInputError."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name.startswith("torch.ops.aten."):
        fn = _aten(name)
        if fn is not None:
            return fn
    module, _, short = name.rpartition(".")
    ns = _NAMESPACES.get(module)
    if ns is not None and not _DENIED.search(short):
        fn = getattr(ns, short, None)
        if callable(fn) and not isinstance(fn, type):
            return fn
    raise InvalidInputError(f"the graph calls {name!r}, which a dense checkpoint may not call")


def admits(fn: Callable[..., Any]) -> bool:
    """Whether a stored graph could call ``fn`` again after loading."""
    try:
        return resolve(qualified_name(fn)) is fn
    except (InvalidInputError, RuntimeError, AttributeError):
        return False
