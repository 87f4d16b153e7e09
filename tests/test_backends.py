"""The two backends' public faces (`econv_convert.torch_api`, `econv_convert.onnx_api`): the
same names, the same return shapes, each read against the other's model."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import rand_bn
from onnx_graphs import export, run

from econv_convert import DenseInfo, onnx_api, torch_api
from econv_convert.errors import InvalidInputError

SHAPE = (1, 3, 24, 24)


def _model() -> nn.Module:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(8, 5))
    return rand_bn(model).eval()


def test_the_same_names():
    assert torch_api.__all__ == onnx_api.__all__
    for name in torch_api.__all__:
        assert callable(getattr(torch_api, name)) and callable(getattr(onnx_api, name))
    # what ONNX's densify and verify take, PyTorch's take too, by the same names
    for fn in ("densify", "verify"):
        t = inspect.signature(getattr(torch_api, fn)).parameters
        o = inspect.signature(getattr(onnx_api, fn)).parameters
        kw = {n for n, p in o.items() if p.kind == p.KEYWORD_ONLY}
        assert kw <= set(t), kw - set(t)


def test_the_same_return_shapes(tmp_path):
    model = _model()
    graph = export(model, SHAPE, dynamic=True)
    x = torch.randn(1, 3, 37, 41)
    dense_outputs = {}
    for api, baseline, suffix in ((torch_api, model, ".pt"), (onnx_api, graph, ".onnx")):
        dense = api.densify(baseline, SHAPE, global_pool="window")
        assert api.is_dense(dense) and not api.is_dense(baseline)
        meta = api.info(dense)
        assert isinstance(meta, DenseInfo) and meta.global_pool == "window"
        path = api.save(dense, tmp_path / f"dense{suffix}")
        loaded = api.load(path)
        assert api.is_dense(loaded) and api.info(loaded).records == meta.records
        if api is torch_api:
            with torch.no_grad():
                out, again = dense(x).numpy(), loaded(x).numpy()
        else:
            out, again = run(dense, x.numpy())[0], run(loaded, x.numpy())[0]
        np.testing.assert_array_equal(out, again)
        # the lattice view reads the same off the model and off its record
        np.testing.assert_array_equal(np.asarray(api.lattice_view(dense, torch.as_tensor(out))),
                                      np.asarray(api.lattice_view(meta, torch.as_tensor(out))))
        assert api.verify(baseline, dense).ok
        dense_outputs[api.__name__] = out
    np.testing.assert_allclose(*dense_outputs.values(), rtol=1e-4, atol=1e-5)


def test_cut_is_the_baseline_a_dense_until_reproduces():
    model = _model()
    x = torch.randn(SHAPE)
    cut = torch_api.cut(model, "features")
    with torch.no_grad():
        want = model[0](x)
        torch.testing.assert_close(cut(x), want)
    dense = torch_api.densify(model, SHAPE, until="features")
    with torch.no_grad():
        torch.testing.assert_close(torch_api.lattice_view(dense, dense(x)), cut(x))
    assert torch_api.verify(cut, dense).ok
    # the ONNX graph's cut at the value the features module makes
    graph = export(model, SHAPE)
    value = next(n.output[0] for n in graph.graph.node if n.op_type == "Conv"
                 and n.input[1].startswith("features.4"))
    got = run(onnx_api.cut(graph, value), x.numpy())[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_cut_names_a_missing_module():
    with pytest.raises(InvalidInputError, match="no module named 'nope'"):
        torch_api.cut(_model(), "nope")


@pytest.mark.parametrize("k,words", [(3, "output_stride=3 cannot be reached: the model's total "
                                        "stride is 4; reachable output strides: 1, 2, 4"),
                                     (0, "output_stride=0: must be a positive integer")])
def test_the_same_output_stride_checks(k, words):
    model = _model()
    graph = export(model, SHAPE, dynamic=True)
    for api, baseline in ((torch_api, model), (onnx_api, graph)):
        with pytest.raises(InvalidInputError) as e:
            api.densify(baseline, SHAPE, output_stride=k)
        assert str(e.value) == words, api.__name__


def test_the_package_functions_take_either_backends_models(tmp_path):
    """``econv_convert.densify`` and the rest on a PyTorch module and on its ONNX export."""
    import econv_convert as ec

    model = _model()
    graph = export(model, SHAPE, dynamic=True)
    x = torch.randn(1, 3, 29, 31)
    views = []
    for baseline, suffix in ((model, ".pt"), (graph, ".onnx")):
        dense = ec.densify(baseline, SHAPE, global_pool="window")
        assert ec.is_dense(dense) and ec.info(dense).global_pool == "window"
        assert ec.verify(baseline, dense).ok
        loaded = ec.load_dense(ec.save_dense(dense, tmp_path / f"d{suffix}"))
        assert ec.is_dense(tmp_path / f"d{suffix}")
        if suffix == ".pt":
            with torch.no_grad():
                views.append(ec.lattice_view(loaded, loaded(x)).numpy())
            assert type(ec.inverse(dense)).__name__ == "GraphModule"
        else:
            views.append(ec.lattice_view(loaded, run(loaded, x.numpy())[0]))
            assert not ec.is_dense(ec.inverse(dense))
    np.testing.assert_allclose(*views, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInputError, match="needs example_input"):
        ec.densify(model)
    with pytest.raises(InvalidInputError, match="for PyTorch models"):
        ec.densify(graph, SHAPE, input_name="pixel_values")
    with pytest.raises(InvalidInputError, match="not a dense model"):
        ec.load_dense(_save_onnx(graph, tmp_path / "base.onnx"))


def _save_onnx(graph, path):
    onnx_api.save(graph, path)
    return path
