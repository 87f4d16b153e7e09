"""The output of ``predict`` as an OME-NGFF image that viewers open at the right scale.

``OUT.zarr`` is a zarr group: the dense output at full resolution is its array ``0``
``(c, y, x)``, float32, one chunk per block, NaN where nothing was computed (blocks skipped as
background); ``1``, ``2``, ... halve it down to about 1024 pixels a side; ``labels/classes``
holds the arg-max class (+1, 0 where there is no output) as an integer label image of the same
pyramid. The NGFF metadata (``multiscales`` with axes ``c, y, x``, ``y`` and ``x`` in
micrometres when the input's pixel size is known; ``omero`` display windows; the label
metadata) is written by the ``ome-zarr`` library. Version 0.5 lives in zarr v3, 0.4 (for
viewers that read only 0.4) in zarr v2.

Level 0's ``scale`` is the input's pixel size times the output step, and its
``translation`` puts output ``q`` at the centre of the input window it reads: input pixel
``offset + q * step + (window - 1) / 2``. Every coarser level is the mean of 2 x 2 of the
level above (of those that are numbers), so its pixels sit at the centres of those.

Each block writes its own part of every level whose chunks it fills whole (a block of ``b``
outputs a side is ``b / 2**k`` at level ``k``, while that is a whole number of at least
:data:`SMALLEST_CHUNK`), with their labels: no pass re-reads level 0, and workers never share
a chunk. The few coarser levels are built at the end, a chunk at a time, from the last of
those.

What econv-convert needs to resume or read a result (model checksum, options, geometry,
``complete``) is the group attribute ``econv``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError, OutputWriteError, describe

VERSIONS = ("0.5", "0.4")
LEVEL0 = "0"
LABELS, CLASSES = "labels", "classes"
SMALLEST = 1024  # the pyramid stops once a level fits this many pixels a side
SMALLEST_CHUNK = 64  # levels written by the blocks have chunks at least this large
_PALETTE = ("FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FF8000", "8000FF")


def zarr_format(ngff: str) -> int:
    if ngff not in VERSIONS:
        raise InvalidInputError(f"ngff_version={ngff}: expected one of {', '.join(VERSIONS)}")
    return 3 if ngff == "0.5" else 2


def _fmt(ngff: str):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV05() if ngff == "0.5" else FormatV04()


def level_shapes(shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The shape ``(C, h, w)`` of each pyramid level: level 0, then each halved (rounded
    down) while the level above is over :data:`SMALLEST` pixels a side."""
    shapes = [tuple(shape)]
    while max(shapes[-1][1:]) > SMALLEST and min(shapes[-1][1:]) >= 2:
        shapes.append((shape[0], *(n // 2 for n in shapes[-1][1:])))
    return shapes


def block_levels(shape: Sequence[int], block: Sequence[int]) -> int:
    """How many levels past 0 the blocks write themselves: those whose chunk (the block
    halved ``k`` times) is whole and at least :data:`SMALLEST_CHUNK` a side."""
    k = 0
    while (k + 1 < len(level_shapes(shape))
           and all(b % 2 ** (k + 1) == 0 and b // 2 ** (k + 1) >= SMALLEST_CHUNK
                   for b in block)):
        k += 1
    return k


def create(path: str | Path, shape: Sequence[int], block: Sequence[int], record: dict,
           ngff: str) -> None:
    """The group with empty levels 0 to :func:`block_levels` (filled with NaN; their labels
    with 0) and the ``econv`` record."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format(ngff))
    shapes = level_shapes(shape)
    written = block_levels(shape, block)
    classes = group.require_group(LABELS).require_group(CLASSES) if shape[0] > 1 else None
    for k in range(written + 1):
        chunks = tuple(b // 2 ** k for b in block)
        group.create_array(str(k), shape=shapes[k], chunks=(shape[0], *chunks),
                           dtype="float32", fill_value=float("nan"),
                           **_array_options(group, "cyx"))
        if classes is not None:  # the blocks write their classes as they go (:func:`classes`)
            classes.create_array(str(k), shape=shapes[k][1:], chunks=chunks,
                                 dtype=_label_dtype(shape[0]), fill_value=0,
                                 **_array_options(group, "yx"))
    group.attrs["econv"] = {**record, "block_levels": written}


def _label_dtype(channels: int):
    return np.uint8 if channels < 255 else np.uint16


def classes(values: np.ndarray, finite: bool | None = None) -> np.ndarray:
    """The label of each output of ``values`` ``(C, ...)``: its arg-max class + 1, 0 where an
    output is not a number (not computed). ``finite``: whether every value is known to be a
    number (checked here when not given)."""
    import torch

    # torch's arg-max (the first largest, as numpy's) runs on every core; along the
    # channels-last memory the model gave, without a copy; an output with a non-number has
    # label 0 whatever its arg-max (checked element-wise only when the sum is not a number)
    t = torch.from_numpy(values)
    label = torch.argmax(t, dim=0).add_(1)
    if not (_finite(t) if finite is None else finite):
        label.masked_fill_(~torch.isfinite(t).all(dim=0), 0)
    return label.to(_torch_dtype(_label_dtype(values.shape[0]))).numpy()


def _finite(t) -> bool:
    """Whether every value of the tensor ``t`` is a number (one sum on every core)."""
    import torch

    return bool(torch.isfinite(t.sum()))


def _torch_dtype(dtype):
    import torch

    return {np.uint8: torch.uint8, np.uint16: torch.uint16}[dtype]


def write_block(path: str | Path, index: tuple, values: np.ndarray) -> None:
    """One block of level 0, ``values`` at ``index`` ``(slice(None), y, x)``, its part of
    the levels the blocks write (:func:`block_levels`) and the labels of each; on disk when
    it returns."""
    with BlockWriter(path) as writer:
        writer.write(index, values)


class BlockWriter:
    """Blocks written into the output at ``path``: halving and arg-max in the caller's
    thread, a block's chunks (every level, scores and labels) compressed at once in zarr's
    threads while the caller waits (Blosc on every core), then handed to the disk in a thread
    of their own.

    A disk here takes a block's 26 MB of level-0 chunks in about 70 ms once its write cache
    is full, time the model can use: waiting on a disk takes no core, where halving or
    compressing beside the model held up its threads (the kernel's copying of the chunks
    into the page cache still takes some: about 4 s of an 8192² job at output stride 1,
    see the README's Performance section). Chunks reach the disk in the order
    written, and ``then`` (a block's resume marker) after them, nothing after a failure;
    the first error (a full disk) is raised in the caller's thread by a later write or by
    :meth:`flush`, which waits for all."""

    LIMIT = 256 * 2**20  # bytes waiting for the disk at most; more wait in the caller

    def __init__(self, path: str | Path):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        import zarr

        self._root = str(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="econv-disk")
        self._pending: deque = deque()
        self._waiting = 0
        self._failed: BaseException | None = None
        self.group = zarr.open_group(store=_behind_store(self._root, self), mode="r+")
        levels = int(self.group.attrs["econv"].get("block_levels", 0))
        # each level's array opened once (its metadata read once), chunks written whole: no
        # pass comparing them with the fill value
        self._scores = [_whole(self.group[str(k)]) for k in range(levels + 1)]
        self._labels = ([_whole(self.group[LABELS][CLASSES][str(k)]) for k in range(levels + 1)]
                        if self.group[LEVEL0].shape[0] > 1 else None)
        self._threads = _compress_on_every_core(True)

    def write(self, index: tuple, values: np.ndarray, then=None) -> None:
        import torch
        from zarr.core.sync import sync

        starts = [i.start for i in index[1:]]
        # whether the block is numbers throughout, checked once: its halvings are then too
        finite = _finite(torch.from_numpy(values))
        parts = []
        for k, scores in enumerate(self._scores):
            if k:
                values = halve(values, finite)
            where = (slice(None), *(slice(a >> k, (a >> k) + n)
                                    for a, n in zip(starts, values.shape[1:])))
            parts.append(scores.async_array.setitem(where, _c_order(values)))
            if self._labels is not None:
                parts.append(self._labels[k].async_array.setitem(where[1:],
                                                                 classes(values, finite)))
        # every chunk of the block compressed at once, in zarr's threads
        sync(_all(parts))
        if then is not None:
            self.submit(then)

    def submit(self, f, *args, size: int = 0) -> None:
        """``f(*args)`` in the disk thread, after what was submitted before; ``size``: the
        bytes it holds until then."""
        while self._pending and (self._pending[0][0].done()
                                 or self._waiting + size > self.LIMIT):
            self._done(self._pending.popleft())
        self._pending.append((self._pool.submit(self._in_turn, f, args), size))
        self._waiting += size

    def _in_turn(self, f, args) -> None:
        """``f(*args)`` unless something before it failed (a block's marker never follows a
        chunk that did not reach the disk)."""
        if self._failed is not None:
            raise self._failed
        try:
            f(*args)
        except OSError as e:
            self._failed = OutputWriteError(
                f"{self._root}: cannot write ({describe(e)}); the blocks written before are "
                "kept: free some space, then run again with resume=True")
            raise self._failed from None
        except BaseException as e:
            self._failed = e
            raise

    def _done(self, item) -> None:
        future, size = item
        self._waiting -= size
        future.result()

    def flush(self) -> None:
        while self._pending:
            self._done(self._pending.popleft())

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            _compress_on_every_core(self._threads)

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _all(parts) -> None:
    import asyncio

    await asyncio.gather(*parts)


def _compress_on_every_core(threads):
    """Set whether Blosc compresses a chunk on its threads (one per core) from any thread,
    not only the main one, and return the setting before. zarr compresses in threads of its
    own, where Blosc would otherwise use one core: a block's 42 MB of level-0 scores took
    28 ms on one, 14 ms on two."""
    import numcodecs.blosc

    before, numcodecs.blosc.use_threads = numcodecs.blosc.use_threads, threads
    return before


def _behind_store(root: str, writer: BlockWriter):
    """A local zarr store whose chunk writes go through ``writer``'s disk thread (metadata
    is written at once)."""
    from zarr.storage import LocalStore

    class Behind(LocalStore):
        async def set(self, key, value) -> None:
            if key.rsplit("/", 1)[-1] in _METADATA:
                return await super().set(key, value)
            writer.submit(_put, self.root / key, value, size=len(value))

    return Behind(root)


_METADATA = {"zarr.json", ".zarray", ".zgroup", ".zattrs"}


def _put(path: Path, value) -> None:
    """A chunk's bytes to ``path`` as zarr writes them: whole or not at all."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".partial")
    with open(part, "wb") as f:
        f.write(value.as_buffer_like())
    os.replace(part, path)


def _whole(array):
    return array.with_config({"write_empty_chunks": True})


def _c_order(values: np.ndarray) -> np.ndarray:
    """``values`` in C order, as zarr stores a chunk (the model gives channels last): copied
    on every core by torch, where numpy (or zarr) would copy on one."""
    if values.flags.c_contiguous:
        return values
    import torch

    return torch.from_numpy(values).contiguous().numpy()


def halve(values: np.ndarray, finite: bool | None = None) -> np.ndarray:
    """The mean of each 2 x 2 of the trailing two dims that are numbers (NaN where none is), an
    odd last row or column dropped. ``finite``: whether every value is known to be a number
    (checked here when not given)."""
    import torch

    h, w = (n // 2 * 2 for n in values.shape[-2:])
    # the four corners of every quad added as strided views: on every core, in the memory
    # order given (channels last, as the model gives it), 10x faster than a pooling kernel
    t = torch.from_numpy(values)
    total = ((t[..., 0:h:2, 0:w:2] + t[..., 1:h:2, 0:w:2])
             + (t[..., 0:h:2, 1:w:2] + t[..., 1:h:2, 1:w:2]))
    if _finite(total) if finite is None else finite:
        return total.mul_(0.25).numpy()
    quads = values[..., :h, :w].reshape(*values.shape[:-2], h // 2, 2, w // 2, 2)
    with warnings.catch_warnings():  # all-NaN quads (blocks skipped) are NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(quads, axis=(-3, -1)).astype(np.float32)


def _array_options(group, axes: str) -> dict[str, Any]:
    """How NGFF wants an array of ``axes`` stored: named dims in zarr v3 (0.5), "/"-separated
    chunk keys in zarr v2 (0.4); Blosc LZ4 with byte shuffling, the codec every OME-Zarr
    reader has (on model outputs: a quarter of the compression time of zarr's default zstd,
    and smaller: ``benchmarks/scene.py --profile``)."""
    if group.metadata.zarr_format == 3:
        from zarr.codecs import BloscCodec

        return {"dimension_names": tuple(axes),
                "compressors": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}
    from numcodecs import Blosc

    return {"chunk_key_encoding": {"name": "v2", "separator": "/"},
            "compressors": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)}


def record(path: str | Path) -> dict | None:
    """The ``econv`` record of an output, or None if ``path`` is not one."""
    import zarr

    try:
        return dict(zarr.open_group(str(path), mode="r").attrs["econv"])
    except Exception:
        return None


def update_record(path: str | Path, **changes) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["econv"] = {**dict(group.attrs["econv"]), **changes}


def level0(path: str | Path, mode: str = "r"):
    """The full-resolution output array ``(C, H', W')``."""
    import zarr

    return zarr.open_array(str(Path(path) / LEVEL0), mode=mode)


def coarsest(path: str | Path):
    """The smallest stored pyramid level ``(C, h, w)`` of an output."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    k = 0
    while str(k + 1) in group:
        k += 1
    return group[str(k)]


def transforms(scale: Sequence[float], translation: Sequence[float], level: int
               ) -> list[dict]:
    """Level ``level``'s coordinate transformations (``c, y, x``): each level halves the one
    above by 2 x 2 means, so its pixels sit at the centres of those it averages."""
    f = 2 ** level
    s = [1.0, *(v * f for v in scale)]
    t = [0.0, *(t0 + v * (f - 1) / 2 for t0, v in zip(translation, scale))]
    return [{"type": "scale", "scale": s}, {"type": "translation", "translation": t}]


def placement(mpp: Sequence[float] | None, step: Sequence[int], offset: Sequence[int] | None,
              window: Sequence[int]) -> tuple[list[float], list[float], str | None]:
    """Level 0's (scale, translation, unit) for ``y, x``: micrometres when the input's pixel
    size ``mpp`` is known, else input pixels."""
    size = list(mpp) if mpp is not None else [1.0, 1.0]
    start = list(offset) if offset is not None else [0, 0]
    scale = [m * s for m, s in zip(size, step)]
    translation = [m * (o + (w - 1) / 2) for m, o, w in zip(size, start, window)]
    return scale, translation, "micrometer" if mpp is not None else None


def finish(path: str | Path, *, ngff: str, scale: Sequence[float],
           translation: Sequence[float], unit: str | None, name: str,
           channel_names: Sequence[str] | None = None) -> int:
    """Write the coarsest pyramid levels with their labels (those the blocks did not write:
    :func:`write_block`) and the NGFF metadata once the blocks are done. Returns the number
    of levels."""
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    fmt = _fmt(ngff)
    group = zarr.open_group(str(path), mode="r+")
    levels = _pyramid(group)
    channels = levels[0].shape[0]
    datasets = [{"path": str(k), "coordinateTransformations": transforms(scale, translation, k)}
                for k in range(len(levels))]
    axes = [{"name": "c", "type": "channel"}, *({"name": a, "type": "space",
                                                  **({"unit": unit} if unit else {})}
                                                 for a in "yx")]
    low = np.asarray(levels[-1][:])
    omero = {"channels": [_channel(k, low[k], channel_names) for k in range(channels)]}
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=name,
                               metadata={"omero": omero})
    if channels > 1:
        _labels(group, levels, datasets, axes, fmt, channel_names)
    return len(levels)


def _pyramid(group) -> list:
    """Every level, stored: those the blocks wrote, then each coarser one from the level
    above, a chunk at a time (chunks of the last level the blocks wrote)."""
    shape = group[LEVEL0].shape
    written = int(group.attrs["econv"].get("block_levels", 0))
    levels = [group[str(k)] for k in range(written + 1)]
    chunks = levels[-1].chunks
    labels = group[LABELS][CLASSES] if shape[0] > 1 else None
    for k, level_shape in enumerate(level_shapes(shape)[written + 1:], written + 1):
        cut = tuple(min(c, n) for c, n in zip(chunks, level_shape))
        level = group.create_array(str(k), shape=level_shape, chunks=cut, dtype="float32",
                                   fill_value=float("nan"), overwrite=True,
                                   **_array_options(group, "cyx"))
        label = None if labels is None else labels.create_array(
            str(k), shape=level_shape[1:], chunks=cut[1:], dtype=_label_dtype(shape[0]),
            fill_value=0, overwrite=True, **_array_options(group, "yx"))
        above = levels[-1]
        for y in range(0, level_shape[1], cut[1]):
            for x in range(0, level_shape[2], cut[2]):
                h, w = min(cut[1], level_shape[1] - y), min(cut[2], level_shape[2] - x)
                part = halve(np.asarray(above[:, 2 * y:2 * (y + h), 2 * x:2 * (x + w)]))
                level[:, y:y + h, x:x + w] = part
                if label is not None:
                    label[y:y + h, x:x + w] = classes(part)
        levels.append(level)
    return levels


def _channel(k: int, values: np.ndarray, names) -> dict:
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return {"label": names[k] if names else f"channel {k}", "color": _PALETTE[k % len(_PALETTE)],
            "active": True, "window": {"min": lo, "max": hi, "start": lo, "end": hi}}


def _labels(group, levels, datasets, axes, fmt, names) -> None:
    """The NGFF metadata of the label image ``labels/classes`` (the arg-max class of each
    level, +1; 0 where the output is NaN), with the image's transformations minus the
    channel axis."""
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

    channels = levels[0].shape[0]
    labels = group.require_group(LABELS)
    image = labels.require_group(CLASSES)  # every level's labels: written with its values
    spatial = [{"path": d["path"], "coordinateTransformations": [
        {"type": t["type"], t["type"]: t[t["type"]][1:]} for t in d["coordinateTransformations"]]}
        for d in datasets]
    write_multiscales_metadata(image, spatial, fmt=fmt, axes=axes[1:], name=CLASSES)
    colors = [{"label-value": k + 1, "rgba": [*_rgb(_PALETTE[k % len(_PALETTE)]), 255]}
              for k in range(channels)]
    properties = [{"label-value": k + 1, "class": names[k] if names else f"channel {k}"}
                  for k in range(channels)]
    if fmt.version != "0.4":
        add_metadata(labels, {"version": fmt.version}, fmt=fmt)
    write_label_metadata(labels, "classes", fmt=fmt, colors=colors, properties=properties)


def _rgb(hex_: str) -> list[int]:
    return [int(hex_[i:i + 2], 16) for i in (0, 2, 4)]


