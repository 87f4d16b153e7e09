"""The block engine: one block of a dense prediction read, run and written, and the blocks
run in this process or on Dask.

Each output block is one chunk and one task: it reads its own lattice-aligned input window
plus a halo from the source, runs the dense model, keeps its block and writes that whole
chunk (and its part of the pyramid), so no two tasks write the same bytes and no array of the
whole image exists anywhere. The same :func:`block_output` serves every sink (an OME-Zarr
image, an array in memory). A block whose window lies inside the image runs without the
padding of its edges (:mod:`econv_convert.run.trim`). A written block leaves a marker file,
for ``resume``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from econv_convert.errors import InvalidInputError, SizeNotCovered, describe
from econv_convert.run import ngff
from econv_convert.run.runner import ModelSpec, Run, runner
from econv_convert.run.sources import SourceSpec, cached_source, normalize

MARKERS = ".econv-blocks"  # inside the zarr folder: one empty file per finished block

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Job:
    """Everything a block task needs: plain data, sent once to every worker. ``model`` and
    ``source`` are None when the blocks run in this process on a model and image in memory
    (:func:`in_memory`)."""

    model: ModelSpec | None
    source: SourceSpec | None
    output: str
    shape: tuple[int, ...]  # (C, *spatial) of the output
    block: tuple[int, ...]  # output positions per block (and chunk), per spatial axis
    step: tuple[int, ...]
    unit: tuple[int, ...]
    halo: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    halo_after: tuple[int, ...] = ()  # () : the same as ``halo``

    def blocks(self) -> list[tuple[int, ...]]:
        counts = [range(math.ceil(n / b)) for n, b in zip(self.shape[1:], self.block)]
        return list(itertools.product(*counts))

    def window(self, block: Sequence[int], size: Sequence[int]):
        """The output range of ``block`` and the input window it reads, per axis."""
        out, inp = [], []
        after = self.halo_after or self.halo
        for k, n, b, s, h, t, extent in zip(block, self.shape[1:], self.block, self.step,
                                            self.halo, after, size):
            a, e = k * b, min(n, (k + 1) * b)
            out.append((a, e))
            inp.append((max(0, a * s - h), min(extent, e * s + t)))
        return out, inp

    def inner_axes(self, block: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
        """The axes along which ``block``'s input window, halo included, lies inside the
        image on both sides: there none of the model's padding is the image's, and the block's
        outputs do not depend on it (:mod:`econv_convert.run.trim`)."""
        after = self.halo_after or self.halo
        inner = []
        for i, (k, n, b, s, h, t, extent) in enumerate(zip(
                block, self.shape[1:], self.block, self.step, self.halo, after, size)):
            if k * b * s - h >= 0 and min(n, (k + 1) * b) * s + t <= extent:
                inner.append(i)
        return tuple(inner)


def block_output(job: Job, block: Sequence[int], source, run: Run | Callable
                 ) -> tuple[tuple, np.ndarray]:
    """One block of the output: its index into the whole output and its values. The one
    computation every sink shares (a zarr chunk, an array in memory). A block inside the
    image along some axes runs trimmed along them where the model allows it
    (:meth:`Run.interior`, checked once per set of axes: :func:`_trimmed`)."""
    if not isinstance(run, Run):  # a plain f(x) -> y
        run = Run(run)
    out_range, in_range, x = block_input(job, block, source)
    # the window's output index q is the image's index lo / step + q
    starts = [a - lo // s for (a, _), (lo, _), s in zip(out_range, in_range, job.step)]
    sizes = [e - a for a, e in out_range]
    part = None
    axes = job.inner_axes(block, source.shape[1:]) if run.can_trim else ()
    if axes:
        part = _trimmed(job, block, run, x, starts, sizes, axes)
    if part is None:
        try:
            y = run(x)
        except SizeNotCovered as e:  # a size this dense model has no value for: the user's
            shape = "x".join(str(e - a) for a, e in in_range)
            raise InvalidInputError(f"block {tuple(block)} (an input window of {shape}): {e}; "
                                    "smaller blocks (block=...) may stay within it") from None
        part = _cut(job, block, y, starts, sizes)
    return (slice(None),) + tuple(slice(a, e) for a, e in out_range), part


def _cut(job: Job, block, y: np.ndarray, starts, sizes) -> np.ndarray:
    y = _as_map(y, job.shape[0], len(starts))
    part = _part(y, starts, sizes)
    if part is None:
        raise RuntimeError(f"block {tuple(block)}: the window's output {y.shape[1:]} does not "
                           f"reach the block's end; the halo {job.halo} is too small")
    return part


def _part(y: np.ndarray, starts, sizes) -> np.ndarray | None:
    """``sizes`` positions of the map ``y`` ``(C, ...)`` from ``starts``, or None where it
    does not hold them."""
    if any(r < 0 or r + n > m for r, n, m in zip(starts, sizes, y.shape[1:])):
        return None
    return y[(slice(None),) + tuple(slice(r, r + n) for r, n in zip(starts, sizes))]


def _trimmed(job: Job, block, run: Run, x, starts, sizes, axes) -> np.ndarray | None:
    """The block's outputs from the pass trimmed along ``axes``, or None where it cannot give
    them (the model then runs padded, and every later block too). The first time in a
    process for these axes, the trimmed pass is compared with the padded one on a corner of
    the block (a window of a few lattice steps of outputs with their halo, at the block's
    own lattice phase)."""
    part = None
    try:
        if axes in run.checked or _same_when_trimmed(job, block, run, x, starts, sizes, axes):
            run.checked.add(axes)
            part = _trimmed_part(job, run, x, starts, sizes, axes)
    except Exception:  # noqa: BLE001 (a layer the trimmed pass gets wrong: run it padded)
        part = None
    if part is None:
        run.no_trim()
        return None
    run.trimmed += 1
    return part


def _trimmed_part(job: Job, run: Run, x, starts, sizes, axes) -> np.ndarray | None:
    y, shift = run.interior(x, axes)
    y = _as_map(y, job.shape[0], len(starts))
    return _part(y, [r - d for r, d in zip(starts, shift)], sizes)


def _same_when_trimmed(job: Job, block, run: Run, x, starts, sizes, axes) -> bool:
    """Whether the trimmed and the padded pass agree (to rounding) on the first outputs of
    ``block``: whole lattice steps of them, at least 32 a side, with the halo they read."""
    after = job.halo_after or job.halo
    small, ends = [], []
    for n, s, u, h, t, extent in zip(sizes, job.step, job.unit, job.halo, after,
                                     x.shape[2:]):
        per = max(1, u // s)  # outputs per lattice step
        m = min(n, per * -(-32 // per))
        small.append(m)
        ends.append(min(extent, m * s + h + t))
    corner = x[(slice(None), slice(None)) + tuple(slice(0, e) for e in ends)]
    trimmed = _trimmed_part(job, run, corner, starts, small, axes)
    if trimmed is None:
        return False
    padded = _cut(job, block, run(corner), starts, small)
    scale = float(np.nanmax(np.abs(padded))) if np.isfinite(padded).any() else 1.0
    return bool(np.allclose(trimmed, padded, rtol=1e-4, atol=1e-5 * max(1.0, scale),
                            equal_nan=True))


def block_input(job: Job, block: Sequence[int], source) -> tuple:
    """The output range of ``block``, the input window it reads and that window read and
    normalized, ``(1, C, ...)`` float32."""
    out_range, in_range = job.window(block, source.shape[1:])
    # in the memory order the file gives (channels last for RGB), which is the order the
    # model runs in: no copy to (C, h, w) order and back
    x = normalize(source.read_window(in_range), job.mean, job.std)[None]
    return out_range, in_range, x


def compute_block(job: Job, block: tuple[int, ...]) -> dict[str, float]:
    """Read, run, write one block into the zarr output (a Dask task). Returns the seconds
    each step took (:data:`STEPS`)."""
    with ngff.BlockWriter(job.output) as writer:
        return _one_block(job, block, cached_source(job.source), runner(job.model), writer)


STEPS = ("read", "model", "write")  # where a block's time goes


def _one_block(job: Job, block, source, run: Run, writer: ngff.BlockWriter
               ) -> dict[str, float]:
    """One block read, run and handed to ``writer``; its marker (for ``resume``) follows its
    chunks to the disk."""
    start, model = time.perf_counter(), run.seconds
    index, part = block_output(job, block, source, run)
    computed = time.perf_counter()
    marker = Path(job.output) / MARKERS / "_".join(map(str, block))
    writer.write(index, part, then=marker.touch)
    model = run.seconds - model
    return {"read": computed - start - model, "model": model,
            "write": time.perf_counter() - computed}


def _in_process(job: Job, blocks: Sequence[tuple[int, ...]], progress: Progress | None
                ) -> dict[str, float]:
    """The blocks in this process, one after another: each read, run and written in turn,
    every step on every core, while the disk takes the chunks of the blocks before
    (:class:`~econv_convert.run.ngff.BlockWriter`). Halving, arg-max and compression run
    here, not beside the model: the model's threads wait for each other at every layer, and
    one of them sharing its core with a reader or writer held up both (a 1184-pixel block ran
    0.69 s alone and about 1.2 s beside a writer thread)."""
    source = cached_source(job.source)
    run = runner(job.model)
    total = dict.fromkeys(STEPS, 0.0)
    with ngff.BlockWriter(job.output) as writer:
        for k, b in enumerate(blocks):
            for step, seconds in _one_block(job, b, source, run, writer).items():
                total[step] += seconds
            if progress:
                progress(k + 1, len(blocks))
        start = time.perf_counter()
        writer.flush()
        total["write"] += time.perf_counter() - start
    return total


def in_memory(job: Job, source, run, blocks: Sequence[tuple[int, ...]] | None = None,
              progress: Progress | None = None) -> np.ndarray:
    """The output as an array in memory, block by block in this process (NaN where a block
    is not in ``blocks``)."""
    out = np.full(job.shape, np.nan, dtype=np.float32)
    todo = job.blocks() if blocks is None else list(blocks)
    for k, b in enumerate(todo, 1):
        index, part = block_output(job, b, source, run)
        out[index] = part
        if progress:
            progress(k, len(todo))
    return out


def _as_map(y: np.ndarray, channels: int, nd: int = 2) -> np.ndarray:
    """A model output ``(1, ..., *spatial)`` as ``(C, *spatial)``."""
    if y.shape[0] != 1 or math.prod(y.shape[1:-nd]) != channels:
        raise InvalidInputError(f"the model's output {tuple(y.shape)} is not a map of "
                                f"{channels} channels")
    return y.reshape(channels, *y.shape[-nd:])


def run_blocks(job: Job, blocks: Sequence[tuple[int, int]], *, workers: int,
               scheduler: str | None = None, progress: Progress | None = None,
               on_start: Callable[[str, str | None], None] | None = None
               ) -> tuple[str, int, dict[str, float]]:
    """Compute ``blocks``: in this process when ``workers`` is 0 and no scheduler is given,
    else on Dask (an embedded ``LocalCluster`` of ``workers`` processes, or the cluster at
    ``scheduler``). ``on_start(scheduler, dashboard)`` is called once the cluster is up.
    Returns the scheduler's description, the number of workers and the seconds each step
    of a block took (:data:`STEPS`), summed over the blocks."""
    total = len(blocks)
    if not blocks:
        return "none", 0, dict.fromkeys(STEPS, 0.0)
    if workers == 0 and scheduler is None:
        if on_start:
            on_start("this process", None)
        return "this process", 1, _in_process(job, blocks, progress)
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=_DASHBOARD,
                                   silence_logs=40)
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout="20s")
    except OSError as e:
        if cluster is not None:
            cluster.close()
        raise InvalidInputError(f"scheduler={scheduler}: cannot connect ({describe(e)})") \
            from None
    try:
        where = scheduler or "embedded LocalCluster"
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        if on_start:
            on_start(where, client.dashboard_link if _has_dashboard() else None)
        futures = client.map(compute_block, [job] * total, blocks, pure=False)
        steps = dict.fromkeys(STEPS, 0.0)
        for k, future in enumerate(as_completed(futures), 1):
            # an error in a task is raised here, as it was there
            for step, seconds in future.result().items():
                steps[step] += seconds
            if progress:
                progress(k, total)
        return where, n, steps
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# a free port on this machine only (None would mean the default, 8787, on every address)
_DASHBOARD = "127.0.0.1:0"


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def default_workers() -> int:
    """Worker processes for the embedded cluster: one per two cores (each runs its torch
    threads on the other), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)
