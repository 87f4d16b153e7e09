"""The plan of a dense model, layer by layer: lattice step, receptive field, output sizes and
cost (multiply-adds) in the baseline and in the dense model, at the example input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from econv_convert.api import info, inverse
from econv_convert.fxgraph import shape_prop


@dataclass(frozen=True)
class LayerCost:
    node: str
    kind: str
    step_in: tuple[int, ...]
    step_out: tuple[int, ...]
    field: tuple[int, ...]
    base_shape: tuple[int, ...]
    dense_shape: tuple[int, ...]
    base_macs: int
    dense_macs: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    layers: list[LayerCost]
    input_shape: tuple[int, ...]
    base_macs: int  # the whole model: convolutions and matrix products (torch's counter)
    dense_macs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "baseline_macs": self.base_macs,
            "dense_macs": self.dense_macs,
            "layers": [dict(layer.__dict__) for layer in self.layers],
        }


def plan(dense: nn.Module) -> Plan:
    """Measure ``dense`` and its baseline on a random input of the example shape."""
    meta = info(dense)
    baseline = inverse(dense)
    shape = tuple(meta.example_shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    base_values = {n.name: v for n, v in shape_prop(baseline, x).items()}
    dense_values = {n.name: v for n, v in shape_prop(dense, x).items()}
    layers = []
    for r in meta.layer_records():
        b = base_values.get(r.fx_name)
        d = dense_values.get(r.dense_name)
        bs = tuple(b.shape) if isinstance(b, torch.Tensor) else ()
        ds = tuple(d.shape) if isinstance(d, torch.Tensor) else ()
        layers.append(LayerCost(
            r.node, r.kind, r.step_in, r.step_out, r.field, bs, ds,
            _numel(bs) * r.cost, _numel(ds) * r.cost, r.note))
    return Plan(layers, shape, _macs(baseline, x), _macs(dense, x))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n if shape else 0


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2
