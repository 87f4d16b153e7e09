"""A block's dense pass without the halo's padding: every layer computes only the positions
its data reaches.

A block reads its outputs' windows plus a halo, and the dense model pads every layer of that
input as if the block's edges were the image's: each layer computes a map as large as the
block's input, though the outputs a block keeps need less and less of it from layer to layer
(the last, most dilated layers of a ResNet-like model lose a tenth of their positions). Along
an axis where a block's input window lies inside the image on both sides, none of that
padding is the image's: its outputs do not depend on it. This module runs the same graph with
every window layer's padding along such axes removed (the dense layers' own ``valid`` form;
the layers that keep their stride cut to the same lattice phase), so each map shrinks to the
positions computed from real data alone, and tracks, per spatial axis, the *shift* between a
position of the trimmed map and the same position of the padded one.

Only graphs made of layers whose meaning is the same on any part of a map are run this way
(:func:`trimmable`): the dense window layers, the layers that keep their stride below an
output stride, element-wise layers, concatenation over the channels, window pooling and the
heads after it (reshapes and layers below the trailing spatial dims). A graph with anything
else (a size read off a map, a global reduction, a permute) runs as it is. Maps meeting in a
sum or a concatenation are cut to the positions they share. Positions near a trimmed map's
edges may read less than their whole window (a ceil-mode window past the end): they lie
outside what the block keeps, as the padded pass's edge positions do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from econv_convert.run import fuse
from econv_convert.torch import ops
from econv_convert.torch.rewrite import norm, pointwise, window

# dense window layers (stride 1 on the dense map): the name of their (first) padding
_WINDOW = {ops.conv: "pad_lo", ops.max_pool: "pad_lo", ops.avg_pool: "padding",
           ops.lp_pool: None}


def _dims(fn) -> int:
    return int(fn.__name__[-2])  # conv2d, max_pool3d, ...


# layers that keep the baseline's stride (below an output stride): the targets their rules
# register, which the dense graph calls as they are; their number of spatial dims
_KEPT_CONV = {f: _dims(f) for f in window.CONV_FUNCTIONS}
_KEPT_POOL = {**{f: (_dims(f), "max") for f in window.MAX_POOL_FUNCTIONS},
              **{f: (_dims(f), "avg") for f in window.AVG_POOL_FUNCTIONS}}
# one map in, the same positions out: the registered unary and channel-wise layers (their
# rules admit them only where they act on each position alone) and the fused ones
_UNARY = {*pointwise.UNARY_FUNCTIONS, *norm.CHANNELWISE, fuse.relu_into}
# maps (and per-channel constants) combined position by position
_BINARY = {*pointwise.BINARY_FUNCTIONS, fuse.add_into}
# layers acting on the dims before the trailing spatial ones (the heads after window
# pooling): checked when run (:func:`_below`)
_BELOW = {ops.reshape, ops.last_dims, torch.squeeze}
# element-wise only when not training: the position of their ``training`` argument
_TRAINING = {ops.batch_norm: 5, F.batch_norm: 5, torch.batch_norm: 5, ops.drop_path: 2, **{
    f: 2 for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                   F.feature_alpha_dropout)}}
_METHODS = {*pointwise.UNARY_METHODS, *pointwise.BINARY_METHODS}
# what else a dense graph may call: layers whose trimmed form is the call itself
_CAT = {torch.cat, torch.concat, torch.concatenate}
_OTHER = {*_CAT, fuse.linear_then_pool}


def handles(target) -> bool:
    """Whether a dense graph's ``call_function`` target is one this module can run trimmed
    (a global pool in window mode is, in :func:`trimmable`, by its arguments)."""
    return any(target in group for group in (_WINDOW, _KEPT_CONV, _KEPT_POOL, _UNARY, _BINARY,
                                             _BELOW, _OTHER))


class Untrimmable(Exception):
    """The graph (or this input) has a layer whose trimmed form is not known here."""


def trimmable(gm: fx.GraphModule) -> bool:
    """Whether every node of ``gm`` is one this module can run trimmed."""
    placeholders = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
        elif node.op == "call_function":
            if not (handles(node.target) or _window_pool(node)):
                return False
        elif node.op == "call_method":
            if node.target not in _METHODS:
                return False
        elif node.op not in ("get_attr", "output"):
            return False
    return placeholders == 1


def _window_pool(node: fx.Node) -> bool:
    return (node.target is ops.global_pool and len(node.args) >= 4
            and node.args[3] == "window")


def run(gm: fx.GraphModule, x: torch.Tensor, nd: int, axes: Sequence[int] | None = None
        ) -> tuple[torch.Tensor, list[int]]:
    """``gm`` on ``x`` with the padding along ``axes`` (of the ``nd`` spatial ones; all by
    default) dropped: the output and, per spatial axis, the index in the padded pass's output
    of the trimmed output's first position (0 along the axes kept as they are)."""
    axes = tuple(range(nd)) if axes is None else tuple(axes)
    values: dict[fx.Node, object] = {}
    shifts: dict[fx.Node, list[int]] = {}

    def arg(a):
        return fx.node.map_arg(a, lambda n: values[n])

    for node in _in_turn(gm, values):
        if node.op == "placeholder":
            values[node], shifts[node] = x, [0] * nd
        elif node.op == "get_attr":
            values[node] = _attr(gm, node.target)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out not in shifts:
                raise Untrimmable("the output is not one map")
            return values[out], shifts[out]
        else:
            spatial = [n for n in node.all_input_nodes if n in shifts]
            if not spatial:  # computed from constants alone
                values[node] = _call(node, arg(node.args), arg(node.kwargs))
                continue
            values[node], shifts[node] = _trimmed(node, arg, values, shifts, spatial, nd,
                                                  axes)
    raise Untrimmable("the graph has no output")


