"""Patterns of real library code (``library_style.py``) that our own family models never
showed: each densifies and verifies, or is refused for a true reason."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import rand_bn
from econv_convert import densify, verify
from econv_convert.cli import app
from econv_convert.loading import load_model
from library_style import FeaturesThenInplace, VersionedNet


def test_verify_with_until_is_not_fooled_by_an_in_place_op_after_the_cut():
    torch.manual_seed(0)
    model = rand_bn(FeaturesThenInplace())
    dense = densify(model, (1, 3, 33, 33), until="features")
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.max_rel < 1e-5


# -- state dicts that carry module versions (MNASNet-style loading) ---------------------------


@pytest.fixture
def versioned(tmp_path):
    torch.manual_seed(0)
    model = rand_bn(VersionedNet())
    path = tmp_path / "versioned.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("wrap", [False, True], ids=["state-dict", "checkpoint-dict"])
def test_state_dict_versions_survive_densify_and_inverse(versioned, tmp_path, wrap):
    model, path = versioned
    if wrap:
        torch.save({"state_dict": model.state_dict(), "arch": "library_style:VersionedNet",
                    "input_shape": [1, 3, 32, 32]}, path)
        args = []
    else:
        args = ["--arch", "library_style:VersionedNet", "--input-shape", "1,3,32,32"]
    result = _run("densify", path, "-o", tmp_path / "dense.pt", *args)
    assert result.exit_code == 0, result.output
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"back{suffix}"
        result = _run("inverse", tmp_path / "dense.pt", "-o", out)
        assert result.exit_code == 0, result.output
        state = load_model(out, arch="library_style:VersionedNet").model.state_dict()
        fresh = VersionedNet()
        fresh.load_state_dict(state)  # the model's own loader finds version 2
        for k, v in model.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[k], v)


def test_an_exception_in_the_models_own_loading_code_is_a_model_error(versioned, tmp_path):
    model, path = versioned
    torch.save(dict(model.state_dict()), path)  # a plain dict: no version metadata
    result = _run("densify", path, "--arch", "library_style:VersionedNet")
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    assert "module '(the model itself)' (VersionedNet)" in result.output
    assert "version should be set to 1 or 2 instead of None" in result.output
