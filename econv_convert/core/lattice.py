"""Lattice arithmetic: the one place where the mathematics of densification lives.

Pure integer functions over small frozen records, free of any framework, so that both
backends' rewrites, the PyTorch runtime ops, the ONNX graphs' size arithmetic, the phase
proof and the block engine share the same formulas.

Conventions (per spatial axis; the README's "How it works" has the picture):

* a baseline map of size ``h`` on a lattice of step ``s`` is held densely in the *tight* form of
  size ``tight(h, s) == (h - 1) * s + 1``: it ends on its last lattice point, so zero, reflect and
  replicate padding stay exact and no layer ever reads a lattice point the baseline lacks;
* ``B[i] == D[i * s]`` for every baseline index ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

Minimum = Callable[[int, int], int]


def tight(h: int, step: int) -> int:
    """Dense size of a baseline map of size ``h`` held on a lattice of step ``step``."""
    return (h - 1) * step + 1


def lattice_count(dense: int, step: int) -> int:
    """Baseline size represented by a tight dense map of size ``dense``."""
    return (dense - 1) // step + 1


def phase_blocks(n: int, step: int) -> int:
    """Blocks of ``step`` positions that cover a map of ``n`` positions (the last one may be
    short): a phase-pooled axis is padded to ``phase_blocks * step`` and split in two."""
    return (n + step - 1) // step


def phase_count(n: int, step: int, phase: Any) -> Any:
    """How many of a map's ``n`` positions fall on ``phase`` (0 <= phase < step): positions
    ``q`` with ``q % step == phase``. Written with a non-negative numerator, as every formula
    here is, so that it also holds under ONNX's truncating ``Div``."""
    return (n - 1 + step - phase) // step


def tf_same_padding(h: Any, kernel: int, stride: int, dilation: int, maximum: Any = max) -> Any:
    """TensorFlow's (and ONNX ``auto_pad`` SAME's) total padding of a map of ``h`` positions:
    enough for ``ceil(h / stride)`` outputs; with a stride it depends on the input size."""
    extent = dilation * (kernel - 1) + 1
    if stride == 1:
        return extent - 1
    return maximum((phase_blocks(h, stride) - 1) * stride + extent - h, 0)


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
    return same_split(dilation * (kernel - 1))


def same_split(total: Any, upper: bool = True) -> tuple[Any, Any]:
    """A SAME padding of ``total`` positions as (before, after): the odd one after
    (``SAME_UPPER``, PyTorch's ``'same'``), or before (``SAME_LOWER``)."""
    small = total // 2
    big = total - small
    return (small, big) if upper else (big, small)


def slice_count(start: Any, end: Any, step: int, maximum: Any = max) -> Any:
    """Elements of ``[start:end:step]`` once both bounds are clamped to the axis (``step``
    positive): ``ceil((end - start) / step)``, none where ``end <= start``."""
    return (maximum(end - start, 0) + step - 1) // step


def avg_divisor_bounds(h: int, w: Window, count_include_pad: bool) -> tuple[int, int]:
    """Baseline positions ``[lo, hi]`` that count towards an average pool's divisor.

    With ``count_include_pad`` the padding counts, but a ceil-mode window is clipped at the end
    of the right padding; without it only real input positions count.
    """
    if count_include_pad:
        return -w.pad_lo, h - 1 + w.pad_hi
    return 0, h - 1


