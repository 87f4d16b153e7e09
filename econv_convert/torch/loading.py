"""Loading baseline models from files, without running code from them unless asked.

* ``.pt``/``.pth``/``.ckpt``/``.bin``: ``torch.load(weights_only=True)``: a state dict, or a
  training checkpoint dict holding ``state_dict``/``model`` (and optionally ``arch``,
  ``arch_kwargs`` and ``input_shape``, so no ``--arch`` is needed);
* ``.safetensors``: a state dict;
* ``.pt2``: a ``torch.export`` program;
* a whole pickled module only with ``trust_pickle=True``: unpickling runs code from the file.

``arch`` (``module:callable``) imports exactly that module and calls the callable with
``arch_kwargs`` to build the model the weights go into.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from econv_convert.errors import (
    InvalidInputError,
    InvalidModelError,
    TransferError,
    UnsafeCheckpointError,
    describe,
)
from econv_convert.torch.state import load_weights_into
from econv_convert.torch.storage import FORMAT, dense_pt2_record

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar"}
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class Loaded:
    model: nn.Module
    input_shape: list[int] | None
    arch: str | None
    arch_kwargs: dict[str, Any] | None = None


def parse_shape(text: str) -> list[int]:
    """``"1,3,224,224"`` -> ``[1, 3, 224, 224]``, with a one-line error otherwise."""
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"input_shape={text}: expected integers like 1,3,224,224") \
            from None
    if len(shape) < 3 or len(shape) > 5 or any(v < 1 for v in shape):
        raise InvalidInputError(f"input_shape={text}: expected N,C and 1 to 3 positive "
                                "spatial sizes, like 1,3,224,224")
    return shape


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"arch_kwargs=... is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidInputError("arch_kwargs=... must be a JSON object, like "
                                "'{\"num_classes\": 10}'")
    return value


def build_arch(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import ``module:callable`` (only that module) and call it to build a model."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(f"arch={arch}: expected MODULE:CALLABLE, like "
                                "mypackage.models:resnet18")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` would: the user's own modules
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise InvalidInputError(f"arch={arch}: cannot import module '{module_name}' "
                                f"({type(e).__name__}: {e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InvalidInputError(f"arch={arch}: module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise InvalidInputError(f"arch={arch}: '{arch}' is not callable")
    try:
        model = fn(**(kwargs or {}))
    except Exception as e:
        raise InvalidModelError(f"arch={arch}: calling it failed ({type(e).__name__}: {e})") \
            from None
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"arch={arch}: it returned {type(model).__name__}, "
                                "not a torch.nn.Module")
    return model


def check_file(path: Path) -> None:
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a directory, not a model file")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{path}: the file is empty")


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> Loaded:
    """Load a baseline model from ``path`` (see the module docstring for formats)."""
    path = Path(path)
    check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise InvalidInputError(f"{path}: this command takes PyTorch models; ONNX graphs work "
                                "with densify, verify, inverse and inspect")
    if suffix == ".pt2":
        return Loaded(_load_pt2(path), None, None)
    if suffix == ".safetensors":
        return _from_state(path, _load_safetensors(path), arch, arch_kwargs, None)
    if suffix not in PICKLE_SUFFIXES:
        raise InvalidInputError(f"{path}: unknown model file type '{suffix}' (expected .pt, .pth, "
                                ".ckpt, .safetensors or .pt2)")
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if arch:
            raise InvalidInputError(f"{path}: holds a whole model; arch=... is not used with it")
        return Loaded(obj, None, None)
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{path}: holds a {type(obj).__name__}, not a state dict or "
                                "checkpoint dict")
    if obj.get("format") == FORMAT:
        raise InvalidInputError(f"{path}: is a dense checkpoint; use it as dense=... (verify) or "
                                "with inverse")
    state = obj
    input_shape = None
    for key in STATE_KEYS:
        if key in obj and isinstance(obj[key], (dict, nn.Module)):
            inner = obj[key]
            if isinstance(inner, nn.Module):
                return Loaded(inner, _shape_of(obj, path), None)
            state = inner
            arch = arch or obj.get("arch")
            if not arch_kwargs and isinstance(obj.get("arch_kwargs"), dict):
                arch_kwargs = obj["arch_kwargs"]
            input_shape = _shape_of(obj, path)
            break
    return _from_state(path, state, arch, arch_kwargs, input_shape)


def _shape_of(obj: dict, path: Path) -> list[int] | None:
    shape = obj.get("input_shape")
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(v, int) for v in shape):
        raise InvalidInputError(f"{path}: 'input_shape' must be a list of integers")
    return list(shape)


def _from_state(path, state, arch, arch_kwargs, input_shape) -> Loaded:
    tensors = OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    if getattr(state, "_metadata", None) is not None:
        tensors._metadata = state._metadata  # module versions: some models' loading reads them
    if not tensors or len(tensors) != len(state):
        raise InvalidInputError(f"{path}: not a state dict (expected a mapping of names to "
                                "tensors)")
    if not arch:
        raise InvalidInputError(f"{path}: holds weights only; name the architecture with "
                                "arch=MODULE:CALLABLE")
    model = build_arch(arch, arch_kwargs)
    try:
        load_weights_into(model, tensors, f"the weights in {path.name}")
    except TransferError as e:
        raise InvalidInputError(str(e)) from None
    # weights carry no train/eval mode: a converter runs the model for inference
    return Loaded(model.eval(), input_shape, arch, arch_kwargs)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if not zipfile.is_zipfile(path) and not _looks_like_legacy_pickle(path):
        raise InvalidInputError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                                "pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise InvalidInputError(f"{path}: damaged checkpoint ({describe(e)})") from None
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path}: loading needs to run code stored in the file ({_global_of(e)}); "
                "if you trust its origin, pass trust_pickle=True") from None
    except Exception as e:
        raise InvalidInputError(f"{path}: cannot read the checkpoint ({describe(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InvalidInputError(f"{path}: cannot unpickle the checkpoint ({describe(e)})") from None


def _looks_like_legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= 5


def _global_of(e: Exception) -> str:
    text = str(e)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        return "it references " + text.split(marker, 1)[1].split()[0]
    return "it is not a plain weights file"


SAFETENSORS_METADATA = "econv.state_dict_metadata"  # module versions, as JSON


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state = OrderedDict(load_file(str(path)))
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a valid safetensors file ({describe(e)})") from None
    if SAFETENSORS_METADATA in header:  # written by econv-convert inverse
        try:
            state._metadata = OrderedDict(json.loads(header[SAFETENSORS_METADATA]))
        except ValueError:
            raise InvalidInputError(f"{path}: damaged '{SAFETENSORS_METADATA}' entry") from None
    return state


def _load_pt2(path: Path) -> nn.Module:
    if dense_pt2_record(path) is not None:
        raise InvalidInputError(
            f"{path}: is a dense model made by econv-convert (a torch.export program, for "
            "deployment); verify, inverse, inspect, bench and predict take the dense .pt "
            "(densify -o dense.pt) or the baseline")
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise InvalidInputError(f"{path}: not a readable torch.export program ({describe(e)})") \
            from None
    from econv_convert.torch.capture import from_exported

    return from_exported(program)
