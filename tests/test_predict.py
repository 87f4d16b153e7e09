"""Tiled prediction is exactly the whole-image dense output, in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_baseline_on_crops
from PIL import Image
from typer.testing import CliRunner

from econv_convert import InvalidInputError, densify, save_dense
from econv_convert.cli import app
from econv_convert.run.predict import plan_tiles, predict
from econv_convert.torch.loading import load_model

CASES = {
    "patch-classifier": ("patch_classifier", None, (203, 171), 8),
    "resnet-layer2": ("tiny_resnet", "layer2", (150, 97), 8),
    "resnet-layer3": ("tiny_resnet", "layer3", (131, 140), 16),
    "vgg-features": ("tiny_vgg", "features", (99, 141), 16),
}


def dense_of(name, until):
    loaded = load_model(FIXTURES / f"{name}.pt")
    return densify(loaded.model, loaded.input_shape, until=until)


@pytest.mark.parametrize("tiles", [1, 2, 3], ids=["tile-x1", "tile-x2", "tile-x3"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tiled_equals_whole_image(case, tiles):
    name, until, size, step = CASES[case]
    dense = dense_of(name, until)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        whole = dense(x)
    got = predict(dense, x, tile=step * tiles * 2)
    assert plan_tiles(dense, x.shape, tile=step * tiles * 2).count > 1
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def test_tile_size_follows_the_memory_budget():
    dense = dense_of("tiny_resnet", "layer3")
    small = plan_tiles(dense, (1, 3, 512, 512), max_memory=100 * 2**20)
    large = plan_tiles(dense, (1, 3, 512, 512), max_memory=2**30)
    assert small.tile < large.tile and small.estimate_bytes <= 100 * 2**20
    with pytest.raises(InvalidInputError, match=r"smallest tile.*raise max_memory=\.\.\."):
        plan_tiles(dense, (1, 3, 512, 512), max_memory=8 * 2**20)


def test_models_that_pool_globally_are_refused():
    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    dense = densify(loaded.model, loaded.input_shape)
    with pytest.raises(InvalidInputError, match="pools over the whole image"):
        predict(dense, torch.randn(1, 3, 80, 80))


def test_tile_must_be_a_multiple_of_the_step():
    with pytest.raises(InvalidInputError, match="multiple of the lattice step 8"):
        predict(dense_of("patch_classifier", None), torch.randn(1, 3, 90, 90), tile=12)


def test_cli_predict_image_and_array(tmp_path):
    save_dense(dense_of("patch_classifier", None), tmp_path / "d.pt")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((97, 120, 3)) * 255).astype("uint8")).save(tmp_path / "i.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "d.pt"), str(tmp_path / "i.png"),
                                      "-o", str(tmp_path / "p.npy"), "--tile", "16",
                                      "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"])
    assert result.exit_code == 0, result.stderr
    y = np.load(tmp_path / "p.npy")
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "i.png"), dtype=np.float32) / 255)
    x = ((x.permute(2, 0, 1)[None] - 0.5) / 0.2).contiguous()
    with torch.no_grad():
        expected = dense_of("patch_classifier", None)(x)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert Image.open(tmp_path / "p.png").size == (y.shape[3], y.shape[2])
    np.save(tmp_path / "a.npy", rng.standard_normal((2, 3, 80, 70)).astype("float32"))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "d.pt"), str(tmp_path / "a.npy"),
                                      "-o", str(tmp_path / "q.npy"), "--max-memory", "64M"])
    assert result.exit_code == 0, result.stderr
    with torch.no_grad():
        expected = dense_of("patch_classifier", None)(torch.from_numpy(np.load(tmp_path / "a.npy")))
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), expected.numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("tiles", [1, 3], ids=["tile-x1", "tile-x3"])
@pytest.mark.parametrize("output_stride", [1, 4, 8], ids=["os1", "os4", "os8"])
def test_tiled_patch_classifier_is_the_baseline_on_every_crop(output_stride, tiles):
    """Not dense against dense: every tiled output is the baseline on the patch under it."""
    loaded = load_model(FIXTURES / "patch_classifier.pt")
    dense = densify(loaded.model, loaded.input_shape, output_stride=output_stride)
    x = torch.randn(1, 3, 157, 131)
    step = 8 // output_stride  # dense positions per lattice step
    got = predict(dense, x, tile=8 * step * tiles * 2)
    assert got.shape[-2:] == dense(x).shape[-2:]
    assert assert_baseline_on_crops(loaded.model, got[0], x, (65, 65),
                                    (output_stride, output_stride)) > 60


@pytest.mark.parametrize("output_stride", [1, 2, 8], ids=["os1", "os2", "os8"])
@pytest.mark.parametrize("name,global_pool", [("tiny_resnet", "window"),
                                              ("patch_classifier", "phase")],
                         ids=["gap-window", "fc-head"])
def test_cli_predict_npy_with_an_output_stride(tmp_path, name, global_pool, output_stride):
    """densify --output-stride K, then predict to .npy in tiles: the whole-image dense pass
    (and, for the unpadded patch classifier, the baseline on every sampled crop)."""
    loaded = load_model(FIXTURES / f"{name}.pt")
    dense = densify(loaded.model, loaded.input_shape, global_pool=global_pool,
                    output_stride=output_stride)
    save_dense(dense, tmp_path / "d.pt")
    x = torch.randn(1, 3, 141, 123)
    np.save(tmp_path / "x.npy", x[0].numpy())
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "d.pt"), str(tmp_path / "x.npy"),
                                      "-o", str(tmp_path / "y.npy"), "--tile", "32"])
    assert result.exit_code == 0, result.output
    y = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        whole = dense(x).numpy()
    assert y.shape == whole.shape
    np.testing.assert_allclose(y, whole, rtol=1e-4, atol=1e-5)
    if name == "patch_classifier":
        assert_baseline_on_crops(loaded.model, y[0], x, (65, 65), (output_stride,) * 2)


def test_predict_refuses_a_model_that_fails_its_verification(tmp_path, monkeypatch):
    """A baseline densified by predict is verified first; a dense model wrong only off the
    lattice (its convolution op broken on purpose) ends in exit 1 naming the worst check,
    and nothing is written."""
    from econv_convert.torch import ops, targets

    conv = ops.conv

    def bumped(*args, **kwargs):
        y = conv(*args, **kwargs).clone()
        y[..., 1::2, :] += 1.0
        return y

    monkeypatch.setattr(ops, "conv", bumped)
    monkeypatch.setitem(targets._REGISTRY, targets.qualified_name(bumped), bumped)
    out = "y.zarr"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 96, 80), np.float32))
    result = CliRunner().invoke(app, ["predict", str(FIXTURES / "tiny_resnet.pt"),
                                      str(tmp_path / "x.npy"), "-o", str(tmp_path / out),
                                      "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "NOT equivalent" in result.stderr and " at " in result.stderr, result.stderr
    assert not (tmp_path / out).exists()
