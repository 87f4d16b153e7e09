"""Lowering: modules left as calls (nn.Conv2d, nn.BatchNorm2d, ...) become the functions the rules
know, with the module's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.torch import ops
from econv_convert.torch.capture.common import NAME, Drop, _emit

# ---------------------------------------------------------------------------------------------
# Lowering of torch.nn leaves to functionals


def _conv(m: nn.Module, x, attr) -> tuple:
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(m.kernel_size)]
    padding = m.padding
    if m.padding_mode != "zeros":
        x = (F.pad, (x, tuple(m._reversed_padding_repeated_twice)), {"mode": m.padding_mode})
        padding = 0
    bias = attr("bias") if m.bias is not None else None
    return fn, (x, attr("weight"), bias, m.stride, padding, m.dilation, m.groups), {}


def _bn(m: nn.Module, x, attr) -> tuple:
    if not m.track_running_stats or m.running_mean is None:
        return None  # batch statistics: refused by the rules as an unknown module
    w = attr("weight") if m.affine else None
    b = attr("bias") if m.affine else None
    tracked = attr("num_batches_tracked") if m.num_batches_tracked is not None else None
    args = (x, attr("running_mean"), attr("running_var"), w, b, False, m.momentum, m.eps,
            tracked)
    return ops.batch_norm, args, {}


def _instance_norm(m: nn.Module, x, attr) -> tuple:
    """In eval mode with running statistics a channel-wise affine map; otherwise it normalizes
    with each sample's statistics over positions (the rules say which)."""
    running = m.track_running_stats and m.running_mean is not None
    args = (x, attr("running_mean") if running else None,
            attr("running_var") if running else None,
            attr("weight") if m.affine else None, attr("bias") if m.affine else None,
            not running, m.momentum if m.momentum is not None else 0.1, m.eps)
    return F.instance_norm, args, {}


def _dropout(m, x, attr):
    """Dropout stays in the graph, off (captured in eval mode); ``train()`` turns it on."""
    fn = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d,
          nn.Dropout3d: F.dropout3d, nn.AlphaDropout: F.alpha_dropout}[type(m)]
    return fn, (x, m.p, False, False), {}


def _maxpool(m, x, attr):
    fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
    args = (x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    return fn[type(m)], args, {}


def _avgpool(m, x, attr):
    if isinstance(m, nn.AvgPool1d):
        return F.avg_pool1d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad), {}
    fn = F.avg_pool2d if isinstance(m, nn.AvgPool2d) else F.avg_pool3d
    args = (x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
            m.divisor_override)
    return fn, args, {}


def _lppool(m, x, attr):
    fn = {nn.LPPool1d: F.lp_pool1d, nn.LPPool2d: F.lp_pool2d, nn.LPPool3d: F.lp_pool3d}
    return fn[type(m)], (x, m.norm_type, m.kernel_size, m.stride, m.ceil_mode), {}


def _adaptive(m, x, attr):
    fn = {
        nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d,
        nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
        nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d,
        nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
        nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
        nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d,
    }[type(m)]
    if getattr(m, "return_indices", False):
        return None
    return fn, (x, m.output_size), {}


def _attrs(fn: Callable, *names: str) -> Callable:
    """A lowering that calls ``fn(x, **{name: module.name})``."""
    return lambda m, x, attr: (fn, (x,), {n: getattr(m, n) for n in names})


def _pad(m, x, attr):
    mode = {
        nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
        nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
        nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
        nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
    }.get(type(m), "constant")
    kwargs = {"mode": mode}
    if mode == "constant":
        kwargs["value"] = m.value
    return F.pad, (x, tuple(m.padding)), kwargs


