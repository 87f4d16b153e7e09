"""The dense model trains like any module: BatchNorm and dropout follow ``train()``, and its
gradients are the baseline's (the proofs that dense training trains the baseline's
parameters)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import rand_bn

from econv_convert import densify, inverse, lattice_view, load_dense, save_dense, verify
from econv_convert.torch.module import freeze_batchnorm


def net(pad: int = 1, dropout: float = 0.0, momentum: float | None = 0.1) -> nn.Module:
    return rand_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, 2, pad), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout2d(dropout),
        nn.Conv2d(6, 8, 3, 1, pad), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(8, 4, 1)))


def classifier() -> nn.Module:
    return rand_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batchnorm_in_training_uses_batch_statistics_and_updates_the_running_ones(momentum):
    model = net(momentum=momentum)
    dense = densify(model, (1, 3, 32, 32))
    x = torch.randn(2, 3, 37, 33)
    bn = dict(dense.named_buffers())
    before = {k: v.clone() for k, v in bn.items()}
    with torch.no_grad():
        frozen_out = dense(x)
        dense.train()
        trained_out = dense(x)
    assert not torch.allclose(trained_out, frozen_out)
    assert int(bn["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1
    assert not torch.equal(bn["1.running_mean"], before["1.running_mean"])
    # the first BatchNorm saw the dense map of the first convolution: its batch mean
    with torch.no_grad():
        first = dense.get_submodule("0")
        conv = nn.functional.conv2d(x, first.weight, first.bias, 1, 1)
    factor = 1.0 / float(bn["1.num_batches_tracked"]) if momentum is None else momentum
    want = (1 - factor) * before["1.running_mean"] + factor * conv.mean((0, 2, 3))
    torch.testing.assert_close(bn["1.running_mean"], want, rtol=1e-5, atol=1e-6)
    dense.eval()
    with torch.no_grad():
        assert not torch.allclose(dense(x), frozen_out)  # the new running statistics


def test_frozen_batchnorm_keeps_running_statistics_in_training_and_is_saved(tmp_path):
    dense = freeze_batchnorm(densify(net(), (1, 3, 32, 32)))
    x = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        want = dense(x)
        dense.train()
        got = dense(x)
    torch.testing.assert_close(got, want)
    save_dense(dense, tmp_path / "d.pt")
    loaded = load_dense(tmp_path / "d.pt").train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)
    freeze_batchnorm(loaded, False)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), want)


def test_dropout_is_on_in_training_only(tmp_path):
    dense = densify(net(dropout=0.5), (1, 3, 32, 32))
    freeze_batchnorm(dense)
    x = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        a, b = dense(x), dense(x)
        torch.testing.assert_close(a, b)
        dense.train()
        assert not torch.allclose(dense(x), a)
        save_dense(dense.eval(), tmp_path / "d.pt")
        loaded = load_dense(tmp_path / "d.pt")
        torch.testing.assert_close(loaded(x), a)
        assert not torch.allclose(loaded.train()(x), a)


@pytest.mark.parametrize("build", [net, classifier], ids=["map", "classifier-phase"])
def test_the_lattice_loss_gradient_is_the_baseline_gradient(build):
    model = build().double()
    dense = densify(model, (1, 3, 32, 32))
    x = torch.randn(2, 3, 37, 41, dtype=torch.float64)
    target = model(x).detach().normal_()
    base = ((model(x) - target) ** 2).sum()
    grads = torch.autograd.grad(base, list(model.parameters()))
    got = ((lattice_view(dense, dense(x)) - target) ** 2).sum()
    params = dict(dense.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(params)
    dense_grads = torch.autograd.grad(got, [params[n] for n in names])
    for name, g, d in zip(names, grads, dense_grads):
        torch.testing.assert_close(d, g, msg=lambda m, n=name: f"{n}: {m}")


def test_the_dense_loss_gradient_is_the_sum_over_shifted_baselines():
    """Without padding every dense position is the baseline on a shifted input (shift and
    stitch): the gradient of a loss summed over every dense position is the sum of the
    baselines' gradients over all shifts."""
    model = net(pad=0).double()
    dense = densify(model, (1, 3, 32, 32))
    step = dense.econv.axis_steps
    x = torch.randn(1, 3, 45, 43, dtype=torch.float64)
    y = dense(x)
    weight = torch.randn_like(y)
    params = dict(dense.named_parameters())
    grads = torch.autograd.grad((y * weight).sum(),
                                [params[n] for n, _ in model.named_parameters()])
    total = [torch.zeros_like(p) for p in model.parameters()]
    for r in range(step[0]):
        for c in range(step[1]):
            out = model(x[:, :, r:, c:])
            w = weight[:, :, r::step[0], c::step[1]]
            rows, cols = min(out.shape[2], w.shape[2]), min(out.shape[3], w.shape[3])
            loss = (out[:, :, :rows, :cols] * w[:, :, :rows, :cols]).sum()
            for t, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
                t += g
    for (name, _), g, t in zip(model.named_parameters(), grads, total):
        torch.testing.assert_close(g, t, msg=lambda m, n=name: f"{n}: {m}")


