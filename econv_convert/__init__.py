"""econv-convert: exact dense (eConv/ePool) versions of strided CNNs, and weights both ways.

>>> dense = densify(model, (1, 3, 224, 224))     # doctest: +SKIP
>>> report = verify(model, dense)                 # doctest: +SKIP
>>> baseline = inverse(dense)                     # doctest: +SKIP

Here: ``densify``, ``verify``, ``inverse``, ``lattice_view``, ``info``, ``is_dense``,
``save_dense`` and ``load_dense`` on models of either backend (a PyTorch module or an ONNX
graph: :mod:`econv_convert.api`), and the workflows over files of either backend
(``*_file``, what the command line runs). Each backend
also has a face of its own with the same names and return shapes: ``econv_convert.torch_api``
and ``econv_convert.onnx_api`` (imported on use: ONNX is not loaded until needed).
"""

from econv_convert.api import (
    densify,
    info,
    inverse,
    is_dense,
    lattice_view,
    load_dense,
    save_dense,
)
from econv_convert.cases import VerifyReport
from econv_convert.core.records import DenseInfo
from econv_convert.equivalence import verify
from econv_convert.errors import (
    EConvError,
    EquivalenceError,
    InvalidInputError,
    InvalidModelError,
    TransferError,
    UnsafeCheckpointError,
    UnsupportedLayerError,
)
from econv_convert.torch.module import freeze_batchnorm
from econv_convert.workflow import (
    CheckOptions,
    LoadOptions,
    bench_file,
    densify_file,
    inspect_file,
    inverse_file,
    predict_file,
    verify_file,
)

__version__ = "0.1.0"

__all__ = [
    "CheckOptions", "DenseInfo", "EConvError", "EquivalenceError", "InvalidInputError",
    "InvalidModelError", "LoadOptions", "TransferError", "UnsafeCheckpointError",
    "UnsupportedLayerError", "VerifyReport", "__version__", "bench_file", "densify",
    "densify_file", "freeze_batchnorm", "info", "inspect_file", "inverse", "inverse_file",
    "is_dense", "lattice_view", "predict_file",
    "load_dense", "save_dense", "verify", "verify_file",
]
