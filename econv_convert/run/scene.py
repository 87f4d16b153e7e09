"""Dense predictions over images larger than memory, block by block, on Dask.

The output is an OME-Zarr image (:mod:`econv_convert.run.ngff`) whose full-resolution array
``(C, H', W')`` is written block by block. Each output block is one chunk and one task: it
reads its own lattice-aligned input window plus a halo from the source, runs the dense model,
keeps its block and writes that whole chunk, so no two tasks write the same bytes and no
array of the whole image exists anywhere. A block is exact (the whole-image
dense output there) for the reason tiles are (:mod:`econv_convert.run.predict`): the window
starts on the image's lattice and its halo holds a receptive field.

A finished block leaves a marker file; the group attribute ``econv`` records the model's
checksum and the options, and ``complete`` becomes true only when every block is written and
the pyramid and labels are built. So a killed run loses only the blocks in flight, and
``resume`` computes only the missing ones, refusing when the model or the options differ.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError, describe
from econv_convert.run import ngff
from econv_convert.run.sources import SourceSpec, cached_source, normalize, open_source

FORMAT = "econv-convert dense prediction"
WRITER = 3  # how the output is laid out; 3: the blocks write their part of the pyramid too
MARKERS = ".econv-blocks"  # inside the zarr folder: one empty file per finished block

Progress = Callable[[int, int], None]


class OutputExistsError(InvalidInputError):
    """The output exists and neither resume nor overwrite was asked for, or it differs."""


# -- the model, as each worker runs it ------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A dense model file (``.pt`` from ``save_dense`` or a dense ``.onnx``) and how to run it."""

    path: str
    device: str = "cpu"
    threads: int = 0  # torch / onnxruntime threads per worker; 0: the cores shared out


_MODELS: dict[tuple[str, str], Any] = {}


def runner(spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """``f(x) -> y`` for ``(1, C, h, w)`` float32 arrays; loaded once per process and file
    (the first load's thread count stays: the output-size probe and the blocks run in this
    process share one model)."""
    key = (spec.path, spec.device)
    if key not in _MODELS:
        _MODELS[key] = _load_runner(spec)
    return _MODELS[key]


def _load_runner(spec: ModelSpec):
    if spec.path.lower().endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if spec.device.startswith("cuda") else ["CPUExecutionProvider"])
        session = ort.InferenceSession(spec.path, options, providers=providers)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x)})[0]
    import torch

    from econv_convert.run.fuse import prepare
    from econv_convert.run.resources import keep_freed_memory
    from econv_convert.torch.storage import load_dense

    keep_freed_memory()
    torch.set_num_threads(spec.threads or torch.get_num_threads())
    device = _device(spec.device)
    model = load_dense(spec.path).eval()
    prepare(model)  # this process's own copy, for inference only
    return module_runner(model.to(device), len(model.econv.example_shape) - 2, device)


def module_runner(model, nd: int, device: Any = "cpu", lead: list | None = None):
    """``f(x) -> y`` on numpy arrays for a dense module of ``nd`` spatial axes (channels-last
    for 2-D and 3-D maps, the output as float32 on the CPU); ``lead``, when given, receives
    the output's dims before the spatial ones."""
    import torch

    from econv_convert.run.bench import memory_format

    fmt = memory_format(nd + 2, True)

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if t.shape[0] == 1:
            # numpy gives a new axis of one stride 0, which sends channels-last convolutions
            # down a path 2x slower: the stride of one whole image, as torch would give it
            t = t.as_strided(t.shape, (t[0].numel(), *t.stride()[1:]))
        with torch.no_grad():
            y = model(t.to(device).contiguous(memory_format=fmt))
        y = y if isinstance(y, torch.Tensor) else _only_tensor(y)
        if lead is not None:
            lead[:] = y.shape[1:-nd]
        return y.float().cpu().numpy()

    return run


def _device(name: str) -> str:
    """``cuda``: each Dask worker on its own GPU (worker k on GPU k modulo their number)."""
    if name != "cuda":
        return name
    import torch

    if not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA device is available here")
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _only_tensor(y):
    from econv_convert.torch.outputs import flatten

    leaves = flatten(y)
    if len(leaves) != 1:
        raise InvalidInputError("prediction needs a model with one output map")
    return leaves[0]


