"""Runtime operations of dense models.

A dense graph calls these functions with the dense tensor and static geometry (plain tuples,
so the graph serializes as data). Every size-dependent correction (ceil-mode ends, tight crops,
average-pool divisors, phase counts) is computed here from the tensor's actual size, so a dense
model is exact for any input size the baseline accepts, not only the example one.

Spatial dimensions are always the trailing ``len(steps)`` dimensions of ``x`` unless a function
says otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from econv_convert.core.lattice import (
    Window,
    avg_tap_counts,
    dense_window,
    effective_dilation,
    lattice_count,
    out_size,
    phase_blocks,
    phase_count,
    slice_count,
    tight,
)
from econv_convert.core.lattice import (
    dense_out as dense_out_size,
)
from econv_convert.core.rules.window import past_cover
from econv_convert.errors import SizeNotCovered
from econv_convert.torch import targets

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {2: F.max_pool2d, 3: F.max_pool3d}
# torch.export, not torch.compile (torch < 2.5 has no is_exporting: treat compiling as exporting)
_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


def _windows(kernel, stride, pad_lo, pad_hi, dilation, ceil_mode) -> list[Window]:
    return [
        Window(k, t, lo, hi, d, ceil_mode)
        for k, t, lo, hi, d in zip(kernel, stride, pad_lo, pad_hi, dilation, strict=True)
    ]


def _pad_arg(lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """F.pad's argument: last axis first, (left, right) pairs."""
    pad: list[int] = []
    for a, b in zip(reversed(lo), reversed(hi), strict=True):
        pad += [a, b]
    return pad


def _crop(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Keep the first ``sizes[i]`` positions of each trailing dim.

    When exporting, a gather rather than ``narrow``: ``narrow`` branches on whether the crop is
    a no-op, which an exporter must then pin to the example size (a guard); a gather always
    copies and does not. Run eagerly or under ``torch.compile`` (where a guard only means a
    recompile), ``narrow``: a view, no copy, and the memory format (channels-last) is kept,
    which a gather loses. Inductor's backward of the gather was also wrong (torch 2.13 CPU:
    gradients off by 2x, or a crashed process), which ``narrow`` avoids.
    """
    nd = len(sizes)
    if not _exporting():
        for i, n in enumerate(sizes):
            x = x.narrow(x.dim() - nd + i, 0, n)
        return x
    for i, n in enumerate(sizes):
        x = x.index_select(x.dim() - nd + i, torch.arange(n, device=x.device))
    return x


def _crop_strided(y: torch.Tensor, x: torch.Tensor, steps, windows, valid=()) -> torch.Tensor:
    """Crop a stride-1 dense output to the tight form of the strided baseline output (not
    along the ``valid`` axes: see :func:`_valid`).

    Without stride there is nothing to crop: the dense output already has the tight size
    ``H + (pad_lo + pad_hi - extent + 1) * s``; skipping the arithmetic keeps the sizes simple
    expressions for exporters (and saves a copy).
    """
    if all(w.stride == 1 for w in windows):
        return y
    dense_out, _ = _out_sizes(x, steps, windows)
    nd = len(steps)
    return _crop(y, [y.shape[y.dim() - nd + i] if i in valid else n
                     for i, n in enumerate(dense_out)])


def _valid(windows: list[Window], valid: Sequence[int]) -> list[Window]:
    """``windows`` with those of the ``valid`` axes unpadded, stride 1 and without ceil mode:
    along such an axis a dense window layer gives every position whose window lies in the
    map, and no other (prediction's trimmed blocks, :mod:`econv_convert.run.trim`)."""
    return [Window(w.kernel, 1, 0, 0, w.dilation, False) if i in valid else w
            for i, w in enumerate(windows)]


def _baseline_sizes(x: torch.Tensor, steps: Sequence[int]) -> list[int]:
    nd = len(steps)
    return [lattice_count(x.shape[x.dim() - nd + i], s) for i, s in enumerate(steps)]


def _out_sizes(x, steps, windows) -> tuple[list[int], list[int]]:
    """Tight dense output sizes and baseline output sizes of a window layer."""
    base_out = []
    for h, w in zip(_baseline_sizes(x, steps), windows, strict=True):
        n = out_size(h, w, torch.sym_min)
        _check(n >= 1, lambda: "input smaller than the layer's window")
        base_out.append(n)
    nd = len(steps)
    dense_out = [dense_out_size(x.shape[x.dim() - nd + i], s, w, torch.sym_min)
                 for i, (s, w) in enumerate(zip(steps, windows, strict=True))]
    return dense_out, base_out


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    steps: Sequence[int],
    stride: Sequence[int],
    pad_lo: Sequence[int],
    pad_hi: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    kernel: Sequence[int] | None = None,
    pad_mode: str = "constant",
    valid: Sequence[int] = (),
) -> torch.Tensor:
    """Dense convolution: stride 1, dilation ``d * s``, padding ``p * s``, tight crop;
    unpadded and uncropped along the ``valid`` axes (:func:`_valid`).

    ``kernel`` reshapes a fully connected weight ``(out, C * prod(kernel))`` into a convolution
    kernel at run time, so the Parameter keeps its name and shape (Flatten + Linear heads).
    """
    nd = len(steps)
    if kernel is not None:
        weight = weight.reshape(weight.shape[0], -1, *kernel)
    k = weight.shape[2:]
    ws = _valid(_windows(k, stride, pad_lo, pad_hi, dilation, False), valid)
    dws = [dense_window(w, s) for w, s in zip(ws, steps, strict=True)]
    lo = [d.pad_lo for d in dws]
    hi = [d.pad_hi for d in dws]
    dil = effective_dilation(k, dws)
    if pad_mode == "constant" and lo == hi:
        y = _CONV[nd](x, weight, bias, 1, lo, dil, groups)
    else:
        padded = F.pad(x, _pad_arg(lo, hi), mode=pad_mode) if any(lo) or any(hi) else x
        y = _CONV[nd](padded, weight, bias, 1, 0, dil, groups)
    return _crop_strided(y, x, steps, ws, valid)  # sizes from the unpadded map


