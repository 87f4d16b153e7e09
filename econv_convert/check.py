"""Numerical proof that a dense model is the baseline's dense equivalent.

Three checks, on random inputs (odd sizes, and sizes that are not multiples of the step):

* **lattice**: ``baseline(x)`` equals the dense output read on the lattice (phase 0), at
  several input sizes;
* **phases** (dense models that are the graph econv-convert made): every phase of every node,
  identity (*) of :mod:`econv_convert.core.lattice`: the baseline's own op on each phase
  sub-map of the dense inputs gives the dense output on that sub-lattice. Complete (every
  position of every node between the lattice points) and cheap (one run of each graph);
* **shift** (models whose outputs have positions): the dense output at the positions of a
  window shifted by ``r`` equals the baseline run on the input cropped at ``r``, for offsets
  that cover every phase of every axis, at every position whose window reads no padding
  (:func:`econv_convert.core.lattice.interior`; every position for unpadded networks).

Both models run in **float64** by default, on CPU copies (the models given are not changed):
the dense graph adds the baseline's terms in another order, and over many layers float32
rounding grows past any tolerance tight enough to catch a real error, while in float64 a
correct dense model agrees to about 1e-13 of the output scale. A case passes when
``|dense - baseline| <= atol * scale + rtol * |baseline|`` everywhere, ``scale`` being the
largest ``|baseline|`` of that output: 1e-9 and 1e-9 in float64. A model that cannot run in
float64 is checked in its own dtype with that dtype's tolerances, and the report says so. The
error at the model's own dtype is measured too, on one input, for information.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from econv_convert.cases import (
    Case,
    RunBaseline,
    RunDense,
    VerifyReport,
    any_size,
    compare,
    not_covered,
    random_input,
    read_lattice,
    timed,
    windowed,
)
from econv_convert.errors import InvalidInputError, SizeNotCovered
from econv_convert.shift import shift_cases, shift_plan

Progress = Callable[[int, int, str], None]
PRECISIONS = ("float64", "model")


def candidate_shapes(example: Sequence[int], st: Sequence[int],
                     compact: bool = False) -> list[tuple[int, ...]]:
    """Input shapes to test: the example, and sizes around it that are odd and not multiples
    of the lattice step ``st`` (one per spatial axis), so ceil-mode ends and tight crops change
    with the size. ``compact`` (for the small sizes) keeps only sizes from the example to one
    step past it."""
    n, c, *sp = (int(v) for v in example)
    shapes = [tuple(sp)]
    shapes.append(tuple(h + 1 + (i % 2) * (st[i] - 1) for i, h in enumerate(sp)))
    if not compact:
        shapes.append(tuple(h + st[i] + 3 + 2 * i for i, h in enumerate(sp)))
    # odd, past the example but short of one more lattice step: same map sizes downstream
    shapes.append(tuple(h + st[i] - 1 - 2 * i if st[i] > 2 * i + 1 else h + 1
                        for i, h in enumerate(sp)))
    if all(h > 3 for h in sp) and not compact:
        shapes.append(tuple(h - 1 - 2 * i for i, h in enumerate(sp)))
    unique = []
    for s in shapes:
        if s not in unique and all(v >= 1 for v in s):
            unique.append(s)
    return [(max(n, 2), c, *s) for s in unique]



def default_tolerance(dtype: torch.dtype, atol: float | None = None,
                      rtol: float | None = None, depth: int = 0) -> tuple[float, float]:
    """``(atol, rtol)``: those given, else by the dtype the check runs in: 1e-9 and 1e-9 in
    float64 (a correct dense model agrees to ~1e-13, so a real error of 1e-6 is caught);
    1e-5 and 1e-4 in float32, widened with the number of layers ``depth`` (rounding grows
    with depth: a correct 50-layer mobile net differs by ~3e-4 of its output scale); 1e-2 in
    fp16/bf16 (half precision rounds at ~1e-3)."""
    if dtype == torch.float64:
        a, r = 1e-9, 1e-9
    elif dtype in (torch.float16, torch.bfloat16):
        a, r = 1e-2, 1e-2
    else:
        a, r = 1e-5 * max(1.0, depth / 5), 1e-4 * max(1.0, depth / 5)
    return (atol if atol is not None else a, rtol if rtol is not None else r)

def default_shapes(meta, near_example: bool = False,
                   lattice_points: int = 2) -> tuple[list[tuple[int, ...]], str]:
    """The input shapes checked by default, and a note on the choice.

    A model that takes any input size is checked at small sizes, from one lattice step plus
    one per axis (every map then has at least two lattice points; odd sizes and sizes that are
    not multiples of the step are among them): the dense graph and its run-time corrections
    are the same at every size, and the check costs a fraction of one pass at the example
    size (a dense ResNet-50 at 224 x 224 takes about 900 G multiply-adds). Other models, and
    ``near_example``, are checked around the example size. ``lattice_points`` is how many
    lattice points the smallest size gives the last map (more for models whose unpadded
    windows need more input)."""
    example = list(meta.canonical(meta.example_shape))
    st = meta.size_steps
    if windowed(meta):
        return [tuple(example)], (
            "window pooling: the dense model is the baseline at the example size only (a "
            "larger input gives one prediction per window position), so it is checked there")
    if not any_size(meta) and not near_example:
        return [(max(example[0], 2), *example[1:])], (
            "one input size: the model takes the example's size only (a head over a fixed "
            "map, or a pool specialized to it), so its lattice is checked there: the head "
            "alone from random maps of its input's sizes where every map before it is proven "
            "node by node, else the whole model once (a dense pass costs about the total "
            "stride squared times the baseline); near=True adds sizes around the example")
    if near_example or not any_size(meta):
        return candidate_shapes(example, st), ""
    # the whole step, even past an example smaller than it (a map of one lattice point has
    # no phase to prove): the model takes any size
    full = meta.axis_steps
    small = [s * (lattice_points - 1) + 1 for s in full]
    if small == example[2:]:
        return candidate_shapes(example, full), ""
    shapes = candidate_shapes(example[:2] + small, full, compact=True)
    sizes = "x".join(map(str, small))
    return shapes, (f"checked at small sizes from {sizes} ({lattice_points} lattice points): "
                    "the model takes any size and its dense graph is the same at every size; "
                    "near=True checks around the example instead")


def spare_shapes(meta, used: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """More sizes near the first of ``used``, tried in place of sizes the baseline rejects (a
    fully connected head takes only the sizes that give its map size; unpadded windows need
    some more input): the report then shows checks, not a list of rejected sizes."""
    n, c, *sp = used[0]
    st = meta.size_steps
    out = []
    for t in range(1, max(st) + 1):
        for sign in (1, -1):
            shape = (max(n, 2), c, *(max(1, h + sign * min(t, s)) for h, s in zip(sp, st)))
            if shape not in out and shape not in [tuple(u) for u in used]:
                out.append(shape)
    return out


def _names(meta, selected: Sequence[str]) -> list[tuple[int, str]]:
    """(index, name) of the outputs to compare."""
    names = [o.get("name") or f"output {k}" for k, o in enumerate(meta.outputs)]
    return [(k, n) for k, n in enumerate(names) if not selected or n in selected]


# the per-node phase proof of one input, with the (atol, rtol) of the check
Prove = Callable[[torch.Tensor, tuple[float, float]], Any]


@dataclass(frozen=True)
class Checks:
    """The options of :func:`econv_convert.equivalence.verify`, as :func:`check` takes them."""

    shapes: Sequence[Sequence[int]] | None = None
    trials: int = 1
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    shift: bool = True
    progress: Progress | None = None
    near_example: bool = False
    precision: str = "float64"
    outputs: Sequence[str] | None = None


def one_size(meta, options: Checks) -> bool:
    """Whether the check runs the dense model at the example size alone (a model that takes
    one input size, checked with the default sizes; not window pooling)."""
    return (not options.shapes and not options.near_example and not windowed(meta)
            and not any_size(meta))


# the end-to-end lattice check of a one-size model's head: given the input the per-node proof
# started from, that proof and the check's (atol, rtol), lattice Cases over the layers after
# the last maps every node before which is proven, on random maps (None where it does not
# apply: the whole model then runs end to end)
Head = Callable[[torch.Tensor, Any, tuple[float, float]], "list[Case] | None"]


def check(meta, run_baseline: RunBaseline, run_dense: RunDense, options: Checks = Checks(), *,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          batch: int | None = None, depth: int = 0, lattice_points: int = 2,
          prove: Prove | None = None, head: Head | None = None) -> VerifyReport:
    """The lattice, phase and shift checks for any runtime: ``run_baseline(x)`` gives the
    baseline's output tensors (or None and why the size is not accepted), ``run_dense(x)``
    the dense model's; ``meta`` is the :class:`~econv_convert.core.records.DenseInfo` of the
    dense model; ``prove(x)`` (when given) runs the per-node phase proof on one input. Inputs
    are made in ``dtype`` on ``device``. ``batch`` fixes the batch size (a graph with a static
    batch dim); ``options.outputs`` names the outputs to compare. Tolerances left as None
    follow the dtype and the number of layers ``depth`` (:func:`default_tolerance`)."""
    shapes, trials, seed, progress = (options.shapes, options.trials, options.seed,
                                      options.progress)
    select = options.outputs
    started = time.perf_counter()
    atol, rtol = default_tolerance(dtype, options.atol, options.rtol, depth)
    all_names = [o.get("name") or f"output {k}" for k, o in enumerate(meta.outputs)]
    unknown = [n for n in select or () if n not in all_names]
    if unknown:
        raise InvalidInputError(f"output={unknown[0]}: the model's outputs are "
                                f"{', '.join(all_names)}")
    names = _names(meta, select or ())
    note = ""
    spares: list[tuple[int, ...]] = []
    if shapes:
        shapes = [meta.canonical(s) for s in shapes]  # given in the input's own order
    else:
        shapes, note = default_shapes(meta, options.near_example, lattice_points)
        spares = [] if windowed(meta) else spare_shapes(meta, shapes)
        if batch is not None:
            shapes = [(batch, *s[1:]) for s in shapes]
            spares = [(batch, *s[1:]) for s in spares]
    report = VerifyReport(atol=atol, rtol=rtol, precision=str(dtype).removeprefix("torch."),
                          outputs=[n for _, n in names])
    if note:
        report.notes.append(note)
    plan, unplanned = shift_plan(meta, seed, batch) if options.shift else (None, "")
    if unplanned:
        report.notes.append(f"shift check: {unplanned}")
    total = len(shapes) * trials + (1 if prove else 0) + (len(plan.offsets) if plan else 0)
    done = 0
    gen = torch.Generator().manual_seed(seed)
    tol = (atol, rtol)
    rejected: list[Case] = []

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    early = None  # (proof, its input): a one-size model's proof, run before its lattice
    if head is not None and prove is not None and one_size(meta, options):
        x = random_input(meta, shapes[0], torch.Generator().manual_seed(seed + 1), device, dtype)
        t = time.perf_counter()
        proof = prove(x, tol)
        proof.seconds = time.perf_counter() - t
        early = (proof, x)
        t = time.perf_counter()
        cases = head(x, proof, tol) if proof.ok and not proof.note and proof.complete \
            else None
        if cases:
            for case in cases:
                report.cases.append(timed(case, t))
                t = time.perf_counter()
                step(f"lattice {'x'.join(map(str, meta.canonical(case.shape)[2:]))}")
            shapes = []
    for shape in shapes:
        for _ in range(trials):
            t = time.perf_counter()
            case = _lattice_case(meta, run_baseline, run_dense,
                                 random_input(meta, shape, gen, device, dtype), tol, names)
            # a size the baseline rejects: try a spare size instead (fixed-size heads)
            while case.skipped and "rejects" in case.detail and spares:
                rejected.append(case)
                x = random_input(meta, spares.pop(0), gen, device, dtype)
                case = _lattice_case(meta, run_baseline, run_dense, x, tol, names)
            report.cases.append(timed(case, t))
            step(f"lattice {'x'.join(map(str, meta.canonical(case.shape)[2:]))}")
    if rejected:
        sizes = ", ".join("x".join(map(str, meta.canonical(c.shape)[2:])) for c in rejected)
        why = rejected[0].detail.removeprefix("the baseline rejects this size (")[:-1]
        report.notes.append(f"the baseline rejects {len(rejected)} other sizes tried ({sizes}; "
                            f"{why}): checked at sizes it takes")
    if (note and any_size(meta) and not windowed(meta)
            and len(report.checked) < min(2, len(shapes) * trials)):
        # the baseline takes (almost) none of the small sizes (unpadded windows need more
        # input): try twice as many lattice points, and the example's own sizes last
        more = lattice_points * 2
        example = meta.canonical(meta.example_shape)[2:]
        # sizes at the example's or past it were tried and rejected: the sizes around the
        # example are the last try (doubling on would grow without end where no size is
        # taken: a covering pool's dense model stops past its kernel)
        past = all(s * (lattice_points - 1) + 1 >= h for s, h in zip(meta.axis_steps, example))
        wider = replace(options, near_example=past or default_shapes(meta, False, more)[1] == "")
        return check(meta, run_baseline, run_dense, wider, device=device, dtype=dtype,
                     batch=batch, depth=depth, lattice_points=more, prove=prove)
    lattice = [c for c in report.checked if c.check == "lattice"]
    if prove is not None and (lattice or early):
        t = time.perf_counter()
        # the smallest checked size at which every phase of every node has points, else
        # the example's (a baseline whose windows eat small inputs)
        if early is not None:
            proof, x = early
        else:
            tried = sorted({meta.canonical(c.shape) for c in lattice}, key=math.prod)
            example = (tried[0][0], *meta.canonical(meta.example_shape)[1:])
            for size in tried + ([example] if example not in tried else []):
                x = random_input(meta, size, torch.Generator().manual_seed(seed + 1), device, dtype)
                proof = prove(x, tol)
                if proof.note or proof.complete or not proof.ok:
                    break
            proof.seconds = time.perf_counter() - t
        report.proof = proof
        if not proof.note and not proof.complete:
            report.notes.append("some phases of some nodes have no point at the sizes checked "
                                "(maps of one lattice point): those are checked end to end")
        if not proof.note and not proof.nodes:
            proof.note = "no node of the graph holds a map between two others"
        if plan is None and options.shift and proof.skipped and "too costly" in unplanned:
            # the proof left some nodes to the end-to-end checks: the shift check is then
            # the only one of their phases, at a larger cost than usual
            plan, more = shift_plan(meta, seed, batch, needed=True)
            report.notes = [n for n in report.notes if not n.startswith("shift check: ")]
            report.notes.append("shift check: run at a larger size than usual, as the only "
                                "check of the phases of the nodes the per-node proof skipped"
                                if plan is not None else f"shift check: {more}; the phases of "
                                "the nodes the per-node proof skipped are not checked")
            total += len(plan.offsets) if plan is not None else 0
        if proof.skipped and not proof.note:
            # say which nodes the proof left, and what checks their other phases
            first, why = next(iter(proof.skipped.items()))
            others = len(proof.skipped) - 1
            report.notes.append(
                f"the per-node proof skipped '{first}' ({why})"
                + (f" and {others} other node{'s' * (others > 1)}" if others else "") + ": "
                + ("the shift check covers their phases end to end" if plan is not None
                   else "only their lattice points are checked end to end"))
        if proof.note:
            report.notes.append(f"phases not proven node by node: {proof.note}")
        else:
            worst = proof.worst
            report.cases.append(Case(
                "phases", tuple(x.shape), worst.max_abs if worst else 0.0,
                worst.scale if worst else 0.0,
                proof.ok,
                f"node {worst.node}: {worst.detail}" if worst and worst.detail
                else f"{len(proof.nodes)} nodes, {proof.phases} phase checks",
                seconds=proof.seconds))
        step("every phase of every node")
    if plan is not None:
        shift_cases(meta, plan, run_baseline, run_dense, gen, device, dtype, tol, names,
                     report, step)
    report.seconds = time.perf_counter() - started
    return report

def _lattice_case(meta, run_baseline: RunBaseline, run_dense: RunDense, x, tol,
                  names: list[tuple[int, str]]) -> Case:
    shape = tuple(x.shape)
    b, why = run_baseline(x)
    if b is None:
        return Case("lattice", shape, skipped=True, detail=why)
    if any(t.numel() == 0 for t in b):  # onnxruntime gives empty maps where PyTorch raises
        return Case("lattice", shape, skipped=True,
                    detail="the baseline's output is empty at this size")
    try:
        dense = run_dense(x)
    except SizeNotCovered as e:  # a size-specialized capture: honest, not a failure
        return Case("lattice", shape, skipped=True, detail=not_covered(e))
    if len(b) != len(dense) or len(dense) != len(meta.outputs):
        return Case("lattice", shape, ok=False, detail=f"{len(dense)} dense outputs vs "
                    f"{len(b)} baseline outputs")
    d = [read_lattice(y, spec["dims"], spec["base_ndim"])
         for y, spec in zip(dense, meta.outputs)]
    return compare("lattice", shape, b, d, tol, names)
