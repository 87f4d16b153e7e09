"""The Python API: densify, inverse, save_dense, load_dense.

A dense model is a ``torch.fx.GraphModule`` whose ``state_dict()`` has exactly the baseline's
keys and shapes (fully connected heads keep their Parameter; it is reshaped at run time), and
whose ``econv`` attribute (:class:`DenseInfo`) records how it was made: enough to rebuild the
baseline (``inverse``) and to read the baseline's outputs off the dense ones (``lattice_view``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from econv_convert import ops, outputs
from econv_convert.errors import InvalidInputError, InvalidModelError, TransferError, describe
from econv_convert.fxgraph import capture, module_of_error, shape_prop
from econv_convert.rewrite import GLOBAL_POOL_MODES, LayerRecord, Rewriter
from econv_convert.serialize import graph_from_json, graph_to_json

FORMAT = "econv-convert/dense"
FORMAT_VERSION = 1


@dataclass
class DenseInfo:
    """How a dense model was made. Plain data: stored as JSON in dense checkpoints."""

    example_shape: list[int]
    global_pool: str
    until: str | None
    outputs: list[dict[str, Any]]  # per output tensor: dense dims (kind, step), base_ndim
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
    capture: str = "torch.fx"  # how the baseline was captured: torch.fx or torch.export
    input_name: str | None = None  # the baseline takes its image as this keyword argument
    output_spec: dict[str, Any] | None = None  # the baseline's output structure (outputs.py)

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
        return tuple(min(s, h) for s, h in zip(self.axis_steps, self.example_shape[2:]))

    def layer_records(self) -> list[LayerRecord]:
        return [LayerRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                for r in self.records]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> DenseInfo:
        data = json.loads(text)
        return DenseInfo(**data)


def _example(model: nn.Module, example_input: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(example_input, torch.Tensor):
        return example_input
    shape = tuple(int(v) for v in example_input)
    if len(shape) < 3 or any(v < 1 for v in shape):
        raise InvalidInputError(f"input shape {shape} must be N,C,spatial... with positive sizes")
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else "cpu"
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def densify(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    global_pool: str = "phase",
    until: str | None = None,
    output_stride: int | None = None,
    input_name: str | None = None,
) -> fx.GraphModule:
    """The dense model of ``model``.

    ``example_input`` (a tensor or a shape ``N, C, spatial...``) is used to trace shapes; the
    result is exact for any input size the baseline accepts. ``global_pool`` is ``phase`` (one
    output per lattice phase; phase 0 is the baseline), ``lattice`` (the baseline's pool) or
    ``dense`` (every position: a different function). ``until`` cuts the model after module
    ``until`` (a name from ``named_modules()``). ``output_stride`` K keeps the baseline's
    strides until the cumulative stride reaches K and turns the rest into dilation (DeepLab
    style); the output lattice step is then total stride / K. K must be reachable that way.
    ``input_name`` calls the model with its image as that keyword argument
    (``model(pixel_values=x)``); the dense model takes it positionally or by that name.
    The dense model returns what the model returns: a tensor, a tuple, a dict or an output
    class (see :mod:`econv_convert.outputs`), with every map over the input made dense.

    Raises :class:`UnsupportedLayerError` naming the node when a layer is not
    translation-equivariant on the lattice. The model is not modified; a model in training mode
    is densified in eval mode (a note in ``dense.econv.notes`` says so).
    """
    if global_pool not in GLOBAL_POOL_MODES:
        raise InvalidInputError(
            f"global pool mode '{global_pool}' is not one of {', '.join(GLOBAL_POOL_MODES)}")
    if output_stride is not None and output_stride < 1:
        raise InvalidInputError(f"--output-stride must be a positive integer, not {output_stride}")
    notes = []
    if model.training:
        notes.append("the model was in training mode: densified in eval mode (BatchNorm uses "
                     "running statistics, dropout is off)")
    baseline = copy.deepcopy(model).eval()
    x = _example(baseline, example_input)
    captured = capture(baseline, x, until=until, input_name=input_name)
    gm = captured.gm
    values = shape_prop(gm, x)
    rewriter = Rewriter(gm, values, global_pool, output_stride)
    graph, plan = rewriter.run()
    if output_stride is not None:
        _check_output_stride(output_stride, plan, rewriter)
    dense = fx.GraphModule(gm, graph)
    _restore_keys(dense, baseline)
    dense.econv = DenseInfo(
        example_shape=list(x.shape),
        global_pool=global_pool,
        until=until,
        outputs=_as_json([o | {"name": n} for o, n in
                          zip(plan.outputs, outputs.names(captured.output_spec))]),
        records=_as_json([asdict(r) for r in plan.records]),
        notes=notes + captured.notes + plan.notes,
        has_padding=plan.has_padding,
        global_pools=plan.global_pools,
        specialized=plan.specialized,
        baseline_graph=graph_to_json(gm.graph),
        params=[k for k, _ in baseline.named_parameters()],
        output_stride=output_stride,
        peak_elements=plan.peak_elements,
        peak_node=plan.peak_node,
        state_metadata=state_metadata(baseline),
        capture=captured.method,
        input_name=input_name,
        output_spec=_as_json(captured.output_spec),
    )
    set_versions(dense, dense.econv.state_metadata)
    dense.eval()
    return dense


def _check_output_stride(k: int, plan, rewriter: Rewriter) -> None:
    cumulative = {max(f.step for f in fs) for fs in rewriter.fields.values() if fs} | {1}
    total = max(cumulative)
    kept = max(plan.kept_stride, default=1)
    if total % k or kept != min(k, total) or k > total:
        raise InvalidInputError(
            f"--output-stride {k} cannot be reached: the model's total stride is {total}; "
            f"reachable output strides: {', '.join(map(str, sorted(cumulative)))}")


def _as_json(value: Any) -> Any:
    """The value as it reads back from a checkpoint (tuples become lists)."""
    return json.loads(json.dumps(value))


def _restore_keys(dense: nn.Module, baseline: nn.Module) -> None:
    """Give ``dense`` every parameter and buffer of ``baseline`` that its graph does not use
    (layers past ``until``, BatchNorm's ``num_batches_tracked``), so the state dicts match."""
    have = set(dense.state_dict().keys())
    persistent = set(baseline.state_dict().keys())
    for name, p in baseline.named_parameters():
        if name not in have:
            _set(dense, name, p, parameter=True)
    for name, b in baseline.named_buffers():
        if name not in have and name in persistent:
            _set(dense, name, b, parameter=False)


def state_metadata(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The JSON-safe part of ``model.state_dict()._metadata`` (module versions)."""
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {prefix: {k: v for k, v in entry.items() if isinstance(v, (int, str, bool))}
            for prefix, entry in meta.items()}


def set_versions(root: nn.Module, metadata: dict[str, dict[str, Any]]) -> None:
    """Give the modules of a rebuilt model (plain containers) the baseline's state-dict
    versions, so that its ``state_dict()`` loads into the baseline's own classes."""
    for prefix, entry in metadata.items():
        if "version" not in entry:
            continue
        try:
            module = root.get_submodule(prefix) if prefix else root
        except AttributeError:
            continue  # a module without parameters or buffers: nothing of it is stored
        module._version = entry["version"]


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as a file should hold it: detached, contiguous CPU copies, with
    the per-module metadata (versions) kept."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone().contiguous()) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out


def _set(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if parameter:
        mod.register_parameter(leaf, value if isinstance(value, nn.Parameter)
                               else nn.Parameter(value))
    else:
        mod.register_buffer(leaf, value)


def info(dense: nn.Module) -> DenseInfo:
    meta = getattr(dense, "econv", None)
    if not isinstance(meta, DenseInfo):
        raise InvalidInputError("not a dense model made by econv-convert (no .econv record)")
    return meta


def lattice_view(dense: nn.Module, out: Any) -> Any:
    """The baseline's outputs read off the dense model's outputs (lattice points, phase 0),
    in the same structure."""
    specs = info(dense).outputs
    return outputs.map_tensors(
        out, lambda i, t: ops.lattice_view(t, specs[i]["dims"], specs[i]["base_ndim"]))


def _build(graph_json: str, state: dict[str, torch.Tensor], params: Sequence[str],
           metadata: dict[str, dict[str, Any]] | None = None) -> fx.GraphModule:
    root = nn.Module()
    params = set(params)
    for name, t in state.items():
        _set(root, name, nn.Parameter(t, requires_grad=t.is_floating_point()) if name in params
             else t, parameter=name in params)
    graph = graph_from_json(graph_json)
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in state:
            raise InvalidInputError(f"the stored graph reads '{n.target}', which the weights lack")
    gm = fx.GraphModule(root, graph)
    _restore_keys(gm, root)  # GraphModule copies only what its graph reads
    set_versions(gm, metadata or {})
    return gm


def inverse(dense: nn.Module) -> fx.GraphModule:
    """The baseline model carrying the dense model's (possibly fine-tuned) weights.

    Its ``state_dict()`` loads into the original baseline class as it is.
    """
    meta = info(dense)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    try:
        baseline = _build(meta.baseline_graph, state, meta.params, meta.state_metadata)
    except InvalidInputError as e:
        raise TransferError(f"cannot rebuild the baseline: {e}") from None
    baseline.econv_example_shape = list(meta.example_shape)
    return baseline.eval()


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with a one-line error naming missing, unexpected and mismatched keys,
    and naming the module when the model's own loading code raises."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        if mismatched:
            parts.append("shape mismatch " + _some(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        raise TransferError(f"{what} do not fit the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state)
    except Exception as e:  # the model's own _load_from_state_dict, or a hook
        raise InvalidModelError(f"loading {what} fails in the model's own code"
                                f"{module_of_error(e, model)} ({describe(e)})") from e


def _some(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Dense checkpoints


def save_dense(dense: nn.Module, path: str | os.PathLike) -> Path:
    """Write a dense checkpoint (``.pt``) that :func:`load_dense` reads without unpickling code.

    The file is written beside its target, read back with :func:`load_dense`, and renamed into
    place only then: a checkpoint that would not load is never written.
    """
    meta = info(dense)
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "graph": graph_to_json(dense.graph),
        "info": meta.to_json(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in dense.state_dict().items()},
    }

    def reads_back(tmp: Path) -> None:
        try:
            load_dense(tmp)
        except InvalidInputError as e:
            reason = str(e).removeprefix(f"{tmp}: ")
            raise InvalidInputError(f"{path}: not written, the dense checkpoint would not load "
                                    f"back ({reason})") from None

    atomic_write(path, lambda f: torch.save(payload, f), check=reads_back)
    return path


def load_dense(path: str | os.PathLike) -> fx.GraphModule:
    """Load a dense checkpoint written by :func:`save_dense` into a trainable module."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidInputError(
            f"{path}: not a readable dense checkpoint ({describe(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"{path}: not a dense checkpoint written by econv-convert")
    if payload.get("version") != FORMAT_VERSION:
        raise InvalidInputError(f"{path}: dense checkpoint version {payload.get('version')} "
                                f"is not supported (expected {FORMAT_VERSION})")
    try:
        meta = DenseInfo.from_json(payload["info"])
        dense = _build(payload["graph"], payload["state_dict"], meta.params,
                       meta.state_metadata)
    except InvalidInputError as e:
        raise InvalidInputError(f"{path}: {e}") from None
    except Exception as e:  # damaged or edited by hand: one line, never a traceback
        raise InvalidInputError(f"{path}: damaged dense checkpoint ({describe(e)})") from None
    dense.econv = meta
    return dense.eval()


def atomic_write(path: Path, write, check=None) -> None:
    """Write through a temporary file in the target folder, renamed into place on success.
    ``check(tmp)``, if given, runs on the complete temporary file before the rename; if it
    raises, nothing is left behind."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidInputError(f"{path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
