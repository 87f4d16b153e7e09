"""Small ONNX graphs written node by node, and the lattice-equivalence assertion for them."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from econv_convert.cases import read_lattice as lattice_view
from econv_convert.onnx import api as onnx_api


class Graph:
    """A graph under construction: input ``x`` of ``shape``; ``stem`` adds a strided
    Conv + BatchNormalization (random statistics) + Relu first, so the layer under test sees a
    lattice step other than 1."""

    def __init__(self, shape: Sequence[int], *, stem_stride: int = 2, seed: int = 0,
                 opset: int = 17) -> None:
        self.shape = tuple(shape)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self._n = 0
        self.x = "x"
        self.channels = shape[1]
        if stem_stride:
            nd = len(shape) - 2
            c = self.channels
            self.x = self.node("Conv", [self.x, self.weight((4, c) + (3,) * nd)],
                               kernel_shape=[3] * nd, strides=[stem_stride] * nd, pads=[1] * 2 * nd,
                               name="stem")
            self.channels = 4
            self.x = self.batch_norm(self.x)
            self.x = self.node("Relu", [self.x])

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def weight(self, shape, scale: float = 0.5) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(self, op: str, inputs, name: str | None = None, outputs: int = 1, **attrs):
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name or self.name(op),
                                           **attrs))
        return outs[0] if outputs == 1 else outs

    def batch_norm(self, x: str, channels: int | None = None) -> str:
        c = channels or self.channels
        r = self.rng
        inits = []
        for values in (r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c),
                       r.uniform(0.5, 2.0, c)):
            inits.append(self.name("bn"))
            self.inits.append(numpy_helper.from_array(values.astype(np.float32), inits[-1]))
        return self.node("BatchNormalization", [x, *inits], epsilon=1e-5)

    def model(self, *outputs: str) -> onnx.ModelProto:
        outs = outputs or (self.x,)
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(m)
        del m.graph.output[:]
        m.graph.output.extend(inferred.graph.output)  # the checker wants output shapes
        onnx.checker.check_model(m)
        return m


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return onnx_api._session(model).run(None, {onnx_api._image_input(model).name: x})


def free(model: onnx.ModelProto) -> onnx.ModelProto:
    """The baseline with free spatial dims, to run it at other sizes."""
    shape = [d.dim_value for d in onnx_api._image_input(model).type.tensor_type.shape.dim]
    return onnx_api._with_input_shape(model, shape[:2] + [f"s{i}" for i in range(len(shape) - 2)])


def assert_onnx_equivalent(model: onnx.ModelProto, sizes: Sequence[Sequence[int]] = (), *,
                           global_pool: str = "phase", seed: int = 0, **kw):
    """Densify ``model`` and check ``baseline(x) == lattice(dense(x))`` in onnxruntime at the
    example input and at each spatial size in ``sizes``."""
    dense = onnx_api.densify(model, global_pool=global_pool, **kw)
    meta = onnx_api.info(dense)
    base = free(model)
    rng = np.random.default_rng(seed)
    example = meta.example_shape
    for spatial in [tuple(example[2:]), *map(tuple, sizes)]:
        x = rng.standard_normal((example[0], example[1], *spatial)).astype(np.float32)
        expected = run(base, x)
        got = run(dense, x)
        for e, g, spec in zip(expected, got, meta.outputs, strict=True):
            view = lattice_view(torch.from_numpy(g), spec["dims"], spec["base_ndim"])
            torch.testing.assert_close(view, torch.from_numpy(e), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=spatial: f"input {s}: {m}")
    return dense, meta


def export(model: torch.nn.Module, shape, *, dynamo: bool = False, dynamic: bool = False):
    """``model`` as an ONNX graph, from the TorchScript exporter or torch.export (dynamo)."""
    x = torch.randn(shape)
    axes = {i: f"d{i}" for i in range(len(shape)) if i != 1}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            dims = ({i: torch.export.Dim.DYNAMIC for i in axes},) if dynamic else None
            return torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dims).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": axes} if dynamic else None)
        return onnx.load_from_string(buf.getvalue())


def zoo_graphs() -> dict[str, str]:
    """The classic ONNX model-zoo CNNs that the onnx package ships as backend test data (their
    structure as the old exporters wrote it, opset 9, IR 3; the weights replaced by
    ConstantOfShape nodes to keep the files small)."""
    import glob
    import os

    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    return {os.path.basename(p)[len("light_"):-len(".onnx")]: p
            for p in sorted(glob.glob(os.path.join(folder, "light_*.onnx")))}


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The zoo graph with its ConstantOfShape weights replaced by random initializers (scaled
    by fan-in, positive where a BatchNormalization reads a variance), so that a check can
    tell a right dense model from a wrong one."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    shapes = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    role = {}  # what a BatchNormalization reads: scale, bias, mean, variance
    for n in g.node:
        if n.op_type == "BatchNormalization":
            role.update({n.input[1]: "scale", n.input[2]: "shift", n.input[3]: "shift",
                         n.input[4]: "scale"})
    keep = []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(v) for v in shapes[node.input[0]])
            name = node.output[0]
            if role.get(name) == "scale":
                values = rng.uniform(0.5, 1.5, shape)
            elif role.get(name) == "shift" or len(shape) == 1:
                values = rng.standard_normal(shape) * 0.1
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                values = rng.standard_normal(shape) * np.sqrt(1.0 / max(fan_in, 1))
            g.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
            if m.ir_version < 4:  # IR 3: every initializer is also a graph input
                g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        else:
            keep.append(node)
    if keep and keep[-1].op_type == "Softmax":  # compare logits: a saturated softmax hides
        logits = keep.pop().input[0]          # differences
        g.output[0].name = logits  # a softmax keeps its input's shape
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input}
    for init in list(g.initializer):
        if init.name not in used and init.name.endswith("__SHAPE"):
            g.initializer.remove(init)
            for i in list(g.input):
                if i.name == init.name:
                    g.input.remove(i)
    return m
