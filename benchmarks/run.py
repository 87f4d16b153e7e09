"""Benchmarks: run ``python benchmarks/run.py`` (about 10 minutes on 2 CPU cores);
``python benchmarks/run.py resnet50`` re-measures section 4 only.

Writes ``benchmarks/results.json``, ``benchmarks/speed.png`` and ``benchmarks/predict.png`` and
prints a Markdown table. Every ratio is measured within one run on one machine.

1. speed: dense vs shift-and-stitch (ResNet-like fixture, output stride 1 and 8) and dense vs
   a per-pixel sliding window (patch classifier, 512 x 512), with multiply-adds;
2. dilation overhead: dense convolutions vs the same ones undilated (equal multiply-adds);
3. tiled predict: peak memory and time as the image grows (each size in a fresh process,
   peak RSS), against one whole-image pass;
4. a ResNet-50-sized model (bottleneck blocks 3-4-6-3, width 64, written here): densify,
   verify with default options, and inspect, in process and as CLI commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from econv_convert import densify, verify  # noqa: E402
from econv_convert.core.costs import plan  # noqa: E402
from econv_convert.examples import randomize_batchnorm  # noqa: E402
from econv_convert.run.bench import bench  # noqa: E402
from econv_convert.torch.loading import load_model  # noqa: E402

RUNS = 5


def speed() -> list[dict]:
    cases = []
    resnet = load_model(ROOT / "fixtures/tiny_resnet.pt")
    for k in (None, 8):
        dense = densify(resnet.model, resnet.input_shape, output_stride=k)
        result = bench(resnet.model, dense, (1, 3, 128, 128), runs=RUNS)
        cases.append({"name": f"tiny_resnet, output stride {k or 1}", **result.to_dict()})
    patch = load_model(ROOT / "fixtures/patch_classifier.pt")
    dense = densify(patch.model, patch.input_shape)
    result = bench(patch.model, dense, (1, 3, 512, 512), runs=3, window_sample=64)
    cases.append({"name": "patch_classifier, 512x512", **result.to_dict()})
    return cases


PREDICT = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from econv_convert import load_dense
from econv_convert.run.predict import predict
torch.manual_seed(0)
dense = load_dense({dense!r})
x = torch.randn(1, 3, {size}, {size})
t = time.perf_counter()
with torch.no_grad():
    y = predict(dense, x, tile={tile}) if {tile} else dense(x)
t = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(t, peak * 1024, tuple(y.shape))
"""


def predict_scaling(tmp: Path) -> list[dict]:
    from econv_convert import save_dense

    patch = load_model(ROOT / "fixtures/patch_classifier.pt")
    path = tmp / "patch_dense.pt"
    save_dense(densify(patch.model, patch.input_shape), path)
    rows = []
    for size in (512, 1024, 2048):
        for tile in (256, 0):
            code = PREDICT.format(root=str(ROOT), dense=str(path), size=size, tile=tile)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split(maxsplit=2)
            rows.append({"size": size, "mode": f"tiled {tile}" if tile else "whole image",
                         "seconds": float(out[0]), "peak_rss_bytes": int(float(out[1])),
                         "output_shape": out[2].strip()})
    return rows


def _bottleneck(cin, mid, stride):
    from torch.nn import functional as F

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, mid * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(mid * 4)
            self.down = None
            if stride != 1 or cin != mid * 4:
                self.down = nn.Sequential(nn.Conv2d(cin, mid * 4, 1, stride, bias=False),
                                          nn.BatchNorm2d(mid * 4))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    return Bottleneck()


