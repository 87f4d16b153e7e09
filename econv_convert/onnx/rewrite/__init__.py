"""The ONNX backend's emitter: a baseline ONNX graph in, its dense equivalent out.

:mod:`.frame` walks the graph and keeps each value's record; each layer family's rules live
in a module of its own, named as in the PyTorch backend (:mod:`econv_convert.torch.rewrite`):
:mod:`.window` (Conv, pools, SpaceToDepth), :mod:`.global_pool` (global pooling and
reductions), :mod:`.pointwise`, :mod:`.norm`, :mod:`.linear`, :mod:`.reshape` (indexing,
reshaping, padding) and :mod:`.shape_values` (sizes as values).
"""

import importlib

from econv_convert.core.records import Rewritten
from econv_convert.core.walk import FAMILIES
from econv_convert.onnx.rewrite.frame import RULES, OnnxRewriter, Val, rule

__all__ = ["RULES", "OnnxRewriter", "Rewritten", "Val", "rule"]

for _family in FAMILIES:  # importing a family's module registers its rules
    importlib.import_module(f"{__name__}.{_family}")
