"""Benchmark of ``predict`` over large images: ``python benchmarks/scene.py [SIZE ...]``
(default sizes 1024 2048 4096; each side of a square RGB image, in pixels),
``python benchmarks/scene.py --memory BLOCK SIZE ...`` (one worker, fixed block: peak memory
against image size only), ``python benchmarks/scene.py --profile`` (where one block's time
goes), ``python benchmarks/scene.py --ratio SIZE K ...`` (dense against patch by patch at
output strides K, with a 100k x 100k slide extrapolated), ``--widths SIDE ...`` (the dense
pass alone per pixel at block sizes), ``--glass SIZE`` (a slide with 60%
glass, with and without the tissue mask) and ``--smoke`` (the options crossed on a small
scene, each against a whole-image pass).

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
import math
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


class _Basic(torch.nn.Module):
    """A ResNet basic block, as torchvision writes it (in-place ReLUs, ``+=``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18Like(torch.nn.Module):
    """The layout of a ResNet-18 patch classifier (11.2 M parameters, 1.8 G multiply-adds at
    224 x 224, total stride 32): what slide tools most often run patch by patch. Random weights
    and BatchNorm statistics (nothing is downloaded)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_Basic(cin, cout, stride), _Basic(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def baseline(name: str):
    """``(model, input shape)`` of a benchmark model: the bundled ``tiny_resnet`` or
    ``resnet18`` (:class:`ResNet18Like`)."""
    if name == "resnet18":
        return ResNet18Like().eval(), (1, 3, 224, 224)
    loaded = load_model(MODEL)
    return loaded.model.eval(), loaded.input_shape


def run_predict(model: Path, image: Path, out: Path, workers: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "econv_convert.cli", "predict", str(model), str(image), "-o",
           str(out), "--workers", str(workers), "--json", "--overwrite", "--mask", "none",
           *extra]
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


def patch_by_patch(model, dense, positions: int, sample: int = 64, runs: int = 15,
                   batches=(32, 64, 128)) -> dict:
    """The baseline on every patch at its fastest here: BatchNorms folded into the
    convolutions (as predict folds the dense model's), in the default and the channels-last
    layout and in batches of 32, 64 and 128; the fastest run of all (this machine is shared
    and noisy: the best case for patches is the conservative one for dense), scaled to
    ``positions`` patches."""
    import copy

    from torch.fx.experimental.optimization import fuse

    shape = list(dense.econv.example_shape)
    per_patch = _macs(lambda: model(torch.randn(1, *shape[1:])))
    fused = fuse(copy.deepcopy(model).eval())
    best = math.inf
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            net = fused.to(memory_format=layout)
            for batch in batches:
                patches = torch.randn(batch, *shape[1:]).contiguous(memory_format=layout)
                net(patches)  # warm-up
                for _ in range(runs):
                    t = time.perf_counter()
                    net(patches)
                    best = min(best, (time.perf_counter() - t) / batch)
    return {"seconds": best * positions, "macs": per_patch * positions,
            "seconds_per_patch": best}


def read_once(image: Path, block: int = 1024) -> float:
    """Seconds to read, decode and normalize the whole image once, a block at a time in one
    thread (what any patch-by-patch run must do at least once, with the reader predict
    uses)."""
    from econv_convert.run.sources import SourceSpec, normalize, open_source

    src = open_source(SourceSpec(str(image), 3))
    _, h, w = src.shape
    start = time.perf_counter()
    for y in range(0, h, block):
        for x in range(0, w, block):
            normalize(src.read_window([(y, min(h, y + block)), (x, min(w, x + block))]),
                      None, None)
    return time.perf_counter() - start


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


def profile() -> None:
    """Where one block's time goes: the dense pass with and without the halo a block reads,
    reading and normalizing its window, writing its chunk; beside the patch-by-patch rate
    and the multiply-add ratio. Prints a Markdown table."""
    import copy

    import numpy as np

    from econv_convert.run import ngff, scene
    from econv_convert.run.bench import memory_format
    from econv_convert.run.fuse import prepare
    from econv_convert.run.resources import keep_freed_memory
    from econv_convert.run.sources import SourceSpec, normalize, open_source

    keep_freed_memory()  # as predict's block processes run
    torch.set_num_threads(2)
    loaded = load_model(MODEL)
    base = loaded.model.eval()
    dense = densify(base, loaded.input_shape, global_pool="window")
    geo = scene.geometry(dense.econv)
    fast = copy.deepcopy(dense)  # as predict runs it: BatchNorms folded
    prepare(fast)
    fmt = memory_format(4, True)
    window = geo.window[0] - 1

    def timed(f, n=2):
        f()
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n

    patches = patch_by_patch(base, dense, 1)
    patch_rate = 1 / patches["seconds"]  # outputs per second
    mac_ratio = patches["macs"] / per_output_macs(dense)
    halo = geo.halo[0] + geo.halo_after[0]
    from econv_convert.run.geometry import map_field

    old = 2 * geo.unit[0] * (math.ceil(map_field(dense.econv)[0] / geo.unit[0]) + 1)
    print(f"halo {geo.halo[0]} px before and {geo.halo_after[0]} after a block (a field each "
          f"side before: {old}); multiply-add ratio {mac_ratio:.1f}x; patch by patch "
          f"{patch_rate / 1e6:.4f} M outputs/s\n")
    print("| block | input read | dense pass | outputs/s | vs patch by patch | of the MAC ratio |")
    print("|---|---|---|---|---|---|")
    for side in (512, 1024, 2048):
        # what one interior block reads: its outputs' windows (no halo: as one whole-image
        # pass computes them), with the halo, with the field-sized halo used before
        for n, name in ((side + window, " (no halo)"), (side + halo, " + halo"),
                        (side + old, " + a field each side")):
            x = torch.randn(1, 3, n, n).contiguous(memory_format=fmt)
            with torch.no_grad():
                sec = timed(lambda: fast(x), 1)
            rate = side * side / sec
            print(f"| {side}{name} | {n}^2 | {sec:.2f} s | "
                  f"{rate / 1e6:.3f} M | {rate / patch_rate:.1f}x | "
                  f"{rate / patch_rate / mac_ratio:.2f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        write_scene(Path(tmp) / "s.tif", 2048)
        src = open_source(SourceSpec(str(Path(tmp) / "s.tif"), 3))
        n = 1024 + halo
        read = timed(lambda: normalize(src.read(0, n, 0, n), None, None))
        ngff.create(Path(tmp) / "o.zarr", (10, 2048, 2048), (1024, 1024), {}, "0.5")
        out = ngff.level0(Path(tmp) / "o.zarr", "r+")
        y = np.random.rand(10, 1024, 1024).astype(np.float32)
        write = timed(lambda: out.__setitem__((slice(None), slice(0, 1024), slice(0, 1024)), y))
    print(f"\nread + decode + normalize a {n}^2 window: {read:.3f} s; write a 10 x 1024^2 "
          f"chunk: {write:.3f} s")


def per_output_macs(dense) -> float:
    """The dense model's multiply-adds per output of a whole-image pass: the growth of a
    pass's multiply-adds with its outputs between 1024^2 and 1536^2 inputs (a small pass
    spends more per output on its edges, which would flatter the ratio)."""
    macs, outputs = [], []
    for side in (1024, 1536):
        with torch.no_grad():
            y = dense(torch.randn(1, 3, side, side))
        outputs.append(y.shape[-1] * y.shape[-2])
        macs.append(_macs(lambda side=side: dense(torch.randn(1, 3, side, side))))
    return (macs[1] - macs[0]) / (outputs[1] - outputs[0])


def ratio(size: int, strides: list[int], name: str = "tiny_resnet") -> None:
    """``--ratio SIZE K...``: predict over a SIZE^2 scene with one worker (both cores) at each
    output stride K, against the baseline on every patch at the same output step; and a
    100k x 100k slide with 40% tissue extrapolated from the measured rate. Two ratios: the
    whole job against patches plus one read of the image, and the dense model's own time in
    the job's blocks (halos included) against the patches' model time. ``--ratio-resnet18
    SIZE K...``: the same with a ResNet-18-sized classifier (fewer runs of its patches)."""
    model, input_shape = baseline(name)
    big = name == "resnet18"
    options = {"runs": 3, "batches": (16, 32)} if big else {}
    rows, per_patch = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "scene.tif"
        write_scene(image, size)
        read = min(read_once(image) for _ in range(2))
        for n, k in enumerate(strides):
            dense = densify(model, input_shape, global_pool="window",
                            output_stride=k if k > 1 else None)
            save_dense(dense, tmp / "dense.pt")
            if n == 0:  # the patches' rate, before the jobs and after each
                per_patch.append(patch_by_patch(model, dense, 1, **options)["seconds"])
            runs = [run_predict(tmp / "dense.pt", image, tmp / "o.zarr", 1) for _ in range(2)]
            r = min(runs, key=lambda r: r["seconds"])
            c, h, w = r["shape"]
            pbp = patch_by_patch(model, dense, h * w, **options)
            per_patch.append(pbp["seconds_per_patch"])
            row = {"model": name, "size": size, "output_stride": k, "outputs": h * w,
                   "seconds": r["seconds"], "seconds_runs": [x["seconds"] for x in runs],
                   "block": r["geometry"]["block"],
                   "halo": [r["geometry"]["halo"][0], r["geometry"]["halo_after"][0]],
                   "peak_rss_bytes": r["peak_rss_bytes"], "patches": pbp, "read_once": read,
                   "timing": r.get("timing", {}),
                   "dense_macs": per_output_macs(dense) * h * w}
            rows.append(row)
            print(f"os {k}: done {row['timing']}", file=sys.stderr)
    # the same baseline on the same patch at every stride: its fastest rate of all the
    # measurements (before the jobs and after each; the conservative reference for dense)
    best = min(per_patch)
    for row in rows:
        row["patches"]["seconds_per_patch_measured"] = per_patch
        row["patches"]["seconds"] = best * row["outputs"]
    suffix = f"_{name}" if big else ""
    (HERE / f"scene_ratio_{size}{suffix}.json").write_text(json.dumps(rows, indent=2))
    print(f"patch by patch: fastest {best * 1e6:.1f} us a patch of "
          + ", ".join(f"{p * 1e6:.1f}" for p in per_patch) + " measured")
    print("| output stride | outputs | job (fastest of 2) | output MP/s | per core | patch by "
          "patch + one read (est.) | job faster | MAC ratio | job, of the MAC ratio | "
          "dense model in the blocks | model, of the MAC ratio | read / write in the blocks "
          "| 100k² slide, 40% tissue (est.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["outputs"] / r["seconds"]
        patches = r["patches"]["seconds"]
        faster = (patches + r["read_once"]) / r["seconds"]
        macs = r["patches"]["macs"] / r["dense_macs"]
        t = r["timing"]
        model = t["model_in_blocks"]
        slide = (1e5 / r["output_stride"]) ** 2 * 0.4 / rate
        print(f"| {r['output_stride']} | {r['outputs'] / 1e6:.2f} M | {r['seconds']:.1f} s | "
              f"{rate / 1e6:.3f} | {rate / 2e6:.3f} | {patches:.0f} + {r['read_once']:.1f} s | "
              f"{faster:.1f}x | {macs:.1f}x | {faster / macs:.2f}x | {model:.1f} s | "
              f"{patches / model / macs:.2f}x | {t.get('read_in_blocks', 0):.1f} / "
              f"{t.get('write_in_blocks', 0):.1f} s | {slide / 3600:.1f} h |")


def glass(size: int) -> None:
    """``--glass SIZE``: a synthetic SVS slide with 60% glass, predict with the tissue mask
    (the default for slides) and without: time saved, blocks skipped."""
    from econv_convert.examples import write_slide

    loaded = load_model(MODEL)
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_dense(dense, tmp / "dense.pt")
        tissue = write_slide(tmp / "slide.svs", size, glass=0.6)
        rows = {}
        for mask in ("auto", "none"):
            cmd = [sys.executable, "-m", "econv_convert.cli", "predict", str(tmp / "dense.pt"),
                   str(tmp / "slide.svs"), "-o", str(tmp / f"{mask}.zarr"), "--workers", "1",
                   "--json", "--mask", mask]
            rows[mask] = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                   check=True).stdout)
    result = {"size": size, "tissue_fraction": tissue,
              **{m: {k: r[k] for k in ("seconds", "blocks_total", "blocks_masked", "timing")}
                 for m, r in rows.items()}}
    (HERE / "scene_glass.json").write_text(json.dumps(result, indent=2))
    a, n = rows["auto"], rows["none"]
    print(f"{size}² slide, {tissue:.0%} tissue: mask auto {a['seconds']:.1f} s "
          f"({a['blocks_masked']} of {a['blocks_total']} blocks skipped), none "
          f"{n['seconds']:.1f} s: {n['seconds'] / a['seconds']:.2f}x faster")


def smoke() -> None:
    """``--smoke``: the options of ``predict`` crossed on a small scene (model file kind x
    output stride x sink), each cell against one whole-image pass; a table of the largest
    difference and the time. The full matrix is ``tests/test_predict_matrix.py``."""
    import numpy as np

    from econv_convert.run import scene
    from econv_convert.run.sources import normalize

    loaded = load_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "scene.tif"
        write_scene(image, 384)
        a = np.moveaxis(tifffile_read(image), -1, 0)
        x = torch.from_numpy(normalize(a, None, None))[None]
        print("| output stride | model file | sink | time | max abs difference |")
        print("|---|---|---|---|---|")
        for k in (1, 4, 16):
            dense = densify(loaded.model, loaded.input_shape, global_pool="window",
                            output_stride=k if k > 1 else None)
            with torch.no_grad():
                whole = dense(x).numpy()[0]
            save_dense(dense, tmp / "d.pt")
            subprocess.run([sys.executable, "-m", "econv_convert.cli", "densify", str(MODEL),
                            "-o", str(tmp / "d.onnx"), "--global-pool", "window", "--no-verify",
                            *(["--output-stride", str(k)] if k > 1 else [])],
                           check=True, capture_output=True)
            for kind in ("d.pt", "d.onnx"):
                for sink in ("o.zarr", "o.npy"):
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "econv_convert.cli", "predict",
                                    str(tmp / kind), str(image), "-o", str(tmp / sink),
                                    "--workers", "0", "--block", str(max(16, 256 // k)),
                                    "--mask", "none", "--overwrite"],
                                   check=True, capture_output=True)
                    seconds = time.perf_counter() - t
                    got = (scene.result_array(tmp / sink)[:] if sink.endswith("zarr")
                           else np.load(tmp / sink)[0])
                    diff = float(np.abs(got.reshape(whole.shape) - whole).max())
                    print(f"| {k} | {kind[2:]} | {sink[2:]} | {seconds:.1f} s | {diff:.2e} |",
                          flush=True)


def tifffile_read(path):
    import tifffile

    return tifffile.imread(path)


def widths(sides: list[int]) -> None:
    """``--widths SIDE...``: the dense model as predict's block processes run it (BatchNorms
    folded, freed maps kept), alone, on blocks of these input sides in this one process (the
    fastest of 3 runs each), per input pixel; and per output pixel of a block whose halo is
    predict's. Prints a Markdown table."""
    import numpy as np

    from econv_convert.run import runner, scene

    loaded = load_model(MODEL)
    dense = densify(loaded.model, loaded.input_shape, global_pool="window")
    geo = scene.geometry(dense.econv)
    halo = geo.halo[0] + geo.halo_after[0]
    with tempfile.TemporaryDirectory() as tmp:
        save_dense(dense, Path(tmp) / "dense.pt")
        run = runner.runner(runner.ModelSpec(str(Path(tmp) / "dense.pt")))
        print("| input side | dense pass | per input pixel | block outputs | per output pixel |")
        print("|---|---|---|---|---|")
        for side in sides:
            x = np.random.default_rng(0).random((1, side, side, 3), dtype=np.float32)
            x = np.moveaxis(x, -1, 1)  # channels last in memory, as blocks are read
            run(x)
            best = math.inf
            for _ in range(3):
                t = time.perf_counter()
                run(x)
                best = min(best, time.perf_counter() - t)
            out = side - halo
            print(f"| {side} | {best:.2f} s | {best / side**2 * 1e9:.0f} ns | {out} | "
                  f"{best / out**2 * 1e9:.0f} ns |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--widths"]:
        return widths([int(s) for s in sys.argv[2:]])
    if sys.argv[1:2] == ["--smoke"]:
        return smoke()
    if sys.argv[1:2] == ["--glass"]:
        return glass(int(sys.argv[2]))
    if sys.argv[1:2] == ["--ratio"]:
        return ratio(int(sys.argv[2]), [int(s) for s in sys.argv[3:]] or [1, 4, 16])
    if sys.argv[1:2] == ["--ratio-resnet18"]:
        return ratio(int(sys.argv[2]), [int(s) for s in sys.argv[3:]] or [32], "resnet18")
    if sys.argv[1:2] == ["--memory"]:
        return memory_only(int(sys.argv[2]), [int(s) for s in sys.argv[3:]])
    if sys.argv[1:2] == ["--profile"]:
        return profile()
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
