"""Writing dense models: ``.pt`` dense checkpoints, ``.pt2`` torch.export programs and
``.onnx`` graphs, the latter two with dynamic spatial axes.

Every export is run again after it is made, on an input of a size other than the one it was
traced at, and compared with the in-memory dense model; a mismatch raises
:class:`EquivalenceError` and nothing is written. Files are written through a temporary file
in the target folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from econv_convert.cases import any_size, windowed
from econv_convert.errors import EquivalenceError, InvalidInputError, InvalidModelError, describe
from econv_convert.files import atomic_write
from econv_convert.torch.api import info
from econv_convert.torch.storage import save_dense

SUFFIXES = (".pt", ".pt2", ".onnx")


@dataclass(frozen=True)
class ExportCheck:
    format: str
    shape: tuple[int, ...]  # the input the export was re-run on
    max_abs: float


def check_suffix(path: Path, what: str = "output") -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidInputError(f"{path}: the {what} must end in .pt (dense checkpoint), .pt2 "
                                "(torch.export program) or .onnx")
    return suffix


def export_shapes(dense: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input the export is traced at and the one it is re-run at: batch 2, then a batch
    and a size that are neither (a check of the dynamic axes).

    A model that takes any input size is traced at the smallest size that gives its last map
    two lattice points (unpadded windows: their receptive field and one step more) and re-run
    two pixels larger,
    never at sizes chosen for the baseline: a dense model at total stride ``s`` costs about
    ``s * s`` times the baseline per pixel (a dense ResNet-50 trunk re-run at 323 x 323 took
    more than 12 GB). Other models (a head over a fixed map, an adaptive pool specialized to
    the example) start from the example size plus two lattice steps, so that no dim has
    size 1, which exporters pin."""

    meta = info(dense)
    n, c, *sp = meta.example_shape
    steps = meta.size_steps
    if any_size(meta) and not windowed(meta):
        base = list(_smallest(meta, steps))
        trace = (2, c, *base)
        check = (3, c, *(h + 2 for h in base))
        return trace, check
    trace = (2, c, *(h + 2 * s for h, s in zip(sp, steps)))
    check = (3, c, *(h + 3 * s + 3 for h, s in zip(sp, steps)))
    return trace, check


def _smallest(meta, steps) -> list[int]:
    """Per axis, the smallest input giving the last map two lattice points: ``s + 1``, or
    what the layers without padding consume (the receptive field less the padding's reach)
    plus one step."""
    fields = meta.out_field if meta.out_field and len(meta.out_field) == len(steps) else None
    out = []
    for i, s in enumerate(steps):
        need = s + 1
        if fields is not None:
            # the field less the padding's reach is what the unpadded layers consume (all of
            # it where nothing pads, part of it where only some layers pad)
            size, _, lo, hi = fields[i]
            need = max(need, size - lo - hi + s)
        elif not meta.has_padding:
            need = max(need, meta.example_shape[2 + i] + s)
        out.append(need)
    return out


def _input_name(dense: nn.Module) -> str:
    return next(n.target for n in dense.graph.nodes if n.op == "placeholder")


def _dynamic(dense: nn.Module, ndim: int) -> dict:
    dims = {i: torch.export.Dim.DYNAMIC for i in range(ndim) if i != 1}  # all but channels
    return {_input_name(dense): dims}


def _inputs(shape, dense) -> torch.Tensor:
    ref = next(iter(dense.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise InvalidModelError("the model returns no tensor")


def _compare(fmt: str, expected: torch.Tensor, got: torch.Tensor, shape) -> ExportCheck:
    got = torch.as_tensor(got)
    if got.shape != expected.shape:
        raise EquivalenceError(f"the {fmt} export gives shape {tuple(got.shape)} at input "
                               f"{shape}, the dense model {tuple(expected.shape)}")
    err = float((got.float() - expected.float()).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if err > 1e-4 * max(scale, 1.0):
        raise EquivalenceError(f"the {fmt} export differs from the dense model by {err:.3g} at "
                               f"input {shape}")
    return ExportCheck(fmt, tuple(shape), err)


def export_pt2(dense: nn.Module) -> tuple[torch.export.ExportedProgram, ExportCheck]:
    trace, check = export_shapes(dense)
    import torch.fx.experimental._config as fx_config

    try:
        with warnings.catch_warnings(), fx_config.patch(backed_size_oblivious=True):
            warnings.simplefilter("ignore")
            program = torch.export.export(dense, (_inputs(trace, dense),),
                                          dynamic_shapes=_dynamic(dense, len(trace)))
    except Exception as e:
        raise InvalidModelError(f"torch.export failed on the dense model ({describe(e)})") from e
    x = _inputs(check, dense)
    with torch.no_grad():
        expected = _first_tensor(dense(x))
        got = _run_export("pt2", lambda: _first_tensor(program.module()(x)), check)
    return program, _compare("pt2", expected, got, check)


def export_onnx(dense: nn.Module) -> tuple[bytes, ExportCheck]:
    import onnx
    import onnxruntime as ort

    trace, check = export_shapes(dense)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(dense, (_inputs(trace, dense),), dynamo=True,
                                        dynamic_shapes=_dynamic(dense, len(trace)),
                                        verbose=False, optimize=True)
        model = program.model_proto
        _mark_dense(model, dense)
        onnx.checker.check_model(model)
        data = model.SerializeToString()
    except Exception as e:
        raise InvalidModelError(f"ONNX export failed on the dense model ({describe(e)})") from e
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    x = _inputs(check, dense)
    with torch.no_grad():
        expected = _first_tensor(dense(x))
    got = _run_export("onnx", lambda: torch.from_numpy(
        session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), check)
    return data, _compare("onnx", expected, got, check)


def _run_export(fmt: str, run, shape) -> torch.Tensor:
    """The export's output at ``shape``, where the dense model runs: an export that fails
    there (a size the trace fixed to its own) is not the dense model."""
    try:
        return run()
    except Exception as e:
        raise EquivalenceError(f"the {fmt} export does not run at input {shape}, where the "
                               f"dense model does ({describe(e, 200)})") from None


def _mark_dense(model, dense: nn.Module) -> None:
    """The dense model's record, as a dense ONNX graph made from an ONNX baseline carries it:
    every command then knows the file for a dense model and reads its geometry. The
    baseline's fx graph stays out (an ONNX file cannot rebuild a PyTorch baseline; inverse
    transfer goes through the .pt)."""
    from dataclasses import replace

    from econv_convert.onnx.api import INFO_KEY

    meta = replace(info(dense), baseline_graph="", state_metadata={})
    model.metadata_props.add(key=INFO_KEY, value=meta.to_json())


def write(dense: nn.Module, path: Path) -> ExportCheck | None:
    """Write ``dense`` in the format named by ``path``'s suffix; returns the export's check."""
    suffix = check_suffix(path)
    if suffix == ".pt":
        save_dense(dense, path)
        return None
    if suffix == ".pt2":
        program, result = export_pt2(dense)
        from econv_convert.torch.storage import DENSE_PT2_KEY

        record = info(dense).to_json()  # every command then knows the file for a dense model
        atomic_write(path, lambda f: torch.export.save(program, f,
                                                       extra_files={DENSE_PT2_KEY: record}))
        return result
    data, result = export_onnx(dense)
    atomic_write(path, lambda f: f.write(data))
    return result
