"""Capturing a PyTorch model as a functional torch.fx graph the rewrite rules read.

``capture`` tries torch.fx symbolic tracing (:mod:`.fx_trace`) and, where it fails,
torch.export (:mod:`.export`). ``torch.nn`` layers are then *lowered* (:mod:`.lower`) to the
functional calls they stand for (``nn.MaxPool2d`` -> ``F.max_pool2d``, parameters as
``get_attr`` nodes), so the rules see one form for ``nn.Conv2d`` and ``F.conv2d`` alike; a
leaf module with no lowering stays a ``call_module`` node and the rules refuse it by name.
Stochastic layers are found and recorded (:mod:`.stochastic`); names, paths and the captured
record are shared (:mod:`.common`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from econv_convert.errors import InvalidInputError, InvalidModelError
from econv_convert.torch.capture.common import (  # noqa: F401  (the package's public face)
    NAME,
    PREFIX,
    Captured,
    _short,
    differs,
    eager_outputs,
    module_of_error,
    module_path,
    node_name,
    shape_prop,
)
from econv_convert.torch.capture.export import _capture_export, from_exported  # noqa: F401
from econv_convert.torch.capture.fx_trace import _capture_fx
from econv_convert.torch.capture.stochastic import _export_notes, stochastic_depth

CAPTURES = ("auto", "torch.fx", "torch.export")


MODULES = "econv_modules"  # gm.meta key: the model's module names (what until= may name)


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
    capture only (``auto``: the order above). Each capture's graph is run against the model
    on ``example`` (:func:`differs`) before it is used: one that fails or computes something
    else is not, and the other capture is tried.
    """
    captured = _capture(model, example, until, input_name, method)
    captured.gm.meta[MODULES] = frozenset(n for n, _ in model.named_modules() if n)
    return captured


def _capture(model: nn.Module, example: torch.Tensor, until: str | None,
             input_name: str | None, method: str) -> Captured:
    if method not in CAPTURES:
        raise InvalidInputError(f"capture '{method}' is not one of {', '.join(CAPTURES)}")
    if until is not None and until not in dict(model.named_modules()):
        raise InvalidModelError(f"until={until}: the model has no module named '{until}'")
    drops, off = stochastic_depth(model, example, input_name)
    reproduce = _reproducer(model, example, until, input_name)
    if method == "torch.export":
        captured = _capture_export(model, example, until, input_name)
        reproduce(captured)
        captured.notes += _export_notes(drops) + off
        return captured
    try:
        captured = _capture_fx(model, until, input_name, drops)
        reproduce(captured)
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
        reproduce(captured)
    except InvalidModelError as e:
        raise InvalidModelError(
            f"{fx_error}; torch.export fails too ({e}). Make the forward() of that module "
            "depend on attributes rather than on tensor values, or stop before it with "
            "until=...") from fx_error
    captured.notes.append(
        f"torch.fx could not capture the model ({_short(fx_error)}); captured with "
        "torch.export: Python control flow is fixed at the example input, and where it "
        "depends on the input size the dense model checks that the size takes the same "
        "branch")
    captured.notes += _export_notes(drops) + off
    return captured


class _NotReproduced(Exception):
    """The cause of a capture's refusal where its graph does not reproduce the model: an
    error with a cause is the capture's (``_capture`` then tries the other one)."""


def _reproducer(model: nn.Module, example: torch.Tensor, until: str | None,
                input_name: str | None):
    """A check of a capture: it raises where the captured graph does not compute what the
    model does on ``example`` (the graph, not the model, is then at fault, and the other
    capture may do better). The model runs eagerly once, when the first capture is checked."""
    want: list = []

    def reproduce(captured: Captured) -> None:
        if not want:
            want.append(eager_outputs(model, example, until, input_name))
        why = differs(captured, example, want[0])
        if why is not None:
            raise InvalidModelError(f"the {captured.method} capture {why}") \
                from _NotReproduced(why)

    return reproduce


__all__ = ["CAPTURES", "MODULES", "NAME", "PREFIX", "Captured", "capture", "from_exported",
           "module_of_error", "module_path", "node_name", "shape_prop", "stochastic_depth"]
