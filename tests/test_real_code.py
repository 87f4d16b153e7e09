"""Patterns of real library code (``library_style.py``) that our own family models never
showed: each densifies and verifies, or is refused for a true reason."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rand_bn
from library_style import (
    BackboneOutput,
    ClassifierOutput,
    FeaturesThenInplace,
    KeywordBackbone,
    KeywordClassifier,
    SamePaddingNet,
    SizeBranchNet,
    SpaceToDepthNet,
    TextAndImageModel,
    TFPortNet,
    VersionedNet,
    WrappedLeafNet,
    conv_bn,
)
from typer.testing import CliRunner

from econv_convert import EConvError, densify, load_dense, save_dense, verify
from econv_convert.cli import app
from econv_convert.torch.loading import load_model


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


# -- a TF-ported net: computed asymmetric ZeroPad2d before strided depthwise convolutions, and
# a pooler whose kernel is the hidden width (2560), far larger than its input -------------------


@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_a_pool_larger_than_its_input_is_a_global_pool(mode):
    torch.manual_seed(0)
    model = rand_bn(TFPortNet(hidden_dim=2560))
    dense = densify(model, (1, 3, 96, 96), global_pool=mode)
    assert dense.econv.total_step == (16, 16)  # not 16 x 2560: the pool is global
    assert any("reads all of its" in n for n in dense.econv.notes)
    report = verify(model, dense)
    assert report.ok, report.failures()


def test_past_the_pools_kernel_the_dense_model_stops():
    torch.manual_seed(0)
    model = rand_bn(TFPortNet(hidden_dim=8))  # the pool covers a map of up to 8 positions
    dense = densify(model, (1, 3, 64, 64))
    with torch.no_grad():
        dense(torch.randn(1, 3, 120, 120))  # 8 positions on the pool's lattice
        with pytest.raises(RuntimeError, match="pooler.*more than its kernel of 8 covers"):
            dense(torch.randn(1, 3, 140, 140))


def test_past_the_pools_kernel_both_backends_stop_and_a_block_says_so():
    """The same decision on both paths: a pool that covered its map at the example stops the
    run past its kernel, never a number: PyTorch raises SizeNotCovered, the dense ONNX graph
    fails (its guard), econv-convert's own ONNX runs raise SizeNotCovered in the same words,
    and a block of predict past it is an input error in one line."""
    import numpy as np
    import onnxruntime as ort
    from onnx_graphs import export

    from econv_convert import onnx_api
    from econv_convert.errors import SizeNotCovered
    from econv_convert.onnx.model import _session, run

    torch.manual_seed(0)
    model = rand_bn(TFPortNet(hidden_dim=8)).eval()
    graph = export(model, (1, 3, 64, 64))
    dense_onnx = onnx_api.densify(graph)
    dense = densify(model, (1, 3, 64, 64))
    session = _session(dense_onnx)
    name = session.get_inputs()[0].name
    fits, past = np.random.rand(1, 3, 120, 120), np.random.rand(1, 3, 140, 140)
    got = run(session, None, {name: fits.astype(np.float32)})[0]
    with torch.no_grad():
        want = dense(torch.from_numpy(fits).float()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(SizeNotCovered, match="too large for this dense model.*kernel of 8"):
        run(session, None, {name: past.astype(np.float32)})
    with pytest.raises(SizeNotCovered, match="too large for this dense model.*kernel of 8"):
        dense(torch.from_numpy(past).float())
    raw = ort.InferenceSession(dense_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="econv_past_cover"):  # a bare runtime stops too
        raw.run(None, {name: past.astype(np.float32)})
    # predict's blocks: a size the dense model does not cover is the user's to fix, in one line
    from econv_convert.errors import InvalidInputError
    from econv_convert.run import blocks
    from econv_convert.run.sources import InMemorySource

    job = blocks.Job(None, None, "", (3, 400, 400), (200, 200), (1, 1), (1, 1), (8, 8))

    def stops(x):
        raise SizeNotCovered(past_cover("pooler", [8], 9))

    from econv_convert.core.rules.window import past_cover

    with pytest.raises(InvalidInputError, match=r"block \(0, 1\) .*too large.*block=") as e:
        blocks.block_output(job, (0, 1), InMemorySource(np.zeros((3, 400, 400), np.float32)),
                            stops)
    assert "\n" not in str(e.value)


def test_the_memory_guard_names_the_size_it_checked(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "tf.pt"
    torch.save({"state_dict": rand_bn(TFPortNet(hidden_dim=2560)).state_dict(),
                "arch": "library_style:TFPortNet", "arch_kwargs": {"hidden_dim": 2560}}, path)
    result = _run("densify", path, "--input-shape", "1,3,96,96", "--no-verify")
    assert result.exit_code == 0, result.output  # nothing is run, nothing to refuse
    monkeypatch.setattr("econv_convert.run.resources.available_bytes", lambda: 2**20)
    result = _run("densify", path, "--input-shape", "1,3,96,96")
    assert result.exit_code == 2
    assert "input 2x3x" in result.output and "the largest input the equivalence check runs" \
        in result.output


def test_onnx_a_pool_larger_than_its_input_is_a_global_pool():
    from onnx_graphs import export

    from econv_convert import onnx_api

    torch.manual_seed(0)
    graph = export(rand_bn(TFPortNet(hidden_dim=2560)), (1, 3, 96, 96))
    dense = onnx_api.densify(graph)
    meta = onnx_api.info(dense)
    assert meta.total_step == (16, 16)
    report = onnx_api.verify(graph, dense)
    assert report.ok, report.failures()


# -- capture: fx leaves traced through; torch.export when fx cannot trace ---------------------


def test_functions_registered_as_fx_leaves_are_traced_through():
    torch.manual_seed(0)
    model = rand_bn(WrappedLeafNet())
    dense = densify(model, (1, 3, 32, 32))
    assert dense.econv.capture == "torch.fx"
    assert verify(model, dense).ok


@pytest.mark.parametrize("style", ["helper", "inline"])
def test_tf_same_padding_computed_in_forward_is_computed_when_the_dense_model_runs(style):
    """The padding is a function of the baseline's size at that layer, which the dense graph
    knows from its own size and step: exact at every size, odd and even."""
    torch.manual_seed(0)
    model = rand_bn(SamePaddingNet(style))
    dense = densify(model, (1, 3, 32, 32))
    assert dense.econv.capture == "torch.export"
    report = verify(model, dense, shapes=[(2, 3, h, w) for h, w in
                                          [(32, 32), (33, 31), (35, 40), (17, 18), (64, 61)]])
    assert report.ok and len([c for c in report.checked if c.check == "lattice"]) == 5, \
        report.failures()


def test_padding_chosen_by_branches_on_sizes_covers_the_examples_branch_and_says_so():
    """Branches on the size modulo a stride: the captured graph holds for sizes that take the
    example's branches; others are refused when run, never computed wrongly."""
    from econv_convert.torch.ops import SizeNotCovered

    torch.manual_seed(0)
    model = rand_bn(SamePaddingNet("branches"))
    dense = densify(model, (1, 3, 32, 32))
    report = verify(model, dense, shapes=[(2, 3, 32, 32), (2, 3, 36, 40), (2, 3, 33, 32)])
    assert report.ok and len([c for c in report.checked if c.check == "lattice"]) == 2, \
        report.failures()
    (skipped,) = [c for c in report.cases if c.skipped]
    assert skipped.shape == (2, 3, 33, 32) and "another branch at this size" in skipped.detail
    with pytest.raises(SizeNotCovered):
        dense(torch.randn(1, 3, 33, 32))


