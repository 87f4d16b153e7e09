"""The shift check: the dense output at the positions of a window shifted by ``r`` equals the
baseline run on the input cropped at ``r``, for offsets that cover every phase of every axis,
at every position whose window reads no padding
(:func:`econv_convert.core.lattice.interior`; every position for unpadded networks)."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, replace

from econv_convert.cases import (
    Case,
    RunBaseline,
    VerifyReport,
    any_size,
    compare,
    not_covered,
    random_input,
    timed,
    windowed,
)
from econv_convert.core.lattice import Field, interior
from econv_convert.errors import SizeNotCovered


@dataclass(frozen=True)
class ShiftPlan:
    """The shift check's input: crops of ``crop`` pixels (N, C, spatial...) at ``offsets``
    of one input of ``big`` pixels; ``region`` gives, per axis, the crop output indices
    ``[first, last]`` whose windows read no padding."""

    crop: tuple[int, ...]
    big: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    region: tuple[tuple[int, int], ...]


MAX_OFFSETS = 16


# how much more input the shift check may take where it is the only check of some nodes'
# phases (the per-node proof skipped them: their arguments are computed from sizes)
NEEDED = 16


def shift_plan(meta, seed: int, batch: int | None,
               needed: bool = False) -> tuple[ShiftPlan | None, str]:
    """Where the shift check looks, or why it cannot: crops of the example size (or larger,
    so that some positions are away from the padding), at offsets that cover every phase of
    every axis (every combination while there are at most 16; else every phase per axis on
    the diagonal, plus random ones). ``needed``: no other check covers some phases, so the
    inputs may be ``NEEDED`` times larger than usual."""
    if not any(d[0] == "space" for o in meta.outputs for d in o["dims"]):
        return None, ("the outputs have no positions (a global pool): the positions between "
                      "the lattice points are its phases")
    example = meta.canonical(meta.example_shape)
    nd = len(example) - 2
    res = meta.output_stride or 1  # dense positions are this many input pixels apart
    phases = meta.axis_steps  # dense positions per lattice step, per axis
    steps = [res * p for p in phases]  # the lattice step in input pixels
    if meta.out_field and len(meta.out_field) == nd:
        fields = [Field(*f) for f in meta.out_field]
    elif not meta.has_padding:
        fields = [Field(1, s) for s in steps]
    else:
        return None, "the padding's reach is not recorded (ONNX, or an older file)"
    if meta.global_pools and not windowed(meta):
        return None, ("a global pool inside the network (squeeze-excitation) reads every "
                      "position: no position is independent of the borders")
    if windowed(meta) and any(f.lo or f.hi for f in fields):
        return None, ("a window pool over a padded network reads its crop's borders at every "
                      "position (the fully convolutional prediction): it equals the head over "
                      "the pooled whole-image features, not the baseline on a crop")
    crop = []
    for h, f, s in zip(example[2:], fields, steps):
        need = f.lo + f.size + f.hi + 2 * s if any_size(meta) and not windowed(meta) else h
        crop.append(max(h, need) if (f.lo or f.hi) else h)
    region = [interior(c, replace(f, step=s)) for c, f, s in zip(crop, fields, steps)]
    if any(a > b for a, b in region):
        reach = ", ".join(f"{f.lo} px from the start and {f.hi} px from the end"
                          for f in fields)
        return None, (f"the padding reaches {reach}; a crop of {tuple(crop)} px has no "
                      "position away from it")
    big = [c + 2 * s for c, s in zip(crop, steps)]
    # within four times an input of the example plus two steps, or small in any case (an
    # example smaller than the padding's reach)
    budget = max(4 * math.prod(h + 2 * s for h, s in zip(example[2:], steps)), 48 ** nd)
    if math.prod(big) > budget * (NEEDED if needed else 1):
        return None, (f"positions away from the padding (it reaches {fields[0].lo} px in) need "
                      f"inputs of {'x'.join(map(str, big))} px, too costly here: every phase "
                      "is proven node by node instead")
    combos = list(itertools.product(*(range(p) for p in phases)))
    if len(combos) > MAX_OFFSETS:
        rng = random.Random(seed)
        diagonal = [tuple(k % p for p in phases) for k in range(max(phases))]
        combos = diagonal + [c for c in rng.sample(combos, MAX_OFFSETS // 2)
                             if c not in diagonal]
    n = batch if batch is not None else max(example[0], 2)
    offsets = tuple(tuple(res * k for k in c) for c in combos)
    return ShiftPlan((n, example[1], *crop), (n, example[1], *big), offsets, tuple(region)), ""


def shift_cases(meta, plan: ShiftPlan, run_baseline, run_dense, gen, device, dtype, tol,
                 names, report: VerifyReport, step) -> None:
    t = time.perf_counter()
    x = random_input(meta, plan.big, gen, device, dtype)
    try:
        y = run_dense(x)
    except SizeNotCovered as e:
        report.cases.append(Case("shift", tuple(x.shape), skipped=True, detail=not_covered(e)))
        return
    for offset in plan.offsets:
        case = shift_case(meta, run_baseline, x, y, offset, plan.crop[2:], plan.region, tol,
                           names)
        report.cases.append(timed(case, t))
        t = time.perf_counter()
        step(f"shift {offset}")

def shift_case(meta, run_baseline: RunBaseline, x, y, offset, crop, region, tol,
                names: list[tuple[int, str]]) -> Case:
    """The baseline on ``x`` cropped at ``offset`` (``crop`` pixels per axis) against the
    dense output ``y`` at the crop's positions, on the crop output indices ``region``."""
    c = x
    for i, (r, e) in enumerate(zip(offset, crop)):
        c = c.narrow(meta.spatial_dim(i), r, e)
    b, why = run_baseline(c)
    if b is None:
        return Case("shift", tuple(x.shape), skipped=True, detail=why, offset=offset)
    picked, kept = [], []
    res = meta.output_stride or 1
    for out, spec, base in zip(y, meta.outputs, b):
        index, base_index = [], []
        extra = 0
        for i, (kind, step, axis) in enumerate(spec["dims"]):
            if kind != "space":
                index.append(slice(None))
                base_index.append(slice(None))
                continue
            size = base.shape[i] if i < spec["base_ndim"] else 1
            first, last = region[axis]
            last = min(last, size - 1)
            r = offset[axis] // res
            index.append(slice(r + first * step, r + last * step + 1, step))
            if i < spec["base_ndim"]:
                base_index.append(slice(first, last + 1))
            extra += i >= spec["base_ndim"]
        v = out[tuple(index)]
        if extra:
            v = v.reshape(v.shape[: v.dim() - extra])
        picked.append(v)
        kept.append(base[tuple(base_index)])
    case = compare("shift", tuple(x.shape), kept, picked, tol, names, offset)
    return replace(case, region=tuple(region))
