"""predict over large images: block by block into zarr, on Dask, resumable; the readers.

Every result is compared with one whole-image pass of the same dense model: blocks, workers,
schedulers and resumed runs must not change a single output beyond float rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import FIXTURES, assert_baseline_on_crops, whole
from PIL import Image
from typer.testing import CliRunner

from econv_convert import densify, save_dense
from econv_convert.cli import app
from econv_convert.errors import InvalidInputError
from econv_convert.run import ngff, scene
from econv_convert.run.sources import SourceSpec, normalize, open_source
from econv_convert.torch.loading import load_model


def dense_model(name: str, global_pool: str = "window"):
    loaded = load_model(FIXTURES / f"{name}.pt")
    return densify(loaded.model, loaded.input_shape, global_pool=global_pool)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A global-average-pool classifier as a heat map (window mode), saved."""
    path = tmp_path_factory.mktemp("model") / "dense.pt"
    dense = dense_model("tiny_resnet")
    save_dense(dense, path)
    return dense, path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A tiled, compressed RGB TIFF with a second pyramid level."""
    rng = np.random.default_rng(0)
    a = (rng.random((181, 203, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "scene.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(a, tile=(32, 32), compression="zlib", photometric="rgb", subifds=1)
        w.write(a[::2, ::2], tile=(32, 32), compression="zlib", photometric="rgb",
                subfiletype=1)
    return a, path


def run(model_path, image_path, out, **kw):
    meta = load_dense_meta(model_path)
    kw.setdefault("workers", 0)
    kw.setdefault("mask", "none")  # random pixels: no glass to skip (tests/test_slides.py)
    return scene.predict_scene(scene.ModelSpec(str(model_path)),
                               SourceSpec(str(image_path), 3), out,
                               record={"model_sha256": scene.checksum(model_path),
                                       "options": kw.pop("options", {})}, meta=meta, **kw)


def load_dense_meta(path):
    from econv_convert.torch.storage import load_dense

    return load_dense(path).econv


def test_blocks_write_the_whole_image_result(tmp_path, classifier, image):
    dense, path = classifier
    a, tif = image
    report = run(path, tif, tmp_path / "o.zarr", block=32)
    out = scene.result_array(tmp_path / "o.zarr")
    expected = whole(dense, a)
    assert out.shape == expected.shape and report.blocks_total > 4
    np.testing.assert_allclose(out[:], expected, rtol=1e-5, atol=1e-5)
    attrs = ngff.record(tmp_path / "o.zarr")
    assert attrs["complete"] and attrs["step"] == [1, 1] and attrs["offset"] == [0, 0]
    assert attrs["window"] == list(dense.econv.example_shape[2:])
    assert out.chunks == (expected.shape[0], 32, 32)
    assert Image.open(tmp_path / "o.png").size[0] <= 1024


def test_dask_workers_and_a_separate_scheduler_give_the_same_result(tmp_path, classifier,
                                                                   image):
    """The same blocks; only the torch threads per process differ (one process with both
    cores, or two with one each), which changes float rounding, nothing more."""
    from distributed import LocalCluster

    _, path = classifier
    _, tif = image
    run(path, tif, tmp_path / "one.zarr", block=64)
    report = run(path, tif, tmp_path / "two.zarr", block=64, workers=2)
    assert report.workers == 2 and report.scheduler == "embedded LocalCluster"
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", scheduler_port=0) as cluster:
        report = run(path, tif, tmp_path / "far.zarr", block=64,
                     scheduler=cluster.scheduler_address)
        assert report.scheduler == cluster.scheduler_address
    one = scene.result_array(tmp_path / "one.zarr")[:]
    for name in ("two", "far"):
        np.testing.assert_allclose(scene.result_array(tmp_path / f"{name}.zarr")[:], one,
                                   rtol=1e-6, atol=1e-6)


def test_the_block_size_does_not_change_the_result(tmp_path, classifier, image):
    _, path = classifier
    _, tif = image
    outs = []
    for block in (16, 48):
        run(path, tif, tmp_path / f"{block}.zarr", block=block, overview=False)
        outs.append(scene.result_array(tmp_path / f"{block}.zarr")[:])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_a_killed_run_resumes_with_only_the_missing_blocks(tmp_path, classifier, image):
    _, path = classifier
    _, tif = image
    out = tmp_path / "o.zarr"
    full = run(path, tif, tmp_path / "full.zarr", block=32, overview=False)
    # a run killed after some blocks: its output exists, incomplete
    meta = load_dense_meta(path)
    geo = scene.geometry(meta)
    job = scene.Job(scene.ModelSpec(str(path), threads=1), SourceSpec(str(tif), 3), str(out),
                    full.shape, (32, 32), geo.step, geo.unit, geo.halo,
                    halo_after=geo.halo_after)
    record = {"model_sha256": scene.checksum(path), "options": {}, "format": scene.FORMAT,
              "shape": list(full.shape), "block": [32, 32], "ngff": "0.5"}
    assert scene.prepare_output(job, record, resume=False, overwrite=False) == set()
    for b in job.blocks()[:5]:
        scene.compute_block(job, b)
    assert not ngff.record(out)["complete"]
    with pytest.raises(scene.OutputExistsError, match="exists; resume=True"):
        run(path, tif, out, block=32)
    with pytest.raises(scene.OutputExistsError, match="another options"):
        run(path, tif, out, block=32, resume=True, options={"mean": [0.5]})
    report = run(path, tif, out, block=32, resume=True)
    assert report.blocks_skipped == 5 and report.blocks_total == full.blocks_total
    assert np.array_equal(scene.result_array(out)[:],
                          scene.result_array(tmp_path / "full.zarr")[:])
    assert ngff.record(out)["complete"]


def test_an_existing_folder_that_is_not_ours_is_never_removed(tmp_path, classifier, image):
    _, path = classifier
    _, tif = image
    (tmp_path / "data.zarr").mkdir()
    (tmp_path / "data.zarr" / "keep.txt").write_text("precious")
    with pytest.raises(scene.OutputExistsError, match="not an output of econv-convert"):
        run(path, tif, tmp_path / "data.zarr", overwrite=True)
    assert (tmp_path / "data.zarr" / "keep.txt").read_text() == "precious"


def test_phase_pooled_models_are_refused_with_what_to_do(tmp_path):
    meta = dense_model("tiny_resnet", "phase").econv
    with pytest.raises(InvalidInputError, match="global_pool=window"):
        scene.geometry(meta)


# -- readers ---------------------------------------------------------------------------------


def test_readers_give_the_same_pixels(tmp_path, image):
    a, tif = image
    chw = np.ascontiguousarray(np.moveaxis(a, -1, 0))
    np.save(tmp_path / "hwc.npy", a)
    np.save(tmp_path / "chw.npy", chw)
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    zarr.create_array(str(tmp_path / "a.zarr"), data=chw, chunks=(3, 50, 50))
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    group.create_array("0", data=chw[None, :, None], chunks=(1, 3, 1, 64, 64))
    group.attrs["multiscales"] = [{"axes": [{"name": n} for n in "tczyx"],
                                   "datasets": [{"path": "0"}]}]
    for name in ("hwc.npy", "chw.npy", "rgba.png", "a.zarr", "ome.zarr", tif.name):
        where = tif if name == tif.name else tmp_path / name
        src = open_source(SourceSpec(str(where), 3))
        assert src.shape == (3, 181, 203), name
        np.testing.assert_array_equal(src.read(10, 50, 7, 90), chw[:, 10:50, 7:90], name)
    level = open_source(SourceSpec(str(tif), 3, level=1))
    np.testing.assert_array_equal(level.read(0, 20, 0, 30), chw[:, ::2, ::2][:, :20, :30])


@pytest.mark.parametrize("kind", ["rgb-zlib", "gray-uint16", "rgb-jpeg", "rgb-strips"])
def test_tiff_windows_are_the_file_s_pixels_whatever_the_cache_holds(tmp_path, kind,
                                                                     monkeypatch):
    """Windows across tile edges, the image's ragged last tiles, windows read again from the
    tile cache and after it evicted them: the pixels tifffile decodes from the whole file."""
    from econv_convert.run import sources

    rng = np.random.default_rng(1)
    shape = (150, 133) if kind == "gray-uint16" else (150, 133, 3)
    dtype = np.uint16 if kind == "gray-uint16" else np.uint8
    a = (rng.random(shape) * np.iinfo(dtype).max).astype(dtype)
    path = tmp_path / "t.tif"
    options = {"rgb-zlib": {"tile": (32, 48), "compression": "zlib"},
               "gray-uint16": {"tile": (16, 32), "compression": "zlib"},
               "rgb-jpeg": {"tile": (32, 32), "compression": "jpeg"},
               "rgb-strips": {"rowsperstrip": 16}}[kind]
    tifffile.imwrite(path, a, photometric="rgb" if a.ndim == 3 else "minisblack", **options)
    expected = tifffile.imread(path)
    chw = expected[None] if expected.ndim == 2 else np.moveaxis(expected, -1, 0)
    src = open_source(SourceSpec(str(path), 1 if a.ndim == 2 else 3))
    assert isinstance(src.array, sources.TiffTiles) == (kind != "rgb-strips")
    windows = [(0, 150, 0, 133), (5, 37, 40, 131), (31, 33, 47, 49), (120, 150, 100, 133),
               (5, 37, 40, 131)]
    for y0, y1, x0, x1 in windows:
        np.testing.assert_array_equal(src.read(y0, y1, x0, x1), chw[:, y0:y1, x0:x1])
    monkeypatch.setattr(sources.TiffTiles, "CACHE_BYTES", 1)  # one tile at a time
    src = open_source(SourceSpec(str(path), 1 if a.ndim == 2 else 3))
    for y0, y1, x0, x1 in windows:
        np.testing.assert_array_equal(src.read(y0, y1, x0, x1), chw[:, y0:y1, x0:x1])


def test_integer_images_are_scaled_to_one_then_normalized():
    a = np.array([[[0, 65535]]], dtype=np.uint16)
    np.testing.assert_allclose(normalize(a, [0.5], [0.5]), [[[-1.0, 1.0]]])
    np.testing.assert_allclose(normalize(a.astype(np.float32), None, None), [[[0, 65535]]])


def _normalized_in_numpy(a, mean, std):
    """The normalization as plain numpy float32 steps (the reference the torch one matches
    bit for bit)."""
    x = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        x /= np.float32(np.iinfo(a.dtype).max)
    shape = (-1,) + (1,) * (a.ndim - 1)
    if mean is not None:
        x -= np.asarray(mean, np.float32).reshape(shape)
    if std is not None:
        x /= np.asarray(std, np.float32).reshape(shape)
    return x


@pytest.mark.parametrize("kind", ["uint8-rgb-channels-last", "uint16", "big-endian", "flipped",
                                  "float64", "float32", "bool", "read-only", "3-d"])
def test_normalize_gives_numpys_float32_bits_in_any_memory_order(tmp_path, kind):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 37, 41), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    a = {"uint8-rgb-channels-last": np.moveaxis(np.ascontiguousarray(np.moveaxis(raw, 0, -1)),
                                                -1, 0),
         "uint16": raw.astype(np.uint16) * 257,
         "big-endian": (raw.astype(np.uint16) * 251).astype(">u2"),
         "flipped": raw[:, ::-1, ::-2],
         "float64": rng.standard_normal((3, 37, 41)),
         "float32": rng.standard_normal((3, 37, 41)).astype(np.float32),
         "bool": raw > 128,
         "read-only": raw,
         "3-d": rng.integers(0, 256, (3, 5, 9, 11), dtype=np.uint8)}[kind]
    if kind == "read-only":
        np.save(tmp_path / "a.npy", raw)
        a = np.load(tmp_path / "a.npy", mmap_mode="r")
    before = np.array(a, copy=True)
    got = normalize(a, mean, std)
    expected = _normalized_in_numpy(np.asarray(a), mean, std)
    assert got.dtype == np.float32 and got.shape == a.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(a, before)  # the source's array is never written
    if kind == "uint8-rgb-channels-last":
        assert got.strides[0] == 4  # channels last stays channels last (no copy to C order)


@pytest.mark.parametrize("damage", ["truncated", "not-an-image", "wrong-channels", "level"])
def test_bad_inputs_end_in_one_line_and_write_nothing(tmp_path, classifier, image, damage):
    _, path = classifier
    a, tif = image
    bad = tmp_path / "bad.tif"
    args = []
    if damage == "truncated":
        bad.write_bytes(tif.read_bytes()[:3000])
    elif damage == "not-an-image":
        bad.write_bytes(b"II*\x00 this is not a tiff")
    elif damage == "wrong-channels":
        tifffile.imwrite(bad, a[..., :2])
    else:
        bad = tif
        args = ["--level", "5"]
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(app, ["predict", str(path), str(bad), "-o", str(out),
                                      "--workers", "0", *args])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and str(bad.name) in message
    assert not out.exists()


def test_cli_densifies_a_baseline_and_reports_json(tmp_path, image):
    a, tif = image
    out = tmp_path / "heat.zarr"
    result = CliRunner().invoke(app, ["predict", str(FIXTURES / "tiny_resnet.pt"), str(tif),
                                      "-o", str(out), "--workers", "0", "--block", "64",
                                      "--mask", "none", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocks_total"] == 6 and report["blocks_skipped"] == 0
    assert report["seconds"] > 0 and report["geometry"]["window"] == [64, 64]
    np.testing.assert_allclose(scene.result_array(out)[:],
                               whole(dense_model("tiny_resnet"), a), rtol=1e-5, atol=1e-5)
    again = CliRunner().invoke(app, ["predict", str(FIXTURES / "tiny_resnet.pt"), str(tif),
                                     "-o", str(out), "--workers", "0", "--block", "64",
                                     "--mask", "none", "--resume", "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["blocks_skipped"] == 6


def test_a_dense_onnx_model_runs_in_onnxruntime(tmp_path, image):
    from onnx_graphs import export

    from econv_convert import onnx_api

    a, tif = image
    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    graph = export(loaded.model.eval(), loaded.input_shape, dynamic=True)
    dense_graph = onnx_api.densify(graph, loaded.input_shape, global_pool="window")
    onnx_api.save(dense_graph, tmp_path / "dense.onnx")
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "dense.onnx"), str(tif), "-o",
                                      str(out), "--workers", "0", "--block", "96", "--mask",
                                      "none"])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(scene.result_array(out)[:],
                               whole(dense_model("tiny_resnet"), a), rtol=1e-4, atol=1e-4)


def test_resume_after_a_real_kill(tmp_path, classifier, image):
    import signal
    import subprocess
    import sys
    import textwrap

    _, path = classifier
    _, tif = image
    out = tmp_path / "o.zarr"
    # the CLI in a process that kills itself (SIGKILL: no clean-up runs) right after its
    # third block's marker reaches the disk, whatever the machine's speed
    driver = textwrap.dedent(f"""
        import os, pathlib, signal, sys
        touch = pathlib.Path.touch
        def touched(self, *a, **k):
            touch(self, *a, **k)
            if self.parent.name == {scene.MARKERS!r} and len(list(self.parent.iterdir())) >= 3:
                os.kill(os.getpid(), signal.SIGKILL)
        pathlib.Path.touch = touched
        from econv_convert.cli import main
        sys.argv = ["econv-convert"] + sys.argv[1:]
        main()
        """)
    cmd = [sys.executable, "-c", driver, "predict", str(path), str(tif), "-o", str(out),
           "--workers", "0", "--block", "16", "--mask", "none", "--json"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not ngff.record(out)["complete"]
    done = len(list((out / scene.MARKERS).iterdir()))
    assert done >= 3
    result = CliRunner().invoke(app, ["predict", str(path), str(tif), "-o", str(out),
                                      "--workers", "0", "--block", "16", "--mask", "none",
                                      "--resume", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocks_skipped"] == done < report["blocks_total"]
    run(path, tif, tmp_path / "full.zarr", block=16, overview=False)
    # the killed process's blocks ran in another process, beside other tests under xdist:
    # equal to float32 rounding (a lost or stale block differs in whole values)
    np.testing.assert_allclose(scene.result_array(out)[:],
                               scene.result_array(tmp_path / "full.zarr")[:],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_stride", [1, 4, 8], ids=["os1", "os4", "os8"])
def test_zarr_blocks_are_the_baseline_on_every_crop(tmp_path, image, output_stride):
    """Not dense against dense: a patch classifier's heat map over many blocks (edge blocks
    of odd size) is the baseline on the patch under each output, located by the output's own
    step and offset attributes."""
    loaded = load_model(FIXTURES / "patch_classifier.pt")
    dense = densify(loaded.model, loaded.input_shape, output_stride=output_stride)
    save_dense(dense, tmp_path / "d.pt")
    a, tif = image
    # blocks count outputs: about 32 pixels of the image each
    report = run(tmp_path / "d.pt", tif, tmp_path / "o.zarr", block=32 // output_stride)
    assert report.blocks_total > 4
    out = scene.result_array(tmp_path / "o.zarr")
    attrs = ngff.record(tmp_path / "o.zarr")
    assert attrs["step"] == [output_stride] * 2
    x = torch.from_numpy(normalize(np.moveaxis(a, -1, 0), None, None))[None]
    assert_baseline_on_crops(loaded.model, out[:], x, (65, 65), attrs["step"],
                             attrs["offset"] or (0, 0))


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_default_blocks_grow_where_the_maps_are_small(stride):
    """About 1024 input pixels a side where a block's maps are large (output stride 1), up
    to 4096 where they stay under GROW_BYTES (coarse strides): fewer halos to recompute; a
    memory budget still shrinks them."""
    from econv_convert.run.resources import estimate_bytes

    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    meta = densify(loaded.model, loaded.input_shape, global_pool="window",
                   output_stride=stride if stride > 1 else None).econv
    geo = scene.geometry(meta)
    image = (3, 20000, 20000)
    size = scene.block_size(meta, geo, image, None, 64 * 2**30, 1)
    pixels = size * geo.step[0]
    window = [1, 3, *(pixels + h + t for h, t in zip(geo.halo, geo.halo_after))]
    assert 1024 <= pixels <= 4096 and estimate_bytes(meta, window) <= max(
        scene.GROW_BYTES, estimate_bytes(meta, [1, 3, *(1024 + h + t for h, t in
                                                        zip(geo.halo, geo.halo_after))]))
    assert (pixels == 1024) == (stride == 1)
    small = scene.block_size(meta, geo, image, None, estimate_bytes(meta, window) // 2, 1)
    assert small < size
