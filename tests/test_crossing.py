"""Every command reads every file the others write.

A baseline of each kind (``.pt``, safetensors + ``--arch``, ``.onnx``) is densified to each
output (``.pt``, ``.pt2``, ``.onnx``), plain, with ``--output-stride`` and with ``--until``;
then ``verify``, ``inverse``, ``inspect``, ``bench`` and ``predict`` run on the result. Each
either works (and what it writes is checked: predictions against one whole-image pass of the
dense model, inverse against the dense model by the command itself) or refuses with exit 2 and
one line that says why: never exit 3, never a traceback, never an unpickling message.

The plain row runs in CI; the option rows are ``extended`` (they add a minute).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import FIXTURES, whole
from typer.testing import CliRunner

from econv_convert.cli import app
from econv_convert.torch.storage import load_dense

BASELINES = {
    "pt": [FIXTURES / "patch_classifier.pt"],
    "safetensors": [FIXTURES / "patch_classifier.safetensors", "--arch",
                    "econv_convert.examples:patch_classifier", "--input-shape", "1,3,64,64"],
    "onnx": [FIXTURES / "patch_classifier.onnx"],
}
UNTIL = {"pt": "3", "safetensors": "3", "onnx": "/3/MaxPool_output_0"}
OPTIONS = {"plain": [], "os2": ["--output-stride", "2"], "until": ["--until"]}
OUTPUTS = (".pt", ".pt2", ".onnx")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    message = (result.stderr or "").strip()
    assert result.exit_code in (0, 2), f"{args}: exit {result.exit_code}: {message}"
    if result.exit_code == 2:
        last = message.splitlines()[-1]
        assert last.startswith("error: ") and "Traceback" not in message, message
        assert "npickl" not in message and "internal error" not in message, message
    return result.exit_code, message


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    a = (np.random.default_rng(0).random((150, 141, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "image.npy"
    np.save(path, a)
    return a, path


def cells(extended: bool):
    for base, option, out in itertools.product(BASELINES, OPTIONS, OUTPUTS):
        marks = [pytest.mark.extended] if option != "plain" else []
        if (option != "plain") == extended:
            yield pytest.param(base, option, out, id=f"{base}-{option}-{out[1:]}", marks=marks)


@pytest.mark.parametrize("base,option,out", [*cells(False), *cells(True)])
def test_every_command_reads_what_densify_writes(tmp_path, image, base, option, out):
    a, picture = image
    options = [*OPTIONS[option], *([UNTIL[base]] if option == "until" else [])]
    dense = tmp_path / f"dense{out}"
    code, message = cli("densify", *BASELINES[base], "-o", dense, *options)
    if base == "onnx" and out != ".onnx":
        assert code == 2 and "must end in .onnx" in message
        return
    assert code == 0, message
    arch = BASELINES[base][1:]
    cli("verify", BASELINES[base][0], "--dense", dense, *arch)
    cli("inspect", dense)
    cli("bench", dense, "--runs", "1")
    target = tmp_path / f"baseline{'.onnx' if out == '.onnx' else '.pt'}"
    cli("inverse", dense, "-o", target)
    code, message = cli("predict", dense, picture, "-o", tmp_path / "p.npy", "--workers", "0")
    if code == 0:
        got = np.load(tmp_path / "p.npy")
        assert np.isfinite(got).all()
        if out == ".pt":
            expected = whole(load_dense(dense), a)
            np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-5,
                                       atol=1e-5)
    else:
        assert out == ".pt2" and "dense .pt" in message