def resnet50_sized() -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (mid, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for b in range(blocks):
            layers.append(_bottleneck(cin, mid, 2 if b == 0 and i > 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(*layers)).eval()


def resnet50_timings() -> dict:
    model = resnet50_sized()
    params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    dense = densify(model, (1, 3, 224, 224))
    t_densify = time.perf_counter() - t
    t = time.perf_counter()
    costs = plan(dense)  # what `inspect` does after densifying
    t_inspect = time.perf_counter() - t + t_densify
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        t = time.perf_counter()
        dense(x)
        t_forward = time.perf_counter() - t
    t = time.perf_counter()
    report = verify(model, dense)
    t_verify = time.perf_counter() - t
    cli = _cli_timings(model)
    return {"parameters": params, "baseline_macs": costs.base_macs,
            "dense_macs": costs.dense_macs, "densify_s": t_densify, "inspect_s": t_inspect,
            "dense_forward_224_s": t_forward, "verify_s": t_verify,
            "verify_checks": len(report.checked), "verify_ok": report.ok,
            "verify_sizes": [list(c.shape) for c in report.checked],
            "verify_proven": report.proven(),
            "densify_plus_verify_s": t_densify + t_verify,
            **cli}


def _cli_timings(model: nn.Module) -> dict:
    """The commands a user runs, end to end in a fresh process (start-up included):
    ``econv-convert densify`` with default options (which verifies) and without verifying,
    ``inspect``, and ``densify`` of the same model exported to ONNX, with and without."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "resnet50_sized.pt"
        torch.save({"state_dict": model.state_dict(), "arch": "benchmarks.run:resnet50_sized",
                    "input_shape": [1, 3, 224, 224]}, ckpt)
        graph = Path(tmp) / "resnet50_sized.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(graph), dynamo=False,
                              opset_version=17, input_names=["x"])
        out = {}
        for name, args in (("cli_densify_s", ["densify", str(ckpt)]),
                           ("cli_densify_no_verify_s", ["densify", str(ckpt), "--no-verify"]),
                           ("cli_inspect_s", ["inspect", str(ckpt)]),
                           ("cli_onnx_densify_s", ["densify", str(graph), "-o",
                                                   str(Path(tmp) / "dense.onnx")]),
                           ("cli_onnx_densify_no_verify_s", ["densify", str(graph), "-o",
                                                             str(Path(tmp) / "dense_nv.onnx"),
                                                             "--no-verify"])):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "econv_convert.cli", *args], cwd=ROOT,
                                  capture_output=True, text=True)
            out[name] = time.perf_counter() - t
            if done.returncode:
                raise RuntimeError(f"econv-convert {args[0]} failed: {done.stderr[-300:]}")
        return out


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, values, colors = [], [], []
    palette = {"baseline": "#999999", "dense": "#1f77b4", "shift_and_stitch": "#ff7f0e",
               "sliding_window": "#d62728"}
    for case in results["speed"]:
        for name, t in case["timings"].items():
            labels.append(f"{case['name']}\n{name}")
            values.append(t["seconds"])
            colors.append(palette[name])
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (median, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(HERE / "speed.png", dpi=120)

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode in ("tiled 256", "whole image"):
        rows = [r for r in results["predict"] if r["mode"] == mode]
        sizes = [r["size"] for r in rows]
        a.plot(sizes, [r["peak_rss_bytes"] / 2**20 for r in rows], "o-", label=mode)
        b.plot(sizes, [r["seconds"] for r in rows], "o-", label=mode)
    a.set_xlabel("image side (pixels)")
    a.set_ylabel("peak RSS of the process (MiB)")
    b.set_xlabel("image side (pixels)")
    b.set_ylabel("seconds")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(HERE / "predict.png", dpi=120)


def table(results: dict) -> str:
    lines = ["| scenario | case | time | multiply-adds | speed-up of dense | MAC ratio |",
             "|---|---|---|---|---|---|"]
    for case in results["speed"]:
        dense_t = case["timings"]["dense"]["seconds"]
        for name, t in case["timings"].items():
            key = f"{name}_vs_dense"
            speed_up = (f"{t['seconds'] / dense_t:.1f}x"
                        if name in ("shift_and_stitch", "sliding_window") else "")
            mac = (f"{case['mac_ratios'][key]:.1f}x" if key in case["mac_ratios"] else "")
            lines.append(f"| {case['name']} | {name} | {t['seconds'] * 1e3:.1f} ms | "
                         f"{t['macs'] / 1e9:.3f} G | {speed_up} | {mac} |")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    torch.set_num_threads(os.cpu_count() or 1)
    if sys.argv[1:] == ["resnet50"]:  # re-measure that section only, into results.json
        results = json.loads((HERE / "results.json").read_text())
        results["resnet50_sized"] = resnet50_timings()
        (HERE / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results["resnet50_sized"], indent=1))
        return
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads()}}
    print("speed ...", flush=True)
    results["speed"] = speed()
    print("predict scaling ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["predict"] = predict_scaling(Path(tmp))
    print("ResNet-50-sized ...", flush=True)
    results["resnet50_sized"] = resnet50_timings()
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    plots(results)
    print(table(results))
    print(json.dumps({"dilation_overhead": [c["dilation_overhead"] for c in results["speed"]],
                      "space_to_batch_overhead": [c["space_to_batch_overhead"]
                                                  for c in results["speed"]],
                      "predict": results["predict"],
                      "resnet50_sized": results["resnet50_sized"]}, indent=1))


if __name__ == "__main__":
    main()