def max_pool(
    x: torch.Tensor,
    steps: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    pad_lo: Sequence[int],
    pad_hi: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    valid: Sequence[int] = (),
) -> torch.Tensor:
    """Dense max pooling: explicit ``-inf`` padding (PyTorch limits pooling padding to half the
    kernel, even when dilated), then a stride-1 dilated pool and a tight crop (neither along
    the ``valid`` axes: :func:`_valid`)."""
    nd = len(steps)
    ws = _valid(_windows(kernel, stride, pad_lo, pad_hi, dilation, ceil_mode), valid)
    dws = [dense_window(w, s) for w, s in zip(ws, steps, strict=True)]
    pad = _pad_arg([d.pad_lo for d in dws], [d.pad_hi for d in dws])
    source = x
    if any(pad):
        x = F.pad(x, pad, value=-math.inf)
    if nd == 1:
        # as a 2-D pool over a singleton row: same values, and torch.export keeps the length
        # symbolic (its 1-D max pool pins it)
        y = F.max_pool2d(x.unsqueeze(-2), (1, kernel[0]), 1, 0, (1, dws[0].dilation))
        return _crop_strided(y.squeeze(-2), source, steps, ws, valid)
    y = _MAXPOOL[nd](x, list(kernel), 1, 0, [d.dilation for d in dws])
    return _crop_strided(y, source, steps, ws, valid)


def avg_pool(
    x: torch.Tensor,
    steps: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    valid: Sequence[int] = (),
) -> torch.Tensor:
    """Dense average pooling (PyTorch's AvgPool has no dilation).

    The window sum is a depthwise convolution with a dilated kernel of ones; the divisor is the
    product over axes of how many taps of each window the baseline counts (the padding, clipped
    at the end of the right padding, or the real input only), computed for the actual size.
    Along the ``valid`` axes (:func:`_valid`) every window is whole.
    """
    nd = len(steps)
    ws = _valid(_windows(kernel, stride, padding, padding, [1] * nd, ceil_mode), valid)
    dws = [dense_window(w, s) for w, s in zip(ws, steps, strict=True)]
    channels = x.shape[x.dim() - nd - 1]
    lead = x.shape[: x.dim() - nd - 1]
    z = x.reshape(-1, channels, *x.shape[x.dim() - nd :])
    z = F.pad(z, _pad_arg([d.pad_lo for d in dws], [d.pad_hi for d in dws]))
    ones = z.new_ones((channels, 1, *kernel))
    y = _CONV[nd](z, ones, None, 1, 0, [d.dilation for d in dws], channels)
    y = _crop_strided(y, x, steps, ws, valid)
    dense_out = y.shape[2:]
    if divisor_override:
        return (y / divisor_override).reshape(*lead, channels, *y.shape[2:])
    divisor = None
    for i, (w, s, n) in enumerate(zip(ws, steps, dense_out, strict=True)):
        h = lattice_count(x.shape[x.dim() - nd + i], s)
        count = avg_tap_counts(torch.arange(n, device=x.device), h, w, s, count_include_pad,
                               minimum=_clamp_max, maximum=_clamp_min).to(y.dtype)
        count = count.reshape([n if j == i else 1 for j in range(nd)])
        divisor = count if divisor is None else divisor * count
    return (y / divisor).reshape(*lead, channels, *y.shape[2:])


