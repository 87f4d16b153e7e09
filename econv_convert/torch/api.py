"""The PyTorch API: densify, inverse, lattice_view, cut (dense checkpoints: :mod:`.storage`).

A dense model is a ``torch.fx.GraphModule`` whose ``state_dict()`` has exactly the baseline's
keys and shapes (fully connected heads keep their Parameter; it is reshaped at run time), and
whose ``econv`` attribute (:class:`DenseInfo`) records how it was made: enough to rebuild the
baseline (``inverse``) and to read the baseline's outputs off the dense ones (``lattice_view``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from econv_convert.cases import read_lattice
from econv_convert.core.records import GLOBAL_POOL_MODES, DenseInfo, info
from econv_convert.core.walk import require_output_stride
from econv_convert.errors import (
    EConvError,
    InvalidInputError,
    InvalidModelError,
    TransferError,
    describe,
)
from econv_convert.torch import outputs
from econv_convert.torch.capture import capture, module_of_error, shape_prop
from econv_convert.torch.module import DenseModule
from econv_convert.torch.rewrite import Rewriter
from econv_convert.torch.state import restore_keys, set_versions, state_metadata
from econv_convert.torch.storage import (
    build_module,
    dense_pt2_record,
    graph_to_json,
    is_dense_checkpoint,
)


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
    capture_with: str = "auto",
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
    class (see :mod:`econv_convert.torch.outputs`), with every map over the input made dense.
    ``capture_with`` is ``auto`` (torch.fx, then torch.export where fx cannot trace the
    model), ``torch.fx`` or ``torch.export``.

    Raises :class:`UnsupportedLayerError` naming the node when a layer is not
    translation-equivariant on the lattice. The model is not modified; a model in training mode
    is densified in eval mode (a note in ``dense.econv.notes`` says so).
    """
    if global_pool not in GLOBAL_POOL_MODES:
        raise InvalidInputError(
            f"global pool mode '{global_pool}' is not one of {', '.join(GLOBAL_POOL_MODES)}")
    require_output_stride(output_stride)
    notes = []
    if model.training:
        notes.append("the model was in training mode: densified in eval mode (BatchNorm uses "
                     "running statistics, dropout is off)")
    baseline = copy.deepcopy(model).eval()
    x = _example(baseline, example_input)
    try:
        captured = capture(baseline, x, until=until, input_name=input_name,
                           method=capture_with)
        gm = captured.gm
        values = shape_prop(gm, x)
        rewriter = Rewriter(gm, values, global_pool, output_stride)
        graph, rewritten = rewriter.run()
    except EConvError:
        raise
    except Exception as e:  # a user's model must never end in an internal error
        raise InvalidModelError(
            f"econv-convert could not process the model{module_of_error(e, baseline)} "
            f"({describe(e, 160)}); this is a limit of econv-convert: please report it, "
            "or densify the part before that module with until=...") from e
    if not rewritten.outputs:
        raise InvalidModelError("the model returns no tensor: nothing to densify")
    rewriter.reached(output_stride)
    dense = DenseModule(gm, graph)
    restore_keys(dense, baseline)
    dense.econv = DenseInfo(
        example_shape=list(x.shape),
        global_pool=global_pool,
        until=until,
        outputs=_as_json([o | {"name": n} for o, n in
                          zip(rewritten.outputs, outputs.names(captured.output_spec))]),
        records=_as_json([asdict(r) for r in rewritten.records]),
        notes=notes + captured.notes + rewritten.notes,
        has_padding=rewritten.has_padding,
        global_pools=rewritten.global_pools,
        specialized=rewritten.specialized,
        baseline_graph=graph_to_json(gm.graph),
        params=[k for k, _ in baseline.named_parameters()],
        output_stride=output_stride,
        peak_elements=rewritten.peak_elements,
        peak_node=rewritten.peak_node,
        state_metadata=state_metadata(baseline),
        capture=captured.method,
        input_name=input_name,
        output_spec=_as_json(captured.output_spec),
        state_shapes={k: list(v.shape) for k, v in baseline.state_dict().items()},
        nodes=_as_json(rewritten.nodes),
        out_field=rewritten.out_field,
        support=rewritten.support,
    )
    set_versions(dense, dense.econv.state_metadata)
    dense.eval()
    return dense


