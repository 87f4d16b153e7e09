"""The PyTorch backend's emitter: a lowered baseline graph in, a dense graph out.

:mod:`.frame` walks the graph and keeps each value's record; each layer family's rules live
in a module of its own, named as in the ONNX backend (:mod:`econv_convert.onnx.rewrite`):
:mod:`.window` (convolutions, pools, space to depth), :mod:`.global_pool` (global pooling and
reductions), :mod:`.pointwise`, :mod:`.norm`, :mod:`.linear`, :mod:`.reshape` (indexing,
reshaping, padding) and :mod:`.shape_values` (sizes as values). Adding a layer kind is one
decision in :mod:`econv_convert.core.rules` and one rule in the family's module here and in
the ONNX backend.
"""

import importlib

from econv_convert.core.records import Rewritten
from econv_convert.core.walk import FAMILIES
from econv_convert.torch.rewrite.frame import FUNCTIONS, METHODS, Rewriter, Val, rule

__all__ = ["FUNCTIONS", "METHODS", "Rewriter", "Rewritten", "Val", "rule"]

for _family in FAMILIES:  # importing a family's module registers its rules
    importlib.import_module(f"{__name__}.{_family}")