def avg_tap_counts(q, h, w: Window, step: int, count_include_pad: bool, *, minimum, maximum):
    """How many taps of the window at dense output position ``q`` (an integer, or a vector of
    them: a tensor of either backend) an average pool's divisor counts, on a map of ``h``
    baseline positions: the one formula both backends evaluate (PyTorch on tensors, ONNX on
    graph values through ``SymInt``; ``minimum``/``maximum`` are element-wise).

    Tap ``k`` of the window at ``q`` reads dense position ``q + (k * dilation - pad_lo) *
    step``; it counts when that lies in ``[lo * step, hi * step]`` (:func:`avg_divisor_bounds`),
    that is for ``k * dilation`` from ``a = lo + pad_lo - floor(q / step)`` to ``b = hi + pad_lo
    - ceil(q / step)``, with ``0 <= k < kernel``. Every division here is of a non-negative
    integer (``q >= 0``; ``a`` and ``b`` are clipped first), so truncating and flooring
    division agree (ONNX's ``Div`` truncates).
    """
    lo, hi = avg_divisor_bounds(h, w, count_include_pad)
    d = w.dilation
    a = maximum(lo + w.pad_lo - q // step, 0)
    b = minimum(hi + w.pad_lo - (q + (step - 1)) // step, (w.kernel - 1) * d)
    first = (a + (d - 1)) // d  # the first tap at or after a
    last = maximum(b + d, 0) // d - 1  # the last tap at or before b (-1: none)
    return maximum(last - first + 1, 0)


# padding whose amount is computed when the model runs (TensorFlow's "same" done by hand):
# its reach is not known, so no position counts as away from the borders
UNKNOWN_REACH = 10**9


@dataclass(frozen=True)
class Field:
    """Receptive field and lattice step of a map along one axis, and the padding's reach:
    ``lo``/``hi`` input pixels from the start/far end within which a position of the map may
    have read padding (at the far end, ceil-mode windows count as padding).

    A position whose window starts at least ``lo`` pixels after the input's start and ends at
    least ``hi`` pixels before its end read no padding in any layer: it is the same function
    of the pixels under its window wherever the window sits (:func:`interior`)."""

    size: int = 1
    step: int = 1
    lo: int = 0
    hi: int = 0

    def through(self, w: Window) -> Field:
        """After window layer ``w``: its padding (``p * step`` pixels each side) adds to the
        reach, and at the far end so does the part of a ceil-mode window past the input."""
        tail = w.stride - 1 if w.ceil_mode else 0
        return Field(size=self.size + (w.extent - 1) * self.step, step=self.step * w.stride,
                     lo=self.lo + _known(w.pad_lo) * self.step,
                     hi=self.hi + (_known(w.pad_hi) + tail) * self.step)

    def padded(self, lo: Any, hi: Any) -> Field:
        """After explicit padding of ``lo``/``hi`` points (at this map's step)."""
        return replace(self, lo=self.lo + _known(lo) * self.step,
                       hi=self.hi + _known(hi) * self.step)

    def sliced(self, start: Any, every: Any = 1) -> Field:
        """After a slice ``x[start::every]``: index 0 sits ``start * step`` pixels further on,
        and the step is ``every`` times larger."""
        if not isinstance(start, int) or start < 0 or not isinstance(every, int):
            return replace(self, lo=UNKNOWN_REACH, hi=UNKNOWN_REACH)
        return replace(self, lo=self.lo - start * self.step, step=self.step * every)

    @staticmethod
    def merge(fields: Sequence[Field]) -> Field:
        """What a value computed from maps with these fields sees: the largest field (and its
        step), the earliest window start and the latest window end (with its reach)."""
        widest = max(fields, key=lambda f: f.size)
        lo = max(f.lo for f in fields)
        end = max(f.size - 1 - f.lo + f.hi for f in fields)  # window end + reach, from i*S
        return replace(widest, lo=lo, hi=end - (widest.size - 1 - lo))


def _known(pad: Any) -> int:
    return pad if isinstance(pad, int) else UNKNOWN_REACH


def interior(n: int, f: Field) -> tuple[int, int]:
    """Output indices ``[first, last]`` (per axis, output lattice step ``f.step``) whose
    windows on an input of ``n`` pixels read no padding: the output at index ``i`` has its
    window at pixels ``[i*S - lo, i*S - lo + size - 1]``; it must start at pixel 0 or later
    and end ``hi`` pixels before the input's end. ``first > last`` when there is none."""
    first = -(-f.lo // f.step)
    last = (n - f.hi - f.size + f.lo) // f.step
    return first, last


# -- phases: what a dense layer computes between the lattice points ----------------------------
#
# A dense map ``D`` on lattice step ``s`` holds ``s`` phases per axis: the phase-``a`` sub-map
# ``D[a::s]`` (``0 <= a < s``) is itself a baseline map, the one the baseline computes on its
# input shifted by ``a * (input pixels per step)``; phase 0 is the lattice. A dense layer is
# right when every phase is: for a baseline op of stride ``t`` (1 for pointwise ops), on an
# input at step ``s``, the dense output at step ``s * t`` has ``s * t`` phases, numbered
# ``a + s * j`` (``0 <= j < t``), and
#
#     dense_out[a + s*j :: s*t]  ==  op(D[a + s*j :: s])                        (*)
#
# that is, the baseline op on the phase-``a`` sub-map without its first ``j`` points. The
# dense op's padding of ``p * s`` zeros (or -inf) is each phase's ``p`` padding, so (*) holds
# at every position for ``j == 0``. For ``j > 0`` the sliced sub-map's own padding stands
# where the dense op reads the ``j`` points cut off: (*) holds from output
# :func:`lead_margin` on. At the far end the tight crop keeps, on each phase but the lattice,
# at most as many points as the op gives on the sub-map (a strided window gives one point
# fewer per ``t`` input points); (*) is compared on the dense points, and on the lattice
# (``a == j == 0``) both sides must have the same size. Padding that is not a constant
# (reflect, replicate) mirrors other phases into a phase's border: for ``a > 0`` (*) holds
# away from each border by that padding.


def phase_start(a: int, j: int, step: int) -> int:
    """Where output phase ``a + step * j`` starts, in the dense input (read every ``step``
    points by op(*)) and in the dense output alike (every ``step * stride`` points)."""
    return a + step * j


def lead_margin(pad_lo: int, stride: int, j: int) -> int:
    """Leading outputs of phase ``j > 0`` where the sliced sub-map reads its own padding and
    the dense op the points before it: ``ceil(pad_lo / stride)`` (0 for ``j == 0``)."""
    return 0 if j == 0 else -(-pad_lo // stride)


def effective_dilation(kernel: Sequence[int], dws: Sequence[DenseWindow]) -> list[int]:
    """The dilation to emit per axis: dilation has no effect along an axis with one tap
    (1 x 1 convolutions), and 1 there lets a runtime pick its plain kernels."""
    return [d.dilation if k > 1 else 1 for k, d in zip(kernel, dws, strict=True)]
