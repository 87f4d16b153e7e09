"""Building ONNX graphs: a node emitter, and integers that compute themselves in the graph.

:class:`SymInt` lets the shared lattice arithmetic (``econv_convert.core.lattice``) run unchanged on
sizes known only when the ONNX model runs: ``lattice.dense_out(h, s, w, b.minimum)`` with ``h``
a :class:`SymInt` emits the ``Shape``/``Div``/``Mul``/``Min`` nodes that compute the tight crop of
a strided layer for whatever input size comes. Static parts fold to Python ints, so a graph
only carries arithmetic that depends on the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Int = Union[int, "SymInt"]


class SymInt:
    """A non-negative int64 scalar held as a 1-element tensor ``name`` of the graph being built.

    ``+ - * //`` with ints or other SymInts emit nodes (``//`` is ONNX ``Div``, which truncates:
    the lattice arithmetic only divides non-negative numbers)."""

    def __init__(self, builder: Builder, name: str) -> None:
        self.b = builder
        self.name = name

    def _op(self, op: str, a: Int, c: Int) -> Int:
        return self.b.int_op(op, a, c)

    def __add__(self, o: Int) -> Int:
        return self._op("Add", self, o)

    def __radd__(self, o: Int) -> Int:
        return self._op("Add", o, self)

    def __sub__(self, o: Int) -> Int:
        return self._op("Sub", self, o)

    def __rsub__(self, o: Int) -> Int:
        return self._op("Sub", o, self)

    def __mul__(self, o: Int) -> Int:
        return self._op("Mul", self, o)

    def __rmul__(self, o: Int) -> Int:
        return self._op("Mul", o, self)

    def __floordiv__(self, o: Int) -> Int:
        return self._op("Div", self, o)

    def __rfloordiv__(self, o: Int) -> Int:
        return self._op("Div", o, self)

    def __repr__(self) -> str:
        return f"SymInt({self.name})"


_NP = {
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64, TensorProto.INT32: np.int32,
}


class Builder:
    """Emits nodes into a list, with fresh names that cannot collide with the model's."""

    def __init__(self, used: set[str], opset: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.used = set(used)
        self.opset = opset
        self._consts: dict[tuple, str] = {}
        self._dims: dict[tuple[str, int], SymInt] = {}
        self._count = 0

    # -- names and nodes ----------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"econv/{hint}_{self._count}"
            if name not in self.used:
                self.used.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1,
           hint: str | None = None, **attrs) -> list[str]:
        """Emit one node; ``outputs`` is a list of names or a count of fresh names."""
        if isinstance(outputs, int):
            outputs = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        name = self.fresh(f"{op_type}_node")
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name,
                                           **attrs))
        return list(outputs)

    def op1(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, [output] if output else 1, **attrs)[0]

    def const(self, values, dtype: int = TensorProto.INT64,
              shape: Sequence[int] | None = None) -> str:
        """A constant tensor as a ``Constant`` node (the model's initializers stay untouched)."""
        arr = np.asarray(values, dtype=_NP[dtype])
        if shape is not None:
            arr = arr.reshape(shape)
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            out = self.fresh("const")
            self.nodes.append(helper.make_node(
                "Constant", [], [out], name=self.fresh("Constant_node"),
                value=numpy_helper.from_array(arr, out)))
            self._consts[key] = out
        return self._consts[key]

    # -- integers -----------------------------------------------------------------------

    def dim(self, x: str, axis: int) -> SymInt:
        """The size of ``x``'s dim ``axis`` when the graph runs (emitted once per value and
        axis: names are assigned once, so the size cannot change)."""
        if (x, axis) not in self._dims:
            shape = self.op1("Shape", [x])
            self._dims[x, axis] = SymInt(self, self.op1("Gather", [shape, self.const([axis])]))
        return self._dims[x, axis]

    def int_tensor(self, v: Int) -> str:
        return v.name if isinstance(v, SymInt) else self.const([int(v)])

    def int_op(self, op: str, a: Int, c: Int) -> Int:
        if not isinstance(a, SymInt) and not isinstance(c, SymInt):
            return {"Add": lambda: a + c, "Sub": lambda: a - c, "Mul": lambda: a * c,
                    "Div": lambda: a // c, "Min": lambda: min(a, c),
                    "Max": lambda: max(a, c)}[op]()
        if op in ("Mul", "Div") and isinstance(c, int) and c == 1:
            return a
        if op in ("Add", "Sub") and isinstance(c, int) and c == 0:
            return a
        if op == "Mul" and isinstance(a, int) and a == 1:
            return c
        return SymInt(self, self.op1(op, [self.int_tensor(a), self.int_tensor(c)]))

    def minimum(self, a: Int, c: Int) -> Int:
        return self.int_op("Min", a, c)

    def maximum(self, a: Int, c: Int) -> Int:
        return self.int_op("Max", a, c)

    def ints(self, values: Sequence[Int]) -> str:
        """A 1-D int64 tensor of the given values (static ones become one constant)."""
        if all(not isinstance(v, SymInt) for v in values):
            return self.const([int(v) for v in values])
        return self.op1("Concat", [self.int_tensor(v) for v in values], axis=0)

    # -- tensor ops that differ across opsets -------------------------------------------

    def slice(self, x: str, axes: Sequence[int], starts: Sequence[Int], ends: Sequence[Int],
              steps: Sequence[int] | None = None, output: str | None = None) -> str:
        inputs = [x, self.ints(starts), self.ints(ends), self.const(list(axes))]
        if steps is not None:
            inputs.append(self.const(list(steps)))
        return self.op1("Slice", inputs, output)

    def pad(self, x: str, rank: int, axes: Sequence[int], lo: Sequence[Int], hi: Sequence[Int],
            value: str | None = None, mode: str = "constant", output: str | None = None) -> str:
        """Pad ``axes`` of a rank-``rank`` tensor; ``value`` names a scalar constant."""
        begin: list[Int] = [0] * rank
        end: list[Int] = [0] * rank
        for a, p, q in zip(axes, lo, hi, strict=True):
            begin[a], end[a] = p, q
        inputs = [x, self.ints(begin + end)]
        if value is not None:
            inputs.append(value)
        return self.op1("Pad", inputs, output, mode=mode)

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: bool,
               output: str | None = None) -> str:
        """``Reduce*`` over ``axes``: an input from opset 18 (ReduceSum: 13), before that an
        attribute."""
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            return self.op1(op, [x, self.const(list(axes))], output, keepdims=int(keepdims))
        return self.op1(op, [x], output, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int], output: str | None = None) -> str:
        return self.op1("Unsqueeze", [x, self.const(list(axes))], output)

    def squeeze(self, x: str, axes: Sequence[int], output: str | None = None) -> str:
        return self.op1("Squeeze", [x, self.const(list(axes))], output)

    def reshape(self, x: str, shape: Sequence[Int] | str, output: str | None = None) -> str:
        target = shape if isinstance(shape, str) else self.ints(shape)
        return self.op1("Reshape", [x, target], output)

    def transpose(self, x: str, perm: Sequence[int], output: str | None = None) -> str:
        if list(perm) == list(range(len(perm))):
            return self.op1("Identity", [x], output) if output else x
        return self.op1("Transpose", [x], output, perm=list(perm))

    def scalar(self, value: float, dtype: int) -> str:
        return self.const(value, dtype, shape=())


def elem_type(value_info: onnx.ValueInfoProto) -> int:
    return value_info.type.tensor_type.elem_type
