"""Inference-only rewrites of a loaded dense model, for prediction.

A dense model computes every layer over every position of a map of the whole block, so each
element-wise layer is a pass over a large map that does not fit any cache: its cost is memory
traffic, not arithmetic. Two rewrites cut that traffic:

* a BatchNorm after a convolution adds nothing a convolution cannot compute itself: on
  running statistics it is a per-channel scale and shift, which folds into the convolution's
  weight and bias (the outputs change by float rounding only);
* a ReLU or a residual sum whose input is a fresh map read by nothing else writes into that
  map instead of allocating a new one (the values are the same);
* a fully connected layer after window mean pooling (a GAP classifier's head) runs before the
  pooling, which then averages its few class scores instead of every feature channel: the
  mean of an affine map is the affine map of the mean (float rounding only). A ResNet-50
  pools 2048 channels for a handful of classes.

Prediction loads its own copy of the model from a file, so the rewrites never touch a model
a user holds.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from econv_convert.torch import ops

# convolutions taking (input, weight, bias, ...): the dense one, and the baseline's own where
# a layer keeps its stride (below --output-stride)
_CONVS = {ops.conv, torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
          torch.nn.functional.conv2d, torch.nn.functional.conv3d}


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each eval-mode BatchNorm whose input is a dense convolution read by nothing
    else into that convolution, in place. Returns how many were folded."""
    folded = 0
    graph = gm.graph
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not ops.batch_norm:
            continue
        x, mean, var, gamma, beta, training, _, eps = bn.args[:8]
        conv = x
        if (training is not False or not isinstance(conv, fx.Node) or conv.op != "call_function"
                or conv.target not in _CONVS or len(conv.users) != 1 or bn.kwargs
                or len(conv.args) < 2 or set(conv.kwargs) - {"bias"}):
            continue
        conv_bias = conv.kwargs.get("bias", conv.args[2] if len(conv.args) > 2 else None)
        tensors = [_attr(gm, a) for a in (conv.args[1], conv_bias, mean, var, gamma, beta)]
        weight, bias, mean_t, var_t, gamma_t, beta_t = tensors
        if weight is None or mean_t is None or var_t is None or (
                conv_bias is not None and bias is None) or (
                gamma is not None and gamma_t is None) or (beta is not None and beta_t is None):
            continue  # a value computed in the graph, not a stored tensor
        with torch.no_grad():
            scale = (gamma_t if gamma_t is not None else torch.ones_like(var_t)) / torch.sqrt(
                var_t + eps)
            new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            shift = (bias if bias is not None else torch.zeros_like(mean_t)) - mean_t
            new_bias = shift * scale + (beta_t if beta_t is not None else 0.0)
        names = []
        for suffix, value in (("weight", new_weight), ("bias", new_bias)):
            name = f"_folded_{folded}_{suffix}"
            gm.register_buffer(name, value.detach().clone())
            names.append(name)
        with graph.inserting_before(conv):
            w_node = graph.get_attr(names[0])
            b_node = graph.get_attr(names[1])
        if "bias" in conv.kwargs:
            conv.kwargs = {"bias": b_node}
            conv.args = (conv.args[0], w_node, *conv.args[2:])
        else:
            conv.args = (conv.args[0], w_node, b_node, *conv.args[3:])
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
        gm.recompile()
    return folded


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if node is None or not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def prepare(gm: fx.GraphModule) -> fx.GraphModule:
    """Every inference rewrite of this module, in place: BatchNorms folded, then element-wise
    layers in place where that is safe. Returns ``gm``."""
    fold_batchnorm(gm)
    linear_before_pool(gm)
    in_place(gm)
    return gm


def relu_into(x: torch.Tensor) -> torch.Tensor:
    """ReLU written into ``x`` (a fresh map nothing else reads)."""
    return torch.relu_(x)


def add_into(a: torch.Tensor, b) -> torch.Tensor:
    """``a + b`` written into ``a`` (a fresh map nothing else reads) when the sum has ``a``'s
    shape and type; otherwise a new tensor, as ``+`` gives."""
    if (isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.dim() <= a.dim()
            and torch.broadcast_shapes(a.shape, b.shape) == a.shape):
        return a.add_(b)
    return a + b


_RELUS = {torch.relu, torch.nn.functional.relu}
_ADDS = {operator.add, torch.add}
# producers whose output is a new tensor (or a view of one) that aliases no input
_FRESH = _CONVS | {add_into, relu_into, operator.add, torch.add}


