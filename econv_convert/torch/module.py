"""The dense model's class: an ``fx.GraphModule`` that follows ``train()`` and ``eval()``.

A dense graph is captured in eval mode, so its BatchNorm and dropout calls carry
``training=False``. Like any ``nn.Module``, a dense model switches them with ``train()``:
BatchNorm (:func:`econv_convert.torch.ops.batch_norm`) then normalizes with batch statistics
over the dense maps and updates its running statistics, dropout and stochastic depth
(:func:`econv_convert.torch.ops.drop_path`) drop. With
:func:`freeze_batchnorm` BatchNorm keeps its running statistics in training (the usual choice
for fine-tuning with small batches). Exports (``.pt2``, ``.onnx``) are made in eval mode.
"""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.torch import ops

_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout)
_TRAINING_ARG = {ops.batch_norm: 5, ops.drop_path: 2, **{fn: 2 for fn in _DROPOUTS}}


class DenseModule(fx.GraphModule):
    """A dense model: a graph module whose BatchNorm, dropout and stochastic depth follow its
    mode."""

    def __deepcopy__(self, memo: dict) -> DenseModule:
        # GraphModule's copy keeps modules, parameters and buffers, not other attributes:
        # a copy without its record would no longer be known as dense
        copied = super().__deepcopy__(memo)
        if "econv" in self.__dict__:
            copied.econv = copy.deepcopy(self.__dict__["econv"], memo)
        return copied

    def train(self, mode: bool = True) -> DenseModule:
        super().train(mode)
        frozen = bool(getattr(getattr(self, "econv", None), "frozen_batchnorm", False))
        changed = False
        for node in self.graph.nodes:
            index = _TRAINING_ARG.get(node.target) if node.op == "call_function" else None
            if index is None:
                continue
            want = mode and not (frozen and node.target is ops.batch_norm)
            if len(node.args) > index:
                if node.args[index] is not want:
                    node.args = (*node.args[:index], want, *node.args[index + 1:])
                    changed = True
            elif node.kwargs.get("training", False) is not want:
                node.kwargs = {**node.kwargs, "training": want}
                changed = True
        if changed:
            self.recompile()
        return self


def freeze_batchnorm(dense: nn.Module, frozen: bool = True) -> nn.Module:
    """Keep (or stop keeping) a dense model's BatchNorm on its running statistics in training
    mode; the choice is saved with the dense checkpoint. Returns the model."""
    from econv_convert.core.records import info

    info(dense).frozen_batchnorm = frozen
    dense.train(dense.training)
    return dense
