"""Benchmark of ``predict`` over large images: ``python benchmarks/scene.py [SIZE ...]``
(default sizes 1024 2048 4096; each side of a square RGB image, in pixels), and
``python benchmarks/scene.py --memory BLOCK SIZE ...`` (one worker, fixed block: peak memory
against image size only).

For each size it writes a synthetic tiled, compressed TIFF (tile by tile: the image is never
in memory) and runs ``econv-convert predict`` on the bundled GAP classifier (tiny_resnet,
``--global-pool window``: one class-score vector per pixel offset) as a separate process with
1 and 2 embedded Dask workers, sampling the resident memory of the whole job (the command and
every worker process, summed) every 0.1 s. Then it times the way sliding-window tools compute
the same predictions: the baseline classifier on every patch at the output step, on a sample
of patches, scaled to all positions, beside the multiply-add ratio.

Writes ``benchmarks/scene.json`` and prints a Markdown table. Ratios are from one run on one
machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from econv_convert import densify, save_dense  # noqa: E402
from econv_convert.examples import write_scene  # noqa: E402
from econv_convert.run.bench import _macs  # noqa: E402
from econv_convert.torch.loading import load_model  # noqa: E402

MODEL = ROOT / "fixtures" / "tiny_resnet.pt"


def run_predict(model: Path, image: Path, out: Path, workers: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "econv_convert.cli", "predict", str(model), str(image), "-o",
           str(out), "--workers", str(workers), "--json", "--overwrite", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"predict failed: {stderr.strip()}")
    report = json.loads(stdout)
    report["peak_rss_bytes"] = peak[0]
    return report


def patch_by_patch(model, dense, positions: int, sample: int = 64) -> dict:
    """The baseline on ``sample`` patches (one batch), scaled to ``positions`` patches."""
    shape = list(dense.econv.example_shape)
    patches = torch.randn(sample, *shape[1:])
    with torch.no_grad():
        model(patches)  # warm-up
        t = time.perf_counter()
        model(patches)
        seconds = (time.perf_counter() - t) / sample * positions
    per_patch = _macs(lambda: model(torch.randn(1, *shape[1:])))
    return {"seconds": seconds, "macs": per_patch * positions}


def memory_only(block: int, sizes: list[int]) -> None:
    """``--memory BLOCK SIZE...``: one worker, a fixed block: peak memory against image size."""
    loaded = load_model(MODEL)
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_dense(dense, tmp / "dense.pt")
        for size in sizes:
            write_scene(tmp / "scene.tif", size)
            r = run_predict(tmp / "dense.pt", tmp / "scene.tif", tmp / "o.zarr", 1,
                            "--block", str(block))
            rows.append({"size": size, "block": block, **{k: r[k] for k in (
                "seconds", "peak_rss_bytes", "shape", "blocks_total")}})
            print(f"| {size}² | {block} | {r['blocks_total']} | {r['seconds']:.0f} s | "
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |", flush=True)
    (HERE / "scene_memory.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["--memory"]:
        return memory_only(int(sys.argv[2]), [int(s) for s in sys.argv[3:]])
    sizes = [int(s) for s in sys.argv[1:]] or [1024, 2048, 4096]
    loaded = load_model(MODEL)
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "dense.pt"
        save_dense(dense, model)
        for size in sizes:
            image = tmp / f"scene{size}.tif"
            write_scene(image, size)
            row = {"size": size}
            for workers in (1, 2):
                r = run_predict(model, image, tmp / f"out{size}.zarr", workers)
                row[f"w{workers}"] = {k: r[k] for k in ("seconds", "peak_rss_bytes", "shape",
                                                        "blocks_total")}
            c, h, w = row["w1"]["shape"]
            positions = h * w
            window = [1, 3, min(512, h + 63), min(512, w + 63)]
            dense_macs = _macs(lambda: dense(torch.randn(window))) / (
                (window[2] - 63) * (window[3] - 63)) * positions
            pbp = patch_by_patch(loaded.model.eval(), dense, positions)
            row.update(positions=positions, dense_macs=dense_macs, patches=pbp)
            rows.append(row)
            print(f"{size}: done", file=sys.stderr)
    (HERE / "scene.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


def table(rows) -> str:
    lines = ["| image | outputs | 1 worker | 2 workers | speed-up | peak memory (1 / 2 workers) "
             "| output MP/s (2 workers) | patch by patch (est.) | dense faster | MAC ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one, two = r["w1"], r["w2"]
        mp = r["positions"] / 1e6
        fast = min(one["seconds"], two["seconds"])
        lines.append(
            f"| {r['size']}² | {mp:.1f} M | {one['seconds']:.1f} s | {two['seconds']:.1f} s | "
            f"{one['seconds'] / two['seconds']:.2f}x | {one['peak_rss_bytes'] / 2**20:.0f} / "
            f"{two['peak_rss_bytes'] / 2**20:.0f} MiB | {mp / two['seconds']:.2f} | "
            f"{r['patches']['seconds']:.0f} s | {r['patches']['seconds'] / fast:.0f}x | "
            f"{r['patches']['macs'] / r['dense_macs']:.0f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
