"""What a densification produces besides the dense model: one record per rewritten layer, and
the :class:`DenseInfo` that says how a dense model was made. Plain data (JSON in dense
checkpoints and in dense ONNX models' metadata), shared by both backends, the reports and the
checks."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from econv_convert.errors import InvalidInputError

GLOBAL_POOL_MODES = ("phase", "lattice", "dense", "window")
HEAD_KIND = "fc_to_conv"  # the record kind of a Flatten + fully connected head (fixed input size)


@dataclass
class Record:
    """What the core decided a layer becomes, as reports show it (:mod:`.rules` returns it;
    the backend adds node names and shapes: :class:`LayerRecord`)."""

    kind: str
    before: dict[str, Any]
    after: dict[str, Any]
    step_in: tuple[int, ...]
    step_out: tuple[int, ...]
    field: tuple[int, ...]
    note: str = ""
    cost: int = 0  # multiply-adds (or comparisons) per output element


@dataclass
class LayerRecord(Record):
    """One rewritten layer, for reports and ``inspect``: the core's :class:`Record` with one
    graph's names and shapes."""

    node: str = ""
    fx_name: str = ""  # the baseline graph's node
    dense_name: str = ""  # the dense graph's node
    base_shape: tuple[int, ...] = ()  # the layer's output at the example input
    dense_shape: tuple[int, ...] = ()

    @classmethod
    def named(cls, rec: Any, node: str, fx_name: str, dense_name: str,
              base_shape: Sequence[int] = (), dense_shape: Sequence[int] = ()) -> LayerRecord:
        """The core's decision ``rec`` (:class:`econv_convert.core.rules.Record`) with the
        names (and, where the backend knows them, the shapes) of one graph's node."""
        return cls(rec.kind, rec.before, rec.after, tuple(rec.step_in), tuple(rec.step_out),
                   tuple(rec.field), rec.note, int(rec.cost), node=node, fx_name=fx_name,
                   dense_name=dense_name, base_shape=tuple(base_shape),
                   dense_shape=tuple(dense_shape))


@dataclass
class Rewritten:
    """What one pass of a backend's rewriter found, besides the dense graph: the layers'
    records, the outputs' lattice views and every value's dense form; the backends' APIs turn
    it into a :class:`DenseInfo`."""

    records: list[LayerRecord] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # lattice views per output
    notes: list[str] = field(default_factory=list)
    has_padding: bool = False  # any zero/reflect padding or ceil-mode window: no shift check
    global_pools: int = 0
    specialized: dict[str, list[int]] = field(default_factory=dict)  # node -> traced size
    peak_elements: int = 0  # the largest dense tensor at the example input
    peak_node: str = ""
    kept_stride: tuple[int, ...] = ()  # cumulative stride kept under an output stride
    # baseline node -> the dense node holding its value and what each dense dim means, for
    # every value that carries a map (the per-node phase proof reads it)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per input axis, the outputs' receptive field, step and padding reach (size, step, lo, hi)
    out_field: list[list[int]] = field(default_factory=list)
    support: list[list[int]] = field(default_factory=list)  # window pooling's, if any
    graph: Any = None  # the dense graph, where the backend builds it beside the walk (ONNX)

    @property
    def total_step(self) -> tuple[int, ...]:
        steps = [tuple(d[1] for d in o["dims"] if d[0] == "space") for o in self.outputs]
        return max(steps, key=lambda s: math.prod(s)) if steps else ()


