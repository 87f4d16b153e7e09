"""``predict`` as a matrix of its options, every cell against one reference.

Bugs lived in the crossings (an output stride with tiling; a dense .onnx written from a
PyTorch model given to predict): model file kind (baseline .pt densified by predict, dense
.pt, dense .onnx exported from PyTorch, dense .onnx densified from an ONNX baseline) x output
stride (1, an intermediate value, the total stride) x block layout (one block; many blocks
with edge blocks of odd size) x model (a GAP classifier with window pooling; a map model) x
sink (OUT.zarr, OUT.npy, the Python API) x workers. Every cell equals one whole-image pass of
the dense model made with the same options; the unpadded patch classifier's cells also equal
the baseline on the crop under sampled outputs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_baseline_on_crops, whole
from typer.testing import CliRunner

from econv_convert import densify, save_dense
from econv_convert.cli import app
from econv_convert.run import scene
from econv_convert.run.predict import predict
from econv_convert.run.sources import normalize
from econv_convert.torch.loading import load_model

# model -> (fixture, global pool, total stride)
MODELS = {"gap": ("tiny_resnet", "window", 16), "map": ("patch_classifier", "phase", 8)}
KINDS = ["baseline.pt", "dense.pt", "torch.onnx", "onnx.onnx"]
SIZE = (157, 139)  # odd, and not a multiple of any stride


def strides(model: str) -> list[int]:
    return [1, 2, MODELS[model][2]]


@functools.lru_cache(maxsize=None)
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def dense_of(model: str, stride: int):
    name, pool, _ = MODELS[model]
    loaded = load_model(FIXTURES / f"{name}.pt")
    return densify(loaded.model, loaded.input_shape, global_pool=pool, output_stride=stride)


@functools.lru_cache(maxsize=None)
def reference(model: str, stride: int) -> np.ndarray:
    return whole(dense_of(model, stride), image())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model files of every kind, written once: ``files(model, stride, kind)``."""
    root = tmp_path_factory.mktemp("matrix")
    np.save(root / "image.npy", image())
    made: dict = {}

    def get(model: str, stride: int, kind: str):
        key = (model, stride, kind)
        if key in made:
            return made[key]
        name, pool, _ = MODELS[model]
        options = ["--global-pool", pool] + (["--output-stride", str(stride)] if stride > 1
                                              else [])
        if kind == "baseline.pt":
            made[key] = (FIXTURES / f"{name}.pt", options)
            return made[key]
        path = root / f"{model}-{stride}-{kind.replace('.', '-')}"
        if kind == "dense.pt":
            path = path.with_suffix(".pt")
            save_dense(dense_of(model, stride), path)
        elif kind == "torch.onnx":
            path = path.with_suffix(".onnx")
            run(["densify", str(FIXTURES / f"{name}.pt"), "-o", str(path), "--no-verify",
                 *options])
        else:  # a dense graph from an ONNX baseline
            from onnx_graphs import export

            from econv_convert import onnx_api

            loaded = load_model(FIXTURES / f"{name}.pt")
            base = root / f"{name}.onnx"
            if not base.exists():
                onnx_api.save(export(loaded.model.eval(), loaded.input_shape, dynamic=True),
                              base)
            path = path.with_suffix(".onnx")
            shape = ",".join(map(str, loaded.input_shape))
            run(["densify", str(base), "-o", str(path), "--no-verify", "--input-shape", shape,
                 *options])
        made[key] = (path, [])
        return made[key]

    get.root = root
    return get


def run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.stderr}"
    return result