def test_trained_weights_and_statistics_come_back_by_inverse_transfer():
    model = net()
    dense = densify(model, (1, 3, 32, 32))
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    dense.train()
    for _ in range(3):
        optimizer.zero_grad()
        dense(torch.randn(2, 3, 36, 36)).square().mean().backward()
        optimizer.step()
    dense.eval()
    baseline = inverse(dense)
    for (name, value), (_, trained) in zip(baseline.state_dict().items(),
                                           dense.state_dict().items()):
        torch.testing.assert_close(value, trained, msg=name)
    assert int(baseline.state_dict()["1.num_batches_tracked"]) == 3
    model.load_state_dict(baseline.state_dict())  # the original class takes them as they are
    assert verify(model, dense).ok


def _ddp_rank(rank: int, world: int, rendezvous: str, model_path: str, data_path: str,
              out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        dense = freeze_batchnorm(load_dense(model_path)).train()
        model = DistributedDataParallel(dense)
        x, target = torch.load(data_path)
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        ((model(x[part]) - target[part]) ** 2).mean().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in dense.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_gives_the_single_process_gradients(tmp_path):
    import torch.multiprocessing as mp

    dense = densify(net(), (1, 3, 32, 32))
    save_dense(dense, tmp_path / "d.pt")
    x = torch.randn(4, 3, 36, 36)
    with torch.no_grad():
        target = torch.randn_like(dense(x))
    torch.save((x, target), tmp_path / "data.pt")
    # a file to meet at, not a free port: a port found free can be taken by another test's
    # cluster before the ranks bind it
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "d.pt"),
                              str(tmp_path / "data.pt"), str(tmp_path / "grads.pt")), nprocs=2,
             join=True)
    got = torch.load(tmp_path / "grads.pt")
    single = freeze_batchnorm(load_dense(tmp_path / "d.pt")).train()
    ((single(x) - target) ** 2).mean().backward()
    for name, p in single.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def _fixture_dense():
    from conftest import FIXTURES

    from econv_convert.torch.loading import load_model

    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    return densify(loaded.model, loaded.input_shape)


@pytest.mark.extended
def test_torch_compile_of_a_dense_model_in_eval():
    dense = _fixture_dense()
    x = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(dense)(x), dense(x), rtol=1e-4, atol=1e-5)


@pytest.mark.extended
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-bn", "batch-statistics"])
def test_torch_compile_of_a_dense_model_in_training(frozen):
    # float64: batch statistics of a batch of two amplify float32 rounding to ~1e-3
    compiled_model = freeze_batchnorm(_fixture_dense(), frozen).double().train()
    eager_model = copy.deepcopy(compiled_model)
    x = torch.randn(2, 3, 80, 72, dtype=torch.float64)
    torch.compile(compiled_model)(x).square().sum().backward()
    eager_model(x).square().sum().backward()
    eager = dict(eager_model.named_parameters())
    for n, p in compiled_model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n].grad, rtol=1e-7, atol=1e-7, msg=n)
    eager_buffers = dict(eager_model.named_buffers())
    for n, b in compiled_model.named_buffers():
        torch.testing.assert_close(b, eager_buffers[n], rtol=1e-9, atol=1e-9, msg=n)


# -- stochastic depth: recognized by behaviour, kept in the graph, on in training -------------

def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Per-sample drop path as libraries write it: the identity in eval mode."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class BatchDrop(nn.Module):
    """Stochastic depth in "batch" mode: one draw for the whole batch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty([1] * x.ndim).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class GaussianNoise(nn.Module):
    """Identity in eval mode, noise at every position in training: not stochastic depth."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x


class Block(nn.Module):
    def __init__(self, c: int, drop: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop_path = drop

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + self.drop_path(y))


def drop_net(first: nn.Module, second: nn.Module) -> nn.Module:
    return rand_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), Block(8, first),
        nn.MaxPool2d(2), Block(8, second), nn.Conv2d(8, 4, 1)))


def _drops(dense):
    from econv_convert.torch import ops

    return [n.args[1:4:2] for n in dense.graph.nodes if n.target is ops.drop_path]


@pytest.mark.parametrize("drop", [DropPath(0.3), BatchDrop(0.25)], ids=["per-sample", "batch"])
def test_stochastic_depth_drops_in_training_as_the_baseline_did(drop, tmp_path):
    model = drop_net(drop, DropPath(0.0))  # a zero rate is the identity in training too
    dense = freeze_batchnorm(densify(model, (1, 3, 32, 32)))
    per_sample = isinstance(drop, DropPath)
    want_p = 0.3 if per_sample else 0.25
    assert len(_drops(dense)) == 1
    p, kind = _drops(dense)[0]
    assert abs(p - want_p) < 1e-12 and kind is per_sample
    assert any("'3.drop_path' is stochastic depth" in n for n in dense.econv.notes)
    assert verify(model, dense).ok
    x = torch.randn(16, 3, 35, 37)
    # in training, the same random draws as the baseline's module: the baseline with only its
    # drop modules in training mode is the dense model's lattice
    model.get_submodule("3.drop_path").train()
    for loaded in (dense, load_dense(save_dense(dense, tmp_path / "d.pt") or tmp_path / "d.pt")):
        freeze_batchnorm(loaded).train()
        with torch.no_grad():
            torch.manual_seed(5)
            got = lattice_view(loaded, loaded(x))
            torch.manual_seed(5)
            want = model(x)
            torch.testing.assert_close(got, want)
            loaded.eval()
            assert not torch.allclose(lattice_view(loaded, loaded(x)), want)