def _in_turn(gm: fx.GraphModule, values: dict):
    """The graph's nodes in order; after each, the values it was the last to use are
    dropped from ``values``, as the graph's own code lets them go (holding every map of a pass
    to its end had a trimmed block peak at the sum of all its maps)."""
    last_use = {n: user for user in gm.graph.nodes for n in user.all_input_nodes}
    for node in gm.graph.nodes:
        yield node
        for used in node.all_input_nodes:
            if last_use.get(used) is node:
                values.pop(used, None)


def _call(node: fx.Node, args, kwargs):
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _trimmed(node, arg, values, shifts, spatial, nd, axes):
    f = node.target
    if f in _WINDOW:
        return _window(node, arg, shifts, nd, axes)
    if f in _KEPT_CONV or f in _KEPT_POOL:
        return _kept(node, arg, shifts, nd, axes)
    if f is fuse.linear_then_pool or _window_pool(node):
        # a window pool without padding: position q pools q, q + s, ...; the shift stays
        _only_first(node, spatial)
        return _call(node, arg(node.args), arg(node.kwargs)), list(shifts[spatial[0]])
    if f in _CAT:
        return _cat(node, arg, values, shifts, nd)
    if f in _BELOW:
        return _below(node, arg, values, shifts, spatial, nd)
    # element-wise: the maps cut to the positions they all have, constants as they are
    shift, common = _overlap(node, spatial, values, shifts, nd)

    def cut(n):
        if n in shifts:
            return common[n]
        v = values[n]
        if isinstance(v, torch.Tensor) and v.dim() >= nd and any(
                v.shape[v.dim() - nd + i] != 1 for i in range(nd)):
            raise Untrimmable(f"{node.name}: a constant with a spatial extent")
        return v

    if node.op == "call_function" and f not in _UNARY and f not in _BINARY:
        raise Untrimmable(f"{node.name}: {f}")
    if f in _TRAINING and _training(node):
        raise Untrimmable(f"{node.name}: batch statistics or dropout in training")
    args = fx.node.map_arg(node.args, cut)
    kwargs = fx.node.map_arg(node.kwargs, cut)
    return _call(node, args, kwargs), shift


def _training(node) -> bool:
    f, at = node.target, _TRAINING[node.target]
    if len(node.args) > at:
        return node.args[at] is not False
    if "training" in node.kwargs:
        return node.kwargs["training"] is not False
    import inspect

    try:
        return inspect.signature(f).parameters["training"].default is not False
    except (ValueError, KeyError):  # a builtin without a signature: as if training
        return True


def _below(node, arg, values, shifts, spatial, nd):
    """A layer that leaves a map's trailing ``nd`` dims as they are (their positions keep
    their shift): a reshape or an op below trailing extra dims that include them, a squeeze
    of other dims."""
    f = node.target
    first = node.args[1] if f is ops.last_dims else node.args[0]  # last_dims(fn, x, ...)
    if spatial != [first]:
        raise Untrimmable(f"{node.name}: a map in an argument other than its input")
    rank = values[first].dim()
    if f is ops.reshape:
        from_dims, n_extra = node.args[2], node.args[3]
        keeps = n_extra >= nd and all(d is None or d % rank < rank - nd for d in from_dims)
    elif f is ops.last_dims:
        keeps = node.args[2] >= nd
    else:  # torch.squeeze(x, dims)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        keeps = dims is not None and all(d % rank < rank - nd for d in dims)
    if not keeps:
        raise Untrimmable(f"{node.name}: reshapes the spatial dims")
    return _call(node, arg(node.args), arg(node.kwargs)), list(shifts[first])


def _only_first(node, spatial):
    if spatial != [node.args[0]]:
        raise Untrimmable(f"{node.name}: a map in an argument other than the first")