def blocks(model: str, stride: int, layout: str) -> int:
    """Output positions per block: one block for the whole image, or the smallest whole
    number of lattice steps (many blocks, the last of odd size)."""
    if layout == "one":
        return 1024
    per_step = MODELS[model][2] // stride  # output positions per lattice step
    return per_step * max(1, 48 // (per_step * stride))


def check(model: str, stride: int, got: np.ndarray) -> None:
    expected = reference(model, stride)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if model == "map":  # unpadded: each output is the baseline on the patch under it
        loaded = load_model(FIXTURES / "patch_classifier.pt")
        x = torch.from_numpy(normalize(np.moveaxis(image(), -1, 0), None, None))[None]
        assert assert_baseline_on_crops(loaded.model, got, x, (65, 65), (stride, stride)) > 20


CELLS = [(m, s, k, b) for m in MODELS for s in strides(m) for k in KINDS for b in ("one", "many")]


@pytest.mark.parametrize("model,stride,kind,layout", CELLS,
                         ids=[f"{m}-os{s}-{k}-{b}" for m, s, k, b in CELLS])
def test_zarr_sink(tmp_path, files, model, stride, kind, layout):
    path, options = files(model, stride, kind)
    out = tmp_path / "o.zarr"
    run(["predict", str(path), str(files.root / "image.npy"), "-o", str(out), "--workers", "0",
         "--block", str(blocks(model, stride, layout)), "--mask", "none", *options])
    got = scene.result_array(out)[:]
    chunks = scene.result_array(out).chunks
    if layout == "many":  # several blocks, the last one on an axis cut short
        assert chunks[1] < got.shape[1] and (got.shape[1] % chunks[1] or got.shape[2] % chunks[2])
    else:
        assert all(c >= n for c, n in zip(chunks[1:], got.shape[1:]))
    check(model, stride, got)


NPY = [(m, s, k) for m in MODELS for s in strides(m) for k in KINDS]


@pytest.mark.parametrize("model,stride,kind", NPY, ids=[f"{m}-os{s}-{k}" for m, s, k in NPY])
def test_npy_sink(tmp_path, files, model, stride, kind):
    path, options = files(model, stride, kind)
    out = tmp_path / "o.npy"
    run(["predict", str(path), str(files.root / "image.npy"), "-o", str(out), "--block",
         str(blocks(model, stride, "many")), *options])
    got = np.load(out)
    assert got.shape[0] == 1
    check(model, stride, got[0].reshape(-1, *got.shape[-2:]))


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_the_facade_writes_both_sinks(tmp_path, files, suffix):
    """``predict_file`` (what the command calls) writes either sink from the same call."""
    from econv_convert import predict_file

    path, _ = files("gap", 2, "dense.pt")
    out = tmp_path / f"o{suffix}"
    report = predict_file(path, files.root / "image.npy", out, workers=0, mask="none",
                          block=blocks("gap", 2, "many"))
    got = np.load(out)[0] if suffix == ".npy" else scene.result_array(out)[:]
    check("gap", 2, got.reshape(-1, *got.shape[-2:]))
    assert list(report.to_dict()["shape"][-2:]) == list(got.shape[-2:])


@pytest.mark.parametrize("option", [{"resume": True}, {"workers": 2}, {"mpp": 0.5},
                                    {"mask": "auto"}, {"ngff_version": "0.4"}])
def test_npy_refuses_what_only_ome_zarr_does(tmp_path, files, option):
    from econv_convert import InvalidInputError, predict_file

    path, _ = files("gap", 2, "dense.pt")
    out = tmp_path / "o.npy"
    with pytest.raises(InvalidInputError, match=r"is for OME-Zarr outputs \(\.zarr\)"):
        predict_file(path, files.root / "image.npy", out, **option)
    assert not out.exists()


API = [(m, s, b) for m in MODELS for s in strides(m) for b in ("one", "many")]


@pytest.mark.parametrize("model,stride,layout", API, ids=[f"{m}-os{s}-{b}" for m, s, b in API])
def test_python_api(model, stride, layout):
    dense = dense_of(model, stride)
    x = torch.from_numpy(normalize(np.moveaxis(image(), -1, 0), None, None))[None]
    tile = blocks(model, stride, layout) * stride  # input pixels per tile
    y = predict(dense, x, tile=tile).numpy()
    check(model, stride, y.reshape(-1, *y.shape[-2:]))


@pytest.mark.parametrize("model", list(MODELS))
def test_two_workers(tmp_path, files, model):
    stride = 2
    path, options = files(model, stride, "torch.onnx")
    out = tmp_path / "o.zarr"
    result = run(["predict", str(path), str(files.root / "image.npy"), "-o", str(out),
                  "--workers", "2", "--block", str(blocks(model, stride, "many")), "--mask",
                  "none", "--json", *options])
    assert '"workers": 2' in result.stdout
    check(model, stride, scene.result_array(out)[:])


@pytest.mark.parametrize("model,stride", [("gap", 1), ("gap", 4), ("map", 2)])
def test_the_recorded_support_is_what_an_output_reads(model, stride):
    """Blocks read the input each output reads (``geometry``): the gradient of one output
    with respect to the input is nonzero exactly on that support."""
    dense = dense_of(model, stride)
    geo = scene.geometry(dense.econv)
    x = torch.randn(1, 3, 260, 250, requires_grad=True)
    y = dense(x)
    q = (y.shape[-2] // 2, y.shape[-1] // 2)
    y[0, :, q[0], q[1]].sum().backward()
    grad = x.grad[0].abs().sum(0)
    for axis, (g, qq) in enumerate(((grad.sum(1), q[0]), (grad.sum(0), q[1]))):
        nonzero = torch.nonzero(g).flatten()
        first, last = nonzero.min().item() - qq * stride, nonzero.max().item() - qq * stride
        assert first >= -geo.halo[axis]  # a block reads this much before its first output
        assert last < stride + geo.halo_after[axis]  # and this much after its last
        if dense.econv.support:
            before, size = dense.econv.support[axis]
            assert (first, last) == (-before, size - before - 1)


@pytest.mark.parametrize("model,stride", [("gap", 1), ("gap", 16), ("map", 2)])
def test_batchnorm_folded_for_prediction_changes_only_rounding(model, stride):
    """Prediction folds eval-mode BatchNorms into the convolutions before them (on its own
    copy of the model): no BatchNorm left where one follows a convolution, the same outputs
    to float rounding, the user's model untouched."""
    import copy

    from econv_convert.run.fuse import fold_batchnorm
    from econv_convert.torch import ops

    dense = dense_of(model, stride)
    copy_ = copy.deepcopy(dense)
    before = sum(n.target is ops.batch_norm for n in copy_.graph.nodes)
    assert fold_batchnorm(copy_) == before > 0
    assert not any(n.target is ops.batch_norm for n in copy_.graph.nodes)
    x = torch.randn(1, 3, 150, 141)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), dense(x), rtol=1e-4, atol=1e-5)
    assert sum(n.target is ops.batch_norm for n in dense.graph.nodes) == before