def _as_json(value: Any) -> Any:
    """The value as it reads back from a checkpoint (tuples become lists)."""
    return json.loads(json.dumps(value))


def lattice_view(dense: nn.Module | DenseInfo, out: Any) -> Any:
    """The baseline's outputs read off the dense model's outputs (lattice points, phase 0),
    in the same structure. ``dense``: the dense model, or its :class:`DenseInfo`."""
    specs = (dense if isinstance(dense, DenseInfo) else info(dense)).outputs
    return outputs.map_tensors(
        out, lambda i, t: read_lattice(t, specs[i]["dims"], specs[i]["base_ndim"]))


class _Reached(Exception):
    """Raised by :class:`Cut`'s hook once the module it cuts at has run."""


class Cut(nn.Module):
    """``model`` up to its module ``until``: the output of that module, and nothing of the
    model after it runs (a head that only accepts one size does not matter). The weights are
    the model's own, under ``model.``."""

    def __init__(self, model: nn.Module, until: str) -> None:
        super().__init__()
        if until not in dict(model.named_modules()):
            raise InvalidInputError(f"until={until}: the model has no module named '{until}'")
        self.model, self.until = model, until
        self.econv_ends_at = until  # as a baseline: its output is already that module's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        reached: list[Any] = []

        def stop(module, inputs, out):
            reached.append(out)
            raise _Reached

        handle = self.model.get_submodule(self.until).register_forward_hook(stop)
        try:
            self.model(*args, **kwargs)
        except _Reached:
            return reached[0]
        finally:
            handle.remove()
        raise InvalidInputError(f"until={self.until}: the model ran without calling that "
                                "module")


def cut(model: nn.Module, until: str) -> Cut:
    """The part of ``model`` that computes the output of its module ``until`` (a name from
    ``named_modules()``): the baseline a dense model made with ``until=`` reproduces."""
    return Cut(model, until)


def is_dense(model: Any) -> bool:
    """Whether ``model`` is a dense PyTorch model made by econv-convert: a module with its
    record, or a file of one (a dense checkpoint or a dense ``.pt2``; no code is read). The
    package's :func:`econv_convert.is_dense` also tells dense ONNX graphs."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix.lower() == ".pt2":
            return dense_pt2_record(path) is not None
        return is_dense_checkpoint(path)
    return isinstance(getattr(model, "econv", None), DenseInfo)


def inverse(dense: nn.Module) -> fx.GraphModule:
    """The baseline model carrying the dense model's (possibly fine-tuned) weights.

    Its ``state_dict()`` loads into the original baseline class as it is.
    """
    meta = info(dense)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    _check_structure(state, meta.state_shapes)
    try:
        baseline = build_module(meta.baseline_graph, state, meta.params, meta.state_metadata)
    except InvalidInputError as e:
        raise TransferError(f"cannot rebuild the baseline: {e}") from None
    baseline.econv_example_shape = list(meta.example_shape)
    # the recorded graph ends where densify stopped (``until``): its output is that module's
    baseline.econv_ends_at = meta.until
    return baseline.eval()


def _check_structure(state: dict[str, torch.Tensor], recorded: dict[str, list[int]]) -> None:
    """Refuse a dense model whose weights no longer have the baseline's names and shapes (a
    replaced head, an added or removed module): its weights would not load into the baseline
    class, or would load into the wrong places."""
    if not recorded:
        return
    missing = [k for k in recorded if k not in state]
    added = [k for k in state if k not in recorded]
    reshaped = [f"{k} {tuple(recorded[k])} -> {tuple(state[k].shape)}" for k in recorded
                if k in state and list(state[k].shape) != recorded[k]]
    if not (missing or added or reshaped):
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = [f"{what}: {some(names)}" for what, names in
             (("missing", missing), ("not in the baseline", added), ("reshaped", reshaped))
             if names]
    raise TransferError(
        "the dense model's weights no longer match its baseline's structure ("
        + "; ".join(parts) + "); inverse transfer moves the baseline's own weights back: "
        "densify the changed baseline instead")
