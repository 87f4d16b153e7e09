"""Every phase of every node, for ONNX dense graphs (:mod:`econv_convert.proof` draws the
small random maps and checks each node; this module cuts each node's dense part out of the
dense graph and runs it, and runs the baseline's node alone, in onnxruntime).

Nothing runs at the model's own size: the baseline's shapes at the checked size come from
ONNX shape inference, and each node then runs alone on random maps a few lattice steps wide.
The node's dense part (the dense graph's nodes between the dense values of its map inputs and
of its output, with their constants) runs as a graph of its own; the baseline node runs as a
one-node graph with its constant inputs, on the phase sub-maps of those inputs, the phases
folded into the batch dim (the ops of a CNN treat samples independently; an op that does not
keep the batch dim is left to the end-to-end checks). A dense part that reads anything else
(the input image's size) is left out likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from econv_convert.cases import compare, read_lattice
from econv_convert.onnx.model import _with_input_shape
from econv_convert.proof import (
    NodeCase,
    NotProven,
    PhaseProof,
    head_of,
    map_inputs,
    plain_maps,
    prove_cases,
)

# ops that move or merge the batch dim: folding phases into it would not be the same op
_BATCH_MOVERS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather",
                 "Expand", "Tile", "SpaceToDepth", "DepthToSpace", "Einsum", "MatMul", "Gemm"}


def prove_graphs(baseline: onnx.ModelProto, dense: onnx.ModelProto, meta,
                 x: torch.Tensor, tol: tuple[float, float],
                 session: Callable[[onnx.ModelProto], Any], seed: int = 0) -> PhaseProof:
    """The per-node proof of ``dense`` against ``baseline`` (free spatial dims), each node on
    small random maps whose sizes start from the baseline's at input ``x``'s shape;
    ``session`` makes an onnxruntime session of a model, as the checks do."""
    proof = PhaseProof()
    nodes = meta.nodes
    if not nodes:
        proof.note = "the dense graph records no node map (written by an older version)"
        return proof
    g = baseline.graph
    constants = _constants(baseline)
    try:
        shapes = _shapes(baseline, tuple(x.shape))
    except Exception as e:  # noqa: BLE001  no shapes: say so, no verdict
        proof.note = f"the baseline's shapes cannot be inferred ({e})"
        return proof
    producers = {o: n for n in dense.graph.node for o in n.output}
    dense_inputs = {i.name for i in dense.graph.input}
    dense_constants = {i.name for i in dense.graph.initializer}
    records = {r.get("dense_name"): r for r in meta.records}
    opset = list(baseline.opset_import)
    dtype = x.dtype
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))

    def case(node: onnx.NodeProto) -> NodeCase:
        out = node.output[0]
        inputs = [i for i in node.input if i]
        maps = map_inputs(inputs, nodes, lambda name: name in constants)
        if nodes[out]["flat"]:
            raise NotProven("its value flattens positions")
        if node.op_type in _BATCH_MOVERS:
            raise NotProven(f"{node.op_type} moves the batch dim the phases are folded into")
        if any(m not in shapes for m in maps):
            raise NotProven("shape inference gives no shape for its input")
        seeds = {nodes[m]["dense"]: m for m in maps}
        piece = _piece(dense, producers, dense_inputs, dense_constants, nodes[out]["dense"],
                       seeds, np_dtype)
        dense_sess = session(piece) if piece is not None else None
        apply = _node_apply(node, list(maps), constants, opset, baseline.ir_version, session,
                            np_dtype)

        def run_dense(values: dict[str, torch.Tensor]) -> torch.Tensor:
            if dense_sess is None:  # the dense value is the input's own
                return values[seeds[nodes[out]["dense"]]]
            feed = {nodes[m]["dense"]: t.contiguous().numpy() for m, t in values.items()}
            return torch.from_numpy(np.asarray(dense_sess.run(None, feed)[0]))

        return NodeCase(out, nodes[out], maps, {m: shapes[m] for m in maps}, run_dense,
                        apply, records.get(out))

    cases = [(n.output[0], lambda n=n: case(n)) for n in g.node
             if n.output and n.output[0] in nodes and n.domain in ("", "ai.onnx")]
    return prove_cases(cases, tol, dtype, seed, proof)


def head_check(baseline: onnx.ModelProto, dense: onnx.ModelProto, meta, x: torch.Tensor,
               proof: PhaseProof, tol: tuple[float, float],
               session: Callable[[onnx.ModelProto], Any]):
    """The end-to-end lattice check of a graph that takes one input size, at the cost of its
    head (:func:`econv_convert.torch.phases.head_check` for ONNX): the nodes after the last
    maps every node before which is proven run from random dense maps of the frontier's
    sizes at input ``x``, against the baseline's same nodes on those maps' lattices. None
    where that does not apply (the whole graph then runs end to end)."""
    from dataclasses import replace


    nodes = meta.nodes
    g = baseline.graph
    if len(g.output) != 1 or len(dense.graph.output) != 1 or len(meta.outputs) != 1:
        return None
    constants = _constants(baseline)
    order = [(o, [i for i in n.input if i]) for n in g.node for o in n.output if o]
    found = head_of(order, set(nodes), {p.node for p in proof.nodes}, set(constants),
                    g.output[0].name, plain_maps(nodes))
    if found is None:
        return None
    head, frontier = found
    np_dtype = np.dtype(str(x.dtype).removeprefix("torch."))
    try:
        shapes = _shapes(baseline, tuple(x.shape))
        dense_piece = _piece(dense, {o: n for n in dense.graph.node for o in n.output},
                             {i.name for i in dense.graph.input},
                             {i.name for i in dense.graph.initializer},
                             dense.graph.output[0].name, {nodes[f]["dense"]: f for f in frontier},
                             np_dtype)
        base_piece = _piece(baseline, {o: n for n in g.node for o in n.output},
                            {i.name for i in g.input}, {i.name for i in g.initializer},
                            g.output[0].name, {f: f for f in frontier}, np_dtype)
        if dense_piece is None or base_piece is None or any(f not in shapes for f in frontier):
            return None
        gen = torch.Generator().manual_seed(2)
        maps = {}
        for f in frontier:
            shape = [(n - 1) * step + 1 if kind == "space" else n
                     for n, (kind, step, _) in zip(shapes[f], nodes[f]["dims"])]
            maps[f] = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype)
        y = session(dense_piece).run(None, {nodes[f]["dense"]: t.numpy()
                                            for f, t in maps.items()})[0]
        feed = {f: read_lattice(t, nodes[f]["dims"], len(nodes[f]["dims"])).contiguous().numpy()
                for f, t in maps.items()}
        try:
            b = session(base_piece).run(None, feed)[0]
        except Exception:  # the sizes are shape inference's, and onnxruntime's differ (a
            return None  # ceil-mode pool's last window): the whole graph runs end to end
    except NotProven:
        return None
    spec = meta.outputs[0]
    dense_lattice = read_lattice(torch.from_numpy(np.asarray(y)), spec["dims"], spec["base_ndim"])
    case = compare("lattice", tuple(x.shape), [torch.from_numpy(np.asarray(b))],
                    [dense_lattice], tol, [(0, spec.get("name") or "output 0")])
    # the per-node proof ran the given baseline graph's own nodes: no other graph to tie
    return [replace(case, detail=case.detail or (
        f"the {len(head)} nodes after {', '.join(frontier)} end to end, from random maps of "
        "its sizes at this input (every map before it is proven node by node)"))]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's initializers and Constant nodes' values."""
    g = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            a = n.attribute[0]
            value = helper.get_attribute_value(a)
            constants[n.output[0]] = (numpy_helper.to_array(value)
                                      if a.type == onnx.AttributeProto.TENSOR
                                      else np.asarray(value))
    return constants