def in_place(gm: fx.GraphModule) -> int:
    """Rewrite ReLUs and sums of two maps whose (first) input is a fresh map read by this node
    alone to write into it, in place. Returns how many were rewritten."""

    def fresh(n) -> bool:
        return (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _FRESH
                and len(n.users) == 1)

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if (node.target in _RELUS and len(node.args) == 1 and fresh(node.args[0])
                and set(node.kwargs) <= {"inplace"}):
            node.target, node.kwargs = relu_into, {}
            changed += 1
        elif node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if not fresh(a) and fresh(b):
                a, b = b, a
            if fresh(a) and a is not b:
                node.target, node.args = add_into, (a, b)
                changed += 1
    if changed:
        gm.recompile()
    return changed


def linear_then_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     steps, extent) -> torch.Tensor:
    """``linear`` over the channels (dim 1) of a 2-D map ``x``, then window mean pooling:
    ``(N, C, H, W) -> (N, K, H', W')``, as pooling then ``linear`` give it."""
    z = torch.nn.functional.linear(x.movedim(1, -1), weight, bias).movedim(-1, 1)
    return ops.global_pool(z, [2, 3], steps, "window", "mean", True, extent=extent).squeeze(
        (2, 3))


_LINEARS = {torch.nn.functional.linear, torch._C._nn.linear}


def linear_before_pool(gm: fx.GraphModule) -> int:
    """Rewrite ``linear(view(window_mean_pool(x)))`` on a 2-D map, where the view only drops
    the pooled dims of size 1, to :func:`linear_then_pool`. Checked on an input a little
    larger than the model's example (when the module has one): a difference beyond rounding
    puts the graph back as it was. Returns how many were rewritten."""
    graph = gm.graph
    found = []
    for node in graph.nodes:
        match = _linear_of_window_mean(node)
        if match is not None:
            found.append((node, match))
    if not found:
        return 0
    saved = copy.deepcopy(graph)
    example = _example(gm)
    before = _run(gm, example)
    for node, (x, steps, extent, weight, bias) in found:
        with graph.inserting_before(node):
            new = graph.call_function(linear_then_pool, (x, weight, bias, steps, extent))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    after = _run(gm, example)
    if before is not None and not _close(before, after):
        gm.graph = saved
        gm.recompile()
        return 0
    return len(found)


def _linear_of_window_mean(node: fx.Node):
    """``(x, steps, extent, weight, bias)`` if ``node`` is a linear layer over the channels of
    a window mean pool's output seen without its pooled dims, else None."""
    if (node.op != "call_function" or node.target is not ops.last_dims or node.kwargs
            or len(node.args) not in (4, 5) or node.args[2] != 2):
        return None
    try:
        if ops._function(node.args[0]) not in _LINEARS:
            return None
    except Exception:
        return None
    view = node.args[1]
    if not isinstance(view, fx.Node) or view.op != "call_function" or len(view.users) != 1:
        return None
    pool = view.args[0] if view.args else None
    if (not isinstance(pool, fx.Node) or pool.target is not ops.global_pool
            or not _drops_pooled_dims(view, pool)
            or any(u is not view and (u.target is not ops.dim_size or set(u.users) != {view})
                   for u in pool.users)):  # read by the view alone (and its batch size)
        return None
    x, dims, steps, mode, reduce, keepdim = pool.args[:6]
    extent = pool.kwargs.get("extent")
    if (list(dims) != [2, 3] or mode != "window" or reduce != "mean" or keepdim is not True
            or extent is None or len(pool.args) != 6 or set(pool.kwargs) != {"extent"}):
        return None
    weight, bias = node.args[3], node.args[4] if len(node.args) == 5 else None
    return x, list(steps), list(extent), weight, bias


def _drops_pooled_dims(view: fx.Node, pool: fx.Node) -> bool:
    """``view`` turns the pool's ``(N, C, 1, 1, H', W')`` into ``(N, C, H', W')``: a squeeze
    of dims 2 and 3, or a reshape to the baseline's ``(N, C)`` that keeps the trailing two."""
    if view.target is torch.squeeze:
        return tuple(view.args[1:]) == ((2, 3),) and not view.kwargs
    if view.target is ops.reshape and len(view.args) == 4 and not view.kwargs:
        _, shape, from_dims, n_extra = view.args
        return (n_extra == 2 and len(shape) == 2 and list(from_dims) == [0, None]
                and (shape[1] == -1 or isinstance(shape[1], int)))
    return False


def _example(gm: fx.GraphModule) -> torch.Tensor | None:
    meta = getattr(gm, "econv", None)
    shape = getattr(meta, "example_shape", None)
    if not shape or len(shape) != 4:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, shape[1], shape[2] + 5, shape[3] + 3, generator=g)


def _run(gm: fx.GraphModule, x: torch.Tensor | None):
    if x is None:
        return None
    with torch.no_grad():
        return gm(x)


def _close(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
