"""Where the tissue is: blocks whose input window holds none are not computed.

A slide is mostly glass, bright and unsaturated. :func:`auto_mask` reads a low-resolution
view of the image (the pyramid's smallest level, or the image read with a stride), takes
each pixel's saturation (darkness for one-channel images), thresholds it with Otsu's method,
removes specks and fills small holes, as pathology tools make their tissue masks.
:func:`read_mask` takes a binary image of any size instead. A :class:`Mask` covers the whole
image at its own resolution and answers, per block, whether any tissue lies in the block's
input window.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError, describe
from econv_convert.run.sources import SourceSpec, open_source

THUMBNAIL = 2048  # the longest side of the view the automatic mask is made from
CHOICES = ("auto", "none")


@dataclass(frozen=True)
class Mask:
    """``tissue``: a boolean ``(h, w)`` image over the whole input of ``image`` = ``(H, W)``
    pixels; ``how``: ``auto`` or the mask file's path."""

    tissue: np.ndarray
    image: tuple[int, int]
    how: str
    threshold: float | None = None

    def has_tissue(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether input pixels ``[y0, y1) x [x0, x1)`` hold any tissue (the mask's pixels
        that overlap them, rounded outward)."""
        h, w = self.tissue.shape
        fy, fx = h / self.image[0], w / self.image[1]
        a0, a1 = math.floor(y0 * fy), max(math.floor(y0 * fy) + 1, math.ceil(y1 * fy))
        b0, b1 = math.floor(x0 * fx), max(math.floor(x0 * fx) + 1, math.ceil(x1 * fx))
        return bool(self.tissue[a0:a1, b0:b1].any())

    @property
    def fraction(self) -> float:
        return float(self.tissue.mean()) if self.tissue.size else 0.0

    def to_record(self) -> dict[str, Any]:
        """What the output records (and resume compares)."""
        bits = np.packbits(self.tissue).tobytes()
        return {"how": self.how, "shape": list(self.tissue.shape),
                "sha256": hashlib.sha256(bits + str(self.tissue.shape).encode()).hexdigest(),
                "tissue_fraction": round(self.fraction, 4),
                "threshold": None if self.threshold is None else round(self.threshold, 4)}


def default_for(spec: SourceSpec, levels: int) -> str:
    """``auto`` for slide formats and pyramids (mostly glass), ``none`` for other inputs."""
    from econv_convert.run.sources import kind_of

    return "auto" if kind_of(spec.path) == "slide" or levels > 1 else "none"


def make(choice: str, spec: SourceSpec, image: tuple[int, int], levels: int) -> Mask | None:
    """The mask ``choice`` asks for (``auto``, ``none``, ``default`` or a path)."""
    if choice == "default":
        choice = default_for(spec, levels)
    if choice == "none":
        return None
    if choice == "auto":
        return auto_mask(spec, image, levels)
    return read_mask(Path(choice), image)


def read_mask(path: Path, image: tuple[int, int]) -> Mask:
    """A binary image (nonzero = tissue) of any size with the input's aspect ratio."""
    if not path.exists():
        raise InvalidInputError(f"mask={path}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as img:
                a = np.asarray(img)
    except Exception as e:
        raise InvalidInputError(f"mask={path}: not a readable image ({describe(e)})") \
            from None
    if a.ndim == 3:
        a = a.max(axis=-1)
    if a.ndim != 2 or min(a.shape) < 1:
        raise InvalidInputError(f"mask={path}: expected a 2-D binary image, got shape "
                                f"{tuple(a.shape)}")
    fy, fx = image[0] / a.shape[0], image[1] / a.shape[1]
    if abs(fy - fx) > 0.02 * max(fy, fx) + max(fy, fx) / min(a.shape):
        raise InvalidInputError(
            f"mask={path}: its aspect ratio ({a.shape[1]}x{a.shape[0]}) is not the image's "
            f"({image[1]}x{image[0]})")
    return Mask(a != 0, image, str(path))


def auto_mask(spec: SourceSpec, image: tuple[int, int], levels: int) -> Mask:
    """Otsu's threshold on saturation (darkness for one channel) of a low-resolution view,
    specks removed and small holes filled."""
    view = thumbnail(SourceSpec(spec.path, spec.channels, max(levels - 1, spec.level),
                                spec.layout))
    value = _tissue_signal(view)
    t = otsu(value)
    spread = float(value.max() - value.min())
    if not np.isfinite(t) or spread < 0.05:
        # no contrast between glass and tissue: no basis to skip anything
        return Mask(np.ones(value.shape, bool), image, "auto", None)
    return Mask(clean(value > t), image, "auto", float(t))


def thumbnail(spec: SourceSpec, longest: int = THUMBNAIL) -> np.ndarray:
    """The image read in strips with a stride so that it has at most ``longest`` pixels a
    side: ``(C, h, w)``, the file's dtype, never the whole image in memory."""
    source = open_source(spec)
    try:
        _, h, w = source.shape
        f = max(1, math.ceil(max(h, w) / longest))
        rows = []
        strip = f * max(1, 256 // f)
        for y in range(0, h, strip):
            rows.append(source.read(y, min(h, y + strip), 0, w)[:, ::f, ::f])
        return np.concatenate(rows, axis=1)
    finally:
        if hasattr(source, "close"):
            source.close()


def _tissue_signal(view: np.ndarray) -> np.ndarray:
    """Saturation of RGB (glass: bright and grey), darkness of one channel; in [0, 1]."""
    from econv_convert.run.sources import scale_of

    x = view.astype(np.float32) / scale_of(view.dtype)
    if x.shape[0] >= 3:
        hi, lo = x[:3].max(axis=0), x[:3].min(axis=0)
        return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    return 1.0 - x[0]


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximizes the between-class variance of ``values``."""
    v = values[np.isfinite(values)].ravel()
    if v.size == 0 or v.min() == v.max():
        return float("nan")
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def clean(tissue: np.ndarray) -> np.ndarray:
    """Specks (objects under 0.05% of the view) removed, holes under 1% filled."""
    from scipy import ndimage

    area = tissue.size
    tissue = ndimage.binary_opening(tissue, iterations=1)
    labels, n = ndimage.label(tissue)
    if n:
        sizes = ndimage.sum(tissue, labels, range(1, n + 1))
        tissue = np.isin(labels, 1 + np.flatnonzero(sizes >= max(4, 5e-4 * area)))
    holes, n = ndimage.label(~tissue)
    if n:
        sizes = ndimage.sum(~tissue, holes, range(1, n + 1))
        border = set(np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0],
                                               holes[:, -1]]))) - {0}
        small = [k + 1 for k in range(n) if sizes[k] < 1e-2 * area and k + 1 not in border]
        tissue = tissue | np.isin(holes, small)
    return tissue
