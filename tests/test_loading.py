"""Loading is safe by default: weights only, no code from the file, one-line errors."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import FIXTURES

from econv_convert import InvalidInputError, InvalidModelError, UnsafeCheckpointError
from econv_convert.torch.loading import build_arch, load_model, parse_kwargs, parse_shape


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def write_evil(path, target):
    torch.save({"state_dict": {}, "payload": _Payload(str(target))}, path)


def test_code_in_a_checkpoint_never_runs_without_trust_pickle(tmp_path):
    target = tmp_path / "pwned"
    write_evil(tmp_path / "evil.pt", target)
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        load_model(tmp_path / "evil.pt")
    assert not target.exists()


def test_trust_pickle_really_unpickles(tmp_path):
    target = tmp_path / "pwned"
    write_evil(tmp_path / "evil.pt", target)
    with pytest.raises(InvalidInputError):
        load_model(tmp_path / "evil.pt", trust_pickle=True)  # runs, then is not a model
    assert target.exists()


def test_whole_pickled_module_needs_trust_pickle(tmp_path):
    model = build_arch("econv_convert.examples:patch_classifier")
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_model(tmp_path / "whole.pt")
    assert load_model(tmp_path / "whole.pt", trust_pickle=True).model is not None


def test_state_dict_with_arch(tmp_path):
    state = torch.load(FIXTURES / "patch_classifier.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "sd.pth")
    with pytest.raises(InvalidInputError, match="arch=MODULE:CALLABLE"):
        load_model(tmp_path / "sd.pth")
    loaded = load_model(tmp_path / "sd.pth", arch="econv_convert.examples:patch_classifier")
    assert not loaded.model.training


def test_safetensors_with_arch():
    loaded = load_model(FIXTURES / "patch_classifier.safetensors",
                        arch="econv_convert.examples:patch_classifier",
                        arch_kwargs={"num_classes": 3})
    assert loaded.model[-1].out_features == 3


@pytest.mark.parametrize("arch,match", [
    ("nomodule_xyz:f", "cannot import module"),
    ("econv_convert.examples", "MODULE:CALLABLE"),
    ("econv_convert.examples:nothing", "has no 'nothing'"),
    ("econv_convert.core.lattice:PLAIN", "has no"),
    ("econv_convert.core.layout:PLAIN", "not callable"),
    ("econv_convert.core.lattice:tight", "failed"),
], ids=["not-importable", "no-colon", "missing-attr", "missing-attr-2", "not-callable",
        "call-fails"])
def test_arch_errors(arch, match):
    with pytest.raises((InvalidInputError, InvalidModelError), match=match):
        build_arch(arch)


def test_arch_that_returns_no_module():
    with pytest.raises(InvalidInputError, match="not a torch.nn.Module"):
        build_arch("econv_convert.core.lattice:Field")


def test_weights_that_do_not_fit_the_arch(tmp_path):
    state = torch.load(FIXTURES / "patch_classifier.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(InvalidInputError, match=r"shape mismatch 16\.bias \(3,\) vs \(7,\)"):
        load_model(tmp_path / "sd.pt", arch="econv_convert.examples:patch_classifier",
                   arch_kwargs={"num_classes": 7})


def test_input_shape():
    assert parse_shape("1,3,8,8") == [1, 3, 8, 8]
    assert parse_shape("2x3x9") == [2, 3, 9]


@pytest.mark.parametrize("text", ["1,3", "a,b,c,d", "1,3,0,4", "1,3,4,4,4,4"])
def test_bad_input_shapes(text):
    with pytest.raises(InvalidInputError, match="input_shape="):
        parse_shape(text)


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_bad_arch_kwargs(text):
    with pytest.raises(InvalidInputError, match="arch_kwargs="):
        parse_kwargs(text)