def test_python_control_flow_on_sizes_falls_back_to_torch_export():
    torch.manual_seed(0)
    model = rand_bn(SizeBranchNet())
    dense = densify(model, (1, 3, 32, 32))
    assert dense.econv.capture == "torch.export"
    assert any("torch.fx could not capture the model" in n and "'(the model itself)'" in n
               for n in dense.econv.notes)
    report = verify(model, dense)
    assert report.ok, report.failures()


def test_a_dynamic_same_pad_that_fx_traces_is_computed_at_run_time():
    class DynamicSamePad(torch.nn.Module):
        def forward(self, x):
            h = x.shape[-2]
            pad = (3 - 1) - (h - 1) % 2
            return torch.nn.functional.pad(x, (0, pad, 0, pad))

    torch.manual_seed(0)
    model = rand_bn(torch.nn.Sequential(conv_bn(3, 8, 3, 2), DynamicSamePad(),
                                        torch.nn.Conv2d(8, 4, 3, 2)))
    dense = densify(model, (1, 3, 30, 30))
    assert dense.econv.capture == "torch.fx"
    report = verify(model, dense, shapes=[(2, 3, h, h) for h in (30, 31, 33, 36, 41)])
    assert report.ok and len([c for c in report.checked if c.check == "lattice"]) == 5, \
        report.failures()


