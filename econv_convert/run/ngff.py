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
level above, so its pixels sit at the centres of those.

What econv-convert needs to resume or read a result (model checksum, options, geometry,
``complete``) is the group attribute ``econv``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError

VERSIONS = ("0.5", "0.4")
LEVEL0 = "0"
LABELS, CLASSES = "labels", "classes"
SMALLEST = 1024  # the pyramid stops once a level fits this many pixels a side
_PALETTE = ("FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FF8000", "8000FF")


def zarr_format(ngff: str) -> int:
    if ngff not in VERSIONS:
        raise InvalidInputError(f"--ngff {ngff}: expected one of {', '.join(VERSIONS)}")
    return 3 if ngff == "0.5" else 2


def _fmt(ngff: str):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV05() if ngff == "0.5" else FormatV04()


def create(path: str | Path, shape: Sequence[int], block: Sequence[int], record: dict,
           ngff: str) -> None:
    """The group with an empty level 0 (filled with NaN) and the ``econv`` record."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format(ngff))
    group.create_array(LEVEL0, shape=tuple(shape), chunks=(shape[0], *block), dtype="float32",
                       fill_value=float("nan"), **_array_options(group, "cyx"))
    if shape[0] > 1:  # the blocks write their classes as they go (see :func:`classes`)
        classes = group.require_group(LABELS).require_group(CLASSES)
        classes.create_array(LEVEL0, shape=tuple(shape[1:]), chunks=tuple(block),
                             dtype=_label_dtype(shape[0]), fill_value=0,
                             **_array_options(group, "yx"))
    group.attrs["econv"] = record


def _label_dtype(channels: int):
    return np.uint8 if channels < 255 else np.uint16


def classes(values: np.ndarray) -> np.ndarray:
    """The label of each output of ``values`` ``(C, ...)``: its arg-max class + 1, 0 where an
    output is not a number (not computed)."""
    finite = np.isfinite(values)
    arg = np.argmax(np.where(finite, values, -np.inf), axis=0) + 1
    return np.where(finite.all(axis=0), arg, 0).astype(_label_dtype(values.shape[0]))


def write_block(path: str | Path, index: tuple, values: np.ndarray) -> None:
    """One block of level 0, ``values`` at ``index`` ``(slice(None), y, x)``, and its labels."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group[LEVEL0][index] = values
    if values.shape[0] > 1:
        group[LABELS][CLASSES][LEVEL0][index[1:]] = classes(values)


def _array_options(group, axes: str) -> dict[str, Any]:
    """How NGFF wants an array of ``axes`` stored: named dims in zarr v3 (0.5), "/"-separated
    chunk keys in zarr v2 (0.4)."""
    if group.metadata.zarr_format == 3:
        return {"dimension_names": tuple(axes)}
    return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}


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
    """Write the pyramid, the label images of its coarser levels and the NGFF metadata once
    level 0 (and its labels: :func:`write_block`) is complete. Returns the number of
    levels."""
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


@contextlib.contextmanager
def _lazily():
    """Dask arrays computed here on threads, a chunk at a time (whatever Dask client the
    caller holds), with the means of all-NaN chunks (skipped blocks) left NaN quietly."""
    import dask

    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _pyramid(group) -> list:
    """Level 0 and each 2 x 2 mean of the level above, stored, down to :data:`SMALLEST`
    pixels a side (Dask is imported only when there is a level to compute)."""
    levels = [group[LEVEL0]]
    if max(levels[0].shape[1:]) <= SMALLEST:
        return levels
    import dask.array as da

    with _lazily():
        while max(levels[-1].shape[1:]) > SMALLEST and min(levels[-1].shape[1:]) >= 2:
            above = da.from_zarr(levels[-1])
            small = da.coarsen(np.nanmean, above, {1: 2, 2: 2}, trim_excess=True)
            levels.append(_store(group, str(len(levels)), small, levels[0].chunks, "cyx"))
    return levels


def _store(group, name: str, data, chunks, axes: str) -> Any:
    """``data`` (a Dask array) written as array ``name`` of ``group``, a chunk at a time."""
    import dask.array as da

    array = group.create_array(name, shape=data.shape, dtype=data.dtype,
                               chunks=tuple(min(c, n) for c, n in zip(chunks, data.shape)),
                               fill_value=float("nan") if data.dtype.kind == "f" else 0,
                               overwrite=True, **_array_options(group, axes))
    da.store(data.rechunk(array.chunks), array, lock=False)
    return array


def _channel(k: int, values: np.ndarray, names) -> dict:
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return {"label": names[k] if names else f"channel {k}", "color": _PALETTE[k % len(_PALETTE)],
            "active": True, "window": {"min": lo, "max": hi, "start": lo, "end": hi}}


def _labels(group, levels, datasets, axes, fmt, names) -> None:
    """The arg-max class of each level (+1; 0 where the output is NaN) under
    ``labels/classes``, with the image's transformations minus the channel axis."""
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

    channels = levels[0].shape[0]
    labels = group.require_group(LABELS)
    image = labels.require_group(CLASSES)
    for k, level in enumerate(levels[1:], 1):  # level 0's: written with each block
        import dask.array as da

        with _lazily():
            x = da.from_zarr(level)
            label = x.map_blocks(classes, drop_axis=0, dtype=_label_dtype(channels))
            _store(image, str(k), label, level.chunks[1:], "yx")
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


def describe_scale(scale: Sequence[float], unit: str | None) -> str:
    return " x ".join(f"{v:.4g}" for v in scale) + (" um" if unit else " px")
