"""Deliberately hostile model code, as real model files sometimes are: attributes assigned in
forward(), submodules replaced at run time, tensors made in forward(), control flow on tensor
values, data-dependent shapes, a model returning nothing, a model that raises. Each must
convert exactly or end in a typed error that names the cause: never an internal error.

``OUTCOMES`` maps each model to what densify must do: ``"exact"`` (converts and verifies, by
whichever capture can take it) or ``(error type name, a phrase of the message)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, 2, 1)


class AssignsAttr(_Conv):
    def forward(self, x):
        y = self.c(x)
        self.last_mean = y.mean()  # a statistic kept for logging
        return y


class ReplacesSubmodule(_Conv):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        self.act = nn.GELU()  # replaced at run time
        return self.act(self.c(x))


class MakesPositions(_Conv):
    def forward(self, x):
        y = self.c(x)
        return y + torch.arange(y.shape[-1], dtype=y.dtype, device=y.device)


class MakesConstants(_Conv):
    def forward(self, x):
        y = self.c(x)
        return y * torch.ones(y.shape[1], 1, 1, device=y.device) + torch.tensor(0.5)


class BranchesOnValues(_Conv):
    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:
            return y
        return -y


class DataDependentShape(_Conv):
    def forward(self, x):
        y = self.c(x)
        return y[y > 0].reshape(1, -1)


class EarlyExitStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)])

    def forward(self, x):
        for i in range(len(self.stages)):
            x = self.stages[i](x)
            if x.shape[-1] < 4:
                break
        return x


class ReadsAnItem(_Conv):
    def forward(self, x):
        y = self.c(x)
        k = int(y.abs().max().item() > 1) + 1
        return F.max_pool2d(y, k)


class UsesNumpy(_Conv):
    def forward(self, x):
        return self.c(x) * float(np.sqrt(2.0))


class ReturnsNothing(_Conv):
    def forward(self, x):
        self.c(x)


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("the model itself fails")


OUTCOMES = {
    AssignsAttr: "exact",
    ReplacesSubmodule: "exact",
    MakesPositions: ("UnsupportedLayerError", "positional embedding"),
    MakesConstants: "exact",
    BranchesOnValues: ("InvalidModelError", "depends on the values of a tensor"),
    DataDependentShape: ("UnsupportedLayerError", "cannot densify node"),
    EarlyExitStages: "exact",
    ReadsAnItem: ("InvalidModelError", "depends on the values of a tensor"),
    UsesNumpy: "exact",
    ReturnsNothing: ("InvalidModelError", "returns no tensor"),
    Raises: ("InvalidModelError", "the model itself fails"),
}