class _InPlaceShapes(torch.nn.Module):
    """The shapes element-wise layers take in library code: ``inplace=True`` ReLUs, a
    residual ``+=``, a sum read twice, ``x + x``, a broadcast sum into a smaller map, and a
    convolution whose output is read by two layers (which must not be overwritten)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.b = torch.nn.Conv2d(8, 8, 3, 1, 1)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.d = torch.nn.Conv2d(8, 1, 1)
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.act(self.a(x))
        shared = self.b(y)  # read by the ReLU and by the sum below
        z = torch.relu(shared)
        z = self.c(z) + shared
        z = z + z
        gate = self.d(z)  # one channel, broadcast over eight: cannot hold the sum
        return torch.relu(gate + self.c(z))


def test_element_wise_layers_in_place_for_prediction_change_nothing():
    """Prediction writes a ReLU or a sum into its input where that input is a fresh map read
    by nothing else: the same values bit for bit, a map read twice never overwritten, a sum
    whose shape is not its first input's computed as a new tensor."""
    import copy

    from econv_convert.run.fuse import add_into, in_place, relu_into

    model = _InPlaceShapes().eval()
    dense = densify(model, (1, 3, 32, 32))
    copy_ = copy.deepcopy(dense)
    changed = in_place(copy_)
    targets = [n.target for n in copy_.graph.nodes]
    # a's ReLU, c + shared (c's output is fresh), gate + c(z) and its ReLU; not the ReLU of
    # the shared map, not z + z
    assert targets.count(relu_into) == 2 and targets.count(add_into) == 2 and changed == 4
    x = torch.randn(1, 3, 61, 47)
    with torch.no_grad():
        assert torch.equal(copy_(x), dense(x))


class _FlattenHead(torch.nn.Module):
    """A GAP classifier head written as torchvision writes it (``AdaptiveAvgPool2d`` then
    ``torch.flatten``) or as older code does (``x.view(x.size(0), -1)``)."""

    def __init__(self, view: bool):
        super().__init__()
        self.view = view
        self.conv = torch.nn.Conv2d(3, 12, 3, 2, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1) if self.view else torch.flatten(x, 1))


@pytest.mark.parametrize("case", ["gap-1", "gap-4", "gap-16", "flatten", "view", "map-2"])
def test_linear_after_window_pooling_runs_first_for_prediction(case, monkeypatch):
    """Prediction runs a GAP classifier's fully connected layer before its window mean pool
    (a pool of the class scores, not of every feature channel): the head of every way of
    writing it is rewritten, to float rounding; a phase-pooled map model has no such head; a
    rewrite whose result differs on the example is put back."""
    import copy

    from econv_convert.run import fuse

    if case.startswith(("gap", "map")):
        model, stride = case.split("-")
        dense = (dense_of(model, int(stride)) if int(stride) in strides(model)
                 else densify(load_model(FIXTURES / "tiny_resnet.pt").model,
                              (1, 3, 64, 64), global_pool="window", output_stride=4))
    else:
        dense = densify(_FlattenHead(case == "view").eval(), (1, 3, 32, 32),
                        global_pool="window")
    copy_ = copy.deepcopy(dense)
    expected = 0 if case.startswith("map") else 1
    assert fuse.linear_before_pool(copy_) == expected
    assert any(n.target is fuse.linear_then_pool for n in copy_.graph.nodes) == bool(expected)
    x = torch.randn(1, 3, 150, 141)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), dense(x), rtol=1e-4, atol=1e-5)
    if expected:  # a wrong rewrite is caught on the example and undone
        monkeypatch.setattr(fuse, "linear_then_pool",
                            lambda *a: fuse.__dict__["ops"].global_pool(
                                a[0], [2, 3], a[3], "window", "mean", True,
                                extent=a[4]).squeeze((2, 3))[:, :5] * 0)
        broken = copy.deepcopy(dense)
        assert fuse.linear_before_pool(broken) == 0
        assert not any(n.target is fuse.linear_then_pool for n in broken.graph.nodes)
        with torch.no_grad():
            torch.testing.assert_close(broken(x), dense(x))


