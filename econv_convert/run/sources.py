"""Images read window by window, never whole: TIFF/BigTIFF/OME-TIFF (pyramid levels, tiles
in any codec imagecodecs reads), zarr arrays, OpenSlide formats, memory-mapped ``.npy``, and
PNG/JPEG (which have no windowed reader: decoded whole, so keep them small).

A :class:`SourceSpec` is plain, picklable data: each Dask worker opens its own reader from it
(:func:`open_source`, cached per process). A reader returns ``(C, h, w)`` windows in the
file's own dtype; :func:`normalize` turns them into the model's float input.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from econv_convert.errors import InvalidInputError, describe

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LAYOUTS = ("auto", "chw", "hwc")


@dataclass(frozen=True)
class SourceSpec:
    """Where to read: ``path``, the pyramid ``level`` (0 = full resolution), the channel
    ``layout`` (``auto``: from the file's own axes, else from the model's channel count) and
    the channels the model takes."""

    path: str
    channels: int
    level: int = 0
    layout: str = "auto"


class Source:
    """A 2-D image of ``channels`` channels and ``height`` x ``width`` pixels."""

    shape: tuple[int, int, int]  # (C, H, W) as the model takes it
    dtype: np.dtype
    # micrometres per pixel (y, x) at the level read, when the file records it
    mpp: tuple[float, float] | None = None
    # every level of the file: ((height, width), mpp or None), finest first
    levels: tuple = ()

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0, y1) x [x0, x1)`` as a ``(C, h, w)`` array of the file's dtype."""
        raise NotImplementedError

    def read_window(self, ranges) -> np.ndarray:
        """Pixels in ``[(start, end)]`` per spatial axis, as ``(C, ...)``."""
        (y0, y1), (x0, x1) = ranges
        return self.read(y0, y1, x0, x1)


