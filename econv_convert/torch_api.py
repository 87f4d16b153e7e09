"""PyTorch models in and out: densify, verify, inverse, load, save.

The same names, arguments and return shapes as :mod:`econv_convert.onnx_api`: ``densify``
returns the dense model (its record: ``info(dense)``), ``load``/``save`` read and write dense
files (``.pt`` checkpoints that unpickle no code), ``cut`` is the baseline up to ``until``.
The package's top level has these under the names it always had (``save_dense``,
``load_dense``)."""

from econv_convert.core.records import info
from econv_convert.equivalence import verify
from econv_convert.torch.api import cut, densify, inverse, is_dense, lattice_view
from econv_convert.torch.storage import load_dense as load
from econv_convert.torch.storage import save_dense as save

__all__ = ["cut", "densify", "info", "inverse", "is_dense", "lattice_view", "load", "save",
           "verify"]
