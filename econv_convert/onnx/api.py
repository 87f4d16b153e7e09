"""Densify, verify and invert ONNX graphs, on the ONNX IR (no round trip through PyTorch).

* :func:`densify` rewrites a baseline ``onnx.ModelProto`` (:mod:`econv_convert.onnx.rewrite`),
  checks the result with ``onnx.checker`` and strict shape inference, makes the input's and
  outputs' spatial axes dynamic, and records how it was made in the model's metadata: the
  :class:`~econv_convert.core.records.DenseInfo` and the baseline graph without its weights, so that
  :func:`inverse` needs only the dense file.
* :func:`checked` is what :func:`econv_convert.equivalence.verify` runs for ONNX graphs: both
  in onnxruntime (CPU, graph optimizations off), with the same lattice, phase and shift checks
  as PyTorch models (:func:`econv_convert.check.check`).
* :func:`inverse` puts the dense model's initializers (same names and shapes, possibly
  fine-tuned) back into the recorded baseline graph.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from econv_convert.cases import VerifyReport, read_lattice
from econv_convert.check import Checks, check
from econv_convert.core.lattice import Window, out_size
from econv_convert.core.records import GLOBAL_POOL_MODES, DenseInfo
from econv_convert.core.walk import require_output_stride
from econv_convert.errors import (
    InvalidInputError,
    InvalidModelError,
    SizeNotCovered,
    TransferError,
    describe,
)
from econv_convert.files import atomic_write
from econv_convert.onnx.model import (
    _constants,
    _fold_constants,
    _image_input,
    _input_dtype,
    _prepared,
    _session,
    _shapes,
    _with_input_shape,
    channels_last,
    example_shape,
    run,
)
from econv_convert.onnx.phases import head_check, prove_graphs
from econv_convert.onnx.rewrite import OnnxRewriter

INFO_KEY = "econv_convert.dense"
BASELINE_KEY = "econv_convert.baseline_graph"


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data beside it is loaded too)."""
    path = Path(path)
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise InvalidInputError(f"{path}: not a readable ONNX model ({describe(e, 120)})") from e


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write through a temporary file in the target folder (an interrupted write leaves
    nothing behind)."""
    path = Path(path)
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return path


def densify(
    model: onnx.ModelProto,
    input_shape: Sequence[int] | None = None,
    *,
    global_pool: str = "phase",
    output_stride: int | None = None,
    until: str | None = None,
) -> onnx.ModelProto:
    """The dense equivalent of a baseline ONNX graph; how it was made is in its metadata
    (:func:`info`). ``until`` names a value of the graph (a node's output): the graph is cut
    there, and that value is its output (a dense feature extractor).

    Raises :class:`UnsupportedLayerError` naming the first node that is not translation-
    equivariant on the lattice (or has no rule)."""
    if global_pool not in GLOBAL_POOL_MODES:
        raise InvalidInputError(f"global pool mode '{global_pool}' is not one of "
                                f"{', '.join(GLOBAL_POOL_MODES)}")
    require_output_stride(output_stride)
    notes: list[str] = []
    model = _prepared(model, notes)
    if until is not None:
        model = cut(model, until)
    example = example_shape(model, input_shape)
    shapes, types = _shapes(model, example)
    consts = _constants(model)
    _fold_constants(model, consts)
    last = channels_last(model)
    if last:
        notes.append("the graph's input is channels-last (N, spatial..., C): shapes are given "
                     "and checked in that order")
    rw = OnnxRewriter(model, shapes, types, consts, global_pool, output_stride, last)
    rewritten = rw.run()
    rw.reached(output_stride)
    dense = _assemble(model, rewritten, example, last)
    meta = DenseInfo(
        example_shape=list(example), global_pool=global_pool, until=until,
        outputs=rewritten.outputs,
        records=[_record_dict(r) for r in rewritten.records],
        notes=notes + rewritten.notes, has_padding=rewritten.has_padding,
        global_pools=rewritten.global_pools, output_stride=output_stride,
        peak_elements=rewritten.peak_elements, peak_node=rewritten.peak_node,
        input_layout="channels_last" if last else "channels_first", capture="onnx",
        out_field=rewritten.out_field, support=rewritten.support,
        nodes=json.loads(json.dumps(rewritten.nodes)))
    _store(dense, meta, model)
    _check_dense(dense)
    return dense


def cut(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    """The part of ``model`` that computes ``value``, with ``value`` as its only output."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    if value not in producer:
        made = [n.output[0] for n in g.node if n.output][:3]
        raise InvalidInputError(f"until={value}: no node of the graph makes a value of that "
                                f"name (node outputs are named like {', '.join(made)})")
    needed, todo = set(), [value]
    while todo:
        v = todo.pop()
        n = producer.get(v)
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo += [i for i in n.input if i]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [n for n in g.node if id(n) in needed]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    inits = {i.name for i in g.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits or i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    del m.graph.output[:]
    m.graph.output.append(inferred.get(value) or helper.make_tensor_value_info(
        value, TensorProto.FLOAT, None))
    return m


def _record_dict(r) -> dict:
    from dataclasses import asdict

    d = asdict(r)
    return json.loads(json.dumps(d, default=str))


def _assemble(model: onnx.ModelProto, result, example, last: bool = False) -> onnx.ModelProto:
    g = model.graph
    x = _image_input(model)
    channel = len(example) - 1 if last else 1
    dims = [d for d in x.type.tensor_type.shape.dim]
    new_in = [example[i] if i == channel else "N" if i == 0 else f"{x.name}_dim{i}"
              for i in range(len(example))]
    if dims and dims[0].HasField("dim_value"):
        new_in[0] = int(dims[0].dim_value)
    elif dims and dims[0].dim_param:
        new_in[0] = dims[0].dim_param
    inputs = []
    for i in g.input:
        if i.name == x.name:
            inputs.append(helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type,
                                                        new_in))
        else:
            inputs.append(i)
    outputs = []
    for o, spec in zip(g.output, result.outputs):
        base = [d for d in o.type.tensor_type.shape.dim]
        shape: list = []
        for i, (kind, _, _) in enumerate(spec["dims"]):
            if kind == "plain" and i < len(base) and base[i].HasField("dim_value"):
                shape.append(int(base[i].dim_value))  # plain dims keep the baseline's size
            else:
                shape.append(f"{o.name}_dim{i}")
        outputs.append(helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type,
                                                     shape))
    graph = helper.make_graph(list(result.graph.node), g.name or "dense", inputs, outputs,
                              initializer=list(g.initializer), doc_string=g.doc_string)
    dense = helper.make_model(graph, opset_imports=list(model.opset_import),
                              producer_name="econv-convert", ir_version=model.ir_version,
                              functions=list(model.functions))
    for p in model.metadata_props:
        if p.key not in (INFO_KEY, BASELINE_KEY):
            dense.metadata_props.add(key=p.key, value=p.value)
    return dense