@dataclass
class DenseInfo:
    """How a dense model was made. Plain data: stored as JSON in dense checkpoints."""

    example_shape: list[int]
    global_pool: str
    until: str | None
    outputs: list[dict[str, Any]]  # per output tensor: dense dims (kind, step, axis), name
    records: list[dict[str, Any]]
    notes: list[str]
    has_padding: bool
    global_pools: int
    specialized: dict[str, list[int]] = field(default_factory=dict)
    baseline_graph: str = ""  # JSON: the lowered baseline graph, for inverse
    params: list[str] = field(default_factory=list)  # state-dict keys that are Parameters
    arch: str | None = None  # MODULE:CALLABLE of the baseline, when known (for inverse)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    output_stride: int | None = None
    peak_elements: int = 0  # the largest dense activation at the example input
    peak_node: str = ""
    # the baseline state dict's per-module metadata (``state_dict()._metadata``: versions that
    # some modules' ``_load_from_state_dict`` reads), kept for inverse transfer
    state_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    capture: str = "torch.fx"  # how the baseline was captured: torch.fx, torch.export or onnx
    input_name: str | None = None  # the baseline takes its image as this keyword argument
    output_spec: dict[str, Any] | None = None  # the baseline's output structure
    # the image input's dims: channels_first (N, C, spatial...) or channels_last
    # (N, spatial..., C, as TensorFlow conversions have it); shapes given to the checks and
    # reports are in the input's own order, canonical() reorders them as N, C, spatial...
    input_layout: str = "channels_first"
    # training mode keeps BatchNorm on its running statistics (freeze_batchnorm)
    frozen_batchnorm: bool = False
    # the baseline's state-dict keys and shapes: inverse refuses a dense model that no longer
    # has them (empty in checkpoints written before it was recorded: not checked)
    state_shapes: dict[str, list[int]] = field(default_factory=dict)
    # baseline node -> {"dense": dense node, "dims": [(kind, step, axis)...], "n_extra",
    # "flat"} for every value that carries a map: what the per-node phase proof compares
    # (empty in checkpoints written before it was recorded: that proof is not available)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per input axis, the outputs' receptive field: [size, step, reach lo, reach hi] in input
    # pixels (core.lattice.Field); empty where not recorded (files written before it was)
    out_field: list[list[int]] = field(default_factory=list)
    # per input axis, with window pooling: [pixels before an output's lattice point where
    # the input it reads starts, how many it reads] (empty: not window-pooled, or older files)
    support: list[list[int]] = field(default_factory=list)

    @property
    def channels_last(self) -> bool:
        return self.input_layout == "channels_last"

    def canonical(self, shape) -> tuple[int, ...]:
        """An input shape as (N, C, spatial...)."""
        shape = tuple(shape)
        return (shape[0], shape[-1], *shape[1:-1]) if self.channels_last else shape

    def input_shape(self, canonical) -> tuple[int, ...]:
        """A (N, C, spatial...) shape in the input's own order."""
        c = tuple(canonical)
        return (c[0], *c[2:], c[1]) if self.channels_last else c

    def spatial_dim(self, i: int) -> int:
        """The input dim of spatial axis ``i``."""
        return 1 + i if self.channels_last else 2 + i

    @property
    def total_step(self) -> tuple[int, ...]:
        """The largest lattice step the model reaches (per spatial axis)."""
        best: tuple[int, ...] = ()
        for r in self.records:
            for steps in (tuple(r["step_in"]), tuple(r["step_out"])):
                if math.prod(steps) > math.prod(best) or len(steps) > len(best):
                    best = steps
        return best

    @property
    def axis_steps(self) -> tuple[int, ...]:
        """The total lattice step for each spatial axis of the input (1 for an axis that is
        never strided)."""
        nd = len(self.example_shape) - 2
        steps = tuple(self.total_step[:nd])
        return steps + (1,) * (nd - len(steps))

    @property
    def size_steps(self) -> tuple[int, ...]:
        """The lattice step per axis to choose input sizes by (checks, exports): the total step,
        but never more than the example's size, since a step beyond the input adds no
        position to check (a layer whose window exceeds its input)."""
        example = self.canonical(self.example_shape)
        return tuple(min(s, h) for s, h in zip(self.axis_steps, example[2:]))

    def layer_records(self) -> list[LayerRecord]:
        return [LayerRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                for r in self.records]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> DenseInfo:
        data = json.loads(text)
        return DenseInfo(**data)


def info(dense: Any) -> DenseInfo:
    """The :class:`DenseInfo` of a dense model (its ``econv`` attribute), or the record
    itself."""
    meta = dense if isinstance(dense, DenseInfo) else getattr(dense, "econv", None)
    if not isinstance(meta, DenseInfo):
        raise InvalidInputError("not a dense model made by econv-convert (no .econv record)")
    return meta