def test_stochastic_depth_by_a_plain_rand_comparison_is_recognized_too():
    from families import StochasticDepth

    dense = densify(drop_net(StochasticDepth(0.1), StochasticDepth(0.2)), (1, 3, 32, 32))
    got = sorted(_drops(dense))
    assert [k for _, k in got] == [True, True]
    for (p, _), want in zip(got, (0.1, 0.2)):
        assert abs(p - want) < 1e-12


@pytest.mark.parametrize("module, phrase", [
    (DropPath(0.2, scale_by_keep=False), "drops without rescaling"),
    (GaussianNoise(), "random per position"),
], ids=["unscaled", "noise"])
def test_training_only_behaviour_that_is_not_stochastic_depth_is_reported(module, phrase):
    model = drop_net(module, nn.Identity())
    before = torch.get_rng_state()
    dense = densify(model, (1, 3, 32, 32))
    assert torch.equal(torch.get_rng_state(), before)  # the probe leaves the RNG as it was
    assert _drops(dense) == []
    assert any("'3.drop_path' is the identity in eval mode" in n and phrase in n
               for n in dense.econv.notes), dense.econv.notes
    assert verify(model, dense).ok


# -- inverse refuses a dense model whose structure changed -----------------------------------

def _replace_head(d):
    d.get_submodule("0").weight = nn.Parameter(torch.randn(5, 3, 3, 3))  # other out-channels


def _add_module(d):
    d.extra = nn.Linear(2, 2)


def _drop_buffer(d):
    del d.get_submodule("1").running_var


@pytest.mark.parametrize("edit, names", [
    (_replace_head, "reshaped: 0.weight (6, 3, 3, 3) -> (5, 3, 3, 3)"),
    (_add_module, "not in the baseline: extra.weight, extra.bias"),
    (_drop_buffer, "missing: 1.running_var"),
], ids=["reshaped", "added", "missing"])
def test_inverse_refuses_a_dense_model_whose_structure_changed_naming_what_differs(edit, names):
    from econv_convert.errors import TransferError

    dense = densify(net(), (1, 3, 32, 32))
    inverse(dense)  # unchanged: fine
    edit(dense)
    with pytest.raises(TransferError, match="no longer match") as e:
        inverse(dense)
    assert names in str(e.value)


def test_inverse_cli_refuses_a_changed_dense_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from econv_convert.cli import app

    dense = densify(net(), (1, 3, 32, 32))
    _add_module(dense)
    save_dense(dense, tmp_path / "d.pt")
    proc = CliRunner().invoke(app, ["inverse", str(tmp_path / "d.pt"), "-o",
                                    str(tmp_path / "b.pt")])
    assert proc.exit_code == 2, proc.stderr
    assert "extra.weight" in proc.stderr + proc.stdout
    assert not (tmp_path / "b.pt").exists()


def test_densify_cli_freezes_batchnorm_on_request_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from econv_convert.cli import app

    model = tmp_path / "m.pt"
    torch.save(net(), model)
    base = ["densify", str(model), "--input-shape", "1,3,32,32", "--trust-pickle",
            "--no-verify"]
    runner = CliRunner()
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "a.pt")])
    frozen = runner.invoke(app, [*base, "-o", str(tmp_path / "b.pt"), "--freeze-batchnorm"])
    assert plain.exit_code == 0 and frozen.exit_code == 0, plain.stderr + frozen.stderr
    assert "BatchNorm and dropout follow train()" in plain.stdout
    assert "BatchNorm frozen" in frozen.stdout
    assert not load_dense(tmp_path / "a.pt").econv.frozen_batchnorm
    assert load_dense(tmp_path / "b.pt").econv.frozen_batchnorm
    as_json = runner.invoke(app, [*base, "--freeze-batchnorm", "--json"])
    assert json.loads(as_json.stdout)["dense"]["training"].startswith("BatchNorm frozen")


@pytest.mark.slow
@pytest.mark.extended  # a benchmark's run: kept out of CI's time
def test_the_training_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/training.py at a toy budget: the script the README's table comes from still
    runs (dense training, inverse, the dense evaluation checked against baseline crops)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "training.py"
    out = tmp_path / "t.json"
    args = [sys.executable, str(script), "--seeds", "1", "--train-sizes", "32", "--steps", "2",
            "--test-size", "40", "--batch", "8", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["invocations"][0]["runs"]
    assert [r["way"] for r in runs] == ["baseline", "dense", "shift-aug"]
    assert out.with_suffix(".png").exists()
    assert runs[1]["saved_bytes"] > runs[0]["saved_bytes"]