def _store(dense: onnx.ModelProto, meta: DenseInfo, baseline: onnx.ModelProto) -> None:
    graph = copy.deepcopy(baseline.graph)
    names = [i.name for i in graph.initializer]
    del graph.initializer[:]
    del graph.value_info[:]
    record = {"graph": base64.b64encode(graph.SerializeToString()).decode(),
              "initializers": names, "ir_version": baseline.ir_version,
              "opset_import": [[o.domain, o.version] for o in baseline.opset_import]}
    for key, value in ((INFO_KEY, meta.to_json()), (BASELINE_KEY, json.dumps(record))):
        dense.metadata_props.add(key=key, value=value)


def _check_dense(dense: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(dense)
        onnx.shape_inference.infer_shapes(dense, check_type=True, strict_mode=True)
    except Exception as e:  # a bug of ours: say so rather than write a broken file
        raise InvalidModelError(f"the dense ONNX graph fails its own checks "
                                f"({describe(e, 200)})") from e


def info(dense: onnx.ModelProto) -> DenseInfo:
    for p in dense.metadata_props:
        if p.key == INFO_KEY:
            try:
                return DenseInfo.from_json(p.value)
            except Exception as e:
                raise InvalidInputError(f"the dense model's record is damaged "
                                        f"({describe(e, 120)})") from e
    raise InvalidInputError("not a dense ONNX model made by econv-convert (no "
                            f"'{INFO_KEY}' metadata)")


def is_dense(model: onnx.ModelProto) -> bool:
    return any(p.key == INFO_KEY for p in model.metadata_props)


def lattice_view(dense: onnx.ModelProto | DenseInfo, out):
    """The baseline's outputs read off the dense graph's outputs (``out``: one array, or the
    list onnxruntime returns; lattice points, phase 0), as numpy arrays in the same
    structure."""
    import torch


    specs = (dense if isinstance(dense, DenseInfo) else info(dense)).outputs
    arrays = out if isinstance(out, (list, tuple)) else [out]
    views = [read_lattice(torch.as_tensor(np.asarray(a)), s["dims"], s["base_ndim"]).numpy()
             for a, s in zip(arrays, specs, strict=True)]
    return views if isinstance(out, (list, tuple)) else views[0]


def inverse(dense: onnx.ModelProto) -> onnx.ModelProto:
    """The baseline graph recorded in ``dense``, with ``dense``'s initializers (and
    ``Constant`` values of the same names): the inverse weight transfer."""
    meta = info(dense)
    record = next((p.value for p in dense.metadata_props if p.key == BASELINE_KEY), None)
    if record is None and meta.capture != "onnx":
        raise InvalidInputError("this dense ONNX graph was exported from a PyTorch model: its "
                                "baseline is a PyTorch graph; inverse transfer takes the dense "
                                ".pt it was exported from")
    if record is None:
        raise InvalidInputError(f"the dense model has no '{BASELINE_KEY}' metadata")
    try:
        data = json.loads(record)
        graph = onnx.GraphProto()
        graph.ParseFromString(base64.b64decode(data["graph"]))
    except Exception as e:
        raise InvalidInputError(f"the recorded baseline graph is damaged ({describe(e, 120)})") \
            from e
    inits = {i.name: i for i in dense.graph.initializer}
    missing = [n for n in data["initializers"] if n not in inits]
    if missing:
        raise TransferError(f"the dense model lacks {len(missing)} of the baseline's "
                            f"initializers (first: {missing[0]})")
    graph.initializer.extend(copy.deepcopy(inits[n]) for n in data["initializers"])
    constants = {n.output[0]: n for n in dense.graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in constants:
            node.CopyFrom(constants[node.output[0]])
    baseline = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in data["opset_import"]],
        producer_name="econv-convert", ir_version=int(data["ir_version"]))
    return baseline