# -- geometry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where a dense model's outputs lie on its input, per spatial axis, in input pixels:
    ``step`` between neighbouring outputs, ``unit`` the lattice (window starts keep to it),
    ``halo`` the input a block reads before its own (and ``halo_after`` after it),
    ``window`` the input one output reads (the example input with ``--global-pool window``,
    else the receptive field) and ``offset`` the input pixel of output 0's window corner."""

    step: tuple[int, ...]
    unit: tuple[int, ...]
    halo: tuple[int, ...]
    window: tuple[int, ...]
    offset: tuple[int, ...] | None
    halo_after: tuple[int, ...] = ()


def geometry(meta) -> Geometry:
    """The :class:`Geometry` of a dense model from its :class:`DenseInfo`; refuses a model
    whose output is not one map over the input (a global pool in phase mode, several
    outputs)."""
    from econv_convert.run.predict import map_field

    field_ = map_field(meta)
    example = meta.canonical(meta.example_shape)
    nd = len(example) - 2
    res = meta.output_stride or 1  # dense positions are this many input pixels apart
    unit = tuple(res * s for s in meta.axis_steps)
    windowed = meta.global_pool == "window" and meta.global_pools > 0
    support = _support(meta, windowed, nd)
    if support is None:  # where an output's field starts is not known: one field each side
        halo = tuple(u * (math.ceil(f / u) + 1) for f, u in zip(field_, unit))
        after = halo
    else:
        # output q reads input [q * res - before, q * res - before + size): a block reads
        # that much before its first output and after its last, in whole lattice steps (the
        # window starts and ends on the lattice, so no tight crop cuts its last outputs)
        halo = tuple(u * math.ceil(b / u) for (b, _), u in zip(support, unit))
        after = tuple(u * math.ceil(max(0, n - b - res) / u) for (b, n), u in zip(support, unit))
    window = tuple(example[2:]) if windowed else tuple(field_)
    # output q's window starts at input pixel q * step: the example-size window in window
    # mode, the receptive field of an unpadded network; a padded network's field reaches
    # before pixel 0 by an amount its graph does not record in one number: left unknown
    offset = (0,) * nd if windowed or not meta.has_padding else None
    return Geometry((res,) * nd, unit, halo, window, offset, after)


def _support(meta, windowed: bool, nd: int) -> list[tuple[int, int]] | None:
    """Per axis, (pixels before an output's lattice point where the input it reads starts,
    how many it reads), when the model records it: window pooling's support, or the
    receptive field with its padding reach (``core.lattice.Field``) of a map model."""
    from econv_convert.core.lattice import UNKNOWN_REACH

    if getattr(meta, "support", None) and len(meta.support) == nd:
        found = [(int(b), int(n)) for b, n in meta.support]
    elif not windowed and meta.out_field and len(meta.out_field) == nd:
        found = [(int(f[2]), int(f[0])) for f in meta.out_field]
    else:
        return None
    if any(b < 0 or b >= UNKNOWN_REACH or n < 1 for b, n in found):
        return None
    return found


# -- the job ---------------------------------------------------------------------------------


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
    y = _as_map(run(x), job.shape[0], len(in_range))
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


