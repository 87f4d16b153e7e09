"""Bad input gets one clear line and exit 2, nothing is lost or half-written, no code runs
from a checkpoint by default, outputs are reproducible, and runs that would not fit in memory
are refused before they start."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from econv_convert import EConvError, load_dense, save_dense
from econv_convert.cli import app
from econv_convert.torch import api, ops
from econv_convert.torch.loading import load_model

runner = CliRunner()
FIXTURE_BYTES = (FIXTURES / "patch_classifier.pt").read_bytes()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


# -- the rest of the bad-input catalogue ------------------------------------------------------

def test_truncated_checkpoint(tmp_path):
    (tmp_path / "t.pt").write_bytes(FIXTURE_BYTES[: len(FIXTURE_BYTES) // 2])
    assert "t.pt" in one_line_error(run("densify", tmp_path / "t.pt"))


@pytest.mark.parametrize("suffix", [".pt2", ".pth", ".ckpt", ".onnx"])
def test_random_bytes_with_each_extension(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(os.urandom(256))
    assert path.name in one_line_error(run("densify", path))


def test_input_smaller_than_the_receptive_field():
    err = one_line_error(run("densify", "--input-shape", "1,3,20,20"))
    assert "fails on an input of shape (1, 3, 20, 20)" in err


def test_untraceable_control_flow_gets_a_hint(tmp_path, monkeypatch):
    (tmp_path / "branchy.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = nn.Conv2d(3, 3, 3, 2)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x) if x.sum() > 0 else x\n")
    monkeypatch.chdir(tmp_path)
    torch.save(torch.nn.Conv2d(3, 3, 3, 2).state_dict(), tmp_path / "w.pt")
    state = {f"conv.{k}": v for k, v in torch.load(tmp_path / "w.pt").items()}
    torch.save(state, tmp_path / "w.pt")
    err = one_line_error(run("densify", tmp_path / "w.pt", "--arch", "branchy:Net"))
    assert "cannot trace" in err and "control flow" in err
    # both captures were tried, and the message says what to do
    assert "torch.export fails too" in err and "values of a tensor" in err and "--until" in err


def test_state_dict_with_missing_and_unexpected_keys(tmp_path):
    state = torch.load(FIXTURES / "patch_classifier.pt", weights_only=True)["state_dict"]
    state["extra.weight"] = torch.zeros(1)
    del state["0.weight"]
    torch.save(state, tmp_path / "sd.pt")
    err = one_line_error(run("densify", tmp_path / "sd.pt", "--arch",
                             "econv_convert.examples:patch_classifier"))
    assert "missing 0.weight" in err and "unexpected extra.weight" in err


def test_inverse_of_weights_that_do_not_fit_the_baseline(tmp_path):
    assert run("densify", "-o", tmp_path / "d.pt").exit_code == 0
    payload = torch.load(tmp_path / "d.pt", weights_only=True)
    payload["state_dict"]["13.bias"] = torch.zeros(65)  # fine-tuned into another shape
    torch.save(payload, tmp_path / "bad.pt")
    err = one_line_error(run("inverse", tmp_path / "bad.pt", "-o", tmp_path / "b.pt"))
    assert "13.bias" in err
    assert not (tmp_path / "b.pt").exists()


def test_memory_guard_refuses_with_the_estimate(monkeypatch):
    monkeypatch.setattr("econv_convert.run.resources.available_bytes", lambda: 1024)
    err = one_line_error(run("densify", FIXTURES / "tiny_resnet.pt"))
    assert "GiB" in err and "--force" in err and "largest map" in err
    assert run("densify", FIXTURES / "tiny_resnet.pt", "--force").exit_code == 0


# -- nothing lost -----------------------------------------------------------------------------

def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "dense.pt"
    target.write_bytes(b"previous version")
    dense = api.densify(load_model(FIXTURES / "tiny_vgg.pt").model, (1, 3, 64, 64))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_dense(dense, target)
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]


def test_a_failed_verification_writes_nothing(tmp_path, monkeypatch):
    real = ops.dense_window

    def shifted(w, step):  # a deliberately broken rule: one position too much padding
        d = real(w, step)
        return dataclasses.replace(d, pad_lo=d.pad_lo + 1)

    monkeypatch.setattr(ops, "dense_window", shifted)
    out = tmp_path / "d.pt"
    result = run("densify", "-o", out)
    assert result.exit_code == 1 and "NOT equivalent" in result.stdout
    assert not out.exists()
    assert run("densify", "-o", out, "--allow-mismatch").exit_code == 1
    assert out.exists()


def test_the_input_is_never_modified(tmp_path):
    before = (FIXTURES / "patch_classifier.pt").read_bytes()
    run("densify", FIXTURES / "patch_classifier.pt", "-o", tmp_path / "d.pt")
    assert (FIXTURES / "patch_classifier.pt").read_bytes() == before


# -- reproducibility --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_the_same_command_writes_identical_bytes(tmp_path, suffix):
    for name in ("a", "b"):
        assert run("densify", FIXTURES / "tiny_vgg.pt", "-o", tmp_path / f"{name}{suffix}",
                   "--json").exit_code == 0
    assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_inverse_writes_identical_bytes(tmp_path):
    run("densify", "-o", tmp_path / "d.pt")
    for name in ("a", "b"):
        assert run("inverse", tmp_path / "d.pt", "-o", tmp_path / f"{name}.safetensors",
                   "--json").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.integers(1, len(FIXTURE_BYTES))))
def test_corrupted_checkpoints_end_in_a_clear_error(tmp_path, edits, cut):
    data = _mutate(FIXTURE_BYTES, edits)[:cut]
    path = tmp_path / "fuzz.pt"
    path.write_bytes(data)
    try:
        load_model(path)
    except EConvError as e:
        assert "\n" not in str(e)


class _Payload(dict):
    def __repr__(self) -> str:  # keeps hypothesis' failure reports short
        return "<dense checkpoint payload>"


@pytest.fixture(scope="module")
def dense_payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "d.pt"
    save_dense(api.densify(load_model(FIXTURES / "tiny_resnet.pt").model, (1, 3, 64, 64)), path)
    return _Payload(torch.load(path, weights_only=True))


NODE_FIELDS = ["op", "target", "args", "kwargs", "name"]
VALUES = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=12),
                   st.sampled_from(["os.system", "builtins.eval", "torch.load", "torch.save",
                                    "call_module", "get_attr", "x", "conv", {"$n": "nowhere"},
                                    {"$fn": "subprocess.run"}, {"$zz": 1}, [1, {"$t": [2]}]]))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(NODE_FIELDS), VALUES),
                      min_size=1, max_size=4))
def test_mutated_dense_graphs_end_in_a_clear_error(tmp_path, dense_payload, edits):
    graph = json.loads(dense_payload["graph"])
    for index, key, value in edits:
        node = graph["nodes"][index % len(graph["nodes"])]
        node[key] = value
    payload = dict(dense_payload, graph=json.dumps(graph))
    path = tmp_path / "mutated.pt"
    torch.save(payload, path)
    try:
        load_dense(path)
    except EConvError as e:
        assert "\n" not in str(e)
