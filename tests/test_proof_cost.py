"""The proof of a model that takes one input size costs about one dense pass, not many:
verify's peak memory stays within a small multiple of one dense pass at the example size (a
regression of this kind fails here, not on a user's machine), and the per-node proof never
runs the model at its own size (each node runs alone on small random maps)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import rand_bn

from econv_convert import densify, verify
from econv_convert.torch import ops

# each measurement in a fresh process: the peak resident memory of one step, over the memory
# the process held before it (Linux resets the peak on writing 5 to /proc/self/clear_refs)
_MEASURE = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from econv_convert import densify, verify
    torch.manual_seed(0)
    def layer(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2)]
    model = nn.Sequential(*layer(3, 32), *layer(32, 64), *layer(64, 96), *layer(96, 96),
                          nn.Flatten(), nn.Linear(96 * 10 * 10, 10)).eval()
    dense = densify(model, (1, 3, 160, 160))
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    before = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    with torch.no_grad():
        if sys.argv[1] == "pass":
            dense(torch.randn(2, 3, 160, 160))
        else:
            assert verify(model, dense).ok
    print(json.dumps(rss("VmHWM:") - before))
""")


def _peak(what: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, what], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_verifying_a_one_size_model_peaks_near_one_dense_pass():
    one_pass = _peak("pass")  # batch 2, float32, at the example size: what the check runs
    proof = _peak("verify")
    # float64 copies of the whole model and a float64 dense pass (its dilated convolutions
    # go through im2col) peaked at several times this
    assert proof <= 2.5 * one_pass + 64, (proof, one_pass)


def _net():
    torch.manual_seed(0)
    return rand_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 30 * 30, 3)))


def _spy(dense, seen):
    """Record the dtype and spatial size of every dense convolution ``dense`` runs."""
    real = ops.conv

    def conv(x, *args, **kwargs):
        seen.append((x.dtype, tuple(x.shape[2:])))
        return real(x, *args, **kwargs)

    for node in dense.graph.nodes:
        if node.target is real:
            node.target = conv
    dense.recompile()
    return dense


def test_a_one_size_model_never_runs_dense_at_its_size():
    """The per-node proof runs each window op on maps a few lattice steps wide, and the
    lattice check runs the head alone (here Flatten + Linear, the layers after the last
    proven map) from random maps of its input's size: no dense pass over the 120 x 120
    example at all."""
    model = _net()
    dense = densify(model, (1, 3, 120, 120))
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []
    report = verify(model, _spy(dense, seen))
    assert report.ok, report.failures()
    head = (29 * 4 + 1,) * 2  # the last pool's dense map: 30 lattice points at step 4
    assert seen and all(dt == torch.float64 for dt, _ in seen)
    assert all(max(s) <= 40 or s == head for _, s in seen), seen
    lattice = [c for c in report.checked if c.check == "lattice"]
    assert len(lattice) == 2, lattice
    # the recorded baseline graph is the model given (run at the baseline's cost), and the
    # dense head is that graph's head on the lattice
    assert "the baseline graph the dense model records gives" in lattice[0].detail
    assert "layers after max_pool2d_1 end to end" in lattice[1].detail
    proven = report.to_dict()["proven"]
    assert proven["phases"]["precision"] == "float64"
    assert proven["phases"]["where"] == "each node alone, on small random maps"


def _bumped(*args, **kwargs):
    return ops.conv(*args, **kwargs) + 1e-3