# -- keyword inputs and output classes ---------------------------------------------------------


def test_a_backbone_returning_an_output_class_keeps_its_structure():
    torch.manual_seed(0)
    model = rand_bn(KeywordBackbone())
    dense = densify(model, (1, 3, 32, 32))
    names = [o["name"] for o in dense.econv.outputs]
    assert names == ["last_hidden_state", "pooler_output", "hidden_states.0",
                     "hidden_states.1", "hidden_states.2"]
    out = dense(torch.randn(1, 3, 37, 41))
    assert type(out) is BackboneOutput and out.last_hidden_state.shape == (1, 16, 33, 41)
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.outputs == names
    assert {c.output for c in report.checked if c.check != "phases"} <= set(names)


def test_the_structure_survives_a_dense_checkpoint(tmp_path):
    torch.manual_seed(0)
    dense = densify(rand_bn(KeywordClassifier()), (1, 3, 32, 32))
    loaded = load_dense(save_dense(dense, tmp_path / "d.pt"))
    x = torch.randn(2, 3, 35, 33)
    out, back = dense(x), loaded(x)
    assert type(back) is ClassifierOutput  # the class is imported here: rebuilt
    torch.testing.assert_close(back.logits, out.logits)


def test_an_output_class_that_is_not_imported_comes_back_as_a_dict_with_attributes():
    from econv_convert.torch.outputs import DenseOutput, flatten, unflatten

    leaves, spec = flatten(ClassifierOutput(logits=torch.ones(2)))
    spec["cls"] = "nowhere_imported:Output"
    out = unflatten(leaves, spec)
    assert type(out) is DenseOutput and out.logits is leaves[0] and list(out) == ["logits"]


def test_a_model_that_takes_its_image_by_keyword():
    torch.manual_seed(0)
    model = rand_bn(TextAndImageModel())
    with pytest.raises(EConvError, match="input-name|pixel_values"):
        densify(model, (1, 3, 32, 32))  # positionally the image would be input_ids
    dense = densify(model, (1, 3, 32, 32), input_name="pixel_values")
    out = dense(pixel_values=torch.randn(2, 3, 40, 40))
    assert set(out) == {"image_embeds", "input_ids"} and out["input_ids"] is None
    report = verify(model, dense)
    assert report.ok and report.checked[0].output == "image_embeds", report.failures()


