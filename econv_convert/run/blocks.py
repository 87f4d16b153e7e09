"""The block engine: one block of a dense prediction read, run and written, and the blocks
run in this process or on Dask.

Each output block is one chunk and one task: it reads its own lattice-aligned input window
plus a halo from the source, runs the dense model, keeps its block and writes that whole
chunk (and its part of the pyramid), so no two tasks write the same bytes and no array of the
whole image exists anywhere. The same :func:`block_output` serves every sink (an OME-Zarr
image, an array in memory). A written block leaves a marker file, for ``resume``.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from econv_convert.errors import InvalidInputError, SizeNotCovered, describe
from econv_convert.run import ngff
from econv_convert.run.runner import ModelSpec, runner, timed
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


def block_output(job: Job, block: Sequence[int], source, run,
                 read: tuple | None = None) -> tuple[tuple, np.ndarray]:
    """One block of the output: its index into the whole output and its values. The one
    computation every sink shares (a zarr chunk, an array in memory). ``read``: the block's
    input from :func:`block_input`, when it was read ahead."""
    out_range, in_range, x = read if read is not None else block_input(job, block, source)
    try:
        y = _as_map(run(x), job.shape[0], len(in_range))
    except SizeNotCovered as e:  # a size this dense model has no value for: the user's to fix
        shape = "x".join(str(e - a) for a, e in in_range)
        raise InvalidInputError(f"block {tuple(block)} (an input window of {shape}): {e}; "
                                "smaller blocks (block=...) may stay within it") from None
    # the window's output index q is the image's index lo / step + q
    starts = [a - lo // s for (a, _), (lo, _), s in zip(out_range, in_range, job.step)]
    if any(r + (e - a) > n for r, (a, e), n in zip(starts, out_range, y.shape[1:])):
        raise RuntimeError(f"block {tuple(block)}: the window's output {y.shape[1:]} does not "
                           f"reach the block's end; the halo {job.halo} is too small")
    part = y[(slice(None),) + tuple(slice(r, r + e - a) for r, (a, e) in zip(starts, out_range))]
    return (slice(None),) + tuple(slice(a, e) for a, e in out_range), part


def block_input(job: Job, block: Sequence[int], source) -> tuple:
    """The output range of ``block``, the input window it reads and that window read and
    normalized, ``(1, C, ...)`` float32."""
    out_range, in_range = job.window(block, source.shape[1:])
    # in the memory order the file gives (channels last for RGB), which is the order the
    # model runs in: no copy to (C, h, w) order and back
    x = normalize(source.read_window(in_range), job.mean, job.std)[None]
    return out_range, in_range, x


def compute_block(job: Job, block: tuple[int, ...], read: tuple | None = None) -> float:
    """Read, run, write one block into the zarr output (a Dask task). Returns the seconds
    its model took."""
    run, seconds = timed(runner(job.model))
    index, part = block_output(job, block, cached_source(job.source), run, read)
    store_block(job, block, index, part)
    return seconds[0]


def store_block(job: Job, block: tuple[int, ...], index: tuple, part: np.ndarray
                ) -> tuple[int, ...]:
    """Write one computed block into the zarr output, then mark it done (for resume)."""
    ngff.write_block(job.output, index, part)
    marker = Path(job.output) / MARKERS / "_".join(map(str, block))
    marker.touch()
    return block


def _in_process(job: Job, blocks: Sequence[tuple[int, ...]], progress: Progress | None
                ) -> float:
    """The blocks in this process: each block's input read (in a thread) while the block
    before it runs, and its output written (in another) while the block after it runs; a
    block counts as done once written. The writer first imports the NGFF writer the job
    needs at its end (over half a second of imports, hidden under the first block)."""
    from concurrent.futures import ThreadPoolExecutor

    source = cached_source(job.source)
    run, seconds = timed(runner(job.model))
    with ThreadPoolExecutor(1) as writer:
        pending = writer.submit(importlib.import_module, "ome_zarr.writer")
        for k, (b, data) in enumerate(_read_ahead(job, list(blocks), source)):
            index, part = block_output(job, b, source, run, data)
            pending.result()  # the write before this one (an error in it is raised here)
            if progress and k:
                progress(k, len(blocks))
            pending = writer.submit(store_block, job, b, index, part)
        pending.result()
        if progress:
            progress(len(blocks), len(blocks))
    return seconds[0]


def _read_ahead(job: Job, blocks: Sequence[tuple[int, ...]], source):
    """``(block, its input)`` in order, each block's input read and decoded in a thread while
    the one before it runs (reading and decoding release the GIL, as the model does)."""
    from concurrent.futures import ThreadPoolExecutor

    if not blocks:
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(block_input, job, blocks[0], source)
        for k, b in enumerate(blocks):
            data = ahead.result()
            if k + 1 < len(blocks):
                ahead = pool.submit(block_input, job, blocks[k + 1], source)
            yield b, data


def in_memory(job: Job, source, run, blocks: Sequence[tuple[int, ...]] | None = None,
              progress: Progress | None = None) -> np.ndarray:
    """The output as an array in memory, block by block in this process (NaN where a block
    is not in ``blocks``)."""
    out = np.full(job.shape, np.nan, dtype=np.float32)
    todo = job.blocks() if blocks is None else list(blocks)
    for k, (b, data) in enumerate(_read_ahead(job, todo, source), 1):
        index, part = block_output(job, b, source, run, data)
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
               ) -> tuple[str, int, float]:
    """Compute ``blocks``: in this process when ``workers`` is 0 and no scheduler is given,
    else on Dask (an embedded ``LocalCluster`` of ``workers`` processes, or the cluster at
    ``scheduler``). ``on_start(scheduler, dashboard)`` is called once the cluster is up.
    Returns the scheduler's description, the number of workers and the seconds the model
    took, summed over the blocks."""
    total = len(blocks)
    if not blocks:
        return "none", 0, 0.0
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
        model = 0.0
        for k, future in enumerate(as_completed(futures), 1):
            model += future.result()  # an error in a task is raised here, as it was there
            if progress:
                progress(k, total)
        return where, n, model
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
