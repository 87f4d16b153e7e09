"""The workflows the commands run, as a Python user calls them (econv_convert.workflow):
either backend chosen by the file, the write-only-if-verified policy, typed errors, results
as data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import FIXTURES

from econv_convert import workflow
from econv_convert.errors import InvalidInputError
from econv_convert.torch.storage import load_dense


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_densify_verify_and_inverse_files_of_either_backend(tmp_path, kind):
    baseline = FIXTURES / f"patch_classifier.{kind}"
    dense = tmp_path / f"dense.{kind}"
    calls = []
    done = workflow.densify_file(baseline, dense,
                                 progress=lambda *a: calls.append(a))
    assert done.written and done.ok and dense.exists() and calls
    assert done.to_dict()["output"] == str(dense) and done.info.total_step == (8, 8)
    if kind == "pt":
        assert load_dense(dense).econv.total_step == (8, 8)
    checked = workflow.verify_file(baseline, dense)
    assert checked.ok and checked.to_dict()["verification"]["ok"]
    recorded = workflow.verify_file(None, dense)  # against the baseline the file records
    assert recorded.ok and "no MODEL given" in recorded.verification.notes[0]
    back = tmp_path / ("baseline.onnx" if kind == "onnx" else "baseline.safetensors")
    inverted = workflow.inverse_file(dense, back)
    assert inverted.ok and back.exists() and inverted.to_dict()["output"] == str(back)


def test_a_dense_model_that_does_not_verify_is_not_written_unless_asked(tmp_path,
                                                                        monkeypatch):
    failed = SimpleNamespace(ok=False, to_dict=lambda: {"ok": False})
    monkeypatch.setattr(workflow, "run_checks", lambda *a, **k: failed)
    out = tmp_path / "dense.pt"
    done = workflow.densify_file(FIXTURES / "patch_classifier.pt", out)
    assert not done.written and not done.ok and not out.exists()
    assert done.to_dict()["output"] is None
    done = workflow.densify_file(FIXTURES / "patch_classifier.pt", out, allow_mismatch=True)
    assert done.written and out.exists()
    inverted = workflow.inverse_file(out, tmp_path / "b.pt")
    assert not inverted.ok and not (tmp_path / "b.pt").exists()


def test_options_and_outputs_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(InvalidInputError, match="must end in .onnx"):
        workflow.densify_file(FIXTURES / "patch_classifier.onnx", tmp_path / "d.pt")
    with pytest.raises(InvalidInputError, match=r"arch=\.\.\. is for PyTorch models"):
        workflow.densify_file(FIXTURES / "patch_classifier.onnx",
                              load_options=workflow.LoadOptions(arch="m:f"))
    with pytest.raises(InvalidInputError, match="does not exist"):
        workflow.densify_file(FIXTURES / "patch_classifier.pt", tmp_path / "no" / "d.pt")
    assert list(tmp_path.iterdir()) == []


def test_both_backends_answer_is_dense_info_and_lattice_view_alike(tmp_path):
    """The same questions, the same answers: is this dense, how was it made, what would the
    baseline have output (for modules, ONNX graphs and the files of both)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from econv_convert import info, is_dense, lattice_view, onnx_api

    workflow.densify_file(FIXTURES / "patch_classifier.pt", tmp_path / "d.pt", check=None)
    workflow.densify_file(FIXTURES / "patch_classifier.pt", tmp_path / "d.pt2", check=None)
    workflow.densify_file(FIXTURES / "patch_classifier.onnx", tmp_path / "d.onnx", check=None)
    for path in ("d.pt", "d.pt2", "d.onnx"):
        assert is_dense(tmp_path / path), path
    for path in (FIXTURES / "patch_classifier.pt", FIXTURES / "patch_classifier.onnx"):
        assert not is_dense(path)
    dense_pt, dense_onnx = load_dense(tmp_path / "d.pt"), onnx_api.load(tmp_path / "d.onnx")
    assert is_dense(dense_pt) and is_dense(dense_onnx)
    assert info(dense_pt).total_step == onnx_api.info(dense_onnx).total_step == (8, 8)
    x = torch.randn(1, 3, 71, 67)
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    y_onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = lattice_view(dense_pt, dense_pt(x)).numpy()
    got = onnx_api.lattice_view(dense_onnx, y_onnx)
    assert isinstance(got, list) and got[0].shape == expected.shape
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)


def test_inspect_and_bench_are_workflows_too(tmp_path):
    """What ``inspect`` and ``bench`` print, as results: the plan of a PyTorch model and of an
    ONNX graph alike (nothing run), and the timings, each with ``to_dict``."""
    from econv_convert import workflow
    from econv_convert.workflow import LoadOptions

    for name in ("tiny_resnet.pt", "tiny_resnet.onnx"):
        done = workflow.inspect_file(FIXTURES / name,
                                     load_options=LoadOptions(global_pool="window"))
        data = done.to_dict()
        assert data["dense"]["global_pool"] == "window" and data["plan"]["layers"]
        assert done.plan.layers and list(done.info.total_step) == [16, 16]
    timed = workflow.bench_file(FIXTURES / "tiny_resnet.pt", input_shape=[1, 3, 96, 96],
                                runs=1, warmup=0,
                                load_options=LoadOptions(global_pool="window"))
    assert timed.shape == [1, 3, 96, 96]
    assert {"baseline", "dense"} <= set(timed.to_dict()["timings"])
    with pytest.raises(InvalidInputError, match="device=tpu: expected cpu or cuda"):
        workflow.bench_file(FIXTURES / "tiny_resnet.pt", device="tpu")


def test_predict_is_a_workflow_too(tmp_path):
    """``predict`` into OME-Zarr as a function: a baseline densified (and verified) here, the
    blocks, the report; equal to one whole-image pass; an existing output refused before
    anything runs."""
    import numpy as np
    from conftest import whole

    from econv_convert import densify
    from econv_convert.run import scene
    from econv_convert.torch.loading import load_model
    from econv_convert.workflow import LoadOptions

    a = np.random.default_rng(0).integers(0, 256, (150, 141, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", a)
    how = LoadOptions(global_pool="window", output_stride=4)
    report = workflow.predict_file(FIXTURES / "tiny_resnet.pt", tmp_path / "image.npy",
                                   tmp_path / "out.zarr", load_options=how, block=16,
                                   workers=0, mask="none")
    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    dense = densify(loaded.model, loaded.input_shape, global_pool="window", output_stride=4)
    expected = whole(dense, a)
    assert report.blocks_total > 1 and tuple(report.shape) == expected.shape
    np.testing.assert_allclose(scene.result_array(tmp_path / "out.zarr")[:], expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInputError, match="resume=True"):
        workflow.predict_file(FIXTURES / "tiny_resnet.pt", tmp_path / "image.npy",
                              tmp_path / "out.zarr", load_options=how)
