"""An ONNX model as the backend reads it: its opset, its one image input and example shape,
its constants folded, the shapes of its values at an example input (shape inference, else one
onnxruntime run), and onnxruntime sessions that run it as written (no graph optimizations).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from econv_convert.core.rules.reasons import REFUSED
from econv_convert.core.rules.window import PAST_COVER, past_cover
from econv_convert.errors import (
    InvalidInputError,
    InvalidModelError,
    SizeNotCovered,
    UnsupportedLayerError,
    describe,
)

MIN_OPSET = 13
DEFAULT_SPATIAL = 224


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise InvalidInputError("the model imports no default ONNX opset")


def _prepared(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise InvalidInputError(f"the ONNX model is not valid ({describe(e, 160)})") from e
    opset = _opset(model)
    if opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise InvalidInputError(f"opset {opset} could not be converted to {MIN_OPSET} "
                                    f"({describe(e, 120)})") from e
        notes.append(f"the model's opset {opset} was converted to {MIN_OPSET}")
    return model


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedLayerError("graph inputs", REFUSED["image_inputs"].format(
            n=len(inputs), names=", ".join(i.name for i in inputs)))
    return inputs[0]


def channels_last(model: onnx.ModelProto) -> bool:
    """Whether the image input is channels-last (N, spatial..., C), as TensorFlow conversions
    write it: everything that reads it is a Transpose to channels first."""
    x = _image_input(model).name
    readers = [n for n in model.graph.node if x in n.input]
    r = len(_image_input(model).type.tensor_type.shape.dim)
    to_first = [0, r - 1, *range(1, r - 1)]
    return r >= 3 and bool(readers) and all(
        n.op_type == "Transpose" and [int(p) for p in attrs_of(n).get("perm", [])] == to_first
        for n in readers)


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def example_shape(model: onnx.ModelProto, given: Sequence[int] | None = None) -> list[int]:
    """The input shape to densify at: ``given``, else the graph's static dims (symbolic
    batch 1, symbolic spatial dims 224)."""
    x = _image_input(model)
    dims = x.type.tensor_type.shape.dim
    channel = len(dims) - 1 if channels_last(model) else 1
    if given:
        shape = [int(v) for v in given]
        if dims and len(shape) != len(dims):
            raise InvalidInputError(f"input_shape={','.join(map(str, shape))} has {len(shape)} "
                                    f"dims; the graph's input '{x.name}' has {len(dims)}")
        return shape
    if len(dims) < 3:
        raise InvalidInputError(f"the graph's input '{x.name}' has rank {len(dims)}; expected "
                                "N, C, spatial...")
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif i == channel:
            raise InvalidInputError(f"the graph's input '{x.name}' has no static channel "
                                    "count; give input_shape=...")
        else:
            shape.append(1 if i == 0 else DEFAULT_SPATIAL)
    return shape


def _with_input_shape(model: onnx.ModelProto, shape: Sequence[int | str]) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    x = _image_input(m)
    dims = x.type.tensor_type.shape.dim
    del dims[:]
    for v in shape:
        d = dims.add()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = int(v)
    return m


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            a = node.attribute[0]
            if a.name == "value":
                consts[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                consts[node.output[0]] = np.asarray(helper.get_attribute_value(a))
            elif a.name in ("value_floats", "value_ints"):
                consts[node.output[0]] = np.asarray(helper.get_attribute_value(a))
    return consts


FOLD_LIMIT = 4096  # elements: constant subgraphs of this size are evaluated (pads, shapes)


def _fold_constants(model: onnx.ModelProto, consts: dict[str, np.ndarray]) -> None:
    """Evaluate small nodes whose inputs are all constants (exporters build pads and shapes
    from chains of Constant, Concat, Reshape, Slice, Cast...), so that rules can read them.
    The graph itself is not changed."""
    from onnx.reference import ReferenceEvaluator

    opsets = list(model.opset_import)
    for node in model.graph.node:
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        ins = [i for i in node.input if i]
        if not all(i in consts for i in ins) or any(o in consts for o in node.output):
            continue
        if sum(consts[i].size for i in ins) > FOLD_LIMIT:
            continue
        graph = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype),
                                           consts[i].shape) for i in dict.fromkeys(ins)],
            [helper.make_tensor_value_info(o, 0, None) for o in node.output if o])
        try:
            outs = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(
                None, {i: consts[i] for i in ins})
        except Exception:  # an op the reference cannot run: the rules will say what they need
            continue
        for o, v in zip([o for o in node.output if o], outs):
            if isinstance(v, np.ndarray) and v.size <= FOLD_LIMIT:
                consts[o] = v


def _shapes(model: onnx.ModelProto, example: Sequence[int]):
    """Every value's shape and element type at the example input. Types come from ONNX shape
    inference; shapes are measured in one onnxruntime run that exposes every value, since the
    runtime is what the dense graph is checked against (the spec's shape inference and
    onnxruntime disagree on ceil-mode pools whose last window would start in the padding)."""
    m = _with_input_shape(model, example)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"ONNX shape inference fails at input {tuple(example)} "
                                f"({describe(e, 160)})") from e
    g = inferred.graph
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        types[vi.name] = t.elem_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    outputs = [o for n in g.node for o in n.output if o]
    shapes.update(_run_shapes(model, example, outputs, types, symbolic=not static_input(model)))
    return shapes, types


def _run_shapes(model: onnx.ModelProto, example, names: list[str], types: dict[str, int],
                symbolic: bool):
    """Shapes of ``names`` measured by running the model once at the example input. The input
    is declared with free sizes: onnxruntime's own shape inference at load time follows the
    spec, and would reject a graph whose ceil-mode pools it sizes differently from its run."""
    channel = len(example) - 1 if channels_last(model) else 1
    m = _with_input_shape(model, [v if i in (0, channel) else f"d{i}"
                                  for i, v in enumerate(example)])
    outputs = {o.name for o in m.graph.output}
    known = [n for n in names if types.get(n)]
    for n in known:
        if n not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(n, types[n], None))
    try:
        sess = _session(m)
        x = np.random.default_rng(0).standard_normal(example).astype(_input_dtype(m))
        outs = sess.run(known, {_image_input(m).name: x})
    except Exception as e:
        hint = "; its input has symbolic sizes: give input_shape=..." if symbolic else ""
        raise InvalidModelError(f"the baseline does not run in onnxruntime at input "
                                f"{tuple(example)} ({describe(e, 120)}){hint}") from e
    return {n: tuple(o.shape) for n, o in zip(known, outs)}


def static_input(model: onnx.ModelProto) -> bool:
    dims = _image_input(model).type.tensor_type.shape.dim
    return bool(dims) and all(d.HasField("dim_value") for d in dims[1:])


def _input_dtype(model: onnx.ModelProto):
    return helper.tensor_dtype_to_np_dtype(_image_input(model).type.tensor_type.elem_type)


def run(session, outputs, feed: dict) -> list:
    """``session.run``, with a run stopped by a covering pool past its kernel (its guard node:
    :data:`~econv_convert.core.rules.window.PAST_COVER`) raised as :class:`SizeNotCovered`
    in the core's words, as the PyTorch path raises it."""
    try:
        return session.run(outputs, feed)
    except Exception as e:
        found = re.search(re.escape(PAST_COVER) + r"\|(.*?)\|([\d,]+)\|", str(e))
        if found is None:
            raise
        limits = [int(v) for v in found.group(2).split(",")]
        raise SizeNotCovered(past_cover(found.group(1), limits)) from None


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a baseline rejecting a size is reported, not logged
    # each run's memory goes back when it ends: an arena kept at its largest map (a dense
    # ResNet-50 at 224 x 224) holds gigabytes through every later check
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
