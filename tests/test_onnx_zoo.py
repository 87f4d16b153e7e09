"""The classic ONNX model-zoo CNNs (AlexNet, VGG-19, ZFNet, GoogLeNet, Inception-v2, ResNet-50,
ShuffleNet, SqueezeNet, DenseNet-121) as their exporters wrote them: opset 9, IR 3 (graph inputs
that repeat the initializers), Dropout nodes with a mask output nothing reads, Caffe-style
pooling, Sum of residual branches, constant Reshape targets before the head. Every one must
densify and verify. The onnx package ships their structure; the weights are made random here.

Graphs with a fixed-size head are checked near 224 x 224, where their dense forms cost tens of
seconds each: those are ``extended`` tests (``pytest -m extended``)."""

from __future__ import annotations

import pytest
from onnx_graphs import with_random_weights, zoo_graphs

from econv_convert import onnx_api

FAST = {"squeezenet"}  # a head after a global pool: checked at small sizes (densenet121, the
# other such graph, takes ~25 s on CI's cores: it runs with -m extended)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST
                                               else pytest.mark.extended)
                                  for n in zoo_graphs()])
def test_model_zoo_graph_densifies_and_verifies(name):
    model = with_random_weights(onnx_api.load(zoo_graphs()[name]))
    dense = onnx_api.densify(model)
    meta = onnx_api.info(dense)
    assert any("opset 9 was converted" in n for n in meta.notes)
    report = onnx_api.verify(model, dense)
    assert report.ok and len(report.checked) >= 3, (report.notes, report.failures())
    assert report.max_rel > 0  # random weights: the outputs are not trivially equal