def test_cli_input_name_and_output_selection(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "kw.pt"
    torch.save({"state_dict": rand_bn(KeywordBackbone()).state_dict(),
                "arch": "library_style:KeywordBackbone", "input_shape": [1, 3, 32, 32]}, path)
    result = _run("verify", path, "--output", "pooler_output", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["verification"]
    assert {c["output"] for c in data["cases"] if c["check"] != "phases"} == {"pooler_output"}
    result = _run("verify", path, "--output", "nope")
    assert result.exit_code == 2 and "last_hidden_state" in result.output


# -- space to depth ----------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["unshuffle", "view", "focus"])
@pytest.mark.parametrize("mode", ["phase", "lattice"])
def test_space_to_depth_stems_are_strided_windows(stem, mode):
    """pixel_unshuffle, a view/permute space-to-depth and the strided-slice 'focus' stem: each
    is a stride-r window whose taps become channels; exact at every size the baseline takes,
    after a strided layer too (so the taps are a lattice step apart)."""
    torch.manual_seed(0)
    model = rand_bn(torch.nn.Sequential(conv_bn(3, 3, 3, 2), SpaceToDepthNet(stem)))
    dense = densify(model, (1, 3, 64, 64), global_pool=mode)
    block = 4 if stem == "view" else 2
    assert dense.econv.total_step == (2 * block * 2, 2 * block * 2)
    sizes = [(64, 64), (72, 80), (96, 72)] if stem == "view" else [(64, 64), (72, 68), (68, 76)]
    report = verify(model, dense, shapes=[(2, 3, *s) for s in sizes])
    assert report.ok and len([c for c in report.checked if c.check == "lattice"]) == 3, \
        report.failures()


@pytest.mark.parametrize("stem", ["unshuffle", "view", "focus"])
def test_space_to_depth_stems_in_onnx(stem):
    from onnx_graphs import export

    from econv_convert import onnx_api

    torch.manual_seed(0)
    model = rand_bn(torch.nn.Sequential(conv_bn(3, 3, 3, 2), SpaceToDepthNet(stem)))
    graph = export(model, (1, 3, 64, 64))
    ops = {n.op_type for n in graph.graph.node}
    assert "SpaceToDepth" in ops or stem != "unshuffle" or "Reshape" in ops
    dense = onnx_api.densify(graph)
    report = onnx_api.verify(graph, dense)
    assert report.ok, (report.notes, report.failures())
    # the same dense predictions as the PyTorch path
    x = torch.randn(1, 3, 64, 64)
    from onnx_graphs import run

    want = densify(model, (1, 3, 64, 64))(x).detach().numpy()
    got = run(dense, x.numpy())[0]
    assert abs(want - got).max() < 1e-4


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_a_capture_that_drops_a_branch_is_not_used(merge):
    """torch.fx takes ``torch.jit.isinstance(skip, torch.Tensor)`` as false: its graph fails
    (``cat``: a convolution gets too few channels) or computes something else (``add``: the
    skip is left out). Each capture is run against the model before the rewrite; torch.export
    runs the branch the model takes, and the note says which capture was used."""
    from library_style import OptionalSkipNet

    torch.manual_seed(0)
    model = rand_bn(OptionalSkipNet(merge))
    dense = densify(model, (1, 3, 32, 32))
    assert dense.econv.capture == "torch.export"
    note = next(n for n in dense.econv.notes if n.startswith("torch.fx could not capture"))
    assert ("cannot run" if merge == "cat" else "a branch the model takes") in note
    report = verify(model, dense)
    assert report.ok, report.failures()
    with pytest.raises(EConvError, match="torch.fx capture") as e:
        densify(model, (1, 3, 32, 32), capture_with="torch.fx")
    assert "fails on an input" not in str(e.value)  # the model runs; its capture does not


def test_an_in_place_residual_through_a_channel_slice_view():
    """A ghost module's ``out[:, :oup, :, :]`` changed in place by the residual: torch.export
    writes it back with ``slice_scatter`` over the channels and over the whole of each spatial
    axis, which is no write into positions."""
    from library_style import GhostNetLike

    torch.manual_seed(0)
    model = rand_bn(GhostNetLike())
    dense = densify(model, (1, 3, 29, 29))  # verify checks it at odd and even sizes
    assert dense.econv.capture == "torch.export"
    report = verify(model, dense)
    assert report.ok, report.failures()


def test_the_until_hint_names_a_module_of_the_model(monkeypatch):
    """torch.export's own passes give the nodes they create a module path of their own
    (``_empty_nn_module_stack_from_metadata_hook``); "to go on: ... until=" names a module
    of the user's model, one that densifies."""
    import torch.nn.functional as F

    import econv_convert.torch.api as torch_api

    class Upsampling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body = conv_bn(3, 4, stride=2), conv_bn(4, 4)

        def forward(self, x):
            return F.interpolate(self.body(self.stem(x)), scale_factor=2.0)

    real = torch_api.capture

    def capture(*args, **kwargs):  # the last node before the refusal, made by a pass
        captured = real(*args, **kwargs)
        nodes = list(captured.gm.graph.nodes)
        up = [i for i, n in enumerate(nodes) if "upsample" in str(n.target)]
        if not up:
            return captured
        before = nodes[up[0] - 1]
        key = "_empty_nn_module_stack_from_metadata_hook"
        before.meta["nn_module_stack"] = {key: (key, key)}
        before.meta.pop("econv_name", None)
        return captured

    monkeypatch.setattr(torch_api, "capture", capture)
    torch.manual_seed(0)
    model = rand_bn(Upsampling())
    with pytest.raises(EConvError, match="until=body$"):
        densify(model, (1, 3, 32, 32), capture_with="torch.export")
    assert verify(model, densify(model, (1, 3, 32, 32), until="body")).ok