INSIDE = [(s, sink) for s in strides("gap") for sink in (".zarr", ".npy")]


def _inside_case(tmp_path, stride):
    big = np.random.default_rng(1).integers(0, 256, (459, 437, 3), dtype=np.uint8)
    np.save(tmp_path / "big.npy", big)
    dense = dense_of("gap", stride)
    path = tmp_path / "dense.pt"
    save_dense(dense, path)
    return big, dense, path, 96 // stride  # block outputs: 96 input pixels, > the halo


def test_blocks_inside_the_image_on_two_workers(tmp_path):
    """The same with two Dask workers: each process trims (and checks) on its own."""
    big, dense, path, block = _inside_case(tmp_path, 1)
    out = tmp_path / "o.zarr"
    run(["predict", str(path), str(tmp_path / "big.npy"), "-o", str(out), "--block",
         str(block), "--workers", "2", "--mask", "none"])
    expected = whole(dense, big)
    np.testing.assert_allclose(scene.result_array(out)[:], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,sink", INSIDE, ids=[f"os{s}-{k[1:]}" for s, k in INSIDE])
def test_blocks_inside_the_image_run_trimmed(tmp_path, monkeypatch, stride, sink):
    """An image large enough for blocks whose window, halo included, lies inside it (2 x 2 of
    them): those run trimmed (no padding in any layer), the blocks on its edges between them
    trimmed along the axis they lie inside on, the corners padded; every output equals the
    whole pass, through both sinks. (Were the trimmed pass found wrong on its
    check against the padded one, no block would be run trimmed.)"""
    from econv_convert.run import trim

    calls = []
    real = trim.run
    monkeypatch.setattr(trim, "run", lambda gm, x, nd, axes: calls.append(axes) or real(
        gm, x, nd, axes))
    big, dense, path, block = _inside_case(tmp_path, stride)
    out = tmp_path / f"o{sink}"
    run(["predict", str(path), str(tmp_path / "big.npy"), "-o", str(out), "--block",
         str(block), *(["--workers", "0", "--mask", "none"] if sink == ".zarr" else [])])
    got = scene.result_array(out)[:] if sink == ".zarr" else np.load(out)[0]
    expected = whole(dense, big)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
    # each block trimmed along the axes its window lies inside the image on (both: 2 x 2 of
    # them; one: those on the edges between), each set of axes checked once on a corner
    from collections import Counter

    from econv_convert import info
    from econv_convert.run.blocks import Job

    geo = scene.geometry(info(dense))
    job = Job(None, None, "", got.shape, (block, block), geo.step, geo.unit, geo.halo,
              halo_after=geo.halo_after)
    kinds = Counter(job.inner_axes(b, big.shape[:2]) for b in job.blocks())
    kinds.pop((), None)
    assert kinds[(0, 1)] == 4 and kinds[(0,)] and kinds[(1,)]
    assert Counter(calls) == Counter({axes: n + 1 for axes, n in kinds.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_inside_the_image_from_every_model_file(tmp_path, files, kind):
    """The image with inside blocks crossed with the model file kinds: a baseline densified
    by predict and a dense .pt run trimmed, the dense .onnx graphs padded; every output
    equals the whole pass."""
    big, dense, _, block = _inside_case(tmp_path, 2)
    path, options = files("gap", 2, kind)
    out = tmp_path / "o.zarr"
    run(["predict", str(path), str(tmp_path / "big.npy"), "-o", str(out), "--block",
         str(block), "--workers", "0", "--mask", "none", *options])
    np.testing.assert_allclose(scene.result_array(out)[:], whole(dense, big), rtol=1e-4,
                               atol=1e-4)
