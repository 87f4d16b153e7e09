"""State dicts: what moves between a baseline and its dense model.

A dense model has exactly the baseline's state-dict keys and shapes, so weights move both ways
by plain loading. These helpers keep it so: parameters and buffers a graph does not read are
put back, the per-module versions some models' loading code reads travel along, and loading
errors name the keys and the module.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from econv_convert.errors import InvalidModelError, TransferError, describe
from econv_convert.torch.capture import module_of_error


def restore_keys(dense: nn.Module, baseline: nn.Module) -> None:
    """Give ``dense`` every parameter and buffer of ``baseline`` that its graph does not use
    (layers past ``until``, BatchNorm's ``num_batches_tracked``), so the state dicts match."""
    have = set(dense.state_dict().keys())
    persistent = set(baseline.state_dict().keys())
    for name, p in baseline.named_parameters():
        if name not in have:
            set_tensor(dense, name, p, parameter=True)
    for name, b in baseline.named_buffers():
        if name not in have and name in persistent:
            set_tensor(dense, name, b, parameter=False)


def state_metadata(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The JSON-safe part of ``model.state_dict()._metadata`` (module versions)."""
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {prefix: {k: v for k, v in entry.items() if isinstance(v, (int, str, bool))}
            for prefix, entry in meta.items()}


def set_versions(root: nn.Module, metadata: dict[str, dict[str, Any]]) -> None:
    """Give the modules of a rebuilt model (plain containers) the baseline's state-dict
    versions, so that its ``state_dict()`` loads into the baseline's own classes."""
    for prefix, entry in metadata.items():
        if "version" not in entry:
            continue
        try:
            module = root.get_submodule(prefix) if prefix else root
        except AttributeError:
            continue  # a module without parameters or buffers: nothing of it is stored
        module._version = entry["version"]


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as a file should hold it: detached, contiguous CPU copies, with
    the per-module metadata (versions) kept."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone().contiguous()) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if parameter:
        mod.register_parameter(leaf, value if isinstance(value, nn.Parameter)
                               else nn.Parameter(value))
    else:
        mod.register_buffer(leaf, value)


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with a one-line error naming missing, unexpected and mismatched keys,
    and naming the module when the model's own loading code raises."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        if mismatched:
            parts.append("shape mismatch " + _some(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        raise TransferError(f"{what} do not fit the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state)
    except Exception as e:  # the model's own _load_from_state_dict, or a hook
        raise InvalidModelError(f"loading {what} fails in the model's own code"
                                f"{module_of_error(e, model)} ({describe(e)})") from e


def _some(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
