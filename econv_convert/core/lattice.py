"""Lattice arithmetic: the one place where the mathematics of densification lives.

Pure integer functions over small frozen records, free of any framework, so that the PyTorch
rewrite, the runtime ops, ``inspect`` and the verifier all share the same formulas.

Conventions (per spatial axis, see ``DESIGN.md``):

* a baseline map of size ``h`` on a lattice of step ``s`` is held densely in the *tight* form of
  size ``tight(h, s) == (h - 1) * s + 1``: it ends on its last lattice point, so zero, reflect and
  replicate padding stay exact and no layer ever reads a lattice point the baseline lacks;
* ``B[i] == D[i * s]`` for every baseline index ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Minimum = Callable[[int, int], int]


def tight(h: int, step: int) -> int:
    """Dense size of a baseline map of size ``h`` held on a lattice of step ``step``."""
    return (h - 1) * step + 1


def lattice_count(dense: int, step: int) -> int:
    """Baseline size represented by a tight dense map of size ``dense``."""
    return (dense - 1) // step + 1


@dataclass(frozen=True)
class Window:
    """Geometry of one sliding-window layer along one axis (convolution or pooling).

    ``pad_lo``/``pad_hi`` allow asymmetric padding (``padding='same'`` with an even kernel).
    """

    kernel: int
    stride: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def extent(self) -> int:
        """Number of input positions one window spans."""
        return self.dilation * (self.kernel - 1) + 1


def out_size(h: int, w: Window, minimum: Minimum = min) -> int:
    """Baseline output size of a window layer on an input of size ``h`` (PyTorch semantics).

    With ``ceil_mode`` the last, partial window is kept only if it starts inside the input or
    the left padding; ``minimum`` lets callers pass ``torch.sym_min`` for symbolic sizes.
    Returns a value below 1 when the input is smaller than the window.
    """
    span = h + w.pad_lo + w.pad_hi - w.extent
    if not w.ceil_mode:
        return span // w.stride + 1
    ceil_out = (span + w.stride - 1) // w.stride + 1
    return minimum(ceil_out, (h + w.pad_lo - 1) // w.stride + 1)


def covers_input(h: int, w: Window) -> bool:
    """Whether ``w`` pools its whole input of size ``h`` in one window that reaches past the
    input's end, its windows not overlapping (a kernel larger than the input, which ceil mode
    or padding admits: a pool whose kernel is a model's hidden width). Such a layer is a
    global pool for inputs up to :func:`covered_limit` positions. A window that fits its input
    exactly, or windows that overlap (stride below the kernel), slide on larger inputs: those
    layers are densified as they are."""
    return (w.dilation == 1 and w.stride >= w.extent and w.extent > h + w.pad_lo
            and out_size(h, w) == 1)


def covered_limit(w: Window) -> int:
    """The largest input size one window of ``w`` still covers whole."""
    return w.extent - w.pad_lo


@dataclass(frozen=True)
class DenseWindow:
    """What a window layer becomes on an input lattice of step ``step``.

    The dense layer runs with stride 1 and the dilation below on the input padded by
    ``pad_lo``/``pad_hi`` dense positions; its output is then cropped to the tight size of the
    baseline output on the output lattice ``out_step``.
    """

    kernel: int
    dilation: int
    pad_lo: int
    pad_hi: int
    out_step: int


def dense_window(w: Window, step: int) -> DenseWindow:
    """The dense form of ``w`` on an input lattice of step ``step``.

    In ceil mode the baseline's extra window reaches up to ``stride - 1`` positions past the
    right padding; the dense map is padded that far so that the window exists.
    """
    extra = w.stride - 1 if w.ceil_mode else 0
    return DenseWindow(
        kernel=w.kernel,
        dilation=w.dilation * step,
        pad_lo=w.pad_lo * step,
        pad_hi=(w.pad_hi + extra) * step,
        out_step=step * w.stride,
    )


def dense_out(size: int, step: int, w: Window, minimum: Minimum = min) -> int:
    """Tight dense output size of window layer ``w`` run densely on a tight map of ``size``
    positions on a lattice of ``step`` (the crop that follows a strided dense layer).

    Only ``+ - * //`` and ``minimum`` are used, on non-negative operands, so symbolic sizes
    work: ``torch.SymInt`` in PyTorch exports, graph-building integers for ONNX."""
    return tight(out_size(lattice_count(size, step), w, minimum), step * w.stride)


def keeps_stride(steps: Sequence[int], fields: Sequence[Field], strides: Sequence[int],
                 output_stride: int | None) -> bool:
    """Under an output stride K, a strided layer still on lattice step 1 (where the dense map
    is the baseline's) keeps its stride while the cumulative stride stays within K
    (DeepLab style); ``fields`` are those of the layer's input."""
    if output_stride is None or any(s != 1 for s in steps):
        return False
    return all(f.step * t <= output_stride for f, t in zip(fields, strides, strict=True))


def window_geometry(windows: Sequence[Window], steps: Sequence[int] | None = None,
                    **extra) -> dict:
    """How a window layer reads, for reports: kernel, stride, padding (``(lo, hi)`` pairs when
    they differ), dilation and ceil mode; with ``steps``, its dense form on that lattice.
    Padding that is not a number (computed when a graph runs) reads "same (size-dependent)"."""
    s = tuple(steps) if steps is not None else (1,) * len(windows)
    dense = steps is not None
    g: dict = {"kernel": tuple(w.kernel for w in windows),
               "stride": tuple(1 if dense else w.stride for w in windows)}
    if all(isinstance(w.pad_lo, int) and isinstance(w.pad_hi, int) for w in windows):
        lo = tuple(w.pad_lo * k for w, k in zip(windows, s))
        hi = tuple(w.pad_hi * k for w, k in zip(windows, s))
        g["padding"] = lo if lo == hi else tuple(zip(lo, hi))
    else:
        g["padding"] = "same (size-dependent)"
    g["dilation"] = tuple(w.dilation * k for w, k in zip(windows, s))
    g["ceil_mode"] = any(w.ceil_mode for w in windows)
    return g | extra


def same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    """PyTorch's ``padding='same'`` split: the odd position goes to the right."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def avg_divisor_bounds(h: int, w: Window, count_include_pad: bool) -> tuple[int, int]:
    """Baseline positions ``[lo, hi]`` that count towards an average pool's divisor.

    With ``count_include_pad`` the padding counts, but a ceil-mode window is clipped at the end
    of the right padding; without it only real input positions count.
    """
    if count_include_pad:
        return -w.pad_lo, h - 1 + w.pad_hi
    return 0, h - 1


@dataclass(frozen=True)
class Field:
    """Receptive field and lattice step of a map along one axis."""

    size: int = 1
    step: int = 1

    def through(self, w: Window) -> Field:
        return Field(size=self.size + (w.extent - 1) * self.step, step=self.step * w.stride)
