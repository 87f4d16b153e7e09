"""Dense predictions over images larger than memory: the job around the blocks.

The output is an OME-Zarr image (:mod:`econv_convert.run.ngff`) whose full-resolution array
``(C, H', W')`` is written block by block (:mod:`econv_convert.run.blocks`: one chunk and
one task per block, on Dask or in this process; :mod:`econv_convert.run.runner`: the model
as each process runs it). Here: the geometry of the blocks, the output's size, the output
claimed, created, resumed and finished, the default block size. A block is exact (the
whole-image dense output there) for the reason tiles are (:mod:`econv_convert.run.predict`):
the window starts on the image's lattice and its halo holds a receptive field.

A finished block leaves a marker file; the group attribute ``econv`` records the model's
checksum and the options, and ``complete`` becomes true only when every block is written and
the pyramid and labels are built. So a killed run loses only the blocks in flight, and
``resume`` computes only the missing ones, refusing when the model or the options differ.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError
from econv_convert.run import ngff
from econv_convert.run.blocks import (  # noqa: F401  (compute_block: for callers of scene)
    MARKERS,
    Job,
    Progress,
    compute_block,
    default_workers,
    run_blocks,
)
from econv_convert.run.geometry import (  # noqa: F401  (Geometry, geometry: for callers)
    Geometry,
    geometry,
    output_size,
)
from econv_convert.run.runner import ModelSpec
from econv_convert.run.sources import SourceSpec, open_source

FORMAT = "econv-convert dense prediction"
WRITER = 3  # how the output is laid out; 3: the blocks write their part of the pyramid too


class OutputExistsError(InvalidInputError):
    """The output exists and neither resume nor overwrite was asked for, or it differs."""


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
            raise OutputExistsError(f"{path}: exists; resume=True to finish it, overwrite=True to "
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
                        f"({old.get(key)} vs {record.get(key)}); overwrite=True to start again")
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


# -- the report ----------------------------------------------------------------------------


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
    # the NGFF writer is only needed at the end, and importing it takes over half a second
    importer = threading.Thread(target=importlib.import_module, args=("ome_zarr.writer",),
                                daemon=True)
    importer.start()
    where, used, steps = run_blocks(job, todo, workers=n_workers, scheduler=scheduler,
                                    progress=progress, on_start=on_start)
    timing["blocks"] = time.perf_counter() - start - timing["prepare"]
    importer.join()
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
                                                **{f"{k}_in_blocks": round(v, 3)
                                                   for k, v in steps.items()}})


BLOCK_PIXELS = 1024  # input pixels a default block covers, per side
GROW_BYTES = 2**30  # up to 4x that where a block's maps still fit this (coarse strides)


def block_size(meta, geo: Geometry, image, block: int | None, max_memory: int | None,
               workers: int | None) -> int:
    """Output positions per block side: ``block`` if given (checked: whole lattice steps),
    else the default (:func:`_default_block`)."""
    size = block or _default_block(meta, geo, image, max_memory, workers)
    if size < 1 or any((size * s) % u for s, u in zip(geo.step, geo.unit)):
        unit = math.lcm(*(u // math.gcd(u, s) for u, s in zip(geo.unit, geo.step)))
        raise InvalidInputError(f"block={size}: must be a positive multiple of {unit} "
                                "(output positions per lattice step)")
    return size


def _default_block(meta, geo: Geometry, image, max_memory, workers) -> int:
    """Output positions per block side: about 1024 input pixels a side, up to 4096 (fewer
    halos recomputed) where the maps stay under :data:`GROW_BYTES` (at a coarse output
    stride), or within the memory budget where the dense model is not dilated (the output
    stride is the total stride); fewer if the memory budget shared by the workers needs it; a
    whole number of lattice steps. Dilated convolutions ran slower and less steadily per
    pixel here once a map is over a gigabyte (``benchmarks/scene.py --widths``); undilated
    ones do not, and a ResNet-18's halo (608 pixels) costs 1.7x the work of a 2048-pixel
    block but 1.3x of a 4096-pixel one."""
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
    dilated = any(u > s for u, s in zip(geo.unit, geo.step))
    grow = min(GROW_BYTES, budget) if dilated else budget
    while (size * 2 * max(geo.step) <= 4 * BLOCK_PIXELS and size * 2 * geo.step[0] <= largest
           and cost(size * 2) <= grow):
        size *= 2
    while size > unit and (cost(size) > budget or size * geo.step[0] > 2 * largest):
        size = max(unit, size // 2 // unit * unit)
    if cost(size) > budget:
        from econv_convert.run.resources import ResourceError

        raise ResourceError(f"even the smallest block ({unit} outputs plus a halo of "
                            f"{max(geo.halo)} pixels) needs about {cost(size) / 2**20:.0f} MiB, "
                            f"over the budget of {budget / 2**20:.0f} MiB per worker; raise "
                            "max_memory=... or use fewer workers=...")
    return size


def write_overview(output: str, picture: str, channel: int | None, longest: int = 1024):
    """A downsampled PNG of the output: one channel as a heat map, or the arg-max class."""
    import torch
    from PIL import Image

    from econv_convert.files import atomic_write
    from econv_convert.run.predict import heat_map

    array = ngff.coarsest(output)  # at most ngff.SMALLEST a side (or one pixel thin)
    if channel is not None and not 0 <= channel < array.shape[0]:
        raise InvalidInputError(f"channel={channel}: the output has {array.shape[0]} channels")
    f = max(1, math.ceil(max(array.shape[1:]) / longest))
    small = np.asarray(array[:, ::f, ::f])
    rgb = heat_map(torch.from_numpy(np.nan_to_num(small))[None], channel).numpy()
    atomic_write(Path(picture), lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
