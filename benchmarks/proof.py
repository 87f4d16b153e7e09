"""The proof's cost on models of one input size: ``python benchmarks/proof.py`` (about five
minutes on 2 CPU cores).

Each row is one ``econv-convert`` command in a fresh process, timed with its peak resident
memory (``/usr/bin/time``): ``densify`` with its full proof (the default) against
``--no-verify``, and ``inverse`` of a fine-tuned copy, for a VGG-11 and an AlexNet written
the way the common model library writes them (an adaptive pool and a three-layer
classifier: one input size), a ResNet-50 exported to ONNX at one fixed size with operator
set 9 (a fixed 7 x 7 average pool and a Gemm, as the classic zoo graphs are), and a
ResNet-50 trunk (``--until layer4``, any size) written to ``.onnx``. Models are built in code
(``zoo.py``) with random weights. Writes ``benchmarks/proof.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402

CLI = [sys.executable, "-m", "econv_convert.cli"]


def timed(args: list[str], cwd: Path) -> dict:
    """One command in a fresh process: seconds, peak resident MiB, exit code."""
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{ROOT}")
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *CLI, *args], cwd=cwd, env=env,
                         capture_output=True, text=True)
    line = [x for x in out.stderr.splitlines() if x.startswith("TIME ")][-1].split()
    result = {"seconds": float(line[1]), "peak_mib": round(int(line[2]) / 1024),
              "exit": out.returncode}
    if out.returncode:
        result["error"] = (out.stderr.strip().splitlines() or [""])[-2][:200]
    return result


def fine_tune_pt(path: Path, out: Path) -> None:
    """A 'fine-tuned' copy of a dense checkpoint: every weight moved by a little noise."""
    from econv_convert import load_dense, save_dense

    dense = load_dense(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(1 + 1e-2 * torch.randn(p.shape, generator=g))
    save_dense(dense, out)


def fine_tune_onnx(path: Path, out: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim >= 2:
            a = a * (1 + 1e-2 * rng.standard_normal(a.shape)).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(model, str(out))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        shape = "1,3,224,224"
        for name, arch in (("VGG-11", "zoo:VGG"), ("AlexNet", "zoo:AlexNet")):
            build = getattr(zoo, arch.split(":")[1])
            torch.save({"state_dict": zoo.randomized(build()).state_dict()}, d / "model.pt")
            common = ["model.pt", "--arch", arch, "--input-shape", shape]
            rows.append({"model": name, "command": "densify -o dense.pt",
                         **timed(["densify", *common, "-o", "dense.pt"], d)})
            rows.append({"model": name, "command": "densify -o dense.pt --no-verify",
                         **timed(["densify", *common, "-o", "dense.pt", "--no-verify"], d)})
            rows.append({"model": name, "command": "densify -o dense.onnx",
                         **timed(["densify", *common, "-o", "dense.onnx"], d)})
            fine_tune_pt(d / "dense.pt", d / "tuned.pt")
            rows.append({"model": name, "command": "inverse tuned.pt -o base.pt",
                         **timed(["inverse", "tuned.pt", "-o", "base.pt"], d)})
        zoo.export_fixed(zoo.randomized(zoo.ResNet(fixed_pool=True)), d / "resnet50.onnx")
        name = "ResNet-50 (ONNX, opset 9, fixed 224)"
        rows.append({"model": name, "command": "densify -o dense.onnx",
                     **timed(["densify", "resnet50.onnx", "-o", "dense.onnx"], d)})
        rows.append({"model": name, "command": "densify -o dense.onnx --no-verify",
                     **timed(["densify", "resnet50.onnx", "-o", "dense.onnx", "--no-verify"], d)})
        fine_tune_onnx(d / "dense.onnx", d / "tuned.onnx")
        rows.append({"model": name, "command": "inverse tuned.onnx -o base.onnx",
                     **timed(["inverse", "tuned.onnx", "-o", "base.onnx"], d)})
        torch.save({"state_dict": zoo.randomized(zoo.ResNet()).state_dict()}, d / "r50.pt")
        common = ["r50.pt", "--arch", "zoo:ResNet", "--input-shape", shape, "--until", "layer4"]
        name = "ResNet-50 trunk (--until layer4, any size)"
        rows.append({"model": name, "command": "densify --until layer4 -o trunk.onnx",
                     **timed(["densify", *common, "-o", "trunk.onnx"], d)})
        rows.append({"model": name, "command": "densify --until layer4 -o trunk.onnx "
                     "--no-verify", **timed(["densify", *common, "-o", "trunk.onnx",
                                             "--no-verify"], d)})
    from econv_convert import __version__

    result = {"version": __version__, "command": "python benchmarks/proof.py",
              "machine": f"{os.cpu_count()} CPU cores", "rows": rows}
    (HERE / "proof.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| model | command | seconds | peak MiB |\n|---|---|---|---|")
    for r in rows:
        extra = f" (exit {r['exit']}: {r.get('error', '')})" if r["exit"] else ""
        print(f"| {r['model']} | `{r['command']}` | {r['seconds']:.1f} | {r['peak_mib']}{extra} |")


if __name__ == "__main__":
    main()
