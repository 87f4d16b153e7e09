"""Real slide files through OpenSlide, OME-Zarr outputs that viewers open at the right scale,
and empty glass skipped.

The slides are Aperio-style SVS files written here with tifffile (tiled, lossless zlib,
``MPP = 0.5`` in the description); OpenSlide reads them as vendor ``aperio``. Every output is
compared with one whole-image pass of the dense model over the same pixels; the NGFF groups
are validated with ``ome-zarr-models`` and opened with the ``ome-zarr`` reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from conftest import FIXTURES, whole
from PIL import Image
from typer.testing import CliRunner

from econv_convert import densify, save_dense
from econv_convert.cli import app
from econv_convert.run import ngff, scene
from econv_convert.run.sources import SourceSpec, open_source
from econv_convert.torch.loading import load_model

openslide = pytest.importorskip("openslide")

H, W, MPP = 448, 640, 0.5


def aperio(path, a: np.ndarray, levels=(1, 4), mpp=MPP) -> None:
    """An Aperio-style SVS of ``a`` (H, W, 3) with pyramid levels downsampled by ``levels``."""
    with tifffile.TiffWriter(path) as w:
        for k, f in enumerate(levels):
            level = np.ascontiguousarray(a[::f, ::f])
            h, w_ = level.shape[:2]
            desc = (f"Aperio Image Library v12.0.15\r\n{w_}x{h} [0,0 {w_}x{h}] (128x128) RAW"
                    f"|AppMag = 20|MPP = {mpp * f}|Filename = test" if k == 0 else
                    f"Aperio Image Library v12.0.15\r\n{w_}x{h} -> {w_}x{h} - |")
            w.write(level, tile=(128, 128), compression="zlib", photometric="rgb",
                    description=desc, metadata=None)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """Glass (bright, grey, a little noise) with two tissue blobs (pink, saturated): about
    60% glass."""
    rng = np.random.default_rng(0)
    a = (240 + rng.integers(0, 12, (H, W, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:H, :W]
    blob = (((yy - 130) / 100.0) ** 2 + ((xx - 150) / 120.0) ** 2 < 1) | \
        (((yy - 320) / 90.0) ** 2 + ((xx - 250) / 100.0) ** 2 < 1)
    pink = np.stack([190 + rng.integers(0, 50, (H, W)), 100 + rng.integers(0, 50, (H, W)),
                     160 + rng.integers(0, 50, (H, W))], -1).astype(np.uint8)
    a[blob] = pink[blob]
    path = tmp_path_factory.mktemp("slide") / "slide.svs"
    aperio(path, a)
    return a, blob, path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A global-average-pool classifier as a heat map (window mode), saved."""
    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    path = tmp_path_factory.mktemp("model") / "dense.pt"
    save_dense(dense, path)
    return dense, path


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    """An unpadded patch classifier as a heat map: a small halo, so blocks over glass read
    no tissue at all."""
    loaded = load_model(FIXTURES / "patch_classifier.pt")
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    path = tmp_path_factory.mktemp("model") / "patches.pt"
    save_dense(dense, path)
    return dense, path


