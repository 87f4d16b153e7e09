"""The lattice arithmetic, against PyTorch itself."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from econv_convert.core.lattice import (
    Field,
    Window,
    dense_window,
    lattice_count,
    out_size,
    phase_blocks,
    phase_count,
    same_padding,
    tf_same_padding,
    tight,
)

CASES = [
    (h, k, t, p, d, c)
    for h, k, t, p, d, c in itertools.product(
        (1, 2, 5, 8, 13), (1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2), (False, True))
    if p <= k // 2
]


@pytest.mark.parametrize("h,k,t,p,d,ceil", CASES,
                         ids=[f"h{h}-k{k}-s{t}-p{p}-d{d}-{'ceil' if c else 'floor'}"
                              for h, k, t, p, d, c in CASES])
def test_out_size_matches_pytorch(h, k, t, p, d, ceil):
    w = Window(k, t, p, p, d, ceil)
    try:
        expected = F.max_pool1d(torch.zeros(1, 1, h), k, t, p, d, ceil).shape[-1]
    except RuntimeError:
        expected = None  # PyTorch rejects an input smaller than the window
    got = out_size(h, w)
    if expected is None:
        assert got < 1
    else:
        assert got == expected


@pytest.mark.parametrize("h,step", [(1, 1), (1, 4), (5, 1), (5, 3), (17, 8)])
def test_tight_and_lattice_count_are_inverse(h, step):
    assert lattice_count(tight(h, step), step) == h
    assert tight(h, step) == (h - 1) * step + 1


def test_dense_window_scales_padding_and_dilation_by_the_step():
    dw = dense_window(Window(3, 2, 1, 1, 2, ceil_mode=True), step=4)
    assert (dw.dilation, dw.pad_lo, dw.pad_hi, dw.out_step) == (8, 4, 8, 8)


@pytest.mark.parametrize("k,d", [(1, 1), (2, 1), (3, 1), (4, 2), (5, 3)])
def test_same_padding_matches_pytorch(k, d):
    x = torch.randn(1, 1, 11)
    w = torch.randn(1, 1, k)
    lo, hi = same_padding(k, d)
    expected = F.conv1d(x, w, padding="same", dilation=d)
    torch.testing.assert_close(F.conv1d(F.pad(x, (lo, hi)), w, dilation=d), expected)


def test_receptive_field_grows_with_the_step():
    f = Field().through(Window(3, 2)).through(Window(3, 1))
    assert (f.size, f.step) == (7, 2)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("kernel,stride,pad,dilation,ceil", [
    (3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 2, 0, 1, True), (5, 3, 2, 1, True),
    (3, 1, 1, 2, False), (3, 2, 2, 3, True), (4, 4, 1, 1, True), (1, 2, 0, 1, False)])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_avg_tap_counts_is_the_count_of_taps_inside(kernel, stride, pad, dilation, ceil,
                                                    step, include):
    """The average-pool divisor both backends evaluate: at every dense position, the number
    of window taps within the counted range, counted one by one here."""
    from econv_convert.core.lattice import avg_divisor_bounds, avg_tap_counts

    w = Window(kernel, stride, pad, pad, dilation, ceil)
    for h in range(1, 12):
        lo, hi = avg_divisor_bounds(h, w, include)
        n = (h - 1) * step + 1 + 2 * step
        got = [avg_tap_counts(q, h, w, step, include, minimum=min, maximum=max)
               for q in range(n)]
        want = [sum(lo * step <= q + (k * dilation - pad) * step <= hi * step
                    for k in range(kernel)) for q in range(n)]
        assert got == want, (h, got, want)


class Truncating(int):
    """An int whose ``//`` truncates toward zero, as ONNX's ``Div`` does."""

    def __sub__(self, o):
        return Truncating(int(self) - int(o))

    def __add__(self, o):
        return Truncating(int(self) + int(o))

    def __floordiv__(self, o):
        q = abs(int(self)) // abs(int(o))
        return Truncating(q if (int(self) >= 0) == (int(o) > 0) else -q)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_phase_counts_count_the_positions_of_each_phase(n, step):
    assert phase_blocks(n, step) * step >= n > (phase_blocks(n, step) - 1) * step
    for r in range(step):
        want = sum(1 for q in range(n) if q % step == r)
        assert phase_count(n, step, r) == want
        assert phase_count(Truncating(n), step, r) == want  # the ONNX graph's Div too


@pytest.mark.parametrize("h", [1, 2, 5, 8, 13, 16])
@pytest.mark.parametrize("k,stride,d", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (4, 2, 1), (3, 3, 2),
                                        (5, 4, 1)])
def test_tf_same_padding_gives_ceil_outputs_with_the_least_padding(h, k, stride, d):
    total = tf_same_padding(h, k, stride, d)
    extent = d * (k - 1) + 1
    outputs = (h + total - extent) // stride + 1
    assert outputs == -(-h // stride)
    assert total == 0 or (h + total - 1 - extent) // stride + 1 < outputs
