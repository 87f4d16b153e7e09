"""Timing the dense model against the ways of getting the same predictions without it.

All figures come from one run on one machine, as medians of several runs after a warm-up, so
their ratios are meaningful even on a noisy machine:

* ``baseline``: one baseline pass (predictions on the coarse lattice only);
* ``dense``: one dense pass (predictions at every position);
* ``shift_and_stitch``: the baseline on every shifted input (the same positions as the
  dense model, ``(s / output_stride)^2`` passes);
* ``sliding_window`` (patch classifiers, whose baseline accepts one patch size only): the
  baseline on the patch at every output position, timed on a sample of positions and scaled
  up (the report says so);
* ``dilation``: each dense convolution against the same convolution undilated on an input
  cropped so that the output size, and so the multiply-adds, are equal.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from econv_convert.core.lattice import Window, dense_window, effective_dilation
from econv_convert.errors import InvalidInputError
from econv_convert.run.resources import estimate_bytes
from econv_convert.torch import ops
from econv_convert.torch.api import info


@dataclass
class Timing:
    name: str
    seconds: float  # median
    macs: int
    runs: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # measured on CUDA; None on the CPU
    note: str = ""


@dataclass
class BenchResult:
    input_shape: list[int]
    device: str
    step: list[int]
    output_stride: int | None
    timings: dict[str, Timing]
    dilation_overhead: float | None  # dense conv time / undilated conv time, same MACs
    space_to_batch_overhead: float | None  # the same convs in space-to-batch form
    dense_activation_estimate: int
    notes: list[str] = field(default_factory=list)

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.timings and b in self.timings and self.timings[b].seconds > 0:
            return self.timings[a].seconds / self.timings[b].seconds
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        t = self.timings
        data["speedups"] = {}
        data["mac_ratios"] = {}
        for other in ("shift_and_stitch", "sliding_window"):
            if other in t:
                data["speedups"][f"dense_vs_{other}"] = self.ratio(other, "dense")
                data["mac_ratios"][f"{other}_vs_dense"] = t[other].macs / max(t["dense"].macs, 1)
        return data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> tuple[
        float, list[float], int | None]:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), times, peak


def _interleaved(fns: Sequence[Callable[[], Any]], device: torch.device, runs: int,
                 warmup: int) -> list[float]:
    """Median times of ``fns`` run in turn, run after run, so that drift on a shared machine
    falls on all of them alike (a ratio of two separate blocks of runs would carry it). The
    order rotates from run to run, so that each function follows each other one equally
    often."""
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    with torch.no_grad():
        for i in range(warmup + runs):
            for j in range(n):
                k = (i + j) % n
                fn, ts = fns[k], times[k]
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if i >= warmup:
                    ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _macs(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() // 2


def shifts(step: Sequence[int], output_stride: int | None) -> list[tuple[int, ...]]:
    """The input shifts whose baseline passes cover the dense model's positions."""
    res = output_stride or 1
    return list(itertools.product(*(range(0, s * res, res) for s in step)))


def shift_and_stitch(baseline: nn.Module, x: torch.Tensor, step: Sequence[int],
                     output_stride: int | None = None) -> dict[tuple[int, ...], Any]:
    """The baseline on every shifted input ``x[..., r:, c:]``: one output per shift."""
    out = {}
    for offset in shifts(step, output_stride):
        crop = x
        for i, r in enumerate(offset):
            crop = crop.narrow(2 + i, r, x.shape[2 + i] - r)
        out[offset] = baseline(crop)
    return out