def predict(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_openslide_reads_the_written_slide_as_aperio_with_its_pixel_size(slide):
    a, _, path = slide
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == MPP and s.level_count == 2
    src = open_source(SourceSpec(str(path), 3))
    assert src.mpp == (MPP, MPP) and src.levels[1][1] == (4 * MPP, 4 * MPP)
    np.testing.assert_array_equal(src.read(10, 90, 30, 150), np.moveaxis(a[10:90, 30:150], -1, 0))


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_a_slide_prediction_is_exact_and_an_ome_zarr_at_its_physical_scale(tmp_path, slide,
                                                                        patches, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    if version == "0.5":
        from ome_zarr_models.v05 import Image as NGFFImage
    else:
        from ome_zarr_models.v04 import Image as NGFFImage

    a, _, path = slide
    dense, model_path = patches
    out = tmp_path / "heat.zarr"
    code, stdout, stderr = predict(model_path, path, "-o", out, "--workers", "0", "--block", "128",
                                   "--mask", "none", "--ngff", version, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["pixel_size"] == [MPP, MPP] and report["unit"] == "micrometer"
    expected = whole(dense, a)
    np.testing.assert_allclose(scene.result_array(out)[:], expected, rtol=1e-5, atol=1e-5)
    group = zarr.open_group(str(out), mode="r")
    image = NGFFImage.from_zarr(group)  # raises on anything the spec does not allow
    meta = group.attrs["ome"] if version == "0.5" else dict(group.attrs)
    multiscales = meta["multiscales"][0]
    assert [ax["name"] for ax in multiscales["axes"]] == ["c", "y", "x"]
    assert multiscales["axes"][1]["unit"] == "micrometer"
    scale, translation = multiscales["datasets"][0]["coordinateTransformations"]
    window = scene.geometry(dense.econv).window  # each output's input window
    assert ngff.record(out)["window"] == list(window)
    assert scale["scale"] == [1.0, MPP, MPP]  # one output per input pixel
    assert translation["translation"] == [0.0, *(MPP * (w - 1) / 2 for w in window)]
    assert len(meta["omero"]["channels"]) == expected.shape[0]
    labels = np.asarray(group["labels/classes/0"][:])  # the arg-max class of the output, + 1
    np.testing.assert_array_equal(labels, scene.result_array(out)[:].argmax(0) + 1)
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes[0].data[0].shape == expected.shape and image is not None
    assert ngff.record(out)["complete"]


def test_mpp_picks_the_level_nearest_at_or_finer_and_reports_it(tmp_path, slide, model):
    a, _, path = slide
    dense, model_path = model
    for mpp, level in ((2.0, 1), (1.0, 0), (3.5, 1)):
        out = tmp_path / f"m{mpp}.zarr"
        code, stdout, stderr = predict(model_path, path, "-o", out, "--workers", "0",
                                       "--mask", "none", "--mpp", mpp, "--json")
        assert code == 0, stderr
        report = json.loads(stdout)
        assert ngff.record(out)["level"] == level
        assert report["pixel_size"] == [MPP * 4 ** level] * 2
    np.testing.assert_allclose(scene.result_array(tmp_path / "m2.0.zarr")[:],
                               whole(dense, np.ascontiguousarray(a[::4, ::4])),
                               rtol=1e-5, atol=1e-5)
    code, _, stderr = predict(model_path, path, "-o", tmp_path / "fine.zarr", "--mpp", 0.25)
    assert code == 2 and "finest level is 0.5" in stderr


def test_mpp_on_an_image_without_a_pixel_size_is_one_line_and_writes_nothing(tmp_path, model):
    _, model_path = model
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, np.zeros((96, 96, 3), np.uint8), tile=(32, 32), photometric="rgb")
    out = tmp_path / "o.zarr"
    code, _, stderr = predict(model_path, tif, "-o", out, "--mpp", 0.5)
    assert code == 2 and "\n" not in stderr.strip() and "plain.tif" in stderr
    assert "records no pixel size" in stderr and not out.exists()
    code, stdout, stderr = predict(model_path, tif, "-o", out, "--workers", "0", "--json")
    assert code == 0 and json.loads(stdout)["unit"] is None  # pixel units, still works


def test_pixel_sizes_are_read_from_ome_tiff_resolution_tags_and_ome_zarr(tmp_path):
    a = np.zeros((64, 80, 3), np.uint8)
    tifffile.imwrite(tmp_path / "o.ome.tif", a, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    tifffile.imwrite(tmp_path / "cm.tif", a, photometric="rgb",
                     resolution=(1e4 / 0.75, 1e4 / 0.75), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", a, photometric="rgb",
                     resolution=(25400 / 2.0, 25400 / 2.0), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", a, photometric="rgb")
    expect = {"o.ome.tif": (0.5, 0.25), "cm.tif": (0.75, 0.75), "inch.tif": (2.0, 2.0),
              "none.tif": None}
    for name, mpp in expect.items():
        got = open_source(SourceSpec(str(tmp_path / name), 3)).mpp
        assert got == (pytest.approx(mpp) if mpp else None), name
    # an output of predict read back as an input: its level 0 is at the output's scale
    group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    group.create_array("0", data=np.moveaxis(a, -1, 0), chunks=(3, 32, 32))
    group.attrs["multiscales"] = [{"axes": [{"name": "c", "type": "channel"},
                                            {"name": "y", "type": "space", "unit": "micrometer"},
                                            {"name": "x", "type": "space", "unit": "micrometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1, 0.3, 0.4]}]}]}]
    assert open_source(SourceSpec(str(tmp_path / "in.zarr"), 3)).mpp == (0.3, 0.4)


# -- empty glass skipped ---------------------------------------------------------------------


def test_glass_is_skipped_and_every_computed_output_is_unchanged(tmp_path, slide, patches,
                                                                 monkeypatch):
    a, blob, path = slide
    dense, model_path = patches
    out = tmp_path / "masked.zarr"
    monkeypatch.setattr(ngff, "SMALLEST", 32)  # a pyramid, with skipped blocks in it
    code, stdout, stderr = predict(model_path, path, "-o", out, "--workers", "0", "--block",
                                   "64", "--json")  # a slide: the mask is on by default
    assert code == 0, stderr
    report = json.loads(stdout)
    assert 0 < report["blocks_masked"] < report["blocks_total"]
    assert report["mask"]["how"] == "auto" and 0.2 < report["mask"]["tissue_fraction"] < 0.6
    y = scene.result_array(out)[:]
    expected = whole(dense, a)
    computed = np.isfinite(y).all(axis=0)
    assert 0.2 < computed.mean() < 0.95
    np.testing.assert_allclose(y[:, computed], expected[:, computed], rtol=1e-5, atol=1e-5)
    # every output whose window holds tissue was computed
    window = dense.econv.example_shape[2:]
    rows, cols = np.nonzero(blob[: y.shape[1], : y.shape[2]])
    assert computed[np.clip(rows - window[0] // 2, 0, y.shape[1] - 1),
                    np.clip(cols - window[1] // 2, 0, y.shape[2] - 1)].mean() > 0.99
    assert ngff.record(out)["mask"]["sha256"] == report["mask"]["sha256"]
    # the label image of each level: the arg-max class + 1 of that level, 0 where no output
    group = zarr.open_group(str(out), mode="r")
    assert report["levels"] > 2
    for k in range(report["levels"]):
        level = np.asarray(group[str(k)][:])
        valid = np.isfinite(level).all(axis=0)
        expected = np.where(valid, np.nan_to_num(level, nan=-np.inf).argmax(0) + 1, 0)
        np.testing.assert_array_equal(group[f"labels/classes/{k}"][:], expected)
        assert 0 < valid.mean() < 1
    # resume keeps the first run's mask: the same mask finishes, another is refused
    code, stdout, _ = predict(model_path, path, "-o", out, "--workers", "0", "--block", "64",
                              "--resume", "--json")
    assert code == 0 and json.loads(stdout)["blocks_skipped"] == report["blocks_total"]
    code, _, stderr = predict(model_path, path, "-o", out, "--workers", "0", "--block", "64",
                              "--resume", "--mask", "none")
    assert code == 2 and "another mask" in stderr


def test_a_mask_file_of_any_size_is_used_and_bad_ones_are_refused(tmp_path, slide, patches):
    a, blob, path = slide
    _, model_path = patches
    small = Image.fromarray((blob[::8, ::8] * 255).astype(np.uint8))
    small.save(tmp_path / "mask.png")
    out = tmp_path / "o.zarr"
    code, stdout, stderr = predict(model_path, path, "-o", out, "--workers", "0", "--block",
                                   "64", "--mask", tmp_path / "mask.png", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["blocks_masked"] > 0
    Image.fromarray(np.zeros((10, 40), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for bad, words in (("wide.png", "aspect ratio"), ("broken.png", "not a readable image"),
                       ("missing.png", "no such file")):
        target = tmp_path / f"{bad}.zarr"
        code, _, stderr = predict(model_path, path, "-o", target, "--mask", tmp_path / bad)
        assert code == 2 and words in stderr and "\n" not in stderr.strip(), stderr
        assert not target.exists()


def test_other_inputs_are_not_masked_unless_asked(tmp_path, slide, patches):
    a, _, _ = slide
    _, model_path = patches
    np.save(tmp_path / "a.npy", a)
    code, stdout, stderr = predict(model_path, tmp_path / "a.npy", "-o", tmp_path / "o.zarr",
                                   "--workers", "0", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["mask"] is None
    code, stdout, stderr = predict(model_path, tmp_path / "a.npy", "-o", tmp_path / "m.zarr",
                                   "--workers", "0", "--block", "64", "--mask", "auto", "--json")
    assert code == 0 and json.loads(stdout)["blocks_masked"] > 0, stderr
