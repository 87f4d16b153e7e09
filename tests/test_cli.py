"""The command line, end to end on the fixtures, through Typer's runner."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES
from typer.testing import CliRunner

from econv_convert import __version__, lattice_view, load_dense
from econv_convert.cli import app
from econv_convert.examples import patch_classifier, tiny_resnet

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    assert run("--version").stdout.strip() == f"econv-convert {__version__}"
    for cmd in ("densify", "verify", "inverse", "inspect"):
        result = run(cmd, "-h")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_densify_default_model_prints_the_report(tmp_path):
    result = run("densify", "-o", tmp_path / "dense.pt")
    assert result.exit_code == 0, result.stderr
    assert "fc_to_conv" in result.stdout and "equivalent" in result.stdout
    dense = load_dense(tmp_path / "dense.pt")
    # the default fixture is a 65 x 65 patch classifier: on a larger image, a map of predictions
    assert dense(torch.randn(1, 3, 97, 90)).shape == (1, 3, 33, 25)


def test_densify_json_is_machine_readable():
    result = run("densify", FIXTURES / "tiny_resnet.pt", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verification"]["ok"] and data["dense"]["total_step"] == [16, 16]
    assert data["output"] is None and data["dense"]["layers"][0]["kind"] == "conv"


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_densify_exports_with_dynamic_spatial_axes(tmp_path, suffix):
    out = tmp_path / f"dense{suffix}"
    result = run("densify", FIXTURES / "tiny_resnet.pt", "-o", out, "--global-pool", "lattice")
    assert result.exit_code == 0, result.stderr
    assert "export re-run" in result.stdout
    baseline = tiny_resnet().eval()
    baseline.load_state_dict(torch.load(FIXTURES / "tiny_resnet.pt")["state_dict"])
    x = torch.randn(1, 3, 77, 59)  # neither the example size nor the traced one
    if suffix == ".pt2":
        got = torch.export.load(out).module()(x)
    else:
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, baseline(x), rtol=1e-4, atol=1e-5)


def test_densify_until_gives_a_feature_extractor(tmp_path):
    result = run("densify", FIXTURES / "tiny_resnet.pt", "--until", "layer2", "-o",
                 tmp_path / "f.pt")
    assert result.exit_code == 0, result.stderr
    dense = load_dense(tmp_path / "f.pt")
    assert dense(torch.randn(1, 3, 64, 64)).shape == (1, 32, 65, 65)


def test_verify_in_memory_and_saved(tmp_path):
    assert run("verify", FIXTURES / "tiny_vgg.pt").exit_code == 0
    run("densify", FIXTURES / "tiny_vgg.pt", "-o", tmp_path / "d.pt")
    result = run("verify", FIXTURES / "tiny_vgg.pt", "--dense", tmp_path / "d.pt", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["verification"]["ok"]


def test_verify_fails_with_exit_1_and_says_where(tmp_path):
    run("densify", FIXTURES / "patch_classifier.pt", "-o", tmp_path / "d.pt")
    payload = torch.load(FIXTURES / "patch_classifier.pt", weights_only=True)
    payload["state_dict"]["4.weight"] = payload["state_dict"]["4.weight"] * 1.1
    torch.save(payload, tmp_path / "other.pt")
    result = run("verify", tmp_path / "other.pt", "--dense", tmp_path / "d.pt")
    assert result.exit_code == 1
    assert "NOT equivalent" in result.stdout and "output at" in result.stdout


def test_inverse_writes_baseline_weights(tmp_path):
    run("densify", FIXTURES / "patch_classifier.pt", "-o", tmp_path / "d.pt")
    dense = load_dense(tmp_path / "d.pt")
    with torch.no_grad():  # fine-tuning stand-in
        for p in dense.parameters():
            p.mul_(0.9)
    from econv_convert import save_dense
    save_dense(dense, tmp_path / "tuned.pt")
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"base{suffix}"
        result = run("inverse", tmp_path / "tuned.pt", "-o", out)
        assert result.exit_code == 0, result.stderr
        if suffix == ".pt":
            state = torch.load(out, weights_only=True)
        else:
            from safetensors.torch import load_file
            state = load_file(out)
        model = patch_classifier().eval()
        model.load_state_dict(state)
        x = torch.randn(2, 3, 65, 65)
        torch.testing.assert_close(model(x), lattice_view(dense, dense(x)), rtol=1e-4,
                                   atol=1e-5)


def test_inspect_shows_costs():
    result = run("inspect", FIXTURES / "tiny_resnet.pt", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["dense_macs"] > plan["baseline_macs"] > 0
    last = plan["layers"][-2]
    assert last["field"] == [97, 97] and last["step_out"] == [16, 16]


# -- errors: exit 2, one line on stderr, nothing written --------------------------------------

BAD = {
    "missing-file": (lambda p: ["densify", p / "nope.pt"], "no such file"),
    "directory": (lambda p: ["densify", p], "is a directory"),
    "empty-file": (lambda p: (p / "e.pt").touch() or ["densify", p / "e.pt"], "empty"),
    "random-bytes-pt": (lambda p: (p / "r.pt").write_bytes(b"\x13\x37" * 50) and
                        ["densify", p / "r.pt"], "not a PyTorch checkpoint"),
    "random-bytes-safetensors": (lambda p: (p / "r.safetensors").write_bytes(b"\x13" * 64) and
                                 ["densify", p / "r.safetensors", "--arch",
                                  "econv_convert.examples:patch_classifier"],
                                 "not a valid safetensors"),
    "unknown-suffix": (lambda p: (p / "m.h5").write_bytes(b"x") and ["densify", p / "m.h5"],
                       "unknown model file type"),
    "bad-output-suffix": (lambda p: ["densify", "-o", p / "out.txt"], "must end in"),
    "missing-output-folder": (lambda p: ["densify", "-o", p / "no" / "d.pt"], "does not exist"),
    "bad-input-shape": (lambda p: ["densify", "--input-shape", "1,3"], "--input-shape"),
    "bad-arch": (lambda p: ["densify", FIXTURES / "patch_classifier.safetensors", "--arch",
                            "nope_nope:f"], "cannot import"),
    "until-unknown": (lambda p: ["densify", "--until", "layer9"], "no module named 'layer9'"),
    "inverse-of-baseline": (lambda p: ["inverse", FIXTURES / "tiny_vgg.pt", "-o", p / "b.pt"],
                            "not a dense checkpoint"),
    "output-is-input": (lambda p: ["densify", FIXTURES / "tiny_vgg.pt", "-o",
                                   FIXTURES / "tiny_vgg.pt"], "overwrite the input"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    make_args, match = BAD[case]
    args = make_args(tmp_path)  # may create the bad input file
    before = sorted(tmp_path.rglob("*"))
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert match in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unsupported_layer_exits_2_naming_the_node(tmp_path, monkeypatch):
    (tmp_path / "upsampler_model.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.Upsample(scale_factor=2))\n")
    monkeypatch.chdir(tmp_path)
    state = {"0.weight": torch.randn(4, 3, 3, 3), "0.bias": torch.randn(4)}
    torch.save({"state_dict": state, "arch": "upsampler_model:build",
                "input_shape": [1, 3, 32, 32]}, tmp_path / "up.pt")
    result = run("densify", tmp_path / "up.pt", "-o", tmp_path / "d.pt")
    assert result.exit_code == 2
    assert "node '1'" in result.stderr and "Upsample" in result.stderr
    assert not (tmp_path / "d.pt").exists()


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "densify", "nope.pt"])
    assert result.exit_code != 0 and result.exception is not None


def test_library_messages_name_api_arguments_and_the_cli_shows_flags():
    """The library names options as the API arguments they are (``output_stride=3``); the
    command line shows its own flags for them (``--output-stride 3``), brackets and all."""
    from econv_convert import densify
    from econv_convert.errors import InvalidInputError
    from econv_convert.report import cli_words
    from econv_convert.torch.loading import load_model

    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    with pytest.raises(InvalidInputError, match=r"output_stride=3 cannot be reached"):
        densify(loaded.model, loaded.input_shape, output_stride=3)
    result = run("densify", FIXTURES / "tiny_resnet.pt", "--output-stride", "3", "--no-verify")
    assert result.exit_code == 2
    assert "--output-stride 3 cannot be reached" in result.stderr
    assert "output_stride=" not in result.stderr
    assert cli_words("give input_shape=... or force=True; until=layer3 [1, 2]") == (
        "give --input-shape or --force; --until layer3 [1, 2]")
    assert cli_words("model(NAME=x), x.until=1") == "model(NAME=x), x.until=1"