def _shapes(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every value's shape at input ``shape``, by ONNX shape inference (no data)."""
    inferred = onnx.shape_inference.infer_shapes(_with_input_shape(model, shape))
    g = inferred.graph
    found = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            found[vi.name] = tuple(int(d.dim_value) for d in dims)
    return found


def _piece(dense: onnx.ModelProto, producers: dict[str, onnx.NodeProto], graph_inputs: set[str],
           initializers: set[str], out: str, seeds: dict[str, str],
           np_dtype: np.dtype) -> onnx.ModelProto | None:
    """The dense graph's nodes that compute ``out`` from the values ``seeds`` and constants,
    as a graph of their own (None when ``out`` is a seed); NotProven where they read the
    image input or any other value."""
    if out in seeds:
        return None
    wanted: list[onnx.NodeProto] = []
    seen: set[int] = set()
    used_inits: set[str] = set()
    stack = [out]
    while stack:
        name = stack.pop()
        if not name or name in seeds:
            continue
        if name in initializers:
            used_inits.add(name)
            continue
        if name in graph_inputs:
            raise NotProven("its dense part reads the input image (its size), not only its "
                            "inputs")
        node = producers.get(name)
        if node is None:
            raise NotProven(f"its dense part reads {name}, which no node makes")
        if id(node) in seen:
            continue
        seen.add(id(node))
        wanted.append(node)
        stack.extend(node.input)
        for a in node.attribute:  # subgraphs (If, Loop) read outer values: not cut here
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise NotProven(f"its dense part has a {node.op_type} with a subgraph")
    order = {id(n): i for i, n in enumerate(dense.graph.node)}
    wanted.sort(key=lambda n: order[id(n)])
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    inputs = [helper.make_tensor_value_info(name, elem, None) for name in seeds]
    inits = [i for i in dense.graph.initializer if i.name in used_inits]
    graph = helper.make_graph(wanted, "piece", inputs, [onnx.ValueInfoProto(name=out)], inits)
    model = helper.make_model(graph, opset_imports=list(dense.opset_import))
    model.ir_version = dense.ir_version
    return model


def _node_apply(node: onnx.NodeProto, maps: list[str], constants: dict[str, np.ndarray],
                opset, ir_version: int, session, np_dtype: np.dtype):
    """``apply(subs, count)`` for :func:`check_node`: ``node`` alone, its map inputs fed the
    stacked sub-maps with the phases folded into the batch dim."""
    one = helper.make_node(node.op_type, list(node.input), [node.output[0]],
                           domain=node.domain or None)
    one.attribute.extend(node.attribute)
    inputs = [helper.make_tensor_value_info(m, helper.np_dtype_to_tensor_dtype(np_dtype), None)
              for m in maps]
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