def _narrow(t: torch.Tensor, starts: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    nd = len(starts)
    for i, (a, n) in enumerate(zip(starts, sizes)):
        d = t.dim() - nd + i
        if a or n != t.shape[d]:
            t = t.narrow(d, a, n)
    return t


def _bound(node):
    import inspect

    sig = inspect.signature(node.target)
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound


def _window(node, arg, shifts, nd, axes):
    """A dense window layer (stride 1 on the dense map) without padding, ceil mode or the
    tight crop along ``axes`` (the op's ``valid`` axes): there every position of its output
    reads real data alone."""
    _only_first(node, [n for n in node.all_input_nodes if n in shifts])
    bound = _bound(node)
    pad_name = _WINDOW[node.target]
    steps = list(bound.arguments["steps"])
    shift = list(shifts[node.args[0]])
    if pad_name is not None:
        pad = list(bound.arguments[pad_name])
        shift = [d + p * s if i in axes else d
                 for i, (d, p, s) in enumerate(zip(shift, pad, steps))]
    bound.arguments["valid"] = axes
    return node.target(*arg(bound.args), **arg(bound.kwargs)), shift


def _tuple(v, nd):
    if isinstance(v, int):
        return [v] * nd
    v = list(v)
    return v * nd if len(v) == 1 else v


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices")
_AVG_NAMES = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
             "ceil_mode": False, "return_indices": False, "count_include_pad": True,
             "divisor_override": None}


def _kept(node, arg, shifts, nd, axes):
    """A layer that keeps the baseline's stride ``t``, without padding along ``axes``: its
    input cut there so that the first window starts where one of the padded pass's does."""
    _only_first(node, [n for n in node.all_input_nodes if n in shifts])
    if node.target in _KEPT_CONV:
        names, kind = _CONV_NAMES, "conv"
        if _KEPT_CONV[node.target] != nd:
            raise Untrimmable(f"{node.name}: not a {nd}-D convolution")
    else:
        dims, kind = _KEPT_POOL[node.target]
        names = _MAX_NAMES if kind == "max" else _AVG_NAMES
        if dims != nd:
            raise Untrimmable(f"{node.name}: not a {nd}-D pool")
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    params = {k: given.get(k, _DEFAULTS.get(k)) for k in names}
    if params.get("return_indices"):
        raise Untrimmable(f"{node.name}: pool indices are positions")
    stride = params["stride"]
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = params["kernel_size"]  # a pool's default stride
    padding = params["padding"]
    if isinstance(padding, str):
        if padding != "valid":
            raise Untrimmable(f"{node.name}: padding={padding!r}")
        padding = 0
    stride, padding = _tuple(stride, nd), _tuple(padding, nd)
    shift = list(shifts[node.args[0]])
    cut = [(-(d + p)) % t if i in axes else 0
           for i, (d, p, t) in enumerate(zip(shift, padding, stride))]
    x = arg(node.args[0])
    x = _narrow(x, cut, [x.shape[x.dim() - nd + i] - c for i, c in enumerate(cut)])
    out_shift = [(d + c + p) // t if i in axes else d
                 for i, (d, c, p, t) in enumerate(zip(shift, cut, padding, stride))]
    params = {k: arg(v) for k, v in params.items() if k != "input"}
    params["padding"] = [0 if i in axes else p for i, p in enumerate(padding)]
    if "ceil_mode" in params and len(axes) == nd:
        # a ceil-mode window past a trimmed map's end reads part of it: garbage there, at
        # positions no kept output reads (as in the padded pass); the same without it
        params["ceil_mode"] = False
    if kind == "conv":
        return node.target(x, params.pop("weight"), params.pop("bias"), **params), out_shift
    params.pop("return_indices", None)  # False (checked above); torch.max_pool2d has none
    return node.target(x, **params), out_shift


def covered(y: torch.Tensor, shift: Sequence[int], starts: Sequence[int],
            sizes: Sequence[int]) -> bool:
    """Whether the trimmed output ``y`` (first position at ``shift`` of the padded pass's)
    holds the padded pass's positions ``starts`` to ``starts + sizes``."""
    nd = len(shift)
    return all(0 <= a - d and a - d + n <= y.shape[y.dim() - nd + i]
               for i, (a, d, n) in enumerate(zip(starts, shift, sizes)))


def _cat(node, arg, values, shifts, nd):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim",
                                                                    node.kwargs.get("axis", 0))
    if not isinstance(tensors, (list, tuple)) or not all(
            isinstance(t, fx.Node) and t in shifts for t in tensors):
        raise Untrimmable(f"{node.name}: concatenates a constant")
    rank = values[tensors[0]].dim()
    if dim % rank >= rank - nd:
        raise Untrimmable(f"{node.name}: concatenates along a spatial axis")
    shift, common = _overlap(node, tensors, values, shifts, nd)
    return torch.cat([common[t] for t in tensors], dim), shift


def _overlap(node, maps, values, shifts, nd):
    """The positions ``maps`` all have: the shift of the first and each map cut to them."""
    shift = [max(shifts[n][i] for n in maps) for i in range(nd)]
    end = [min(shifts[n][i] + values[n].shape[values[n].dim() - nd + i] for n in maps)
           for i in range(nd)]
    if any(e <= s for s, e in zip(shift, end)):
        raise Untrimmable(f"{node.name}: the maps it combines do not overlap")
    sizes = [e - s for s, e in zip(shift, end)]
    return shift, {n: _narrow(values[n], [s - t for s, t in zip(shift, shifts[n])], sizes)
                   for n in maps}