def lp_pool(
    x: torch.Tensor,
    steps: Sequence[int],
    norm_type: float,
    kernel: Sequence[int],
    stride: Sequence[int],
    ceil_mode: bool,
    valid: Sequence[int] = (),
) -> torch.Tensor:
    """Dense power-average pooling, the arithmetic of ``F.lp_pool{1,2,3}d``: the average pool
    of ``x ** p`` (the windows' taps counted as the baseline counts them, ceil mode included)
    times the kernel's size, to the power ``1 / p``; the max of ``|x|`` for ``p = inf``."""
    nd = len(steps)
    zeros, ones = [0] * nd, [1] * nd
    if norm_type == float("inf"):
        return max_pool(x.abs(), steps, kernel, stride, zeros, zeros, ones, ceil_mode, valid)
    if norm_type == -float("inf"):
        return -max_pool(-x.abs(), steps, kernel, stride, zeros, zeros, ones, ceil_mode, valid)
    out = avg_pool(x.pow(norm_type), steps, kernel, stride, zeros, ceil_mode, True, None,
                   valid)
    return (torch.sign(out) * F.relu(torch.abs(out))).mul(math.prod(kernel)).pow(
        1.0 / norm_type)


def _clamp_max(t: torch.Tensor, bound) -> torch.Tensor:
    return torch.clamp(t, max=bound)


def _clamp_min(t: torch.Tensor, bound) -> torch.Tensor:
    return torch.clamp(t, min=bound)


def batch_norm(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool,
               momentum: float | None, eps: float, num_batches_tracked=None) -> torch.Tensor:
    """``nn.BatchNorm``'s forward, as a function of its buffers: in training, batch statistics
    (over every dense position) and an update of the running statistics by ``momentum`` (or
    the cumulative average when it is None) and of ``num_batches_tracked``; otherwise the
    running statistics. A dense model flips ``training`` with ``train()``/``eval()``."""
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)


def drop_path(x: torch.Tensor, p: float, training: bool, per_sample: bool) -> torch.Tensor:
    """Stochastic depth as the baseline's module did it (recognized by :mod:`.capture` from
    its behaviour): in training, each sample's map (``per_sample``) or the whole batch's is
    zeroed with probability ``p`` and kept ones are scaled by ``1 / (1 - p)``; otherwise the
    identity. A per-sample factor multiplies every dense position alike, as it multiplied the
    baseline's map, so it is equivariant. A dense model flips ``training``."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1) if per_sample else (1,) * x.dim()
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep) if keep > 0 else x * mask


def within(x: torch.Tensor, steps: Sequence[int], limits: Sequence[int], what: str):
    """``x`` itself, after checking that its baseline sizes are within ``limits``: a pool whose
    kernel covers the whole map is a global pool only while the map fits in the kernel."""
    nd = len(steps)
    for i, (s, limit) in enumerate(zip(steps, limits, strict=True)):
        n = lattice_count(x.shape[x.dim() - nd + i], s)
        _check(n <= limit, lambda n=n, limit=limit: past_cover(what, [limit], n),
               SizeNotCovered)
    return x


def global_pool(
    x: torch.Tensor,
    dims: Sequence[int],
    steps: Sequence[int],
    mode: str,
    reduce: str,
    keepdim: bool,
    extent: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pooling over whole spatial dimensions ``dims`` of a dense map.

    * ``lattice``: only the lattice points: exactly the baseline's value;
    * ``dense``: every dense position: the average over shifted copies (a different function);
    * ``phase``: each of the ``s`` phases of each axis separately; the pooled dimensions become
      trailing *phase* dimensions of size ``s`` (phase 0 is exactly the baseline). A phase with
      no position inside the input (possible when the map has a single lattice point) is NaN;
    * ``window``: a pool of ``extent`` lattice points (the map's size at the example input),
      dilated by the step, at every dense position where it fits: the pooled dims keep size
      1 and the window positions become trailing dims.
    """
    dims = [d % x.dim() for d in dims]
    if mode == "window":
        return _window_pool(x, dims, steps, extent, reduce)
    if mode == "lattice":
        index = [slice(None)] * x.dim()
        for d, s in zip(dims, steps, strict=True):
            index[d] = slice(None, None, s)
        x = x[tuple(index)]
    if mode in ("lattice", "dense"):
        return _reduce(x, dims, reduce, keepdim)
    # phase: split each pooled dim (size H) into (ceil(H / s), s) and reduce the first part
    fill = 0.0 if reduce in ("mean", "sum") else -math.inf
    counts = []
    for d, s in zip(dims, steps, strict=True):
        n = x.shape[d]
        h = phase_blocks(n, s)
        pad = [0, 0] * (x.dim() - 1 - d) + [0, h * s - n]
        x = F.pad(x, pad, value=fill)
        x = x.unflatten(d, (h, s)).movedim(d + 1, -1)
        r = torch.arange(s, device=x.device)
        counts.append(phase_count(n, s, r))
    y = _reduce(x, dims, "sum" if reduce == "mean" else reduce, keepdim)
    count = counts[0]
    for c in counts[1:]:
        count = count[..., None] * c
    if reduce == "mean":
        y = y / count.to(y.dtype)
    elif reduce != "sum":
        y = torch.where(count > 0, y, torch.full_like(y, math.nan))
    return y