_LOWER: dict[type, Callable] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.Linear: lambda m, x, attr: (
        F.linear, (x, attr("weight"), attr("bias") if m.bias is not None else None), {}),
    nn.BatchNorm1d: _bn, nn.BatchNorm2d: _bn, nn.BatchNorm3d: _bn,
    nn.InstanceNorm1d: _instance_norm, nn.InstanceNorm2d: _instance_norm,
    nn.InstanceNorm3d: _instance_norm,
    nn.MaxPool1d: _maxpool, nn.MaxPool2d: _maxpool, nn.MaxPool3d: _maxpool,
    nn.AvgPool1d: _avgpool, nn.AvgPool2d: _avgpool, nn.AvgPool3d: _avgpool,
    nn.LPPool1d: _lppool, nn.LPPool2d: _lppool, nn.LPPool3d: _lppool,
    nn.Identity: lambda m, x, attr: ("identity", (x,), {}),
    nn.Flatten: lambda m, x, attr: (torch.flatten, (x, m.start_dim, m.end_dim), {}),
    nn.Unflatten: lambda m, x, attr: ("method:unflatten", (x, m.dim, tuple(m.unflattened_size)),
                                      {}),
    nn.ReLU: lambda m, x, attr: (F.relu, (x,), {}),
    nn.ReLU6: lambda m, x, attr: (F.relu6, (x,), {}),
    nn.SiLU: lambda m, x, attr: (F.silu, (x,), {}),
    nn.Sigmoid: lambda m, x, attr: (torch.sigmoid, (x,), {}),
    nn.Tanh: lambda m, x, attr: (torch.tanh, (x,), {}),
    nn.Hardswish: lambda m, x, attr: (F.hardswish, (x,), {}),
    nn.Hardsigmoid: lambda m, x, attr: (F.hardsigmoid, (x,), {}),
    nn.Mish: lambda m, x, attr: (F.mish, (x,), {}),
    nn.SELU: lambda m, x, attr: (F.selu, (x,), {}),
    nn.LeakyReLU: _attrs(F.leaky_relu, "negative_slope"),
    nn.ELU: _attrs(F.elu, "alpha"),
    nn.CELU: _attrs(F.celu, "alpha"),
    nn.GELU: _attrs(F.gelu, "approximate"),
    nn.Hardtanh: _attrs(F.hardtanh, "min_val", "max_val"),
    nn.Softplus: _attrs(F.softplus, "beta", "threshold"),
    nn.Softmax: _attrs(F.softmax, "dim"),
    nn.LogSoftmax: _attrs(F.log_softmax, "dim"),
    nn.PReLU: lambda m, x, attr: (F.prelu, (x, attr("weight")), {}),
    nn.LayerNorm: lambda m, x, attr: (
        F.layer_norm,
        (x, tuple(m.normalized_shape),
         attr("weight") if m.weight is not None else None,
         attr("bias") if m.bias is not None else None, m.eps), {}),
    nn.GroupNorm: lambda m, x, attr: (
        F.group_norm, (x, m.num_groups, attr("weight") if m.affine else None,
                       attr("bias") if m.affine else None, m.eps), {}),
    nn.LocalResponseNorm: lambda m, x, attr: (
        F.local_response_norm, (x, m.size, m.alpha, m.beta, m.k), {}),
    nn.ChannelShuffle: lambda m, x, attr: (F.channel_shuffle, (x, m.groups), {}),
    nn.PixelUnshuffle: lambda m, x, attr: (F.pixel_unshuffle, (x, m.downscale_factor), {}),
    nn.PixelShuffle: lambda m, x, attr: (F.pixel_shuffle, (x, m.upscale_factor), {}),
    nn.ZeroPad1d: _pad, nn.ZeroPad2d: _pad, nn.ZeroPad3d: _pad,
    nn.ConstantPad1d: _pad, nn.ConstantPad2d: _pad, nn.ConstantPad3d: _pad,
    nn.ReflectionPad1d: _pad, nn.ReflectionPad2d: _pad, nn.ReflectionPad3d: _pad,
    nn.ReplicationPad1d: _pad, nn.ReplicationPad2d: _pad, nn.ReplicationPad3d: _pad,
    nn.CircularPad1d: _pad, nn.CircularPad2d: _pad, nn.CircularPad3d: _pad,
}
for _cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    _LOWER[_cls] = _adaptive
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
    _LOWER[_cls] = _dropout


def _lower(gm: fx.GraphModule, drops: dict[int, Drop] | None = None) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        node.meta[NAME] = node.target
        m = modules[node.target]
        rule = _LOWER.get(type(m))
        if drops and id(m) in drops:
            rule = drops[id(m)].lower
        if rule is None or len(node.args) != 1 or node.kwargs:
            continue
        with graph.inserting_before(node):

            def attr(name: str, _prefix: str = node.target) -> fx.Node:
                return graph.get_attr(f"{_prefix}.{name}")

            lowered = rule(m, node.args[0], attr)
            if lowered is None:
                continue
            before = set(graph.nodes)
            new = _emit(graph, *lowered)
        for n in set(graph.nodes) - before:
            n.meta[NAME] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
