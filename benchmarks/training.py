"""Does dense training make the baseline more accurate? ``python benchmarks/training.py``

The method's claim, reproduced in small on a task generated in code (nothing is downloaded):
each example is a 72 x 72 canvas, a texture of six copies of one of six 9 x 9 binary glyphs and
six distractor glyphs from a shared set, at random places and colours, over noise and a smooth
background; the label is the glyph. The model (``TextureNet`` below, written as libraries write
classifiers) has three conv-BN-ReLU-max-pool stages (total stride 8, no padding), a global
average pool and a linear head with dropout; it takes a 64 x 64 patch.

Ways to spend a budget of updates (same optimizer: Adam with a cosine decay of the learning
rate; same batches of canvases, initial weights and seed):

- ``baseline``: the baseline trained on the crop at offset (0, 0) of each canvas (the data set
  as 64 x 64 patches: the usual training);
- ``dense``: the same initial baseline densified (``--global-pool window``), trained on the
  whole canvas with the label at each of the 8 x 8 dense positions of the first lattice cell
  (every shift of the window at once), then inverse-transferred and evaluated as a baseline;
- ``shift-aug``: a control for what dense training amounts to here (the network has no
  padding, so a dense position is exactly the baseline on a shifted crop): the baseline
  trained on one random crop of each canvas per update;
- ``shift-aug-long`` (``--ways``): the same control given ``--long-factor`` times the updates,
  so that it takes about as long as dense training.

Evaluated as baselines on 1000 held-out canvases: accuracy of the crop at offset (0, 0), the
mean accuracy over all 64 crops (computed with the dense model of each trained baseline, which
gives every crop's prediction at once; checked against the baseline on crops), the worst crop
offset, and the fraction of canvases whose 64 crop predictions all agree. Also the median time
per training step and the bytes autograd saves for backward in one step (activation memory).

Writes ``benchmarks/training.json`` (``--append`` adds to it) and ``benchmarks/training.png``
and prints a Markdown table. Times are from one run on one machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from econv_convert import densify, inverse  # noqa: E402

CANVAS, PATCH, STEP = 72, 64, 8  # crop offsets 0..7 on each axis: one per lattice phase
GLYPH = 9


# --- the task ---------------------------------------------------------------------------------

def glyphs(count: int, seed: int) -> torch.Tensor:
    """``count`` fixed 9 x 9 binary patterns, half of the pixels on."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, GLYPH, GLYPH, generator=g) > 0.5).float()


def make_set(n: int, classes: torch.Tensor, distractors: torch.Tensor, seed: int,
             noise: float = 0.5, stamps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases (n, 3, 72, 72) and labels: a texture of ``stamps`` copies of the class
    glyph and as many glyphs from a shared set of distractors, at random places and colours,
    over Gaussian noise and a smooth random background."""
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    labels = torch.randint(k, (n,), generator=g)
    low = torch.randn(n, 3, 9, 9, generator=g)
    canvas = F.interpolate(low, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)
    canvas = 0.3 * canvas + noise * torch.randn(n, 3, CANVAS, CANVAS, generator=g)
    for i in range(n):
        picks = torch.randint(len(distractors), (stamps,), generator=g)
        for stamp in [classes[labels[i]]] * stamps + [distractors[j] for j in picks]:
            r, c = (int(v) for v in torch.randint(CANVAS - GLYPH + 1, (2,), generator=g))
            colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)
            canvas[i, :, r:r + GLYPH, c:c + GLYPH] += colour * stamp
    return canvas, labels


# --- the model --------------------------------------------------------------------------------

class TextureNet(nn.Module):
    """A small classifier as libraries write them: conv-BN-ReLU stages with max pooling (total
    stride 8), no padding, a global average pool and a linear head with dropout."""

    def __init__(self, num_classes: int, width: int = 16, drop_rate: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.features(x)).flatten(1)
        return self.fc(self.drop(x))


# --- training ---------------------------------------------------------------------------------

def batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch]
        order = order[batch:]


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> int:
    """Bytes of the tensors autograd saves for backward in one step: the activation memory."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return total[0]


def train(way: str, data, steps: int, batch: int, lr: float, seed: int, classes: int) -> dict:
    canvases, labels = data
    torch.manual_seed(seed)
    baseline = TextureNet(classes)
    crop_rng = torch.Generator().manual_seed(seed + 1)
    if way == "dense":
        model = densify(baseline, (1, 3, PATCH, PATCH), global_pool="window")

        def inputs(idx):
            return canvases[idx]

        def loss_fn(out, y):
            # out: (B, K, 9, 9), position (i, j) the baseline on the crop at offset (i, j);
            # the first 8 x 8 are the 64 lattice phases, each once. The label holds at each.
            out = out[..., :STEP, :STEP]
            return F.cross_entropy(out, y[:, None, None].expand(-1, STEP, STEP))
    else:
        model = baseline

        def inputs(idx):
            if way.startswith("shift-aug"):
                r, c = (int(v) for v in torch.randint(STEP, (2,), generator=crop_rng))
            else:
                r = c = 0
            return canvases[idx, :, r:r + PATCH, c:c + PATCH]

        def loss_fn(out, y):
            return F.cross_entropy(out, y)

    model.train()
    first = torch.arange(batch)
    memory = saved_bytes(copy.deepcopy(model), inputs(first), labels[first], loss_fn)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # a cosine decay to zero: with a constant rate the BatchNorm running statistics lag the
    # weights and eval-mode accuracy swings from one step to the next (by 50 points here)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    times = []
    for idx in batches(len(labels), batch, steps, seed):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs(idx)), labels[idx])
        loss.backward()
        opt.step()
        schedule.step()
        times.append(time.perf_counter() - t)
    model.eval()
    if way == "dense":
        trained = TextureNet(classes)
        trained.load_state_dict(inverse(model).state_dict())
    else:
        trained = model
    return {"model": trained.eval(), "step_s": statistics.median(times), "saved_bytes": memory,
            "final_loss": float(loss.detach())}