def _reduce(x: torch.Tensor, dims: Sequence[int], reduce: str, keepdim: bool) -> torch.Tensor:
    if reduce == "mean":
        return x.mean(tuple(dims), keepdim=keepdim)
    if reduce == "sum":
        return x.sum(tuple(dims), keepdim=keepdim)
    if reduce == "amin":
        return x.amin(tuple(dims), keepdim=keepdim)
    return x.amax(tuple(dims), keepdim=keepdim)


def _window_pool(x: torch.Tensor, dims: Sequence[int], steps: Sequence[int],
                 extent: Sequence[int] | None, reduce: str) -> torch.Tensor:
    """A 2-D map: a dilated max pool or a depthwise convolution. Otherwise separable: each of
    these reductions over a box is the reduction, axis by axis, of the reductions along one
    axis, and ``unfold`` makes each axis' windows a view (no copy)."""
    if extent is None or len(extent) != len(dims):
        raise ValueError("window pooling needs the window's extent per pooled dim")
    for d, s, m in zip(dims, steps, extent, strict=True):
        span = (m - 1) * s + 1
        n = x.shape[d]
        _check(n >= span, lambda n=n, span=span, m=m: (
            f"the input is smaller than this dense model's window: a pooled map has {n} dense "
            f"positions, the window of {m} lattice points needs {span}"))
    if list(dims) == [x.dim() - 2, x.dim() - 1] and x.dim() == 4 and reduce != "amin":
        # the common case, a 2-D map: one dilated pool (max) or depthwise convolution (mean,
        # sum) instead of two passes over strided views
        if reduce == "amax":
            x = F.max_pool2d(x, tuple(extent), 1, 0, tuple(steps))
        else:
            c = x.shape[1]
            scale = 1.0 / math.prod(extent) if reduce == "mean" else 1.0
            w = torch.full((c, 1, *extent), scale, dtype=x.dtype, device=x.device)
            x = F.conv2d(x, w, None, 1, 0, tuple(steps), c)
        return x[:, :, None, None]
    for d, s, m in zip(dims, steps, extent, strict=True):
        x = _reduce(x.unfold(d, (m - 1) * s + 1, 1)[..., ::s], [-1], reduce, False)
    # the window positions go to the end; the pooled dims stay, with size 1
    k = len(dims)
    x = x.reshape(*x.shape, *([1] * k))
    for j, d in enumerate(dims):
        x = x.transpose(d, x.dim() - k + j)
    return x


