"""The ONNX path end to end: fixtures, exported families (parity with the PyTorch path),
metadata and the inverse transfer, and the command line on .onnx files."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, rand_bn
from families import FAMILIES
from onnx import numpy_helper
from onnx_graphs import Graph, assert_onnx_equivalent, export, run
from typer.testing import CliRunner

from econv_convert import densify, onnx_api
from econv_convert.cli import app
from econv_convert.errors import InvalidInputError, UnsupportedLayerError

runner = CliRunner()
RESNET = FIXTURES / "tiny_resnet.onnx"
PATCH = FIXTURES / "patch_classifier.onnx"


# -- exported families: exact in onnxruntime, and the same dense outputs as the PyTorch path ----

PARITY = ["vgg", "resnet-bottleneck", "densenet", "mobilenetv3", "efficientnet", "regnety",
          "shufflenetv2", "squeezenet", "googlenet", "convnext", "cnn1d", "cnn3d"]


@pytest.mark.parametrize("name", PARITY)
def test_exported_family_matches_pytorch_path(name):
    build, shape, stride = FAMILIES[name]
    torch.manual_seed(0)
    model = rand_bn(build())
    graph = export(model, shape, dynamic=name in ("shufflenetv2", "mobilenetv3"))
    dense = onnx_api.densify(graph)
    meta = onnx_api.info(dense)
    report = onnx_api.verify(graph, dense)
    assert report.ok, report.failures()
    assert max(meta.axis_steps) == stride
    # the two paths give the same dense model
    x = torch.randn(shape[0], shape[1], *(h + 5 for h in shape[2:]))
    got = torch.from_numpy(run(dense, x.numpy())[0])
    with torch.no_grad():
        want = densify(model, shape)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet-basic", "mobilenetv3"])
def test_dynamo_export_with_dynamic_shapes(name):
    build, shape, _ = FAMILIES[name]
    torch.manual_seed(0)
    graph = export(rand_bn(build()), shape, dynamo=True, dynamic=True)
    dense = onnx_api.densify(graph, shape)
    report = onnx_api.verify(graph, dense)
    assert report.ok and len(report.checked) >= 3, report.failures()


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_global_pool_modes_on_fixture(mode):
    graph = onnx_api.load(RESNET)
    dense = onnx_api.densify(graph, global_pool=mode)
    assert onnx_api.verify(graph, dense).ok
    x = np.zeros((1, 3, 64, 64), np.float32)
    assert run(dense, x)[0].shape == ((1, 10, 16, 16) if mode == "phase" else (1, 10))


def test_output_stride_keeps_early_strides():
    graph = onnx_api.load(RESNET)
    dense = onnx_api.densify(graph, output_stride=8)
    meta = onnx_api.info(dense)
    assert onnx_api.verify(graph, dense).ok
    assert meta.axis_steps == (2, 2)  # the dense part: 16 / 8
    with pytest.raises(InvalidInputError, match="cannot be reached"):
        onnx_api.densify(graph, output_stride=3)


def test_patch_classifier_predicts_every_pixel():
    graph = onnx_api.load(PATCH)
    dense = onnx_api.densify(graph)
    report = onnx_api.verify(graph, dense)
    assert report.ok and any(c.check == "shift" for c in report.checked), report.failures()
    y = run(dense, np.zeros((2, 3, 80, 90), np.float32))[0]
    # one prediction per window position (receptive field 64), tight to the last lattice point
    assert y.shape == (2, 3, 17, 25)


# -- the dense file: initializers, dynamic axes, checker, metadata, inverse --------------------


def test_dense_graph_keeps_initializers_and_is_dynamic():
    graph = onnx_api.load(RESNET)
    dense = onnx_api.densify(graph)
    assert [(i.name, i.raw_data) for i in dense.graph.initializer] == \
        [(i.name, i.raw_data) for i in graph.graph.initializer]
    onnx.checker.check_model(dense, full_check=True)
    dims = dense.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] and all(d.dim_param for d in dims[2:])
    assert onnx_api.info(dense).example_shape == [1, 3, 64, 64]
    for size in (33, 100):  # other sizes run, and give the dense size
        y = run(dense, np.zeros((1, 3, size, size + 3), np.float32))[0]
        assert y.shape[-2:] == (16, 16)  # phase outputs: one per lattice phase


def test_inverse_round_trip_and_fine_tuned_weights(tmp_path):
    graph = onnx_api.load(RESNET)
    dense = onnx_api.densify(graph)
    back = onnx_api.inverse(dense)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(back, x)[0], run(graph, x)[0])
    # "fine-tune" the dense model: new weights move back by name
    for init in dense.graph.initializer:
        arr = numpy_helper.to_array(init) * 1.1
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    tuned = onnx_api.inverse(dense)
    assert not np.allclose(run(tuned, x)[0], run(graph, x)[0])
    report = onnx_api.verify(tuned, dense)
    assert report.ok, report.failures()
    path = onnx_api.save(tuned, tmp_path / "b.onnx")
    onnx.checker.check_model(onnx.load(str(path)))


def test_inverse_needs_econv_metadata():
    with pytest.raises(InvalidInputError, match="not a dense ONNX model"):
        onnx_api.inverse(onnx_api.load(RESNET))


def test_old_opset_is_converted_with_a_note():
    g = Graph((1, 3, 17, 19), opset=11)
    g.x = g.node("MaxPool", [g.x], kernel_shape=[2, 2], strides=[2, 2])
    _, meta = assert_onnx_equivalent(g.model(), [(20, 21)])
    assert any("converted to 13" in n for n in meta.notes)


def test_refusal_names_the_node_from_an_export():
    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, 2, 1)
            self.up = torch.nn.Upsample(scale_factor=2)

        def forward(self, x):
            return self.up(self.conv(x))

    graph = export(Up().eval(), (1, 3, 16, 16))
    with pytest.raises(UnsupportedLayerError, match=r"Resize.*not translation-equivariant"):
        onnx_api.densify(graph)


# -- command line ---------------------------------------------------------------------------


def test_cli_densify_verify_inverse_inspect(tmp_path):
    dense = tmp_path / "dense.onnx"
    r = runner.invoke(app, ["densify", str(RESNET), "-o", str(dense)])
    assert r.exit_code == 0, r.output
    assert "equivalent" in r.output and dense.exists()
    r = runner.invoke(app, ["verify", "--dense", str(dense), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"]["ok"]
    r = runner.invoke(app, ["verify", str(RESNET), "--dense", str(dense)])
    assert r.exit_code == 0, r.output
    back = tmp_path / "baseline.onnx"
    r = runner.invoke(app, ["inverse", str(dense), "-o", str(back)])
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load(str(back)), x)[0],
                                  run(onnx.load(str(RESNET)), x)[0])
    r = runner.invoke(app, ["inspect", str(PATCH), "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert plan["dense_macs"] > plan["baseline_macs"] > 0


@pytest.mark.parametrize("args,match", [
    (["densify", str(RESNET), "--arch", "m:f"], "--arch is for PyTorch models"),
    (["densify", str(RESNET), "--until", "layer1"], "no node of the graph makes a value"),
    (["densify", str(RESNET), "-o", "x.pt"], "must end in .onnx"),
    (["inverse", str(RESNET), "-o", "y.onnx"], "not a dense ONNX model"),
    (["bench", str(RESNET)], "takes PyTorch models"),
])
def test_cli_onnx_errors(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert match in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert not list(tmp_path.iterdir())


def test_cli_refuses_a_dense_model_as_baseline(tmp_path):
    dense = tmp_path / "dense.onnx"
    assert runner.invoke(app, ["densify", str(PATCH), "-o", str(dense)]).exit_code == 0
    r = runner.invoke(app, ["densify", str(dense)])
    assert r.exit_code == 2 and "already a dense model" in r.stderr


def test_cli_refused_layer_exits_2(tmp_path):
    g = Graph((1, 3, 16, 16))
    g.x = g.node("DepthToSpace", [g.x], name="d2s", blocksize=2)
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), str(path))
    r = runner.invoke(app, ["densify", str(path), "-o", str(tmp_path / "d.onnx")])
    assert r.exit_code == 2
    assert "cannot densify node 'd2s (DepthToSpace)'" in r.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_cli_verify_in_memory_and_at_example_size():
    r = runner.invoke(app, ["verify", str(RESNET), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["verification"]
    assert data["ok"] and any("small sizes" in n for n in data["notes"])
    r = runner.invoke(app, ["verify", str(RESNET), "--at-example-size", "--trials", "1",
                            "--json"])
    assert r.exit_code == 0, r.output
    shapes = [c["shape"] for c in json.loads(r.stdout)["verification"]["cases"]]
    assert [1, 3, 64, 64] in shapes


def test_half_precision_graph_verifies_with_half_tolerances():
    build, shape, _ = FAMILIES["mobilenetv3"]
    torch.manual_seed(0)
    model = rand_bn(build()).half()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(shape).half(),), buf, dynamo=False,
                          opset_version=17)
    graph = onnx.load_from_string(buf.getvalue())
    dense = onnx_api.densify(graph)
    report = onnx_api.verify(graph, dense)
    assert report.ok and (report.atol, report.rtol) == (1e-2, 1e-2), report.failures()
    assert report.max_rel < 1e-2
    strict = onnx_api.verify(graph, dense, atol=1e-7, rtol=0.0)  # fp16 rounding shows
    assert not strict.ok


@pytest.mark.parametrize("name", ["tiny_resnet", "patch_classifier"])
def test_fixture_onnx_export_matches_the_pytorch_fixture(name):
    """fixtures/NAME.onnx is fixtures/NAME.pt exported: both paths, same dense outputs."""
    from econv_convert.torch.loading import load_model

    loaded = load_model(FIXTURES / f"{name}.pt")
    graph = onnx_api.load(FIXTURES / f"{name}.onnx")
    dense = onnx_api.densify(graph)
    x = torch.randn(1, 3, 71, 77)
    got = torch.from_numpy(run(dense, x.numpy())[0])
    with torch.no_grad():
        want = densify(loaded.model, loaded.input_shape)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_until_cuts_an_onnx_graph_at_a_value(tmp_path):
    """--until NAME on an ONNX graph: the part that computes that value, densified (a dense
    feature extractor, as --until a module is for PyTorch models)."""
    model = onnx_api.load(RESNET)
    value = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    dense = onnx_api.densify(model, until=value)
    meta = onnx_api.info(dense)
    assert [o.name for o in dense.graph.output] == [value] and meta.until == value
    report = onnx_api.verify(onnx_api.inverse(dense), dense)
    assert report.ok, report.failures()
    r = runner.invoke(app, ["densify", str(RESNET), "--until", value, "-o",
                            str(tmp_path / "f.onnx")])
    assert r.exit_code == 0, r.output
