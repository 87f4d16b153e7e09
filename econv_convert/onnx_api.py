"""ONNX graphs in and out: densify, verify (in onnxruntime), inverse, load, save.

The public face of :mod:`econv_convert.onnx.api`, at the path the README documents."""

from econv_convert.equivalence import verify
from econv_convert.onnx.api import (
    cut,
    densify,
    info,
    inverse,
    is_dense,
    lattice_view,
    load,
    save,
)

__all__ = ["cut", "densify", "info", "inverse", "is_dense", "lattice_view", "load", "save",
           "verify"]