def checked(baseline: onnx.ModelProto, dense: onnx.ModelProto, options: Checks
            ) -> VerifyReport:
    """:func:`econv_convert.equivalence.verify` of two ONNX graphs, in onnxruntime sessions
    (converted to double where onnxruntime has a double kernel for every op)."""
    precision = options.precision
    meta = info(dense)
    if meta.until is not None:  # the dense graph is the part of the baseline before it
        baseline = cut(baseline, meta.until)
    x = _image_input(baseline)
    dims = x.type.tensor_type.shape.dim
    batch = int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None
    # the baseline with free spatial dims, so that other sizes can be tried (a graph that
    # only works at its own size then reports those sizes as skipped)
    free = meta.input_shape([batch if batch is not None else "N",
                             meta.canonical(meta.example_shape)[1]]
                            + [f"d{i}" for i in range(2, len(meta.example_shape))])
    base_free = _with_input_shape(baseline, free)
    notes = []
    wide = None
    if precision == "float64" and _input_dtype(baseline) != np.float64:
        wide, why = _double_pair(base_free, dense)
        if wide is None:
            notes.append(f"checked in {np.dtype(_input_dtype(baseline)).name} with a tolerance "
                         f"for {len(meta.records)} layers: {why}")
    runs = _OrtRuns(baseline, *(wide or (_session_or_raise(base_free, "baseline"),
                                         _session_or_raise(dense, "dense model"))),
                    _image_input(dense).name)
    np_dtype = np.float64 if wide else _input_dtype(baseline)
    dtype = torch.from_numpy(np.zeros(1, np_dtype)).dtype
    pair = (as_double(base_free), as_double(dense)) if wide else (base_free, dense)
    report = check(meta, runs.baseline, runs.dense, options, dtype=dtype, batch=batch,
                   depth=len(meta.records),
                   prove=lambda x, tol: prove_graphs(*pair, meta, x, tol, _session),
                   head=lambda x, proof, tol: head_check(*pair, meta, x, proof, tol,
                                                         _session))
    report.notes[:0] = notes
    return report


