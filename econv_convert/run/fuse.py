"""Inference-only rewrites of a loaded dense model, for prediction.

A dense model computes every layer over every position of a map of the whole block, so a
BatchNorm after a convolution is a second pass over a large map that adds nothing a
convolution cannot compute itself: on running statistics it is a per-channel scale and
shift, which folds into the convolution's weight and bias. Prediction loads its own copy of
the model from a file, so the folding never touches a model a user holds; the outputs
change by float rounding only.
"""

from __future__ import annotations

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
