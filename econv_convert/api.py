"""The package's functions on model objects of either backend: each takes a PyTorch module or
an ONNX graph (``onnx.ModelProto``) and calls that backend's own
(:mod:`econv_convert.torch_api`, :mod:`econv_convert.onnx_api`, which have the same names).
The workflows over files are :mod:`econv_convert.workflow`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from econv_convert.core.records import DenseInfo
from econv_convert.core.records import info as _info
from econv_convert.errors import InvalidInputError
from econv_convert.kinds import is_onnx_model


def is_dense(model: Any) -> bool:
    """Whether ``model`` is a dense model made by econv-convert: a module with its record, a
    dense ONNX graph, or a file of either (a dense checkpoint, a dense ``.pt2`` or ``.onnx``;
    no code is read)."""
    onnx_file = isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx"
    if onnx_file or is_onnx_model(model):
        from econv_convert.onnx import api as onnx_api

        try:
            return onnx_api.is_dense(onnx_api.load(model) if onnx_file else model)
        except Exception:  # not a readable graph: not a dense one
            return False
    from econv_convert.torch.api import is_dense as torch_is_dense

    return torch_is_dense(model)


def densify(model: Any, example_input: Any = None, *, global_pool: str = "phase",
            until: str | None = None, output_stride: int | None = None,
            input_name: str | None = None, capture_with: str = "auto") -> Any:
    """The dense equivalent of ``model``, of the same kind (a ``torch.fx.GraphModule`` or an
    ONNX graph); its record is :func:`info`. ``example_input``: a tensor or a shape (N, C,
    spatial...); an ONNX graph may omit it where the graph fixes its input's shape.
    ``input_name`` and ``capture_with`` are for PyTorch models (see
    :func:`econv_convert.torch.api.densify`)."""
    if is_onnx_model(model):
        if input_name is not None or capture_with != "auto":
            raise InvalidInputError("input_name=... and capture_with=... are for PyTorch "
                                    "models; an ONNX graph carries its own structure")
        from econv_convert.onnx.api import densify as onnx_densify

        shape = getattr(example_input, "shape", example_input)
        return onnx_densify(model, None if shape is None else list(shape),
                            global_pool=global_pool, output_stride=output_stride, until=until)
    if example_input is None:
        raise InvalidInputError("a PyTorch model needs example_input=... (a tensor, or a "
                                "shape such as (1, 3, 224, 224))")
    from econv_convert.torch.api import densify as torch_densify

    return torch_densify(model, example_input, global_pool=global_pool, until=until,
                         output_stride=output_stride, input_name=input_name,
                         capture_with=capture_with)


def info(dense: Any) -> DenseInfo:
    """How a dense model of either kind was made (:class:`DenseInfo`), or the record itself."""
    if is_onnx_model(dense):
        from econv_convert.onnx.api import info as onnx_info

        return onnx_info(dense)
    return _info(dense)


def inverse(dense: Any) -> Any:
    """The baseline carrying the dense model's (possibly fine-tuned) weights, of its kind."""
    if is_onnx_model(dense):
        from econv_convert.onnx.api import inverse as onnx_inverse

        return onnx_inverse(dense)
    from econv_convert.torch.api import inverse as torch_inverse

    return torch_inverse(dense)


def lattice_view(dense: Any, out: Any) -> Any:
    """The baseline's outputs read off the dense model's outputs (lattice points, phase 0):
    tensors for a PyTorch model, numpy arrays for an ONNX graph's onnxruntime outputs.
    ``dense``: the dense model or its :class:`DenseInfo`."""
    meta = info(dense)
    if meta.capture == "onnx":
        from econv_convert.onnx.api import lattice_view as onnx_view

        return onnx_view(meta, out)
    from econv_convert.torch.api import lattice_view as torch_view

    return torch_view(meta, out)


def save_dense(dense: Any, path: str | os.PathLike) -> Path:
    """Write a dense model of either kind where it reads back (``.pt`` for PyTorch, ``.onnx``
    for ONNX graphs), only once it does."""
    if is_onnx_model(dense):
        from econv_convert.onnx.api import save

        if Path(path).suffix.lower() != ".onnx":
            raise InvalidInputError(f"{path}: a dense ONNX graph is written as .onnx")
        return save(dense, path)
    from econv_convert.torch.storage import save_dense as torch_save

    return torch_save(dense, path)


def load_dense(path: str | os.PathLike) -> Any:
    """A dense model written by :func:`save_dense` (or the command line): a trainable
    ``torch.fx.GraphModule`` from ``.pt``, an ONNX graph from ``.onnx``."""
    if Path(path).suffix.lower() == ".onnx":
        from econv_convert.onnx.api import is_dense, load

        model = load(path)
        if not is_dense(model):
            raise InvalidInputError(f"{path}: not a dense model made by econv-convert (a "
                                    "baseline: densify it first)")
        return model
    from econv_convert.torch.storage import load_dense as torch_load

    return torch_load(path)


def cut(model: Any, until: str) -> Any:
    """The part of ``model`` that computes ``until`` (a module name, or an ONNX value name)."""
    if is_onnx_model(model):
        from econv_convert.onnx.api import cut as onnx_cut

        return onnx_cut(model, until)
    from econv_convert.torch.api import cut as torch_cut

    return torch_cut(model, until)


__all__ = ["cut", "densify", "info", "inverse", "is_dense", "is_onnx_model", "lattice_view",
           "load_dense", "save_dense"]

