"""Every ONNX rule on single-node graphs (after a strided stem with random BatchNorm
statistics), parametrized over the geometry, checked in onnxruntime at odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_graphs import Graph, assert_onnx_equivalent, free, run

from econv_convert import onnx_api
from econv_convert.errors import UnsupportedLayerError

SIZES = [(20, 23), (29, 26)]


@pytest.mark.parametrize("kernel", [1, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("pads", [(0, 0), (1, 1), (0, 2)])
@pytest.mark.parametrize("dilation,group,stem", [(1, 1, 2), (2, 1, 2), (1, 4, 2), (1, 1, 0)])
def test_conv(kernel, stride, pads, dilation, group, stem):
    g = Graph((1, 4, 17, 19), stem_stride=stem)
    lo, hi = pads
    g.x = g.node("Conv", [g.x, g.weight((8, 4 // group, kernel, kernel)), g.weight((8,))],
                 kernel_shape=[kernel, kernel], strides=[stride, stride],
                 pads=[lo, lo, hi, hi], dilations=[dilation, dilation], group=group)
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (4, 2), (2, 3)])
def test_conv_auto_pad(auto_pad, kernel, stride):
    """SAME padding with a stride depends on the input size: computed when the graph runs."""
    g = Graph((1, 3, 17, 20))
    g.x = g.node("Conv", [g.x, g.weight((5, 4, kernel, kernel))], auto_pad=auto_pad,
                 kernel_shape=[kernel, kernel], strides=[stride, stride])
    assert_onnx_equivalent(g.model(), [(18, 21), (23, 19), (16, 16)])


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("ceil", [0, 1])
@pytest.mark.parametrize("dilation", [1, 2])
def test_max_pool(kernel, stride, pad, ceil, dilation):
    g = Graph((1, 3, 17, 19))
    g.x = g.node("MaxPool", [g.x], kernel_shape=[kernel, kernel], strides=[stride, stride],
                 pads=[pad] * 4, ceil_mode=ceil, dilations=[dilation, dilation])
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("ceil", [0, 1])
@pytest.mark.parametrize("include", [0, 1])
def test_avg_pool(kernel, stride, pad, ceil, include):
    g = Graph((1, 3, 17, 19))
    g.x = g.node("AveragePool", [g.x], kernel_shape=[kernel, kernel], strides=[stride, stride],
                 pads=[pad] * 4, ceil_mode=ceil, count_include_pad=include)
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("include", [0, 1])
def test_avg_pool_dilated_opset19(include):
    g = Graph((1, 3, 21, 19), opset=19)
    g.x = g.node("AveragePool", [g.x], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1],
                 dilations=[2, 2], count_include_pad=include)
    _, meta = assert_onnx_equivalent(g.model(), SIZES)
    assert "depthwise Conv of ones" in meta.records[-1]["note"]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1)])
def test_lp_pool(p, stride, pad):
    g = Graph((1, 3, 17, 19))
    g.x = g.node("LpPool", [g.x], kernel_shape=[3, 3], strides=[stride, stride], pads=[pad] * 4,
                 p=p)
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("dims", [1, 3])
def test_one_and_three_dims(dims):
    shape = (1, 2, 23) if dims == 1 else (1, 2, 11, 13, 12)
    g = Graph(shape)
    nd = dims
    g.x = g.node("Conv", [g.x, g.weight((5, 4) + (3,) * nd)], kernel_shape=[3] * nd,
                 strides=[2] * nd, pads=[1] * 2 * nd)
    g.x = g.node("MaxPool", [g.x], kernel_shape=[2] * nd, strides=[2] * nd, ceil_mode=1)
    g.x = g.node("AveragePool", [g.x], kernel_shape=[2] * nd, pads=[1] * 2 * nd)
    sizes = [(26,), (31,)] if dims == 1 else [(12, 14, 15)]
    assert_onnx_equivalent(g.model(), sizes)


# -- global pooling ------------------------------------------------------------------------


def _pooled(op: str, keepdims: int = 1) -> Graph:
    g = Graph((1, 3, 17, 19))
    g.x = g.node("Conv", [g.x, g.weight((5, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    if op.startswith("Global"):
        g.x = g.node(op, [g.x])
    elif op == "ReduceSum":  # axes are an input from opset 13
        g.x = g.node(op, [g.x, g.const([2, 3])], keepdims=keepdims)
    else:
        g.x = g.node(op, [g.x], axes=[2, 3], keepdims=keepdims)
    return g


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("op,keepdims", [("GlobalAveragePool", 1), ("GlobalMaxPool", 1),
                                         ("ReduceMean", 0), ("ReduceMean", 1),
                                         ("ReduceMax", 0), ("ReduceSum", 1), ("ReduceMin", 0)])
def test_global_pool(op, keepdims, mode):
    _, meta = assert_onnx_equivalent(_pooled(op, keepdims).model(), SIZES, global_pool=mode)
    assert meta.global_pools == 1


def test_global_pool_phase_gives_every_shift():
    """Phase (r, c) of the pooled output is the baseline run on the input shifted by (r, c).

    No padding, and sizes where the receptive field (7) leaves a whole number of lattice
    cells (H - 7 divisible by 4), so the shifted baseline sees exactly that phase's windows."""
    g = Graph((1, 3, 31, 35), stem_stride=0)
    g.x = g.node("Conv", [g.x, g.weight((4, 3, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    g.x = g.node("Relu", [g.x])
    g.x = g.node("Conv", [g.x, g.weight((5, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    g.x = g.node("GlobalAveragePool", [g.x])
    model = g.model()
    dense = onnx_api.densify(model, global_pool="phase")
    x = np.random.default_rng(0).standard_normal((1, 3, 31, 35)).astype(np.float32)
    y = run(dense, x)[0]
    assert y.shape == (1, 5, 1, 1, 4, 4)
    base = free(model)
    for r in range(4):
        for c in range(4):
            shifted = run(base, np.ascontiguousarray(x[:, :, r:, c:]))[0]
            torch.testing.assert_close(torch.from_numpy(y[..., r, c]),
                                       torch.from_numpy(shifted), rtol=1e-4, atol=1e-5)


def test_global_pool_dense_mode_is_a_different_function():
    model = _pooled("GlobalAveragePool").model()
    dense = onnx_api.densify(model, global_pool="dense")
    x = np.random.default_rng(0).standard_normal((1, 3, 17, 19)).astype(np.float32)
    assert not np.allclose(run(dense, x)[0], run(model, x)[0], atol=1e-4)
    assert not onnx_api.verify(model, dense).ok


def test_squeeze_excitation_phase():
    """A phase-pooled scale (squeeze-and-excitation) is spread back over the map by phase."""
    g = Graph((1, 3, 17, 19))
    x = g.x
    s = g.node("GlobalAveragePool", [x])
    s = g.node("Conv", [s, g.weight((2, 4, 1, 1)), g.weight((2,))], kernel_shape=[1, 1])
    s = g.node("Relu", [s])
    s = g.node("Conv", [s, g.weight((4, 2, 1, 1))], kernel_shape=[1, 1])
    s = g.node("HardSigmoid", [s])
    s = g.node("Clip", [s, g.const(0.1, np.float32), g.const(0.9, np.float32)])  # scalar params
    s = g.node("PRelu", [s, g.weight((4, 1, 1))])  # a per-channel slope broadcasts
    g.x = g.node("Mul", [x, s])
    g.x = g.node("Conv", [g.x, g.weight((5, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    for mode in ("phase", "lattice"):
        assert_onnx_equivalent(g.model(), SIZES, global_pool=mode)


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("op,keepdims", [("ReduceMean", 0), ("ReduceMax", 1)])
def test_global_pool_written_as_view_and_reduce(op, keepdims, mode):
    """``x.view(n, c, -1).mean(-1)``: spatial dims merged into one, then reduced."""
    g = Graph((1, 3, 17, 19))
    x = g.node("Reshape", [g.x, g.const([1, 4, -1])])
    x = g.node("Relu", [x])
    g.x = g.node(op, [x], axes=[-1], keepdims=keepdims)
    _, meta = assert_onnx_equivalent(g.model(), global_pool=mode)
    assert meta.global_pools == 1


def test_merged_positions_are_only_reduced():
    def build(g):
        x = g.node("Reshape", [g.x, g.const([1, 4, -1])])
        g.x = g.node("Softmax", [x], name="attn", axis=-1)

    _refused(build, r"'attn \(Softmax\)'.*merged spatial positions")


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_squeeze_excitation_with_expand_as(mode):
    """``x * s.expand_as(x)``: Expand to the map's shape, computed from Shape(map)."""
    g = Graph((1, 3, 17, 19))
    x = g.x
    s = g.node("ReduceMean", [x], axes=[2, 3], keepdims=1)
    s = g.node("Sigmoid", [g.node("Conv", [s, g.weight((4, 4, 1, 1))], kernel_shape=[1, 1])])
    s = g.node("Expand", [s, g.node("Shape", [x])])
    g.x = g.node("Mul", [x, s])
    assert_onnx_equivalent(g.model(), SIZES, global_pool=mode)


# -- heads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_flatten_gemm_head(trans_b, alpha, beta):
    """Flatten + Gemm over a 3 x 3 map becomes a dilated 3 x 3 convolution reusing the
    weight initializer by name; the next Gemm runs per position."""
    g = Graph((1, 3, 11, 11))
    g.x = g.node("MaxPool", [g.x], kernel_shape=[2, 2], strides=[2, 2])  # 6 -> 3
    g.x = g.node("Flatten", [g.x], axis=1)
    w = g.weight((7, 36) if trans_b else (36, 7))
    g.x = g.node("Gemm", [g.x, w, g.weight((7,))], transB=trans_b, alpha=alpha, beta=beta)
    g.x = g.node("Relu", [g.x])
    g.x = g.node("Gemm", [g.x, g.weight((3, 7)), g.weight((3,))], transB=1)
    g.x = g.node("Softmax", [g.x], axis=-1)
    model = g.model()
    dense, meta = assert_onnx_equivalent(model)
    report = onnx_api.verify(model, dense)
    assert report.ok, report.failures()
    x = np.random.default_rng(1).standard_normal((1, 3, 19, 23)).astype(np.float32)
    assert run(dense, x)[0].shape == (1, 3, 1 + 8, 1 + 12)  # a map of predictions
    assert [i.name for i in dense.graph.initializer] == [i.name for i in model.graph.initializer]


def test_reshape_matmul_head():
    g = Graph((1, 3, 9, 9), stem_stride=3)
    g.x = g.node("Reshape", [g.x, g.const([1, -1])])
    g.x = g.node("MatMul", [g.x, g.weight((36, 5))])
    g.x = g.node("Add", [g.x, g.weight((5,))])
    dense, _ = assert_onnx_equivalent(g.model())
    assert onnx_api.verify(g.model(), dense).ok


# -- pointwise and shape plumbing -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    g = Graph((1, 3, 17, 19))
    g.x = g.node("Pad", [g.x, g.const([0, 0, 1, 2, 0, 0, 2, 1])], mode=mode)
    g.x = g.node("Conv", [g.x, g.weight((5, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("start,end,step", [(1, 7, 1), (0, 100, 2), (-5, -1, 1), (2, -2, 3)])
def test_spatial_slice(start, end, step):
    g = Graph((1, 3, 21, 19))
    g.x = g.node("Slice", [g.x, g.const([start]), g.const([end]), g.const([2]), g.const([step])])
    g.x = g.node("Conv", [g.x, g.weight((5, 4, 1, 1))], kernel_shape=[1, 1])
    assert_onnx_equivalent(g.model(), [(24, 23), (25, 19)])


def test_channel_plumbing():
    """Concat, Split, channel shuffle (Reshape/Transpose/Reshape), channel Slice, Softmax."""
    g = Graph((1, 3, 17, 19))
    a, b = g.node("Split", [g.x, g.const([2, 2])], axis=1, outputs=2)
    a = g.node("Conv", [a, g.weight((2, 2, 3, 3))], kernel_shape=[3, 3], pads=[1] * 4)
    x = g.node("Concat", [b, a], axis=1)
    x = g.node("Reshape", [x, g.const([1, 2, 2, 9, 10])])
    x = g.node("Transpose", [x], perm=[0, 2, 1, 3, 4])
    x = g.node("Reshape", [x, g.const([1, 4, 9, 10])])
    x = g.node("Slice", [x, g.const([1]), g.const([4]), g.const([-3])])
    g.x = g.node("Softmax", [x], axis=1)
    assert_onnx_equivalent(g.model(), [(17, 19)])


def test_channels_last_layer_norm_and_linear():
    """ConvNeXt style: channels last, LayerNormalization and a MatMul over channels."""
    g = Graph((1, 3, 17, 19))
    x = g.node("Transpose", [g.x], perm=[0, 2, 3, 1])
    x = g.node("LayerNormalization", [x, g.weight((4,)), g.weight((4,))], axis=-1)
    x = g.node("MatMul", [x, g.weight((4, 6))])
    x = g.node("Tanh", [x])
    g.x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    g.x = g.node("MaxPool", [g.x], kernel_shape=[2, 2], strides=[2, 2])
    assert_onnx_equivalent(g.model(), SIZES)


def test_pointwise_variadic_and_channel_reductions():
    """Dropout, LRN, LpNormalization, reductions and ArgMax over channels, Sum/Mean/Where,
    Squeeze/Unsqueeze and Gather on channels, per-channel constants, on a strided map."""
    g = Graph((1, 3, 17, 19))
    x = g.node("Dropout", [g.x])
    x = g.node("LRN", [x], size=3)
    x = g.node("LpNormalization", [x], axis=1, p=2)
    m = g.node("ReduceMean", [x], axes=[1], keepdims=1)
    a = g.node("ArgMax", [x], axis=1, keepdims=1)
    a = g.node("Cast", [a], to=1)
    s = g.node("Sum", [x, m, a])
    s = g.node("Mean", [s, g.weight((4, 1, 1)), g.const(0.5, np.float32)])
    s = g.node("Where", [g.node("Greater", [s, g.const(0.0, np.float32)]), s,
                         g.const(-1.0, np.float32)])
    s = g.node("Squeeze", [g.node("Unsqueeze", [s, g.const([1])]), g.const([1])])
    s = g.node("Gather", [s, g.const([0, 2, 3])], axis=1)
    g.x = g.node("Conv", [s, g.weight((2, 3, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    assert_onnx_equivalent(g.model(), SIZES)


def test_quantize_dequantize_per_tensor_and_per_channel():
    """A QDQ model: activations quantized per tensor, weights per channel."""
    g = Graph((1, 3, 17, 19), opset=13)
    q = g.node("QuantizeLinear", [g.x, g.const(0.05, np.float32), g.const(0, np.uint8)])
    x = g.node("DequantizeLinear", [q, g.const(0.05, np.float32), g.const(0, np.uint8)])
    wq = g.const(np.random.default_rng(0).integers(-50, 50, (5, 4, 3, 3)), np.int8)
    w = g.node("DequantizeLinear", [wq, g.const(np.full(5, 0.01), np.float32),
                                    g.const(np.zeros(5), np.int8)], axis=0)
    x = g.node("Conv", [x, w], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    q = g.node("QuantizeLinear", [x, g.const(np.full(5, 0.02), np.float32),
                                  g.const(np.full(5, 128), np.uint8)], axis=1)
    g.x = g.node("DequantizeLinear", [q, g.const(np.full(5, 0.02), np.float32),
                                      g.const(np.full(5, 128), np.uint8)], axis=1)
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_pooled_matmul_head_runs_per_phase(mode):
    """Global pool, Squeeze, MatMul + Add: in phase mode the head runs once per phase."""
    g = Graph((1, 3, 17, 19))
    x = g.node("GlobalAveragePool", [g.x])
    x = g.node("Squeeze", [x, g.const([2, 3])])
    x = g.node("MatMul", [x, g.weight((4, 6))])
    x = g.node("Add", [x, g.weight((6,))])
    g.x = g.node("LogSoftmax", [x], axis=-1)
    assert_onnx_equivalent(g.model(), SIZES, global_pool=mode)


# -- refusals -------------------------------------------------------------------------------


def _refused(build, match):
    g = Graph((1, 3, 16, 16))
    build(g)
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        onnx_api.densify(g.model())
    # what to do: the part before it densifies
    until = err.value.hint.removeprefix("densify the part before it with until=")
    dense = onnx_api.densify(g.model(), until=until)
    assert [o.name for o in dense.graph.output] == [until]


def test_refuses_resize():
    _refused(lambda g: setattr(g, "x", g.node(
        "Resize", [g.x, "", g.const([1, 1, 2, 2], np.float32)], name="up", mode="nearest")),
        r"'up \(Resize\)'.*upsampling")


def test_refuses_conv_transpose():
    _refused(lambda g: setattr(g, "x", g.node(
        "ConvTranspose", [g.x, g.weight((4, 4, 2, 2))], name="up", kernel_shape=[2, 2],
        strides=[2, 2])), r"'up \(ConvTranspose\)'.*transposed")


def test_refuses_depth_to_space():
    _refused(lambda g: setattr(g, "x", g.node("DepthToSpace", [g.x], name="d2s", blocksize=2)),
             r"'d2s \(DepthToSpace\)'")


def test_refuses_attention_over_positions():
    """Merging the positions into tokens is allowed (a pool may follow); using the tokens
    as a sequence is refused at the first node that does."""
    def build(g):
        t = g.node("Reshape", [g.x, g.const([1, 4, 64])], name="tokens")
        g.x = g.node("MatMul", [g.node("Transpose", [t], name="to_seq", perm=[0, 2, 1]), t],
                     name="attn")

    _refused(build, r"'to_seq \(Transpose\)'.*merged spatial positions")


def test_refuses_windows_moved_into_the_batch():
    """A window partition (Swin-style): blocks of positions moved into the batch."""
    def build(g):
        blocks = g.node("Reshape", [g.x, g.const([1, 4, 2, 4, 2, 4])], name="blocks")
        blocks = g.node("Transpose", [blocks], perm=[0, 2, 4, 1, 3, 5])
        g.x = g.node("Reshape", [blocks, g.const([4, 4, 4, 4])], name="windows")

    _refused(build, r"'windows \(Reshape\)'.*spatial positions into the batch")


def test_refuses_positional_embedding():
    _refused(lambda g: setattr(g, "x", g.node("Add", [g.x, g.weight((1, 4, 8, 8))], name="pos")),
             r"'pos \(Add\)'.*varies over space")


def test_refuses_instance_norm_and_circular_pad():
    _refused(lambda g: setattr(g, "x", g.node(
        "InstanceNormalization", [g.x, g.weight((4,)), g.weight((4,))], name="inorm")),
        r"'inorm \(InstanceNormalization\)'.*statistics over spatial positions")
    _refused(lambda g: setattr(g, "x", g.node(
        "Pad", [g.x, g.const([0, 0, 1, 1, 0, 0, 1, 1])], name="wrap", mode="wrap")),
        r"'wrap \(Pad\)'.*circular")


# -- graphs as old exporters wrote them -----------------------------------------------------


@pytest.mark.parametrize("opset", [7, 9, 11, 13])
def test_old_opsets_with_outputs_nothing_reads(opset):
    """A Dropout's mask and a MaxPool's indices, named by the exporter but read by nothing:
    not a reason to refuse (opsets before 13 are converted first)."""
    g = Graph((1, 3, 17, 19), opset=opset)
    x, _mask = g.node("Dropout", [g.x], outputs=2)
    x = g.node("MaxPool", [x], outputs=2 if opset >= 8 else 1, kernel_shape=[3, 3],
               strides=[2, 2], pads=[1, 1, 1, 1])  # indices exist from opset 8
    x = x[0] if isinstance(x, list) else x
    r = g.rng
    stats = [g.const(v.astype(np.float32), np.float32) for v in (
        r.uniform(0.5, 1.5, 4), r.normal(0, 0.5, 4), r.normal(0, 0.5, 4), r.uniform(0.5, 2, 4))]
    g.x = g.node("BatchNormalization", [x, *stats], epsilon=1e-5)
    g.x = g.node("Conv", [g.x, g.weight((2, 4, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    assert_onnx_equivalent(g.model(), SIZES)


def test_a_used_mask_is_still_refused():
    g = Graph((1, 3, 17, 19))
    x, mask = g.node("Dropout", [g.x], outputs=2)
    g.x = g.node("Mul", [x, g.node("Cast", [mask], to=1)])
    with pytest.raises(UnsupportedLayerError, match="mask output is used"):
        onnx_api.densify(g.model())


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_asymmetric_pads_from_caffe_ceil_mode(op):
    """Caffe's ceil mode, as converters write it: extra padding at the end only."""
    g = Graph((1, 3, 17, 19))
    extra = {"count_include_pad": 0} if op == "AveragePool" else {}
    g.x = g.node(op, [g.x], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1], **extra)
    g.x = g.node(op, [g.x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 1, 1, 0], **extra)
    assert_onnx_equivalent(g.model(), SIZES)


@pytest.mark.parametrize("opset", [9, 13])
def test_batch_norm_with_statistics_outputs_is_training_mode_and_refused(opset):
    """Before opset 14 a BatchNormalization with its statistics outputs is in training mode,
    whether they are read or not, and onnxruntime normalizes with the batch's statistics:
    refused, not silently turned into inference."""
    g = Graph((1, 3, 17, 19), opset=opset, stem_stride=0)
    stats = [g.const(np.full(3, v, np.float32), np.float32) for v in (1.0, 0.0, 0.0, 4.0)]
    g.x = g.node("BatchNormalization", [g.x, *stats], outputs=5, epsilon=1e-5)[0]
    g.x = g.node("Conv", [g.x, g.weight((2, 3, 3, 3))], kernel_shape=[3, 3], strides=[2, 2])
    with pytest.raises(UnsupportedLayerError, match="training mode.*batch's statistics"):
        onnx_api.densify(g.model())


@pytest.mark.parametrize("block", [2, 3])
@pytest.mark.parametrize("stem", [0, 2])
def test_space_to_depth(block, stem):
    """A stride-r window whose r x r taps become channels, blocks first."""
    def size(m):  # an input whose map before the SpaceToDepth has m rows, odd after a stem
        return 2 * m - 1 if stem else m

    m = 4 * block
    g = Graph((1, 3, size(m), size(m)), stem_stride=stem)
    g.x = g.node("SpaceToDepth", [g.x], blocksize=block)
    c = (4 if stem else 3) * block * block
    g.x = g.node("Conv", [g.x, g.weight((4, c, 3, 3))], kernel_shape=[3, 3], pads=[1] * 4)
    assert_onnx_equivalent(g.model(), [(size(m + block), size(m)),
                                       (size(m), size(m + 2 * block))])


def test_channels_last_input_as_tf2onnx_writes_it():
    """An NHWC graph input followed by a Transpose to NCHW (TensorFlow conversions): a plain
    layout change, densified and checked with shapes in the input's own order."""
    g = Graph((1, 17, 19, 3), stem_stride=0)
    x = g.node("Transpose", [g.x], perm=[0, 3, 1, 2])
    x = g.node("Conv", [x, g.weight((4, 3, 3, 3))], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    x = g.batch_norm(x, 4)
    x = g.node("MaxPool", [g.node("Relu", [x])], kernel_shape=[3, 3], strides=[2, 2])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])  # back to channels-last, as TF models end
    g.x = g.node("ReduceMean", [x], axes=[1, 2], keepdims=0)
    model = g.model()
    for mode in ("phase", "lattice"):
        dense = onnx_api.densify(model, global_pool=mode)
        meta = onnx_api.info(dense)
        assert meta.input_layout == "channels_last" and meta.total_step == (4, 4)
        report = onnx_api.verify(model, dense)
        assert report.ok and len(report.checked) >= 3, (report.notes, report.failures())
        assert all(c.shape[-1] == 3 for c in report.cases)
