"""The proof of a model that takes one input size costs about one dense pass, not many:
verify's peak memory stays within a small multiple of one dense pass at the example size (a
regression of this kind fails here, not on a user's machine), and the per-node proof never
runs the model at its own size (each node runs alone on small random maps)."""

from __future__ import annotations

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


def test_the_per_node_proof_never_runs_a_node_at_the_models_size(monkeypatch):
    """Each dense window op of a one-size model runs on maps a few lattice steps wide in the
    proof, however large the example is (the end-to-end check alone runs it at full size)."""
    torch.manual_seed(0)
    model = rand_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 30 * 30, 3)))
    dense = densify(model, (1, 3, 120, 120))
    seen: list[tuple[int, ...]] = []
    real = ops.conv

    def conv(x, *args, **kwargs):
        seen.append((x.dtype, tuple(x.shape[2:])))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ops, "conv", conv)
    for node in dense.graph.nodes:
        if node.target is real:
            node.target = conv
    dense.recompile()
    report = verify(model, dense)
    assert report.ok, report.failures()
    full = [s for dt, s in seen if dt == torch.float32]
    small = [s for dt, s in seen if dt == torch.float64]
    assert full and all(min(s) > 100 for s in full)  # end to end, at the example's size
    assert small and all(max(s) <= 40 for s in small), small  # the proof: small maps
    proven = report.to_dict()["proven"]
    assert proven["phases"]["precision"] == "float64"
    assert proven["lattice"]["precision"] == "float32"
    assert proven["phases"]["where"] == "each node alone, on small random maps"