class InMemorySource(Source):
    """An array ``(C, *spatial)`` already in memory (a tensor given to the Python API), of
    any number of spatial axes."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)

    def read_window(self, ranges) -> np.ndarray:
        return self.array[(slice(None),) + tuple(slice(a, b) for a, b in ranges)]

    def read(self, y0, y1, x0, x1):
        return self.read_window([(y0, y1), (x0, x1)])


def kind_of(path: str | Path) -> str:
    name = str(path).lower().rstrip("/")
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(SLIDE_SUFFIXES):
        return "slide"
    if name.endswith(".zarr") or Path(path).is_dir():
        return "zarr"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    raise InvalidInputError(
        f"{path}: unknown input kind; expected a TIFF (.tif, .tiff, .ome.tif), a slide "
        f"({', '.join(SLIDE_SUFFIXES)}), a .zarr array, a .npy array or a PNG/JPEG")


class ArraySource(Source):
    """Any array with numpy slicing (zarr, memory-mapped numpy, tifffile's zarr view) whose
    dims are ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``."""

    def __init__(self, array, layout: str, channels: int, where: str, closer=None):
        self.array, self.layout, self.where, self._closer = array, layout, where, closer
        shape = tuple(array.shape)
        if len(shape) == 2:
            self.layout, c, h, w = "hw", 1, *shape
        elif len(shape) == 3:
            c, h, w = (shape[2], *shape[:2]) if layout == "hwc" else shape
        else:
            raise InvalidInputError(f"{where}: expected a 2-D image (H,W, H,W,C or C,H,W), "
                                    f"got shape {shape}")
        self.file_channels = c
        self.keep = _channels_kept(c, channels, where)
        self.shape = (channels, h, w)
        self.dtype = np.dtype(array.dtype)

    def read(self, y0, y1, x0, x1):
        try:
            if self.layout == "hw":
                a = np.asarray(self.array[y0:y1, x0:x1])[None]
            elif self.layout == "hwc":
                a = np.moveaxis(np.asarray(self.array[y0:y1, x0:x1, : self.keep]), -1, 0)
            else:
                a = np.asarray(self.array[: self.keep, y0:y1, x0:x1])
        except Exception as e:  # a damaged tile or chunk: one line, never a traceback
            raise InvalidInputError(f"{self.where}: cannot read pixels [{y0}:{y1}, {x0}:{x1}] "
                                    f"({describe(e)})") from None
        return a

    def close(self):
        if self._closer is not None:
            self._closer()


def _channels_kept(have: int, want: int, where: str) -> int:
    """How many of the file's leading channels the model reads: all of them, or RGB of RGBA."""
    if have == want:
        return have
    if have == 4 and want == 3:  # RGBA: the alpha channel is dropped
        return 3
    raise InvalidInputError(f"{where}: the image has {have} channels, the model takes {want} "
                            "(give layout=... if the channel axis was guessed wrong)")


def _guess_layout(shape, channels: int, layout: str, axes: str | None, where: str) -> str:
    if layout != "auto" or len(shape) != 3:
        return layout
    if axes:  # the file says: tifffile's series axes, OME-Zarr's axis names
        axes = axes.upper()
        if axes[-1] in "SC":
            return "hwc"
        if axes[0] in "SC":
            return "chw"
    fits = {channels, 4} if channels == 3 else {channels}
    last, first = shape[-1] in fits, shape[0] in fits
    if last and not first:
        return "hwc"
    if first and not last:
        return "chw"
    if last and first:
        return "hwc" if shape[-1] <= shape[0] else "chw"
    raise InvalidInputError(f"{where}: cannot tell the channel axis of shape {tuple(shape)} "
                            f"for a model of {channels} channels; give layout=chw or layout=hwc")


def _open_tiff(spec: SourceSpec) -> Source:
    import logging

    import tifffile
    import zarr

    # tifffile logs what it skips in a damaged file; the reads below raise what matters
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)

    where = f"{spec.path}"
    try:
        tif = tifffile.TiffFile(spec.path)
        series = tif.series[0]
        levels = len(series.levels)
        if not 0 <= spec.level < levels:
            tif.close()
            raise InvalidInputError(f"{where}: level={spec.level}, but the file has "
                                    f"{levels} level{'s' if levels > 1 else ''}")
        axes = series.levels[spec.level].axes
        tiles = TiffTiles.of(tif, series.levels[spec.level])
        store = None if tiles is not None else series.aszarr(level=spec.level)
        array = tiles if tiles is not None else zarr.open_array(store, mode="r")
    except InvalidInputError:
        raise
    except Exception as e:
        raise InvalidInputError(f"{where}: not a readable TIFF ({describe(e)})") from None
    squeeze = [i for i, (a, n) in enumerate(zip(axes, array.shape)) if a not in "YXSC" and n == 1]
    if squeeze or len(array.shape) > 3:
        raise InvalidInputError(f"{where}: a TIFF series of axes {axes} (expected YX, YXS or "
                                "CYX: one 2-D image)")
    layout = _guess_layout(array.shape, spec.channels, spec.layout, axes, where)
    if store is None and layout == "chw" and len(array.shape) == 3:  # --layout chw: as given
        store = series.aszarr(level=spec.level)
        array = zarr.open_array(store, mode="r")

    def close():
        if store is not None:
            store.close()
        if tiles is not None:
            tiles.close()
        tif.close()

    source = ArraySource(array, layout, spec.channels, where, close)
    base = _tiff_mpp(tif, series)
    sizes = [_yx(lv.shape, lv.axes) for lv in series.levels]
    source.levels = tuple((hw, _scaled(base, sizes[0], hw)) for hw in sizes)
    source.mpp = source.levels[spec.level][1]
    return source


