"""Model outputs as flat lists of tensors and back.

Models return a tensor, a tuple or list, a dict, or an output class of their library (a dict
subclass with attribute access, a dataclass, a named tuple). A dense graph computes the tensors
of that structure; the structure itself is kept as a *spec*, plain JSON data, so that the dense
model returns what the baseline returns and a dense checkpoint can store it.

Rebuilding an output class needs the class. It is looked up among the modules already imported
(``sys.modules``) and never imported from a name read from a file; where it is not found (a
dense checkpoint loaded in a process that never imported the model's library), dict-like outputs
become :class:`DenseOutput` (a dict with attribute access) and named tuples plain tuples.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from econv_convert.errors import InvalidModelError
from econv_convert.torch import targets

Spec = dict[str, Any]
_CONSTANTS = (type(None), bool, int, float, str)


class DenseOutput(dict):
    """A dict whose keys also read as attributes (``out.logits``): what a dense model returns
    for an output class it cannot rebuild."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


pytree.register_pytree_node(
    DenseOutput,
    lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: DenseOutput(zip(keys, values)),
    serialized_type_name="econv_convert.torch.outputs.DenseOutput",
)


def _is_leaf(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, fx.Proxy))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def flatten(out: Any) -> tuple[list[Any], Spec]:
    """The tensors of ``out`` in order, and the spec that rebuilds ``out`` from them."""
    leaves: list[Any] = []

    def visit(v: Any) -> Spec:
        if _is_leaf(v):
            leaves.append(v)
            return {"t": "tensor"}
        if isinstance(v, _CONSTANTS):
            return {"t": "const", "v": v}
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return {"t": "namedtuple", "cls": _class_name(type(v)), "keys": list(v._fields),
                    "items": [visit(x) for x in v]}
        if isinstance(v, (tuple, list)):
            return {"t": type(v).__name__, "items": [visit(x) for x in v]}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise InvalidModelError("the model returns a dict with keys that are not "
                                        "strings")
            cls = None if type(v) in (dict, DenseOutput) else _class_name(type(v))
            return {"t": "dict", "cls": cls, "keys": list(v),
                    "items": [visit(x) for x in v.values()]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields = [f.name for f in dataclasses.fields(v)]
            return {"t": "dataclass", "cls": _class_name(type(v)), "keys": fields,
                    "items": [visit(getattr(v, f)) for f in fields]}
        raise InvalidModelError(f"the model returns a {type(v).__name__}; outputs must be "
                                "tensors, or tuples, lists, dicts or dataclasses of them")

    return leaves, visit(out)


def names(spec: Spec) -> list[str]:
    """A name for each tensor of a spec, in order: its keys and indices joined by dots
    (``logits``, ``hidden_states.2``); ``output`` for a lone tensor."""
    found: list[str] = []

    def visit(s: Spec, path: str) -> None:
        if s["t"] == "tensor":
            found.append(path or "output")
        elif s["t"] in ("tuple", "list"):
            for i, item in enumerate(s["items"]):
                visit(item, f"{path}.{i}" if path else str(i))
        elif s["t"] in ("dict", "dataclass", "namedtuple"):
            for k, item in zip(s["keys"], s["items"]):
                visit(item, f"{path}.{k}" if path else k)

    visit(spec, "")
    return found


def _find_class(name: str | None) -> type | None:
    """An already imported class by ``module:qualname``; None if it is not loaded."""
    if not name:
        return None
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) else None


def unflatten(leaves: list[Any], spec: Spec) -> Any:
    """The output ``spec`` describes, with ``leaves`` for its tensors."""
    it = iter(leaves)

    def build(s: Spec) -> Any:
        t = s["t"]
        if t == "tensor":
            return next(it)
        if t == "const":
            return s["v"]
        items = [build(x) for x in s["items"]]
        if t == "tuple":
            return tuple(items)
        if t == "list":
            return items
        pairs = dict(zip(s["keys"], items))
        cls = _find_class(s.get("cls"))
        if cls is not None:
            try:
                if t == "namedtuple":
                    return cls(*items)
                if t == "dataclass" or dataclasses.is_dataclass(cls):
                    return cls(**pairs)
                return cls(pairs)
            except Exception:  # a class whose constructor wants something else
                pass
        return tuple(items) if t == "namedtuple" else DenseOutput(pairs)

    return build(spec)


def restore(leaves: tuple[Any, ...], spec: Spec) -> Any:
    """The last node of a dense graph whose baseline returns a structure: ``spec`` is plain
    data, so the graph stores as JSON."""
    return unflatten(list(leaves), spec)


def map_tensors(out: Any, fn: Callable[[int, torch.Tensor], Any]) -> Any:
    """``out`` with each tensor ``t`` (the ``i``-th in order) replaced by ``fn(i, t)``."""
    leaves, spec = flatten(out)
    return unflatten([fn(i, t) for i, t in enumerate(leaves)], spec)


def is_plain(spec: Spec | None) -> bool:
    """A lone tensor, or a tuple of tensors: what a graph returns without help."""
    if spec is None or spec["t"] == "tensor":
        return True
    return spec["t"] == "tuple" and all(s["t"] == "tensor" for s in spec["items"])


targets.register(restore)  # the last node of a dense graph whose model returns a structure
