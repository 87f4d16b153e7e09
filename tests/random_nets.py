"""Small networks drawn at random (Hypothesis), the way users' own models differ from the
project's fixtures: kernels 1-5 with and without padding, strides and dilations, max and
average pools with ceil mode, count_include_pad and padding, residual adds with padded or
cropped skips, concatenations, and three heads (a global average pool and a linear layer, a
1 x 1 convolution map, a flatten of a 1 x 1 map), with random BatchNorm statistics.

A drawn network is a :class:`Spec` of plain values (Hypothesis prints it whole on a failure,
where a module's repr hides ceil_mode and count_include_pad); :func:`build` makes the module.
Layers are written as library authors write them: the skip of an unpadded residual block is
cropped to the branch's size read off the branch (``skip[..., c:c + h, c:c + w]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from conftest import rand_bn
from hypothesis import assume
from hypothesis import strategies as st

C = 4  # channels everywhere: blocks compose freely and runs stay small


@dataclass(frozen=True)
class Conv:
    k: int
    padded: bool
    stride: int = 1
    dilation: int = 1

    @property
    def pad(self) -> int:
        return self.dilation * (self.k - 1) // 2 if self.padded else 0


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"
    k: int
    stride: int
    pad: int = 0
    ceil: bool = False
    count_include_pad: bool = True


@dataclass(frozen=True)
class Res:
    """conv-BN-ReLU-conv-BN plus a skip; unpadded: the skip cropped to the branch."""

    k: int
    padded: bool
    stride: int = 1  # 2 only when padded (a cropped skip of a strided branch has no fixed
    # offset: its crop would depend on the input's parity)


@dataclass(frozen=True)
class Cat:
    """A 1 x 1 branch and a k x k branch concatenated; unpadded: the 1 x 1 one cropped."""

    k: int
    padded: bool


@dataclass(frozen=True)
class Spec:
    stem: Conv
    stages: tuple
    head: str  # "gap", "map" or "flatten"
    size: tuple[int, int]  # the example's spatial size

    @property
    def strides(self) -> list[int]:
        return [s for s in (_stride(b) for b in (self.stem, *self.stages)) if s > 1]

    @property
    def total(self) -> int:
        return math.prod(self.strides)

    @property
    def output_strides(self) -> list[int]:
        """The output strides densify can reach: products of the first strides."""
        out = [1]
        for s in self.strides:
            out.append(out[-1] * s)
        return sorted(set(out))

    @property
    def padded(self) -> bool:
        """Whether any layer reads padding (ceil-mode windows count: they read past the end)."""
        def reads(b):
            if isinstance(b, Pool):
                return b.pad > 0 or b.ceil
            return b.padded and b.k > 1
        return any(reads(b) for b in (self.stem, *self.stages))


def _stride(b) -> int:
    return getattr(b, "stride", 1)


@st.composite
def convs(draw, padded=None):
    k = draw(st.integers(1, 5))
    return Conv(k, draw(st.booleans()) if padded is None else padded, draw(st.integers(1, 2)),
                draw(st.integers(1, 2)) if k > 1 else 1)


@st.composite
def pools(draw):
    k = draw(st.integers(2, 3))
    kind = draw(st.sampled_from(["max", "avg"]))
    return Pool(kind, k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)),
                draw(st.booleans()), draw(st.booleans()) if kind == "avg" else True)


@st.composite
def residuals(draw):
    padded = draw(st.booleans())
    return Res(draw(st.sampled_from([1, 3])), padded,
               draw(st.integers(1, 2)) if padded else 1)


@st.composite
def concats(draw):
    return Cat(draw(st.sampled_from([1, 3])), draw(st.booleans()))


@st.composite
def specs(draw, heads=("gap", "map", "flatten")) -> Spec:
    """A network of a stem and 2-4 stages whose baseline runs at its example size; total
    stride at most 16."""
    stem = draw(convs())
    stages = tuple(draw(st.lists(st.one_of(convs(), pools(), residuals(), concats()),
                                 min_size=2, max_size=4)))
    head = draw(st.sampled_from(heads))
    probe = Spec(stem, stages, head, (1, 1))
    assume(probe.total <= 16)
    least = smallest(probe)
    assume(least is not None)
    if head == "flatten":  # the flatten of a 1 x 1 map: the example is that map's input
        size = (least, least)
    else:
        h = least + draw(st.integers(0, 12))
        size = (h, h + draw(st.integers(0, 5)))
    return Spec(stem, stages, head, size)


def smallest(spec: Spec, limit: int = 96) -> int | None:
    """The smallest square input the trunk maps to at least one position (a 1 x 1 map)."""
    trunk = _trunk(spec).eval()
    for n in range(1, limit + 1):
        try:
            with torch.no_grad():
                y = trunk(torch.zeros(1, 3, n, n))
        except RuntimeError:
            continue
        if y.shape[-1] >= 1 and y.shape[-2] >= 1:
            return n if tuple(y.shape[-2:]) == (1, 1) or spec.head != "flatten" else None
    return None


def _conv(b: Conv, c_in: int = C) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, C, b.k, b.stride, b.pad, b.dilation),
                         nn.BatchNorm2d(C), nn.ReLU())


def _crop_to(skip: torch.Tensor, like: torch.Tensor, c: int) -> torch.Tensor:
    h, w = like.shape[-2:]
    return skip[..., c:c + h, c:c + w]


class Residual(nn.Module):
    def __init__(self, b: Res):
        super().__init__()
        pad = (b.k - 1) // 2 if b.padded else 0
        self.crop = 0 if b.padded else b.k - 1
        self.main = nn.Sequential(nn.Conv2d(C, C, b.k, b.stride, pad), nn.BatchNorm2d(C),
                                  nn.ReLU(), nn.Conv2d(C, C, b.k, 1, pad), nn.BatchNorm2d(C))
        self.short = nn.Identity() if b.stride == 1 else nn.Conv2d(C, C, 1, b.stride)

    def forward(self, x):
        y = self.main(x)
        skip = self.short(x)
        if self.crop:
            skip = _crop_to(skip, y, self.crop)
        return torch.relu(y + skip)


class Concat(nn.Module):
    def __init__(self, b: Cat):
        super().__init__()
        self.crop = 0 if b.padded else (b.k - 1) // 2
        self.a = nn.Conv2d(C, C // 2, 1)
        self.b = nn.Sequential(nn.Conv2d(C, C - C // 2, b.k, 1, (b.k - 1) // 2 if b.padded
                                         else 0), nn.BatchNorm2d(C - C // 2))

    def forward(self, x):
        b = self.b(x)
        a = self.a(x)
        if self.crop:
            a = _crop_to(a, b, self.crop)
        return torch.cat([a, b], 1)


def _block(b) -> nn.Module:
    if isinstance(b, Conv):
        return _conv(b)
    if isinstance(b, Pool):
        if b.kind == "max":
            return nn.MaxPool2d(b.k, b.stride, b.pad, ceil_mode=b.ceil)
        return nn.AvgPool2d(b.k, b.stride, b.pad, ceil_mode=b.ceil,
                            count_include_pad=b.count_include_pad)
    return Residual(b) if isinstance(b, Res) else Concat(b)


def _trunk(spec: Spec) -> nn.Module:
    return nn.Sequential(_conv(spec.stem, 3), *(_block(b) for b in spec.stages))


class Net(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.trunk = _trunk(spec)
        self.head = spec.head
        if spec.head == "map":
            self.out = nn.Conv2d(C, 3, 1)
        else:
            self.out = nn.Linear(C, 3)  # gap: C features; flatten: C x 1 x 1

    def forward(self, x):
        x = self.trunk(x)
        if self.head == "map":
            return self.out(x)
        if self.head == "gap":
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.out(torch.flatten(x, 1))


def build(spec: Spec, seed: int = 0) -> nn.Module:
    """The baseline module of ``spec``, with random weights and BatchNorm statistics; the
    example is dropped (Hypothesis ``assume``) where the baseline rejects it."""
    torch.manual_seed(seed)
    model = rand_bn(Net(spec), seed)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *spec.size))
    except RuntimeError:
        assume(False)
    return model