class TiffTiles:
    """One tiled TIFF page read window by window, each tile decoded once (the tiles a window
    misses decoded on every core) while it stays in a bounded cache. Blocks overlap by their
    halos; through a plain tile reader (tifffile's zarr view) a 1024-pixel block with its
    halo decoded 6 x 6 tiles of 256 for 4 x 4 of new pixels, twice the decoding of the image
    itself. Blocks run in rows, so the tiles a halo
    shares with the block to the left, or with the row above, are still cached when it is
    read. Slices like a ``(H, W)`` or ``(H, W, S)`` array (``array[y0:y1, x0:x1]``,
    ``array[y0:y1, x0:x1, :k]``)."""

    CACHE_BYTES = 256 * 2**20

    @classmethod
    def of(cls, tif, level) -> TiffTiles | None:
        """A reader for ``level`` (a tifffile series level) if it is one tiled, chunky page
        of a single plane, else None (read through tifffile's zarr view)."""
        pages = getattr(level, "pages", None) or []
        page = pages[0] if len(pages) == 1 else None
        if (page is None or not page.is_tiled or page.tiledepth > 1 or page.imagedepth > 1
                or page.planarconfig != 1 or tuple(page.shape) != tuple(level.shape)
                or len(page.shape) not in (2, 3)):
            return None
        return cls(tif, page)

    def __init__(self, tif, page):
        import threading
        from collections import OrderedDict

        self.page, self.fh = page, tif.filehandle
        self.shape, self.dtype = tuple(page.shape), np.dtype(page.dtype)
        self.th, self.tw = page.tilelength, page.tilewidth
        self.across = -(-page.imagewidth // self.tw)
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool = None  # decoding threads, made on the first read of several tiles

    def _tiles(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """The decoded tiles at ``keys`` ``(ty, tx)``: those cached, and the others read in
        file order and decoded on every core (decoders release the GIL)."""
        tiles, todo = {}, []
        for key in keys:
            tile = self._cache.get(key)
            if tile is None:
                todo.append(key)
            else:
                self._cache.move_to_end(key)
                tiles[key] = tile
        page = self.page
        raw = []
        with self.fh.lock:
            for ty, tx in sorted(todo, key=lambda k: page.dataoffsets[k[0] * self.across + k[1]]):
                index = ty * self.across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                data = None
                if count:
                    self.fh.seek(offset)
                    data = self.fh.read(count)
                raw.append(((ty, tx), index, data))
        for (key, _, _), tile in zip(raw, self._map(self._decode, raw)):
            tiles[key] = tile
            self._cache[key] = tile
            self._bytes += tile.nbytes
        while self._bytes > self.CACHE_BYTES and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return tiles

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _decode(self, item) -> np.ndarray:
        _, index, data = item
        if data is None:  # a tile the writer left out reads as zeros, as in tifffile
            return np.zeros((self.th, self.tw, self.shape[2] if len(self.shape) == 3 else 1),
                            self.dtype)
        tile = self.page.decode(data, index, jpegtables=self.page.jpegtables)[0]
        return tile.reshape(self.th, self.tw, -1)

    def _map(self, f, items: list):
        if len(items) < 2:
            return [f(item) for item in items]
        if self._pool is None:
            import os
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(os.cpu_count() or 1)
        return list(self._pool.map(f, items))

    def __getitem__(self, key):
        ys, xs, *rest = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        samples = self.shape[2] if len(self.shape) == 3 else 1
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), samples), self.dtype)
        rows = range(y0 // self.th, -(-y1 // self.th))
        cols = range(x0 // self.tw, -(-x1 // self.tw))
        with self._lock:
            tiles = self._tiles([(ty, tx) for ty in rows for tx in cols])
        for ty in rows:
            a, e = max(y0, ty * self.th), min(y1, (ty + 1) * self.th)
            for tx in cols:
                b, f = max(x0, tx * self.tw), min(x1, (tx + 1) * self.tw)
                out[a - y0:e - y0, b - x0:f - x0] = tiles[ty, tx][
                    a - ty * self.th:e - ty * self.th, b - tx * self.tw:f - tx * self.tw]
        if len(self.shape) == 2:
            return out[..., 0]
        return out[..., rest[0]] if rest else out


def _yx(shape, axes: str) -> tuple[int, int]:
    return shape[axes.index("Y")], shape[axes.index("X")]


def _scaled(mpp, full: tuple[int, int], level: tuple[int, int]):
    """A level's pixel size from the full resolution's and the two sizes."""
    if mpp is None:
        return None
    return tuple(m * f / n for m, f, n in zip(mpp, full, level))


_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
       "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6}


def _tiff_mpp(tif, series) -> tuple[float, float] | None:
    """Micrometres per pixel (y, x) of a TIFF's full resolution: OME-XML ``PhysicalSizeX/Y``,
    an Aperio description's ``MPP``, else the resolution tags in centimetres or inches."""
    import re
    import xml.etree.ElementTree as ET

    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter()
                          if e.tag.endswith("Pixels"))
            y, x = pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeX")
            if x and y:
                ux = _UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
                uy = _UM.get(pixels.get("PhysicalSizeYUnit", "µm"))
                if ux and uy:
                    return float(y) * uy, float(x) * ux
        page = series.levels[0].keyframe
        found = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if found and float(found.group(1)) > 0:
            return (float(found.group(1)),) * 2
        unit = int(page.resolutionunit)
        per = {2: 25400.0, 3: 1e4}.get(unit)  # inch, centimetre in micrometres
        if per:
            rx, ry = page.get_resolution()
            if rx > 0 and ry > 0:
                return per / ry, per / rx
    except Exception:  # a pixel size we cannot read is a pixel size we do not know
        return None
    return None


def _open_zarr(spec: SourceSpec) -> Source:
    import zarr

    where = spec.path
    try:
        node = zarr.open(spec.path, mode="r")
    except Exception as e:
        raise InvalidInputError(f"{where}: not a readable zarr array ({describe(e)})") from None
    axes = None
    if isinstance(node, zarr.Group):  # OME-Zarr: the multiscales' dataset of this level
        try:
            ms = node.attrs.get("ome", node.attrs).get("multiscales", [{}])[0]
            path = ms["datasets"][spec.level]["path"]
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", []))
            mpp_levels = _ome_zarr_mpp(node, ms)
            node = node[path]
        except (KeyError, IndexError, TypeError):
            raise InvalidInputError(f"{where}: a zarr group without an image at level "
                                    f"{spec.level} (expected an array or OME-Zarr multiscales)") \
                from None
        keep = [i for i, a in enumerate(axes.upper()) if a in "CYX"]
        if len(keep) != len(node.shape) or axes.upper()[-2:] != "YX":
            if any(n != 1 for i, n in enumerate(node.shape) if i not in keep):
                raise InvalidInputError(f"{where}: OME-Zarr axes {axes}: expected one 2-D image")
            index = tuple(slice(None) if i in keep else 0 for i in range(len(node.shape)))
            node = _Indexed(node, index)
        axes = "".join(a for a in axes.upper() if a in "CYX")
    elif spec.level:
        raise InvalidInputError(f"{where}: level={spec.level}, but this is a single array")
    else:
        mpp_levels = None
    layout = _guess_layout(node.shape, spec.channels, spec.layout, axes, where)
    source = ArraySource(node, layout, spec.channels, where)
    if mpp_levels:
        source.levels = mpp_levels
        source.mpp = mpp_levels[spec.level][1]
    return source


def _ome_zarr_mpp(group, ms: dict) -> tuple | None:
    """((height, width), mpp) per dataset of OME-Zarr multiscales whose y and x axes are in
    a length unit; None if they are not."""
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    names = [a.get("name", "").lower() for a in axes]
    if "y" not in names or "x" not in names:
        return None
    iy, ix = names.index("y"), names.index("x")
    units = [_UM.get(str(axes[i].get("unit", "")).lower()) for i in (iy, ix)]
    found = []
    for d in ms.get("datasets", []):
        shape = group[d["path"]].shape
        scale = next((t["scale"] for t in d.get("coordinateTransformations", [])
                      if t.get("type") == "scale"), None)
        mpp = None
        if scale is not None and all(units):
            mpp = (float(scale[iy]) * units[0], float(scale[ix]) * units[1])
        found.append(((shape[iy], shape[ix]), mpp))
    return tuple(found)


class _Indexed:
    """An array with some leading singleton dims (T, Z of OME-Zarr) fixed."""

    def __init__(self, array, index):
        self.array, self.index = array, index
        self.shape = tuple(n for n, i in zip(array.shape, index) if isinstance(i, slice))
        self.dtype = array.dtype

    def __getitem__(self, key):
        key = list(key) if isinstance(key, tuple) else [key]
        full = [key.pop(0) if isinstance(i, slice) and key else i for i in self.index]
        return self.array[tuple(full)]


def _open_npy(spec: SourceSpec) -> Source:
    try:
        array = np.load(spec.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InvalidInputError(f"{spec.path}: not a readable .npy array ({describe(e)})") \
            from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if spec.level:
        raise InvalidInputError(f"{spec.path}: level={spec.level}, but this is one array")
    return ArraySource(array, _guess_layout(array.shape, spec.channels, spec.layout, None,
                                            spec.path), spec.channels, spec.path)


def _open_picture(spec: SourceSpec) -> Source:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(spec.path) as img:
            if img.mode not in ("L", "RGB", "RGBA", "I;16", "I"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidInputError(f"{spec.path}: not a readable image ({describe(e)})") from None
    if spec.level:
        raise InvalidInputError(f"{spec.path}: level={spec.level}, but a picture has one")
    layout = "hwc" if array.ndim == 3 else "auto"
    return ArraySource(array, layout, spec.channels, spec.path)


class SlideSource(Source):
    """OpenSlide formats; pixels are RGBA composited on white by OpenSlide, alpha dropped."""

    def __init__(self, spec: SourceSpec):
        try:
            import openslide
        except ImportError:
            raise InvalidInputError(
                f"{spec.path}: slide formats need OpenSlide: pip install "
                "'econv-convert[slides]' (openslide-python with the openslide-bin wheel)") \
                from None
        try:
            self.slide = openslide.OpenSlide(spec.path)
        except Exception as e:
            raise InvalidInputError(f"{spec.path}: not a readable slide ({describe(e)})") \
                from None
        if not 0 <= spec.level < self.slide.level_count:
            raise InvalidInputError(f"{spec.path}: level={spec.level}, but the slide has "
                                    f"{self.slide.level_count} levels")
        _channels_kept(4, spec.channels, spec.path)
        props = self.slide.properties
        try:
            base = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
        except (KeyError, ValueError):
            base = None
        self.levels = tuple(((h, w), _scaled(base, self.slide.level_dimensions[0][::-1], (h, w)))
                            for w, h in self.slide.level_dimensions)
        self.mpp = self.levels[spec.level][1]
        self.level = spec.level
        self.down = self.slide.level_downsamples[spec.level]
        w, h = self.slide.level_dimensions[spec.level]
        self.shape, self.dtype = (spec.channels, h, w), np.dtype(np.uint8)
        self.where = spec.path

    def read(self, y0, y1, x0, x1):
        try:
            region = self.slide.read_region((round(x0 * self.down), round(y0 * self.down)),
                                            self.level, (x1 - x0, y1 - y0))
        except Exception as e:
            raise InvalidInputError(f"{self.where}: cannot read [{y0}:{y1}, {x0}:{x1}] "
                                    f"({describe(e)})") from None
        return np.moveaxis(np.asarray(region)[..., :3], -1, 0)

    def close(self):
        self.slide.close()


_OPENERS = {"tiff": _open_tiff, "zarr": _open_zarr, "npy": _open_npy,
            "picture": _open_picture, "slide": SlideSource}


def open_source(spec: SourceSpec) -> Source:
    """A reader for ``spec`` (a new one; see :func:`cached_source` in workers)."""
    if spec.layout not in LAYOUTS:
        raise InvalidInputError(f"layout={spec.layout}: expected one of {', '.join(LAYOUTS)}")
    if not Path(spec.path).exists():
        raise InvalidInputError(f"{spec.path}: no such file")
    return _OPENERS[kind_of(spec.path)](spec)


def level_for_mpp(spec: SourceSpec, mpp: float) -> tuple[int, tuple[float, float]]:
    """The pyramid level whose pixel size is nearest to ``mpp`` micrometres at or finer (the
    coarsest level no coarser than asked, 1% rounding allowed), and its pixel size."""
    source = open_source(spec)
    try:
        levels = source.levels or ((source.shape[1:], source.mpp),)
    finally:
        if hasattr(source, "close"):
            source.close()
    if mpp <= 0:
        raise InvalidInputError(f"mpp={mpp}: must be positive")
    if any(m is None for _, m in levels):
        raise InvalidInputError(f"{spec.path}: the file records no pixel size; mpp=... needs "
                                "one (choose a level=... instead)")
    fine = [(i, m) for i, (_, m) in enumerate(levels) if max(m) <= mpp * 1.01]
    if not fine:
        finest = min(max(m) for _, m in levels)
        raise InvalidInputError(f"{spec.path}: mpp={mpp}: the finest level is "
                                f"{finest:.4g} um per pixel")
    return max(fine, key=lambda im: max(im[1]))


@functools.lru_cache(maxsize=4)
def cached_source(spec: SourceSpec) -> Source:
    """One reader per process and spec: Dask workers reuse it across their blocks."""
    return open_source(spec)


def scale_of(dtype: np.dtype) -> float:
    """Integer images are scaled to [0, 1] by their dtype's maximum; floats are taken as
    they are."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def normalize(a: np.ndarray, mean, std) -> np.ndarray:
    """``(a / max - mean) / std`` as float32 (integers scaled to [0, 1] first; ``mean`` and
    ``std`` per channel, the first dim of ``a``), in ``a``'s memory order.

    On torch, every step on every core: the same float32 operations in the same order as
    numpy's (the same bits), where numpy's ran on one core (a 4256^2 RGB window: 0.39 s
    against 0.05 s here, most of a block's read at coarse output strides)."""
    import torch

    s = scale_of(a.dtype)
    if not a.dtype.isnative or any(n < 0 for n in a.strides):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    with warnings.catch_warnings():  # a read-only array (a memory map): only read here
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(a).to(torch.float32, copy=True)
    if s != 1.0:
        x.div_(s)
    per_channel = (-1,) + (1,) * (a.ndim - 1)
    if mean is not None:
        x.sub_(torch.as_tensor(np.asarray(mean, dtype=np.float32).reshape(per_channel)))
    if std is not None:
        x.div_(torch.as_tensor(np.asarray(std, dtype=np.float32).reshape(per_channel)))
    return x.numpy()
