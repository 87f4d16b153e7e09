"""What one numerical check found, and how a dense output is compared with the baseline's:
the leaf that :mod:`econv_convert.check`, :mod:`econv_convert.shift` and both backends' proofs
share."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from econv_convert.core.records import HEAD_KIND

RunBaseline = Callable[[torch.Tensor], tuple[list[torch.Tensor] | None, str]]
RunDense = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class Case:
    check: str  # "lattice", "phases" or "shift"
    shape: tuple[int, ...]
    max_abs: float = 0.0
    scale: float = 0.0
    ok: bool = True
    detail: str = ""  # where the worst error is, or why the case was skipped
    skipped: bool = False
    offset: tuple[int, ...] = ()
    output: str = ""  # the compared output with the largest error (relative to its scale)
    seconds: float = 0.0
    # shift: the compared output indices per axis (first, last), the window's interior
    region: tuple[tuple[int, int], ...] = ()


@dataclass
class VerifyReport:
    cases: list[Case] = field(default_factory=list)
    atol: float = 1e-5
    rtol: float = 1e-4
    notes: list[str] = field(default_factory=list)
    precision: str = "float32"  # the dtype both models ran in
    outputs: list[str] = field(default_factory=list)  # the outputs compared
    # the error at the model's own dtype, on one input, for information: dtype, shape,
    # max_abs, max_error_over_scale (None when the check already ran in that dtype)
    native: dict[str, Any] | None = None
    # the per-node phase proof (:class:`econv_convert.proof.PhaseProof`), when it ran
    proof: Any = None
    seconds: float = 0.0

    def proven(self) -> dict[str, Any]:
        """What the checks that passed cover, in words a report can print."""
        kinds = {k: [c for c in self.checked if c.check == k]
                 for k in ("lattice", "phases", "shift")}
        out: dict[str, Any] = {
            "lattice": {"sizes": list(map(list, dict.fromkeys(c.shape[2:]
                                                            for c in kinds["lattice"]))),
                        "checks": len(kinds["lattice"]),
                        "where": "end to end", "precision": self.precision,
                        "seconds": sum(c.seconds for c in kinds["lattice"])}}
        p = self.proof
        out["phases"] = None if p is None or not p.nodes else {
            "nodes": len(p.nodes), "phase_checks": p.phases,
            "where": "each node alone, on small random maps",
            "precision": p.precision or self.precision,
            "not_checked": dict(p.skipped), "seconds": p.seconds}
        shifts = kinds["shift"]
        out["shift"] = None if not shifts else {
            "offsets": len(shifts), "interior": [list(r) for r in shifts[0].region],
            "seconds": sum(c.seconds for c in shifts)}
        return out

    @property
    def checked(self) -> list[Case]:
        return [c for c in self.cases if not c.skipped]

    @property
    def ok(self) -> bool:
        return bool(self.checked) and all(c.ok for c in self.checked)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checked), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_abs / c.scale for c in self.checked if c.scale > 0), default=0.0)

    def failures(self) -> list[Case]:
        return [c for c in self.checked if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "precision": self.precision,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_error": self.max_abs,
            "max_error_over_scale": self.max_rel,
            "native": self.native,
            "outputs": list(self.outputs),
            "cases": [c.__dict__ | {"shape": list(c.shape), "offset": list(c.offset),
                                    "region": [list(r) for r in c.region]}
                      for c in self.cases],
            "proven": self.proven(),
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

def any_size(meta) -> bool:
    """Whether the dense model's structure is the same at every input size: no fully
    connected head over a fixed map and no adaptive pool specialized to the example size."""
    return not meta.specialized and not any(r["kind"] == HEAD_KIND for r in meta.records)


def windowed(meta) -> bool:
    """Whether the model pools globally in ``window`` mode (a fixed window: one size)."""
    return meta.global_pool == "window" and meta.global_pools > 0

def timed(case: Case, since: float) -> Case:
    return replace(case, seconds=time.perf_counter() - since)


def random_input(meta, shape, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """A random input of (N, C, spatial...) ``shape``, in the input's own order."""
    return torch.randn(meta.input_shape(shape), generator=gen,
                       dtype=torch.float64).to(device, dtype)

def not_covered(e: Exception) -> str:
    condition = str(e).rpartition("expression ")[2].partition(" on node")[0]
    return ("the model's Python code takes another branch at this size than at the example "
            f"(where {condition or 'its condition'} held); the dense model does not cover it")

def compare(check, shape, base: list[torch.Tensor], dense: list[torch.Tensor], tol,
             names: list[tuple[int, str]], offset: tuple[int, ...] = ()) -> Case:
    """The worst of the selected outputs (the first failing one, else the largest error
    relative to its scale). Compared in float64 whatever the dtype."""
    atol, rtol = tol
    worst = Case(check, shape, offset=offset)
    for k, name in names:
        b, d = base[k], dense[k]
        if b.shape != d.shape:
            return Case(check, shape, ok=False, offset=offset, output=name,
                        detail=f"{name}: dense gives {tuple(d.shape)} on the lattice, "
                               f"baseline {tuple(b.shape)}")
        b = b.double()
        d = d.double()
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = (d - b).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        max_abs = float(diff.max()) if diff.numel() else 0.0
        bad = diff > atol * max(scale, 1e-300) + rtol * b.abs()
        ok = not bool(bad.any())
        detail = ""
        if not ok:
            flat = int(torch.argmax(diff).item())
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), b.shape))
            detail = (f"{name} at {where}: dense {float(d.flatten()[flat]):.9g} vs "
                      f"baseline {float(b.flatten()[flat]):.9g}")
        rel = max_abs / scale if scale else max_abs
        worst_rel = worst.max_abs / worst.scale if worst.scale else worst.max_abs
        if not ok or rel > worst_rel or not worst.output:
            worst = Case(check, shape, max_abs, scale, ok and worst.ok, detail or worst.detail,
                         offset=offset, output=name)
        if not ok:
            return worst
    return worst


def read_lattice(y: torch.Tensor, dims: Sequence[Sequence], base_ndim: int) -> torch.Tensor:
    """The baseline's output read off a dense output.

    ``dims`` gives each dense dim's ``(kind, step, axis)``: ``plain``, ``space`` (every
    ``step``-th) or ``phase`` (take phase 0). Dims past ``base_ndim`` are extras the baseline
    lacks: after the lattice sampling they have size one and are dropped.
    """
    index = []
    for kind, step, *_ in dims:
        if kind == "space":
            index.append(slice(None, None, step))
        elif kind == "phase":
            index.append(slice(0, 1))
        else:
            index.append(slice(None))
    y = y[tuple(index)]
    if y.dim() > base_ndim:
        extra = y.shape[base_ndim:]
        if any(n != 1 for n in extra):
            return y  # a larger input than the baseline accepts: a map of predictions
        y = y.reshape(y.shape[:base_ndim])
    return y