class _OrtRuns:
    """The baseline and dense runs ``check`` calls, in onnxruntime sessions."""

    def __init__(self, baseline: onnx.ModelProto, base_sess, dense_sess, dense_input: str):
        self.baseline_model = baseline
        self.base_sess, self.dense_sess = base_sess, dense_sess
        self.in_base = _image_input(baseline).name
        self.in_dense = dense_input
        self.invalid: dict[tuple[int, ...], str] = {}  # per shape: shape inference, once

    def baseline(self, t: torch.Tensor):
        shape = tuple(t.shape)
        if shape not in self.invalid:
            self.invalid[shape] = _invalid_size(self.baseline_model, shape)
        why = self.invalid[shape]
        if why:
            return None, why
        try:
            outs = self.base_sess.run(None, {self.in_base: t.numpy()})
        except Exception as e:
            return None, f"the baseline rejects this size ({describe(e, 70)})"
        return [torch.from_numpy(np.asarray(o)) for o in outs], ""

    def dense(self, t: torch.Tensor):
        try:
            outs = run(self.dense_sess, None, {self.in_dense: t.numpy()})
        except SizeNotCovered:
            raise
        except Exception as e:
            raise InvalidModelError(f"the dense model fails on an input of shape "
                                    f"{tuple(t.shape)} ({describe(e, 160)})") from e
        return [torch.from_numpy(np.asarray(o)) for o in outs]


def _double_pair(baseline: onnx.ModelProto, dense: onnx.ModelProto):
    """onnxruntime sessions of both graphs converted to double, or (None, why not)."""
    sessions = []
    for model in (baseline, dense):
        try:
            sessions.append(_session(as_double(model)))
        except Exception as e:
            text = str(e)
            op = text.split("Could not find an implementation for ", 1)[-1].split("(", 1)[0]
            why = (f"onnxruntime has no float64 kernel for {op.strip()}"
                   if "NOT_IMPLEMENTED" in text else describe(e, 100))
            return None, why
    return tuple(sessions), ""


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def as_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64: floating-point inputs, outputs,
    initializers, constants and casts become double."""
    m = copy.deepcopy(model)
    g = m.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type in _FLOATS:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, init in enumerate(g.initializer):
        if init.data_type in _FLOATS:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _FLOATS:
                a.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(a), np.float64)
                node.attribute.remove(a)
                node.attribute.append(helper.make_attribute(
                    "value", numpy_helper.from_array(value)))
                break
            elif a.name == "to" and a.i in _FLOATS and node.op_type == "Cast":
                a.i = TensorProto.DOUBLE
    return m


def _invalid_size(model: onnx.ModelProto, shape: tuple[int, ...]) -> str:
    """Why ``model`` cannot take ``shape`` (a window larger than its padded input), or "".
    onnxruntime runs some such graphs anyway (its sizes truncate toward zero: a 3-wide pool
    over 2 values gives one), where PyTorch raises; such sizes are not checked."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_with_input_shape(model, shape))
    except Exception as e:
        return f"the baseline's shapes are invalid at this size ({describe(e, 70)})"
    g = inferred.graph
    known = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
    weights = {i.name: tuple(i.dims) for i in g.initializer}
    for node in g.node:
        if node.op_type not in ("Conv", "MaxPool", "AveragePool", "LpPool") or \
                node.input[0] not in known:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            continue
        dims = known[node.input[0]].type.tensor_type.shape.dim[2:]
        kernel = a.get("kernel_shape") or weights.get(node.input[1], (0, 0))[2:]
        nd = len(kernel)
        pads = a.get("pads") or [0] * 2 * nd
        dil = a.get("dilations") or [1] * nd
        strides = a.get("strides") or [1] * nd
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and i < nd:
                w = Window(kernel[i], strides[i], pads[i], pads[i + nd], dil[i],
                           bool(a.get("ceil_mode", 0)))
                if out_size(d.dim_value, w) < 1:
                    return (f"node '{node.name or node.output[0]}' has a window larger than its "
                            "input at this size")
    return ""


def _session_or_raise(model: onnx.ModelProto, what: str):
    try:
        return _session(model)
    except Exception as e:
        raise InvalidModelError(f"onnxruntime cannot load the {what} ({describe(e, 160)})") \
            from e