def timed(run: Callable[[np.ndarray], np.ndarray]):
    """``run`` and a list whose one number adds up the seconds its calls take."""
    seconds = [0.0]

    def timed_run(x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return run(x)
        finally:
            seconds[0] += time.perf_counter() - start

    return timed_run, seconds


def store_block(job: Job, block: tuple[int, ...], index: tuple, part: np.ndarray
                ) -> tuple[int, ...]:
    """Write one computed block into the zarr output, then mark it done (for --resume)."""
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


def output_size(model, source, geo: Geometry, mean, std) -> tuple[int, ...]:
    """The whole image's output shape ``(C, *spatial)``, from one run at the far corner: a
    window that starts on the lattice loses exactly ``start / step`` outputs (every layer's
    size shrinks by the shift over its stride), so the image's size is the corner's plus
    that. ``model``: a :class:`ModelSpec` or a run function."""
    sizes = source.shape[1:]
    nd = len(sizes)
    after = geo.halo_after or geo.halo
    need = [h + t + max(win, u) for h, t, win, u in zip(geo.halo, after, geo.window, geo.unit)]
    starts = [max(0, (n - m) // u * u) for n, m, u in zip(sizes, need, geo.unit)]
    x = normalize(source.read_window([(a, n) for a, n in zip(starts, sizes)]), mean, std)[None]
    run = runner(model) if isinstance(model, ModelSpec) else model
    corner = "x".join(str(n - a) for a, n in zip(starts, sizes))
    try:
        y = run(np.ascontiguousarray(x))
    except Exception as e:
        raise InvalidInputError(f"the model does not run on a {corner} window of the input "
                                f"({describe(e)}); is the input smaller than the model's "
                                "window?") from None
    if y.ndim < nd + 1:
        raise InvalidInputError(f"the model's output {tuple(y.shape)} is not a map")
    channels = math.prod(y.shape[1:-nd])
    size = [n + s // st for n, s, st in zip(y.shape[-nd:], starts, geo.step)]
    if any(n <= 0 for n in size):
        raise InvalidInputError("the input " + "x".join(map(str, sizes)) + " is smaller "
                                "than the model's window")
    return (channels, *size)


# -- the output ------------------------------------------------------------------------------


def checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_ours(path: Path) -> bool:
    found = ngff.record(path) if path.is_dir() else None
    return bool(found) and found.get("format") == FORMAT


def result_array(path: str | Path):
    """The full-resolution output ``(C, H', W')`` of a finished (or running) ``predict``."""
    path = Path(path)
    if not _is_ours(path):
        raise InvalidInputError(f"{path}: not an output of econv-convert predict")
    return ngff.level0(path)


def claim_output(output: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse early what :func:`prepare_output` would refuse about an existing output."""
    path = Path(output)
    if path.exists():
        if not _is_ours(path):
            raise OutputExistsError(f"{path}: exists and is not an output of econv-convert "
                                    "predict; choose another -o")
        if not resume and not overwrite:
            raise OutputExistsError(f"{path}: exists; --resume to finish it, --overwrite to "
                                    "replace it")
    elif resume:
        raise InvalidInputError(f"{path}: nothing to resume (no such output)")


def prepare_output(job: Job, record: dict[str, Any], *, resume: bool,
                   overwrite: bool, ngff_version: str = "0.5") -> set[tuple[int, int]]:
    """Create the output group and its empty full-resolution array (or open them to
    resume); returns the blocks already done."""
    path = Path(job.output)
    record = {**record, "writer": WRITER}
    claim_output(path, resume=resume, overwrite=overwrite)
    if path.exists():
        if resume:
            old = ngff.record(path) or {}
            for key in ("model_sha256", "options", "shape", "block", "ngff", "mask", "writer"):
                if old.get(key) != record.get(key):
                    raise OutputExistsError(
                        f"{path}: was started with another {key.replace('_', ' ')} "
                        f"({old.get(key)} vs {record.get(key)}); --overwrite to start again")
            if old.get("complete"):
                return set(job.blocks())
            done = set()
            for m in (path / MARKERS).iterdir() if (path / MARKERS).is_dir() else ():
                done.add(tuple(int(v) for v in m.name.split("_")))
            return done
        shutil.rmtree(path)
    ngff.create(path, job.shape, job.block, {**record, "complete": False}, ngff_version)
    (path / MARKERS).mkdir()
    return set()


def finish_output(job: Job, seconds: float, *, ngff_version: str = "0.5",
                  placement: tuple = ([1.0, 1.0], [0.0, 0.0], None)) -> int:
    """The pyramid, labels and NGFF metadata over the complete full-resolution array; then
    ``complete``. Returns the number of levels."""
    scale, translation, unit = placement
    levels = ngff.finish(job.output, ngff=ngff_version, scale=scale, translation=translation,
                         unit=unit, name=Path(job.output).stem)
    ngff.update_record(job.output, complete=True, seconds=round(seconds, 3), levels=levels)
    shutil.rmtree(Path(job.output) / MARKERS, ignore_errors=True)
    return levels


# -- running the blocks ----------------------------------------------------------------------


@dataclass
class RunReport:
    output: str
    shape: tuple[int, ...]
    blocks_total: int
    blocks_skipped: int
    seconds: float
    workers: int
    scheduler: str
    dashboard: str | None = None
    overview: str | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    ngff: str = "0.5"
    levels: int = 1  # pyramid levels written
    pixel_size: list[float] | None = None  # the input's micrometres per pixel (y, x)
    scale: list[float] = field(default_factory=list)  # level 0's pixel size (y, x)
    unit: str | None = None  # "micrometer", or None: input pixels
    blocks_masked: int = 0
    mask: dict[str, Any] | None = None
    # seconds: reading the mask and probing the output size, the blocks, the pyramid and
    # label image, the overview picture; and the model's own time within the blocks (summed
    # over the workers: CPU seconds of a kind, not a part of the wall time)
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        raise InvalidInputError(f"--scheduler {scheduler}: cannot connect ({describe(e)})") \
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


def predict_scene(model: ModelSpec, source: SourceSpec, output: str | Path, *,
                  record: dict[str, Any], block: int | None = None, mean=None, std=None,
                  workers: int | None = None, scheduler: str | None = None,
                  resume: bool = False, overwrite: bool = False,
                  max_memory: int | None = None, meta=None, progress: Progress | None = None,
                  on_start=None, overview_channel: int | None = None,
                  overview: bool = True, ngff_version: str = "0.5",
                  mask: str = "default") -> RunReport:
    """The dense output of ``model`` over the image at ``source``, written block by block to
    the OME-Zarr image ``output`` (:mod:`econv_convert.run.ngff`). ``record`` (the options,
    the model's checksum) goes into its ``econv`` attribute; ``meta`` is the model's
    :class:`DenseInfo`. ``mask`` (``default``, ``auto``, ``none`` or a binary image's path,
    :mod:`econv_convert.run.mask`): blocks whose input window holds no tissue are not
    computed (their outputs stay NaN)."""
    from econv_convert.run import mask as masks

    start = time.perf_counter()
    geo = geometry(meta)
    if len(geo.step) != 2:
        raise InvalidInputError(f"prediction over image files takes 2-D models; this one has "
                                f"{len(geo.step)} spatial axes (the Python API's predict "
                                "takes any)")
    ngff.zarr_format(ngff_version)
    claim_output(output, resume=resume, overwrite=overwrite)
    src = open_source(source)  # errors about the input come before anything is written
    mpp = src.mpp
    try:
        tissue = masks.make(mask, source, src.shape[1:], len(src.levels) or 1)
        shape = output_size(model, src, geo, mean, std)
        size = block_size(meta, geo, src.shape, block, max_memory, workers)
    finally:
        if hasattr(src, "close"):
            src.close()
    job = Job(model, source, str(output), shape, (size, size), geo.step, geo.unit, geo.halo,
              tuple(mean) if mean is not None else None,
              tuple(std) if std is not None else None, halo_after=geo.halo_after)
    where_ = {"step": list(geo.step), "offset": list(geo.offset) if geo.offset else None,
              "window": list(geo.window)}
    placement = ngff.placement(mpp, geo.step, geo.offset, geo.window)
    full = {**record, "format": FORMAT, "shape": list(shape), "block": [size, size], **where_,
            "layout": "C,H,W", "ngff": ngff_version, "level": source.level,
            "pixel_size_um": list(mpp) if mpp else None, "scale": placement[0],
            "translation": placement[1], "unit": placement[2],
            "mask": tissue.to_record() if tissue is not None else None}
    done = prepare_output(job, full, resume=resume, overwrite=overwrite,
                          ngff_version=ngff_version)
    masked = set()
    if tissue is not None:
        image = src.shape[1:]
        for b in job.blocks():
            _, ((y0, y1), (x0, x1)) = job.window(b, image)
            if not tissue.has_tissue(y0, y1, x0, x1):
                masked.add(b)
    todo = [b for b in job.blocks() if b not in done and b not in masked]
    n_workers = default_workers() if workers is None else workers
    if scheduler is None and n_workers > len(todo):
        n_workers = len(todo) if len(todo) > 1 else 0  # one block: no cluster to start
    if scheduler is None and n_workers == 1:
        n_workers = 0  # one worker: this process, without starting a cluster for it
    threads = model.threads or max(1, (os.cpu_count() or 1) // max(1, n_workers))
    job = replace(job, model=replace(model, threads=threads))
    timing = {"prepare": time.perf_counter() - start}
    where, used, model_seconds = run_blocks(job, todo, workers=n_workers, scheduler=scheduler,
                                            progress=progress, on_start=on_start)
    timing["blocks"] = time.perf_counter() - start - timing["prepare"]
    levels = finish_output(job, time.perf_counter() - start, ngff_version=ngff_version,
                           placement=placement)
    timing["pyramid_and_labels"] = time.perf_counter() - start - sum(timing.values())
    picture = None
    if overview:
        picture = str(Path(output).with_suffix(".png"))
        write_overview(job.output, picture, overview_channel)
        timing["overview"] = time.perf_counter() - start - sum(timing.values())
    return RunReport(str(output), shape, len(job.blocks()), len(done),
                     round(time.perf_counter() - start, 3), used, where, overview=picture,
                     geometry={**where_, "halo": list(geo.halo),
                               "halo_after": list(geo.halo_after), "block": size},
                     ngff=ngff_version, levels=levels, pixel_size=list(mpp) if mpp else None,
                     scale=placement[0], unit=placement[2], blocks_masked=len(masked),
                     mask=full["mask"], timing={**{k: round(v, 3) for k, v in timing.items()},
                                                "model_in_blocks": round(model_seconds, 3)})


BLOCK_PIXELS = 1024  # input pixels a default block covers, per side
GROW_BYTES = 2**30  # up to 4x that where a block's maps still fit this (coarse strides)


def block_size(meta, geo: Geometry, image, block: int | None, max_memory: int | None,
               workers: int | None) -> int:
    """Output positions per block side: ``block`` if given (checked: whole lattice steps),
    else the default (:func:`_default_block`)."""
    size = block or _default_block(meta, geo, image, max_memory, workers)
    if size < 1 or any((size * s) % u for s, u in zip(geo.step, geo.unit)):
        unit = math.lcm(*(u // math.gcd(u, s) for u, s in zip(geo.unit, geo.step)))
        raise InvalidInputError(f"--block {size}: must be a positive multiple of {unit} "
                                "(output positions per lattice step)")
    return size


def _default_block(meta, geo: Geometry, image, max_memory, workers) -> int:
    """Output positions per block side: about 1024 input pixels a side (larger blocks spend
    less on halos but ran slower and less steadily per pixel here once a dense map is over a
    gigabyte: ``benchmarks/scene.py --profile``), up to 4096 where the maps stay under
    :data:`GROW_BYTES` (at a coarse output stride), fewer if the memory budget shared by the
    workers needs it, a whole number of lattice steps."""
    from econv_convert.run.resources import available_bytes, estimate_bytes

    n = max(1, workers if workers is not None else default_workers())
    budget = max_memory if max_memory is not None else (available_bytes() or 8 * 2**30) // 2
    budget //= n
    unit = math.lcm(*(u // math.gcd(u, s) for u, s in zip(geo.unit, geo.step)))
    size = max(unit, BLOCK_PIXELS // max(geo.step) // unit * unit)
    largest = max(image[1:])

    def cost(b: int) -> int:
        sides = [min(full, b * s + h + t) for full, s, h, t in
                 zip(image[1:], geo.step, geo.halo, geo.halo_after or geo.halo)]
        return estimate_bytes(meta, [1, image[0], *sides])

    # where the maps are small (a coarse output stride), larger blocks spend less on halos
    while (size * 2 * max(geo.step) <= 4 * BLOCK_PIXELS and size * 2 * geo.step[0] <= largest
           and cost(size * 2) <= min(GROW_BYTES, budget)):
        size *= 2
    while size > unit and (cost(size) > budget or size * geo.step[0] > 2 * largest):
        size = max(unit, size // 2 // unit * unit)
    if cost(size) > budget:
        from econv_convert.run.resources import ResourceError

        raise ResourceError(f"even the smallest block ({unit} outputs plus a halo of "
                            f"{max(geo.halo)} pixels) needs about {cost(size) / 2**20:.0f} MiB, "
                            f"over the budget of {budget / 2**20:.0f} MiB per worker; raise "
                            "--max-memory or use fewer --workers")
    return size


def write_overview(output: str, picture: str, channel: int | None, longest: int = 1024):
    """A downsampled PNG of the output: one channel as a heat map, or the arg-max class."""
    import torch
    from PIL import Image

    from econv_convert.files import atomic_write
    from econv_convert.run.predict import heat_map

    array = ngff.coarsest(output)  # at most ngff.SMALLEST a side (or one pixel thin)
    if channel is not None and not 0 <= channel < array.shape[0]:
        raise InvalidInputError(f"--channel {channel}: the output has {array.shape[0]} channels")
    f = max(1, math.ceil(max(array.shape[1:]) / longest))
    small = np.asarray(array[:, ::f, ::f])
    rgb = heat_map(torch.from_numpy(np.nan_to_num(small))[None], channel).numpy()
    atomic_write(Path(picture), lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
