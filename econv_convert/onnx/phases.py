"""Every phase of every node, for ONNX dense graphs (:mod:`econv_convert.proof` checks each
node; this module runs the graphs in onnxruntime and applies the baseline's nodes).

Both graphs run once on the same input with the values the proof reads exposed as outputs.
Each baseline node that makes a map is then run alone, as a one-node graph with its constant
inputs, on the phase sub-maps of the dense inputs, the phases folded into the batch dim (the
ops of a CNN treat samples independently; an op that does not keep the batch dim is left to
the end-to-end checks). The dense value of a map has the baseline value's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from econv_convert.errors import describe
from econv_convert.onnx.model import run
from econv_convert.proof import NotProven, PhaseProof, check_node, map_inputs

# ops that move or merge the batch dim: folding phases into it would not be the same op
_BATCH_MOVERS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather",
                 "Expand", "Tile", "SpaceToDepth", "DepthToSpace", "Einsum", "MatMul", "Gemm"}


def prove_graphs(baseline: onnx.ModelProto, dense: onnx.ModelProto, meta,
                 x: torch.Tensor, tol: tuple[float, float],
                 session: Callable[[onnx.ModelProto], Any]) -> PhaseProof:
    """The per-node proof of ``dense`` against ``baseline`` (free spatial dims) on ``x``;
    ``session`` makes an onnxruntime session of a model, as the checks do."""
    proof = PhaseProof()
    nodes = meta.nodes
    if not nodes:
        proof.note = "the dense graph records no node map (written by an older version)"
        return proof
    g = baseline.graph
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            constants[n.output[0]] = numpy_helper.to_array(
                helper.get_attribute_value(n.attribute[0])) if n.attribute[0].type == \
                onnx.AttributeProto.TENSOR else np.asarray(
                    helper.get_attribute_value(n.attribute[0]))
    made = {o for n in dense.graph.node for o in n.output} | {i.name for i in dense.graph.input}
    checked = [n for n in g.node if n.output and n.output[0] in nodes
               and n.domain in ("", "ai.onnx")]
    records = {r.get("dense_name"): r for r in meta.records}
    wanted = {nodes[v]["dense"] for n in checked for v in [n.output[0], *n.input] if v in nodes}
    try:
        dense_vals = _run(dense, x, sorted(wanted & made), session)
    except Exception as e:  # noqa: BLE001  a graph the proof cannot run: say so, no verdict
        proof.note = f"the dense graph does not run with its values exposed ({describe(e, 100)})"
        return proof
    opset = [o for o in baseline.opset_import]
    for node in checked:
        out = node.output[0]
        try:
            inputs = [i for i in node.input if i]
            maps = map_inputs(inputs, nodes, lambda name: name in constants)
            if nodes[out]["flat"]:
                raise NotProven("its value flattens positions")
            if node.op_type in _BATCH_MOVERS:
                raise NotProven(f"{node.op_type} moves the batch dim the phases are folded into")
            if any(nodes[v]["dense"] not in dense_vals for v in [out, *maps]):
                raise NotProven("its dense value is not a value of the dense graph")
            apply = _node_apply(node, list(maps), constants, opset, baseline.ir_version, session,
                                {m: dense_vals[nodes[m]["dense"]].dtype for m in maps})
            proof.nodes.append(check_node(
                out, nodes[out], maps, {m: dense_vals[nodes[m]["dense"]] for m in maps},
                dense_vals[nodes[out]["dense"]], apply, records.get(out), tol))
        except NotProven as e:
            proof.skipped[out] = str(e)
        except Exception as e:  # noqa: BLE001  the proof's own limit, never a verdict
            proof.skipped[out] = f"not evaluated here ({describe(e, 80)})"
    return proof


def _run(model: onnx.ModelProto, x: torch.Tensor, names: list[str],
         session) -> dict[str, torch.Tensor]:
    """``names`` of ``model`` on ``x``, read by exposing them as outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = _elem_types(m)
    for name in names:
        if name not in have and name in types:
            m.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    sess = session(m)
    image = next(i.name for i in sess.get_inputs())
    outs = [o.name for o in sess.get_outputs() if o.name in set(names)]
    got = run(sess, outs, {image: x.numpy()})
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(outs, got)}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each value, by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*g.input, *g.output, *g.value_info]
             if vi.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _node_apply(node: onnx.NodeProto, maps: list[str], constants: dict[str, np.ndarray],
                opset, ir_version: int, session, dtypes: dict[str, torch.dtype]):
    """``apply(subs, count)`` for :func:`check_node`: ``node`` alone, its map inputs fed the
    stacked sub-maps with the phases folded into the batch dim."""
    one = helper.make_node(node.op_type, list(node.input), [node.output[0]],
                           domain=node.domain or None)
    one.attribute.extend(node.attribute)
    inputs = [helper.make_tensor_value_info(
        m, helper.np_dtype_to_tensor_dtype(np.dtype(str(dtypes[m]).removeprefix("torch."))),
        None) for m in maps]
    inits = [numpy_helper.from_array(np.asarray(constants[i]), i) for i in node.input
             if i and i not in maps]
    output = onnx.ValueInfoProto(name=node.output[0])  # its type: what the op gives
    graph = helper.make_graph([one], "node", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = ir_version
    sess = session(model)

    def apply(subs: list[torch.Tensor], count: int) -> torch.Tensor:
        batch = subs[0].shape[1]
        feed = {m: t.reshape(count * batch, *t.shape[2:]).contiguous().numpy()
                for m, t in zip(maps, subs)}
        y = torch.from_numpy(np.asarray(sess.run(None, feed)[0]))
        if y.dim() == 0 or y.shape[0] != count * batch:
            raise NotProven("it does not keep the batch dim the phases are folded into")
        return y.reshape(count, batch, *y.shape[1:])

    return apply
