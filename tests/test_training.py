"""The dense model trains like any module: BatchNorm and dropout follow ``train()``, and its
gradients are the baseline's (the proofs that dense training trains the baseline's
parameters)."""

from __future__ import annotations

import copy

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


def _ddp_rank(rank: int, world: int, port: int, model_path: str, data_path: str,
              out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
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
    import socket

    import torch.multiprocessing as mp

    dense = densify(net(), (1, 3, 32, 32))
    save_dense(dense, tmp_path / "d.pt")
    x = torch.randn(4, 3, 36, 36)
    with torch.no_grad():
        target = torch.randn_like(dense(x))
    torch.save((x, target), tmp_path / "data.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path / "d.pt"), str(tmp_path / "data.pt"),
                              str(tmp_path / "grads.pt")), nprocs=2, join=True)
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