@torch.no_grad()
def evaluate(model: nn.Module, data, check: int = 16) -> dict:
    """Accuracy of the baseline ``model`` at crop (0, 0) and over all 64 crops of each canvas."""
    canvases, labels = data
    dense = densify(model, (1, 3, PATCH, PATCH), global_pool="window")
    hits, agree, first = [], [], []
    for part in torch.split(torch.arange(len(labels)), 250):
        x, y = canvases[part], labels[part]
        # (B, 8, 8): the baseline's prediction for every crop
        pred = dense(x)[..., :STEP, :STEP].argmax(1)
        base = model(x[:, :, :PATCH, :PATCH]).argmax(1)
        first.append(base == y)
        hits.append(pred == y[:, None, None])
        agree.append((pred == pred[:, :1, :1]).flatten(1).all(1))
    # the dense model's crops are the baseline's crops: check some, at random offsets
    for i in range(check):
        r, c = (i * 5) % STEP, (i * 3) % STEP
        x = canvases[i:i + 1]
        torch.testing.assert_close(dense(x)[..., r, c],
                                   model(x[:, :, r:r + PATCH, c:c + PATCH]), rtol=1e-4, atol=1e-4)
    hits_t = torch.cat(hits).float()
    assert torch.equal(torch.cat(first), torch.cat(hits)[:, 0, 0])
    per_offset = hits_t.mean(0)
    return {"acc_crop0": float(torch.cat(first).float().mean()),
            "acc_all_crops": float(per_offset.mean()),
            "acc_worst_crop": float(per_offset.min()),
            "consistent": float(torch.cat(agree).float().mean())}


# --- the experiment ---------------------------------------------------------------------------

WAYS = ("baseline", "dense", "shift-aug", "shift-aug-long")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-sizes", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS[:3]))
    ap.add_argument("--long-factor", type=int, default=11,
                    help="shift-aug-long trains this many times --steps: the dense model's "
                    "time per step over the baseline's, so both take the same time")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE / "training.json")
    ap.add_argument("--append", action="store_true",
                    help="add these runs to those already in --out")
    args = ap.parse_args()

    classes = glyphs(args.classes, seed=1000)
    distractors = glyphs(8, seed=2000)
    test = make_set(args.test_size, classes, distractors, seed=999)
    previous = json.loads(args.out.read_text()) if args.append else {"invocations": []}
    runs = []
    started = time.perf_counter()
    for size in args.train_sizes:
        for seed in range(args.seeds):
            data = make_set(size, classes, distractors, seed=seed)
            for way in args.ways:
                steps = args.steps * (args.long_factor if way == "shift-aug-long" else 1)
                result = train(way, data, steps, args.batch, args.lr, seed, args.classes)
                scores = evaluate(result.pop("model"), test)
                runs.append({"train_size": size, "seed": seed, "way": way, "steps": steps,
                             **result, **scores})
                print(f"[{time.perf_counter() - started:6.0f} s] n={size} seed={seed} {way:9s} "
                      + " ".join(f"{k}={v:.3g}" for k, v in runs[-1].items()
                                 if isinstance(v, float)), flush=True)
    invocation = {"argv": sys.argv[1:], "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "runs": runs}
    out = {"invocations": previous["invocations"] + [invocation]}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    every = [r for inv in out["invocations"] for r in inv["runs"]]
    print(table(every))
    plot(every, args.out.with_suffix(".png"))


def summary(runs: list[dict]) -> dict:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["train_size"], r["way"]), []).append(r)
    return groups


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(runs: list[dict]) -> str:
    rows = ["| training canvases | way | updates | acc. crop (0,0) % | acc. all 64 crops % "
            "| worst crop % | all 64 agree % | ms / step | saved for backward / step |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = summary(runs)
    for size, way in sorted(groups, key=lambda k: (k[0], WAYS.index(k[1]))):
        group = groups[(size, way)]
        ms = statistics.median(r["step_s"] for r in group) * 1e3
        mib = group[0]["saved_bytes"] / 2**20
        rows.append(f"| {size} | {way} | {group[0]['steps']} "
                    f"| {mean_sd([r['acc_crop0'] for r in group])} "
                    f"| {mean_sd([r['acc_all_crops'] for r in group])} "
                    f"| {mean_sd([r['acc_worst_crop'] for r in group])} "
                    f"| {mean_sd([r['consistent'] for r in group])} | {ms:.0f} | {mib:.0f} MiB |")
    return "\n".join(rows)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["train_size"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, metric, title in zip(axes, ("acc_crop0", "acc_worst_crop"),
                                 ("crop at offset (0, 0)", "worst of the 64 crop offsets")):
        ways = [w for w in WAYS if any(r["way"] == w for r in runs)]
        for k, way in enumerate(ways):
            for j, size in enumerate(sizes):
                vals = [100 * r[metric] for r in runs
                        if r["way"] == way and r["train_size"] == size]
                if not vals:
                    continue
                xs = [j + (k - (len(ways) - 1) / 2) * 0.2] * len(vals)
                ax.scatter(xs, vals, s=14, color=f"C{k}", label=way if j == 0 else None)
                ax.hlines(statistics.mean(vals), xs[0] - 0.1, xs[0] + 0.1, color=f"C{k}")
        ax.set_xticks(range(len(sizes)), [f"{s} canvases" for s in sizes])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy of the baseline (%)")
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
