"""The plan of a dense model, layer by layer: lattice step, receptive field, output sizes and
cost (multiply-adds) in the baseline and in the dense model, at the example input.

Multiply-adds are counted for the layers the rewrite changes (convolutions, pools, fully
connected heads); Linear layers applied per position after a global pool are not included."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from econv_convert.core.records import info


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
    base_macs: int  # summed over the rewritten layers (convolutions, pools, heads)
    dense_macs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "baseline_macs": self.base_macs,
            "dense_macs": self.dense_macs,
            "layers": [dict(layer.__dict__) for layer in self.layers],
        }


def plan(dense: Any) -> Plan:
    """The per-layer plan at the example input, from the shapes the rewrite recorded (nothing
    is run, so it is as fast for a large model as for a small one). Takes a dense model or
    its :class:`~econv_convert.torch.api.DenseInfo` (what an ONNX densification returns)."""
    meta = info(dense)
    layers = []
    for r in meta.layer_records():
        bs, ds = tuple(r.base_shape), tuple(r.dense_shape)
        layers.append(LayerCost(
            r.node, r.kind, r.step_in, r.step_out, r.field, bs, ds,
            _numel(bs) * r.cost, _numel(ds) * r.cost, r.note))
    return Plan(layers, tuple(meta.example_shape), sum(x.base_macs for x in layers),
                sum(x.dense_macs for x in layers))


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 0  # no shape: the layer gave no tensor
