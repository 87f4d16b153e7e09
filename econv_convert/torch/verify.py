"""Verification of PyTorch dense models: the runs that :func:`econv_convert.check.check`
compares, in float64 on CPU copies by default (see :mod:`econv_convert.check`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from econv_convert.cases import VerifyReport
from econv_convert.check import (
    Checks,
    _lattice_case,
    _names,
    check,
    default_shapes,
    default_tolerance,
    one_size,
)
from econv_convert.errors import (
    EConvError,
    InvalidModelError,
    SizeNotCovered,
    describe,
)
from econv_convert.torch import outputs, phases
from econv_convert.torch.api import info, inverse
from econv_convert.torch.capture import shape_prop


def checked(baseline: nn.Module, dense: nn.Module, options: Checks) -> VerifyReport:
    """:func:`econv_convert.equivalence.verify` of two PyTorch modules: in float64 CPU copies
    (``precision`` ``float64``) unless a kernel is missing, else as they are."""
    precision = options.precision
    meta = info(dense)
    baseline, dense = baseline.eval(), dense.eval()
    ref = next(iter(dense.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    runs = _Runs(meta, baseline, dense)
    depth = len(meta.records)
    notes = []
    with torch.no_grad():
        if precision == "float64" and dtype != torch.float64 and one_size(meta, options):
            # one input size, where a dense pass costs about the total stride squared times
            # the baseline (float64 convolutions, dilated, go through im2col: gigabytes):
            # end to end once in the model's dtype, every phase of every node in float64
            wide_tol = default_tolerance(torch.float64, options.atol, options.rtol)
            try:  # one copy of the baseline graph for the proof and the head check
                rebuilt = inverse(dense) if isinstance(dense, torch.fx.GraphModule) else None
            except EConvError:
                rebuilt = None  # the proof says why
            report = check(meta, runs.baseline, runs.dense, options, device=device,
                           dtype=dtype, prove=_prover(dense, torch.float64, wide_tol, rebuilt),
                           depth=depth, head=lambda x, proof, tol: phases.head_check(
                               dense, x.to("cpu"), proof, wide_tol, baseline=rebuilt,
                               reference=(runs.baseline, tol)))
            if not any(c.detail.startswith("the ") and " layers after " in c.detail
                       for c in report.checked if c.check == "lattice"):
                report.notes.insert(0, f"the lattice checked in {_name(dtype)} (the model's "
                                    "own dtype) at its one input size; every phase of every "
                                    "node in float64 on small maps")
            return report
        if precision == "float64" and dtype != torch.float64:
            try:
                wide = _Runs(meta, _float64_copy(baseline), _float64_copy(dense))
                wide.probe(meta, torch.float64)
            except _NoFloat64 as e:
                notes.append(f"the model cannot run in float64 ({e}): checked in {dtype} "
                             "with its tolerances instead")
            else:
                report = check(meta, wide.baseline, wide.dense, options, device="cpu",
                               dtype=torch.float64, prove=_prover(wide.dense_model),
                               depth=depth)
                report.native = _native_error(meta, runs, report, device, dtype,
                                               options.seed)
                return report
        report = check(meta, runs.baseline, runs.dense, options, device=device, dtype=dtype,
                       prove=_prover(dense), depth=depth)
    report.notes[:0] = notes
    return report


def _prover(dense: nn.Module, dtype: torch.dtype | None = None,
            tol: tuple[float, float] | None = None, baseline: nn.Module | None = None):
    """The per-node phase proof of ``dense`` as the check calls it: on one input, with the
    check's tolerance (or in ``dtype`` with ``tol``); ``baseline``: its rebuilt graph."""
    if dtype is None:
        return lambda x, check_tol: phases.prove_model(dense, x, check_tol)
    return lambda x, check_tol: phases.prove_model(dense, x.to("cpu", dtype), tol, baseline)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float64_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in float64 (a GraphModule's copy keeps its DenseInfo)."""
    wide = copy.deepcopy(model).to("cpu", torch.float64)
    for name in ("econv", "econv_ends_at"):  # what a GraphModule's copy drops
        if hasattr(model, name):
            setattr(wide, name, getattr(model, name))
    return wide


class _NoFloat64(Exception):
    """A model that cannot run in float64 (an op without a double kernel)."""


class _Runs:
    """The baseline and dense runs ``check`` calls, for one pair of models."""

    def __init__(self, meta, baseline: nn.Module, dense: nn.Module) -> None:
        self.meta, self.base_model, self.dense_model = meta, baseline, dense
        self.specialized = _specialized_checker(dense, meta)

    def baseline(self, x: torch.Tensor):
        why = self.specialized(x)
        if why:
            return None, why
        out, why = _run_baseline(self.base_model, x, self.meta.until,
                                 getattr(self.meta, "input_name", None))
        return (_flat(out) if out is not None else None), why

    def dense(self, x: torch.Tensor):
        return _flat(_run_dense(self.dense_model, x))

    def probe(self, meta, dtype: torch.dtype) -> None:
        """Run the baseline once in ``dtype``, at the smallest size the check uses (a
        ResNet-50 in float64 at its example size takes half a minute); _NoFloat64 if a kernel
        is missing (the error names the dtype). The dense graph calls the same kernels; a
        kernel only it needs would fail the check, which says so."""
        shape = meta.input_shape(min(default_shapes(meta)[0], key=math.prod))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        try:
            _run_baseline(self.base_model, x, meta.until, getattr(meta, "input_name", None),
                          raise_errors=True)
        except SizeNotCovered:
            pass
        except Exception as e:
            text = str(e)
            if "Double" in text or "double" in text or "dtype" in text or "Float" in text:
                raise _NoFloat64(describe(e, 100)) from e
            # any other failure (a size the baseline rejects): the check will say


def _native_error(meta, runs: _Runs, report: VerifyReport, device, dtype,
                  seed: int) -> dict[str, Any] | None:
    """The error at the model's own dtype on the smallest checked input, for information."""
    first = min((c for c in report.checked if c.check == "lattice"),
                key=lambda c: c.shape[0] * math.prod(c.shape[2:]), default=None)
    if first is None:
        return None
    x = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    try:
        case = _lattice_case(meta, runs.baseline, runs.dense, x, (1.0, 1.0),
                             _names(meta, report.outputs))
    except Exception as e:  # e.g. half precision kernels missing on the CPU
        return {"dtype": str(dtype).removeprefix("torch."), "shape": list(first.shape),
                "error": describe(e, 100)}
    return {"dtype": str(dtype).removeprefix("torch."), "shape": list(first.shape),
            "max_abs": case.max_abs,
            "max_error_over_scale": case.max_abs / case.scale if case.scale else 0.0}


def _specialized_checker(dense: nn.Module, meta) -> Callable[[torch.Tensor], str]:
    """For models with size-specialized layers (adaptive pools), a function that says why an
    input is outside the specialization (empty when it is inside)."""
    if not meta.specialized:
        return lambda x: ""
    gm = inverse(dense)
    names = {n.name: n for n in gm.graph.nodes}

    def check(x: torch.Tensor) -> str:
        values = shape_prop(gm, x)
        for name, size in meta.specialized.items():
            arg = names[name].args[0]
            got = list(values[arg].shape[2:])
            if got != list(size):
                return (f"adaptive pool '{name}' sees {tuple(got)} here, but the dense model is "
                        f"specialized to {tuple(size)}")
        return ""

    return check


def _run_baseline(baseline: nn.Module, x: torch.Tensor, until: str | None,
                  input_name: str | None = None, raise_errors: bool = False
                  ) -> tuple[Any, str]:
    """The baseline's output, or that of its module ``until``, captured by a hook (the layers
    after it may reject the size; that does not matter then)."""
    captured: list[Any] = []
    handle = None
    if until is not None and getattr(baseline, "econv_ends_at", None) == until:
        until = None  # a baseline rebuilt by inverse(): its graph already ends there
    if until is not None:
        # a copy: the model may change the tensor in place after the cut point (an in-place
        # ReLU right after a "features" module), which must not change the reference
        handle = baseline.get_submodule(until).register_forward_hook(
            lambda m, args, out: captured.append(_copied(out)))
    try:
        out = baseline(**{input_name: x}) if input_name else baseline(x)
        return (captured[0] if captured else out), ""
    except Exception as e:  # a fixed-size head rejects other sizes: not a failure
        if captured:
            return captured[0], ""
        if raise_errors:
            raise
        return None, f"the baseline rejects this size ({describe(e, 70)})"
    finally:
        if handle is not None:
            handle.remove()


def _copied(out: Any) -> Any:
    return outputs.map_tensors(out, lambda i, t: t.clone())


def _run_dense(dense: nn.Module, x: torch.Tensor) -> Any:
    try:
        return dense(x)
    except SizeNotCovered:
        raise
    except Exception as e:  # a damaged dense file, or a bug: either way say where
        raise InvalidModelError(f"the dense model fails on an input of shape {tuple(x.shape)} "
                                f"({describe(e, 160)})") from e


def _flat(out: Any) -> list[torch.Tensor]:
    return outputs.flatten(out)[0]