def phase_to_map(p: torch.Tensor, targets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """Spread trailing phase dimensions of ``p`` over map dimensions.

    The k-th of the last ``len(targets)`` dims of ``p`` holds one value per phase of an axis;
    it replaces the size-1 dim ``targets[k]`` and is tiled to ``sizes[k]``, so that dense
    position ``q`` gets phase ``q % s`` (a squeeze-excitation scale for every shift).
    """
    n = len(targets)
    for k, (t, size) in enumerate(zip(targets, sizes, strict=True)):
        src = p.dim() - n + k
        s = p.shape[src]
        reps = [1] * p.dim()
        reps[src] = phase_blocks(size, s)
        p = p.repeat(reps).narrow(src, 0, size)
        p = p.movedim(src, t + 1).squeeze(t)
    return p


def phase_to_map_like(p, like, targets, like_dims):
    """:func:`phase_to_map` with the sizes of ``like``'s dims ``like_dims``."""
    return phase_to_map(p, targets, [like.shape[d] for d in like_dims])


def base_size(x: torch.Tensor, base_ndim: int, fold: bool, steps: Sequence[int] = ()):
    """``x.size()`` as the baseline model reads it: its own sizes (the lattice count of each
    spatial dim), without trailing extra dims."""
    steps = tuple(steps) + (1,) * (base_ndim - len(steps))
    return torch.Size(dim_size(x, d, base_ndim, fold, steps[d]) for d in range(base_ndim))


def dim_size(x: torch.Tensor, d: int, base_ndim: int, fold: bool, step: int = 1):
    """Size of dim ``d`` as the baseline has it (a dense size counts lattice points)."""
    if fold and d == base_ndim - 1:
        return -1  # a flatten over space has no dense size; -1 keeps reshapes consistent
    return lattice_count(x.shape[d], step) if step > 1 else x.shape[d]


def _check(cond, message, error: type[Exception] = RuntimeError) -> None:
    """``torch._check_with``, without its cost where the sizes are plain ints (eager
    prediction): the first call of ``torch._check`` imports sympy and the symbolic-shape
    machinery, a third of a second in every process that runs blocks."""
    if cond is True:
        return
    if cond is False:
        raise error(message())
    torch._check_with(error, cond, message)


def size_check(cond, message: str) -> None:
    """A size condition torch.export recorded (a branch the model's code took on a size)."""
    _check(cond, lambda: (
        "this input size takes another branch of the model's Python code than the example "
        f"input did, which the dense model does not cover ({message})"), SizeNotCovered)


def lattice_flatten(x: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    """The baseline's ``x.view(n, -1)`` of a map whose last ``len(steps)`` dims are on a
    lattice of those steps: the lattice points, flattened."""
    index = (Ellipsis,) + tuple(slice(None, None, s) for s in steps)
    return torch.flatten(x[index], 1)


def size_fixed(cond, message: str) -> None:
    """A size the dense model was specialized to at the example, checked at run time."""
    _check(cond, lambda: f"{message}: not covered by the dense model", SizeNotCovered)


def pad(x: torch.Tensor, amounts: Sequence[int], scales: Sequence[int], mode: str,
        value: float | None) -> torch.Tensor:
    """``F.pad`` with amounts computed when the graph runs (from the baseline's sizes), each
    multiplied by the lattice step of its axis."""
    dense = [a * s for a, s in zip(amounts, scales, strict=True)]
    if mode == "constant" and value is not None:
        return F.pad(x, dense, mode=mode, value=value)
    return F.pad(x, dense, mode=mode)


def fold_extras(x: torch.Tensor, n_extra: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Move the trailing ``n_extra`` dims into the batch: ``(N, ..., E) -> (N * E, ...)``."""
    extra = tuple(x.shape[x.dim() - n_extra :])
    base = x.dim() - n_extra
    x = x.movedim(tuple(range(base, x.dim())), tuple(range(1, 1 + n_extra)))
    return x.reshape(-1, *x.shape[1 + n_extra :]), extra


def unfold_extras(y: torch.Tensor, extra: Sequence[int]) -> torch.Tensor:
    n = len(extra)
    y = y.reshape(-1, *extra, *y.shape[1:])
    return y.movedim(tuple(range(1, 1 + n)), tuple(range(y.dim() - n, y.dim())))


def _function(name: str):
    return targets.resolve(name)  # the names a rule passes here are registered targets


def per_position(fn: str, x: torch.Tensor, n_extra: int, *args, **kwargs) -> torch.Tensor:
    """Apply the per-sample op named ``fn`` at each trailing extra position of ``x``."""
    z, extra = fold_extras(x, n_extra)
    return unfold_extras(_function(fn)(z, *args, **kwargs), extra)


def last_dims(fn: str, x: torch.Tensor, n_extra: int, *args, **kwargs) -> torch.Tensor:
    """Apply the op named ``fn``, which acts on the last dims of its input, below trailing
    extra dims."""
    lead = tuple(range(x.dim() - n_extra, x.dim()))
    z = x.movedim(lead, tuple(range(n_extra)))
    y = _function(fn)(z, *args, **kwargs)
    return y.movedim(tuple(range(n_extra)), tuple(range(y.dim() - n_extra, y.dim())))


def append_extras(x: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Add ``n_extra`` trailing singleton dims so ``x`` broadcasts against a tensor with extras."""
    return x.reshape(*x.shape, *([1] * n_extra))


def reshape(x: torch.Tensor, shape: Sequence, from_dims: Sequence[int | None], n_extra: int):
    """Reshape whose spatial entries keep the dense size of input dim ``from_dims[i]``.

    ``shape`` is the baseline's shape argument; entries where ``from_dims`` names a dim of
    ``x`` are replaced by that dim's dense size; trailing extra dims are kept as they are.
    """
    out = [x.shape[d] if d is not None else v for v, d in zip(shape, from_dims, strict=True)]
    out += list(x.shape[x.dim() - n_extra :])
    return x.reshape(out)


def space_to_depth(x: torch.Tensor, block: int, steps: Sequence[int], order: str):
    """Space to depth on a dense map (``pixel_unshuffle``, ONNX ``SpaceToDepth``): each dense
    position reads the ``block`` taps of its window along each spatial axis, ``step`` apart,
    and they become channels (``channels_first``: c * r * r + i * r + j; ``blocks_first``:
    (i * r + j) * C + c). The output is tight on a lattice ``block`` times coarser."""
    nd = len(steps)
    sizes = [tight(lattice_count(x.shape[x.dim() - nd + i], s) // block, s * block)
             for i, s in enumerate(steps)]
    taps = []
    for offsets in itertools.product(range(block), repeat=nd):
        t = x
        for i, (o, s, n) in enumerate(zip(offsets, steps, sizes)):
            t = t.narrow(x.dim() - nd + i, o * s, n)
        taps.append(t)
    y = torch.stack(taps, dim=x.dim() - nd)  # (..., C, taps, spatial...)
    if order == "blocks_first":
        y = y.transpose(x.dim() - nd - 1, x.dim() - nd)
    return y.flatten(x.dim() - nd - 1, x.dim() - nd)


def unfold_blocks(x: torch.Tensor, blocks: Sequence[Sequence[int]], steps: Sequence[int]):
    """A spatial dim ``d`` viewed as (blocks, block) (``x.view(..., h // r, r, ...)``: a
    stride-r window): densely, each position of the coarser lattice and its ``r`` taps
    ``step`` apart, the taps in a new dim after ``d``. ``blocks``: (dim, r) pairs."""
    for (d, r), s in sorted(zip(blocks, steps), key=lambda item: -item[0][0]):
        n = tight(lattice_count(x.shape[d], s) // r, s * r)
        x = torch.stack([x.narrow(d, o * s, n) for o in range(r)], dim=d + 1)
    return x


def spatial_slice(x: torch.Tensor, dim: int, start, stop, base_step: int, step: int):
    """Baseline slice ``[start:stop:base_step]`` of a map on lattice ``step``, held densely."""
    h = lattice_count(x.shape[dim], step)
    start, stop = _clamped(start, h, 0), _clamped(stop, h, h)
    n = slice_count(start, stop, base_step, torch.sym_max)
    _check(n >= 1, lambda: "a spatial slice is empty")
    return x.narrow(dim, start * step, tight(n, step * base_step))


def _clamped(bound, h, default):
    """A slice bound as ``slice.indices(h)`` makes it for a positive step, written so that a
    size traced symbolically stays a symbol: ``indices`` reads it as a plain int, and an
    exported dense graph then crops to the trace size's bounds at every size."""
    if bound is None:
        return default
    if bound < 0:
        bound = bound + h
    return torch.sym_max(0, torch.sym_min(bound, h))


# every public function above may be called by a dense graph; checkpoints written before the
# package had subpackages name them econv_convert.ops.NAME
for _name, _fn in list(globals().items()):
    if callable(_fn) and getattr(_fn, "__module__", None) == __name__ and \
            not _name.startswith("_"):
        targets.register(_fn)
        targets.register_as(f"econv_convert.ops.{_name}", _fn)
