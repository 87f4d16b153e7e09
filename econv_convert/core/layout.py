"""What each dense tensor's dimensions mean, relative to the baseline tensor it stands for.

A dense tensor has the baseline tensor's dimensions, in the same order, followed by *extra*
trailing dimensions the baseline lacks:

* ``plain``: the same size in both (batch, channels, a globally pooled axis in lattice mode);
* ``space``: a spatial axis on a lattice of ``step``: baseline size ``h``, dense ``(h-1)*step+1``;
* ``phase`` (extra only): one entry per lattice phase of a globally pooled axis (``phase``
  pooling), phase 0 being the baseline's value;
* an extra ``space`` dim: the positions of a Flatten + Linear head turned into a convolution;
  the baseline, run on the example size, has one position there.

A *fold* is a ``flatten`` over channels and space that only a Linear layer may consume: the
dense tensor keeps the unflattened map. A *merge* flattens only the trailing spatial dims
into one (``x.view(n, c, -1)``); only a reduction over it (global pooling) may consume it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal


class LayoutError(Exception):
    """A tensor's layout does not fit what a rule needs; the message says why."""


# a dense dim: a baseline dim as it is (``plain``), a spatial axis on a lattice of ``step``
# (``space``), or the phases of a pooled axis (``phase``: an extra dim of ``step`` positions)
DimKind = Literal["plain", "space", "phase"]


@dataclass(frozen=True)
class Dim:
    kind: DimKind
    axis: int = -1
    step: int = 1

    @property
    def spatial(self) -> bool:
        return self.kind != "plain"


PLAIN = Dim("plain")
# what a window layer's input is (:meth:`Layout.window_input`)
InputForm = Literal["dense", "plain", "extra"]


@dataclass(frozen=True)
class Layout:
    base: tuple[int, ...]  # the baseline tensor's shape at the example input
    dims: tuple[Dim, ...]  # one per dense dim
    n_extra: int = 0  # trailing dims that the baseline tensor lacks
    fold: int = 0  # >0: the last baseline dim is the flatten of this many dense dims
    fold_shape: tuple[int, ...] = ()  # the folded spatial sizes at the example input
    # >0: the baseline tensor is this one with its last ``merged`` (spatial) dims flattened
    # into one (``x.view(n, c, -1)``); only a reduction over that dim may consume it
    merged: int = 0

    @staticmethod
    def plain(shape) -> Layout:
        return Layout(tuple(shape), tuple(PLAIN for _ in shape))

    @property
    def base_ndim(self) -> int:
        return len(self.base)

    @property
    def base_dims(self) -> tuple[Dim, ...]:
        """Dims standing for baseline dims (no extras; a fold's dims are not included)."""
        body = self.dims[: len(self.dims) - self.n_extra]
        return body[: len(body) - self.fold] if self.fold else body

    @property
    def fold_dims(self) -> tuple[Dim, ...]:
        body = self.dims[: len(self.dims) - self.n_extra]
        return body[len(body) - self.fold :] if self.fold else ()

    @property
    def extras(self) -> tuple[Dim, ...]:
        return self.dims[len(self.dims) - self.n_extra :] if self.n_extra else ()

    @property
    def has_space(self) -> bool:
        return any(d.spatial for d in self.base_dims) or bool(self.fold)

    @property
    def is_plain(self) -> bool:
        """Dense tensor == baseline tensor (nothing spatial, nothing extra)."""
        return not self.has_space and not self.n_extra

    def with_base(self, base, dims) -> Layout:
        """Same extras, new baseline shape and dims."""
        return replace(self, base=tuple(base), dims=tuple(dims) + self.extras, fold=0,
                       fold_shape=(), merged=0)

    def dense_shape(self) -> tuple[int, ...]:
        """The dense tensor's shape at the example input (the tight form)."""
        shape = [(size - 1) * d.step + 1 if d.kind == "space" else size
                 for size, d in zip(self.base, self.base_dims)]
        if self.fold:
            channels = self.base[-1] // max(1, math.prod(self.fold_shape))
            shape += [channels] + [(k - 1) * d.step + 1
                                   for k, d in zip(self.fold_shape, self.fold_dims[1:])]
        shape += [d.step if d.kind == "phase" else 1 for d in self.extras]
        return tuple(shape)

    def dense_numel(self) -> int:
        """Elements of the dense tensor at the example input."""
        return math.prod(self.dense_shape())

    def norm_dim(self, d: int, ndim: int | None = None) -> int:
        """A dim index as the baseline would read it, made non-negative (extras untouched)."""
        n = self.base_ndim if ndim is None else ndim
        if not -n <= d < n:
            raise IndexError(d)
        return d % n

    def window_input(self, nd: int) -> tuple[InputForm, tuple[int, ...], tuple[int, ...]]:
        """Classify the input of a window layer with ``nd`` spatial dims: ``dense`` (every
        spatial dim on a lattice; with their steps and axes), ``plain`` (nothing spatial: the
        baseline op as it is) or ``extra`` (nothing spatial, but extra dims: the op runs per
        extra position). Raises :class:`LayoutError` otherwise."""
        if self.fold:
            raise LayoutError("the input is a flatten over spatial positions")
        if len(self.base) != nd + 2:
            raise LayoutError(f"expected a batched input with {nd} spatial dims, got shape "
                              f"{self.base}")
        sp = self.base_dims[2:]
        if self.n_extra:
            if any(d.spatial for d in sp):
                raise LayoutError("a window layer on a map that also has extra dims")
            return "extra", (), ()
        if all(d.kind == "space" for d in sp):
            return "dense", tuple(d.step for d in sp), tuple(d.axis for d in sp)
        if not any(d.spatial for d in sp):
            return "plain", (), ()
        raise LayoutError("only some of the spatial dims are on a lattice (a channels-last "
                          "model input? it must be N, C, spatial...)")