def test_the_head_check_catches_an_error_in_the_head():
    """A dense head whose op is wrong on the lattice fails the head check; dense weights that
    are not the given model's fail the check of the recorded baseline graph against it."""
    model = _net()
    dense = densify(model, (1, 3, 120, 120))
    wrong = copy.deepcopy(dense)
    wrong.econv = dense.econv
    head = [n for n in wrong.graph.nodes if n.target is ops.conv][-1]
    head.target = _bumped
    wrong.recompile()
    report = verify(model, wrong)
    lattice = [c for c in report.checked if c.check == "lattice"]
    assert not report.ok and len(lattice) == 2
    assert lattice[0].ok and not lattice[1].ok, lattice  # the given model: the head's error
    tuned = copy.deepcopy(dense)
    tuned.econv = dense.econv
    with torch.no_grad():
        [p for n, p in tuned.named_parameters() if n.endswith("bias")][-1].add_(1e-3)
    report = verify(model, tuned)
    assert [c.check for c in report.failures()] == ["lattice"], report.failures()


def test_the_head_check_catches_an_error_in_the_head_of_an_onnx_graph(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from econv_convert.onnx import api as onnx_api

    model = _net()
    torch.onnx.export(model, (torch.randn(1, 3, 120, 120),), str(tmp_path / "m.onnx"),
                      opset_version=13, dynamo=False)
    baseline = onnx.load(str(tmp_path / "m.onnx"))
    dense = onnx_api.densify(baseline)
    report = verify(baseline, dense)
    assert report.ok, report.failures()
    lattice = [c for c in report.checked if c.check == "lattice"]
    assert len(lattice) == 1 and " nodes after " in lattice[0].detail, lattice
    wrong = copy.deepcopy(dense)
    gemm_bias = [i for i in wrong.graph.initializer if numpy_helper.to_array(i).shape == (3,)]
    assert gemm_bias
    bumped = numpy_helper.to_array(gemm_bias[-1]) + np.float32(1e-2)
    gemm_bias[-1].CopyFrom(numpy_helper.from_array(bumped, gemm_bias[-1].name))
    assert not verify(baseline, wrong).ok


class _Gate(nn.Module):
    """Squeeze-excitation as the common libraries write it: a gate from the map's mean."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(c, 3, 1), nn.ReLU(), nn.Conv2d(3, c, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3), keepdim=True))


class _GatedFlatten(nn.Module):
    def __init__(self, size: int = 9):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 2, 1)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), _Gate(6))
        n = 6 * ((size + 1) // 2) ** 2
        self.fc = nn.Linear(n, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(self.stem(x)), 1))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_gate_before_a_flatten_head_is_checked_end_to_end(backend, tmp_path):
    """Found by the random networks: a squeeze-excitation gate (its mean kept per phase in the
    dense model) before a flatten head. The head check drew the frontier in the baseline's
    shape, which a per-phase value does not have (an internal error in both backends); such a
    value is never a frontier, and the model is checked end to end."""
    model = rand_bn(_GatedFlatten(), 0).eval()
    if backend == "torch":
        baseline = model
    else:
        torch.onnx.export(model, (torch.randn(1, 3, 9, 9),), str(tmp_path / "m.onnx"),
                          opset_version=13, dynamo=False)
        import onnx

        baseline = onnx.load(str(tmp_path / "m.onnx"))
    dense = densify(baseline, (1, 3, 9, 9), global_pool="phase")
    report = verify(baseline, dense)
    assert report.ok, report.failures()
    assert any(c.check == "lattice" for c in report.checked)


def test_a_head_after_a_ceil_mode_pool_of_an_onnx_graph(tmp_path):
    """Found by the random networks: ONNX shape inference sizes a ceil-mode pool's output one
    larger than onnxruntime runs it (a last window that starts past the map), so the head's
    frontier drawn at the inferred size fails in the baseline's own Gemm: the graph is then
    checked end to end instead of ending in an internal error."""
    import onnx

    model = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.AvgPool2d(1, 3, ceil_mode=True),
                          nn.Flatten(), nn.Linear(6 * 2 * 2, 4))
    model = rand_bn(model, 0).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 9, 9),), str(tmp_path / "m.onnx"),
                      opset_version=13, dynamo=False)
    baseline = onnx.load(str(tmp_path / "m.onnx"))
    report = verify(baseline, densify(baseline))
    assert report.ok, report.failures()
    assert any(c.check == "lattice" for c in report.checked)