def stitch(parts: dict[tuple[int, ...], torch.Tensor], step: Sequence[int],
           sizes: Sequence[int], output_stride: int | None = None) -> torch.Tensor:
    """Interleave per-shift baseline maps into one map of ``sizes`` (positions no shift
    reaches stay NaN): the dense output, computed independently."""
    res = output_stride or 1
    first = next(iter(parts.values()))
    nd = len(step)
    out = first.new_full((*first.shape[: first.dim() - nd], *sizes), math.nan)
    for offset, part in parts.items():
        index = [slice(None)] * (first.dim() - nd)
        src = [slice(None)] * (first.dim() - nd)
        for i, (r, s) in enumerate(zip(offset, step)):
            q = r // res
            n = min(part.shape[part.dim() - nd + i], max(0, (sizes[i] - q + s - 1) // s))
            index.append(slice(q, q + (n - 1) * s + 1, s))
            src.append(slice(0, n))
        out[tuple(index)] = part[tuple(src)]
    return out


def _patch_size(dense: nn.Module) -> tuple[int, ...] | None:
    """The patch a classifier with a fixed-size head reads, or None (a fully convolutional
    or globally pooled baseline)."""
    meta = info(dense)
    if meta.global_pools or len(meta.outputs) != 1:
        return None
    spec = meta.outputs[0]
    if len(spec["dims"]) <= spec["base_ndim"]:
        return None  # no head turned into a convolution
    return tuple(meta.example_shape[2:])


def sliding_window(baseline: nn.Module, x: torch.Tensor, patch: Sequence[int],
                   positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """The baseline on the patch at each of ``positions`` (one batch)."""
    crops = []
    for pos in positions:
        crop = x[:1]
        for i, (p, size) in enumerate(zip(pos, patch)):
            crop = crop.narrow(2 + i, p, size)
        crops.append(crop)
    return baseline(torch.cat(crops))


def space_to_batch_conv(xp: torch.Tensor, weight, bias, dilation: Sequence[int], groups: int):
    """A stride-1 convolution with dilation ``D = d * s`` on an already padded map, computed as
    ``s`` interleaved phases folded into the batch, each convolved with dilation ``d``: exact,
    and the alternative execution form for dilated layers (TensorFlow's atrous convolution)."""
    nd = xp.dim() - 2
    k = weight.shape[2:]
    s = [math.gcd(*dilation)] * nd
    d = [dd // ss for dd, ss in zip(dilation, s)]
    sizes = xp.shape[2:]
    padded = [-(-n // ss) * ss for n, ss in zip(sizes, s)]
    pad: list[int] = []
    for n, m in zip(reversed(sizes), reversed(padded)):
        pad += [0, m - n]
    z = F.pad(xp, pad)
    n_, c = z.shape[:2]
    shape = [n_, c]
    for m, ss in zip(padded, s):
        shape += [m // ss, ss]
    z = z.reshape(shape)
    phase_dims = [3 + 2 * i for i in range(nd)]
    space_dims = [2 + 2 * i for i in range(nd)]
    z = z.permute(0, *phase_dims, 1, *space_dims).reshape(-1, c, *[m // ss for m, ss in
                                                                  zip(padded, s)])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    y = conv(z, weight, bias, 1, 0, d, groups)
    out = y.shape[2:]
    y = y.reshape(n_, *s, y.shape[1], *out)
    order = [0, 1 + nd]
    for i in range(nd):
        order += [2 + nd + i, 1 + i]
    y = y.permute(order).reshape(n_, y.shape[1 + nd], *[o * ss for o, ss in zip(out, s)])
    for i, (n, kk, dd) in enumerate(zip(sizes, k, dilation)):
        y = y.narrow(2 + i, 0, n - dd * (kk - 1))
    return y


def dilation_overhead(dense: nn.Module, x: torch.Tensor, device: torch.device, runs: int,
                      warmup: int) -> tuple[float, float] | None:
    """Time of the dense model's dilated convolutions, and of the same convolutions in
    space-to-batch form, over the same convolutions undilated, each undilated one on an input
    cropped so that the output (and so the multiply-adds) is the same."""
    calls: list[tuple] = []

    class _Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is ops.conv:
                calls.append((args, kwargs))
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        _Recorder(dense).run(x)
    dilated = undilated = batched = undilated2 = 0.0
    timed = False
    for args, _ in calls:
        xin, weight, bias, steps, stride, lo, hi, dil, groups = args[:9]
        kernel = args[9] if len(args) > 9 else None
        if kernel is not None:
            weight = weight.reshape(weight.shape[0], -1, *kernel)
        k = weight.shape[2:]
        nd = len(steps)
        dws = [dense_window(Window(kk, t, a, b, d), s)
               for kk, t, a, b, d, s in zip(k, stride, lo, hi, dil, steps)]
        dil_t = effective_dilation(k, dws)
        if all(d == 1 for d in dil_t):
            continue  # nothing dilated (a 1 x 1 convolution, or the first layers)
        pad = []
        for d in reversed(dws):
            pad += [d.pad_lo, d.pad_hi]
        fmt = memory_format(xin.dim(), xin.is_contiguous(memory_format=torch.channels_last)
                            or xin.is_contiguous(memory_format=torch.channels_last_3d))
        xp = F.pad(xin, pad).contiguous(memory_format=fmt)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        # the undilated twin: same kernel, output of the same size from a cropped input
        crop = xp
        for i, (kk, d) in enumerate(zip(k, dil_t)):
            crop = crop.narrow(2 + i, 0, xp.shape[2 + i] - (kk - 1) * (d - 1))
        crop = crop.contiguous(memory_format=fmt)
        # each form against the undilated twin in its own interleaved pair: a third function
        # in the same rotation (space-to-batch allocates and sweeps large buffers) slows
        # whatever runs next, and the dilated convolution's larger input suffers most
        plain = lambda: conv(crop, weight, bias, 1, 0, 1, groups)  # noqa: E731
        a, b = _interleaved([lambda: conv(xp, weight, bias, 1, 0, dil_t, groups), plain],
                            device, runs, warmup)
        c, b2 = _interleaved([lambda: space_to_batch_conv(xp, weight, bias, dil_t, groups),
                              plain], device, runs, warmup)
        dilated += a
        undilated += b
        batched += c
        undilated2 += b2
        timed = True
    if not timed or undilated <= 0 or undilated2 <= 0:
        return None
    return dilated / undilated, batched / undilated2


def memory_format(ndim: int, channels_last: bool) -> torch.memory_format:
    """The memory format to run ``ndim``-dimensional activations in. Channels-last makes
    dilated convolutions on this CPU run as fast as undilated ones (in the default layout,
    small dilated maps ran up to 1.3x slower) and whole dense models 5-25% faster."""
    if channels_last and ndim == 4:
        return torch.channels_last
    if channels_last and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def bench(baseline: nn.Module, dense: nn.Module, shape: Sequence[int], *, device: str = "cpu",
          runs: int = 5, warmup: int = 1, window_sample: int = 64, seed: int = 0,
          channels_last: bool = True,
          progress: Callable[[str], None] | None = None) -> BenchResult:
    """Time the baseline, the dense model, shift-and-stitch and (for patch classifiers) the
    sliding window, at input ``shape``, in one run; all of them with activations and weights
    in the same memory format (channels-last by default, for 2-D and 3-D models)."""
    dev = torch.device(device)
    meta = info(dense)
    fmt = memory_format(len(shape), channels_last)
    baseline = baseline.to(dev).eval().to(memory_format=fmt)
    dense = dense.to(dev).eval().to(memory_format=fmt)
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    x = x.contiguous(memory_format=fmt)
    step = list(meta.total_step)
    notes = []
    timings: dict[str, Timing] = {}

    def record(name: str, fn: Callable[[], Any], note: str = "", scale: float = 1.0,
               macs: int | None = None) -> None:
        if progress:
            progress(name)
        med, times, peak = _time(fn, dev, runs, warmup)
        timings[name] = Timing(name, med * scale, macs if macs is not None else _macs(fn),
                               [t * scale for t in times], peak, note)

    patch = _patch_size(dense)
    if patch is None:
        record("baseline", lambda: baseline(x))
    else:
        example = torch.randn(shape[0], shape[1], *patch, device=dev).contiguous(
            memory_format=fmt)
        record("baseline", lambda: baseline(example),
               note=f"one {'x'.join(map(str, patch))} patch: the baseline accepts no other size")
    record("dense", lambda: dense(x))
    if patch is None:
        n = len(shifts(step, meta.output_stride))
        record("shift_and_stitch",
               lambda: shift_and_stitch(baseline, x, step, meta.output_stride),
               note=f"{n} shifted baseline passes")
    else:
        # every position where a whole patch fits in the input
        room = [n - p + 1 for n, p in zip(shape[2:], patch)]
        total = math.prod(room)
        if total < 1:
            raise InvalidInputError(f"input {tuple(shape)} is smaller than the patch {patch}")
        rng = torch.Generator().manual_seed(seed)
        sample = min(window_sample, total)
        flat = torch.randperm(total, generator=rng)[:sample].tolist()
        positions = [_unravel(i, room) for i in flat]
        per = _macs(lambda: sliding_window(baseline, x, patch, positions)) / sample
        record("sliding_window", lambda: sliding_window(baseline, x, patch, positions),
               note=f"timed on {sample} of {total} positions and scaled up",
               scale=total / sample, macs=int(per * total))
    if progress:
        progress("dilation")
    overhead = dilation_overhead(dense, x, dev, runs, warmup) or (None, None)
    if fmt is not torch.contiguous_format:
        notes.append("every case runs channels-last (activations and weights)")
    return BenchResult(list(shape), str(dev), step, meta.output_stride, timings, overhead[0],
                       overhead[1], estimate_bytes(meta, shape), notes)


def _unravel(i: int, sizes: Sequence[int]) -> list[int]:
    out = []
    for n in reversed(sizes):
        i, r = divmod(i, n)
        out.append(r)
    return out[::-1]

