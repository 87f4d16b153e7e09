"""The OME-Zarr output's pyramid: the levels the blocks write themselves and the coarsest ones
built at the end, against a pyramid computed here from the whole level 0."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from econv_convert.errors import OutputWriteError
from econv_convert.run import ngff


def reference_levels(level0: np.ndarray, count: int) -> list[np.ndarray]:
    """Each level the mean of the numbers among 2 x 2 of the level above (NaN where none),
    odd last rows and columns dropped, written out per quad."""
    levels = [level0]
    for _ in range(count - 1):
        a = levels[-1]
        h, w = a.shape[1] // 2 * 2, a.shape[2] // 2 * 2
        quads = np.stack([a[:, i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)])
        n = np.isfinite(quads).sum(0)
        total = np.where(np.isfinite(quads), quads, 0).sum(0)
        levels.append(np.where(n > 0, total / np.maximum(n, 1), np.nan).astype(np.float32))
    return levels


@pytest.mark.parametrize("ngff_version", ngff.VERSIONS)
@pytest.mark.parametrize("chunk,written", [(16, 2), (32, 1), (64, 0)])
def test_every_level_and_its_labels_equal_a_pyramid_of_the_whole_level0(
        tmp_path, monkeypatch, chunk, written, ngff_version):
    """Blocks of 64 (edge blocks of odd size, two blocks never written: NaN), levels down to
    20 pixels a side; the blocks write ``written`` levels past 0, the rest come at the end."""
    monkeypatch.setattr(ngff, "SMALLEST", 20)
    monkeypatch.setattr(ngff, "SMALLEST_CHUNK", chunk)
    shape, block = (3, 203, 157), (64, 64)
    assert ngff.block_levels(shape, block) == written
    path = tmp_path / "o.zarr"
    ngff.create(path, shape, block, {}, ngff_version)
    rng = np.random.default_rng(0)
    whole = np.full(shape, np.nan, np.float32)
    for y in range(0, shape[1], block[0]):
        for x in range(0, shape[2], block[1]):
            if (y, x) in ((64, 0), (128, 128)):
                continue  # skipped as background
            part = rng.standard_normal((3, min(64, shape[1] - y), min(64, shape[2] - x)))
            part = part.astype(np.float32)
            if (y, x) == (0, 64):
                part[:, 5, 7] = np.nan  # an output that is not a number in a computed block
            whole[:, y:y + part.shape[1], x:x + part.shape[2]] = part
            ngff.write_block(path, (slice(None), slice(y, y + part.shape[1]),
                                    slice(x, x + part.shape[2])), part)
    count = ngff.finish(path, ngff=ngff_version, scale=[0.5, 0.5], translation=[0, 0],
                        unit="micrometer", name="o")
    expected = reference_levels(whole, count)
    assert [e.shape[1:] for e in expected] == [(203, 157), (101, 78), (50, 39), (25, 19),
                                               (12, 9)]
    group = zarr.open_group(str(path), mode="r")
    for k, e in enumerate(expected):
        got = group[str(k)][:]
        np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-6)
        assert np.array_equal(np.isnan(got), np.isnan(e))
        valid = np.isfinite(e).all(axis=0)
        classes = np.where(valid, np.nan_to_num(e, nan=-np.inf).argmax(0) + 1, 0)
        np.testing.assert_array_equal(group[f"labels/classes/{k}"][:], classes)
        if k <= written:  # written by the blocks: one chunk per block
            assert group[str(k)].chunks[1:] == (64 >> k, 64 >> k)
    assert ngff.coarsest(path).shape == (3, 12, 9)


def test_a_blocks_marker_reaches_the_disk_after_its_chunks_and_errors_surface(
        tmp_path, monkeypatch):
    """Chunks go to the disk in a thread of their own; a block's ``then`` (its resume
    marker) runs after them, and a failed write is raised in the caller's thread (by a later
    write or by ``close``), its marker never written."""
    path = tmp_path / "o.zarr"
    ngff.create(path, (3, 128, 64), (64, 64), {}, "0.5")
    part = np.random.default_rng(0).standard_normal((3, 64, 64)).astype(np.float32)
    done = []
    with ngff.BlockWriter(path) as writer:
        writer.write((slice(None), slice(0, 64), slice(0, 64)), part,
                     then=lambda: done.append(zarr.open_array(str(path / "0"))[:, :64, :64]))
    np.testing.assert_array_equal(done[0], part)  # on disk when the marker came

    real = ngff._put

    def full_disk(target, value):
        if "/0/c/1/" in str(target).replace("\\", "/"):
            raise OSError(28, "No space left on device")
        return real(target, value)

    monkeypatch.setattr(ngff, "_put", full_disk)
    marker = tmp_path / "marker"
    writer = ngff.BlockWriter(path)
    with pytest.raises(OutputWriteError, match="No space.*resume=True"):  # a later write,
        # or at the latest close
        try:
            writer.write((slice(None), slice(64, 128), slice(0, 64)), part, then=marker.touch)
        finally:
            writer.close()
    assert not marker.exists()


def test_the_writer_compresses_on_every_core_and_gives_the_setting_back(tmp_path):
    """Blosc threads from zarr's own threads while a writer is open (a process-wide numcodecs
    setting), the caller's setting back after, whatever it was."""
    import numcodecs.blosc

    path = tmp_path / "o.zarr"
    ngff.create(path, (3, 64, 64), (64, 64), {}, "0.5")
    part = np.random.default_rng(0).standard_normal((3, 64, 64)).astype(np.float32)
    for before in (None, False):
        numcodecs.blosc.use_threads = before
        try:
            with ngff.BlockWriter(path) as writer:
                assert numcodecs.blosc.use_threads is True
                writer.write((slice(None), slice(0, 64), slice(0, 64)), part)
            assert numcodecs.blosc.use_threads is before
        finally:
            numcodecs.blosc.use_threads = None
    np.testing.assert_array_equal(zarr.open_array(str(path / "0"))[:], part)


def test_a_full_disk_is_a_one_line_refusal_naming_resume(tmp_path, monkeypatch):
    """predict into a disk that fills up: exit 2 and one line that says what to do, not an
    internal error; the output stays incomplete (``complete`` false) for ``--resume``."""
    from conftest import FIXTURES
    from typer.testing import CliRunner

    from econv_convert.cli import app

    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)

    def full_disk(target, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ngff, "_put", full_disk)
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(app, ["predict", str(FIXTURES / "tiny_resnet.pt"),
                                      str(tmp_path / "image.npy"), "-o", str(out),
                                      "--workers", "0", "--mask", "none", "--no-verify"])
    assert result.exit_code == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "No space left" in errors[0] and "--resume" in errors[0]
    assert ngff.record(out) is not None and not ngff.record(out).get("complete")
