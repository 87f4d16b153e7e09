"""What the workflows (:mod:`econv_convert.workflow`) return: one result class per command,
each with ``ok`` where a check decides and ``to_dict()`` for reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Densified:
    """What :func:`densify_file` made: the dense model (``dense``, a module or an ONNX
    graph), how it was made (``info``), its verification, whether ``output`` was written and,
    for ``.pt2``/``.onnx`` exports of a PyTorch model, the export's re-check."""

    source: Path
    output: Path | None
    written: bool
    info: Any
    verification: Any = None
    export_check: Any = None
    dense: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.source),
                "output": str(self.output) if self.written else None,
                "verification": self.verification.to_dict() if self.verification else None,
                "export_check": self.export_check.__dict__ if self.export_check else None}


@dataclass
class Verified:
    """What :func:`verify_file` found: ``model`` against ``dense`` (a file, or MODEL densified
    in memory when None)."""

    source: Path
    dense_path: Path | None
    info: Any
    verification: Any

    @property
    def ok(self) -> bool:
        return self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.source),
                "dense": str(self.dense_path) if self.dense_path else None,
                "verification": self.verification.to_dict()}


@dataclass
class Inverted:
    """What :func:`inverse_file` wrote: the baseline's weights (PyTorch) or graph (ONNX) taken
    from the dense model, written only if the baseline reproduces it; ``what`` says what the
    file holds."""

    dense_path: Path
    output: Path
    verification: Any
    what: str

    @property
    def ok(self) -> bool:
        return self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        return {"dense": str(self.dense_path),
                "output": str(self.output) if self.ok else None,
                "verification": self.verification.to_dict()}


@dataclass
class Inspected:
    """What :func:`inspect_file` planned: how the dense model is made (``info``) and, per
    layer, its lattice step, field, sizes and multiply-adds (``plan``); nothing was run."""

    source: Path
    info: Any
    plan: Any

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.source), "dense": info_dict(self.info),
                "plan": self.plan.to_dict()}


@dataclass
class Benched:
    """What :func:`bench_file` timed, at input ``shape``."""

    source: Path
    shape: list[int]
    result: Any  # econv_convert.run.bench.BenchResult

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.source), **self.result.to_dict()}


def info_dict(meta) -> dict[str, Any]:
    """The parts of a dense record a report shows, as plain data."""
    from econv_convert import report

    return {
        "global_pool": meta.global_pool,
        "until": meta.until,
        "output_stride": meta.output_stride,
        "total_step": list(meta.total_step),
        "example_shape": meta.example_shape,
        "layers": meta.records,
        "outputs": meta.outputs,
        "notes": meta.notes,
        "training": report.training_mode(meta),
    }
