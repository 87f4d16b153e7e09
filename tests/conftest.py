"""Shared helpers: random BatchNorm statistics, and the assertion every rule test makes: the
baseline on the lattice at several sizes, and every phase of every node (float64)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn

from econv_convert import densify, lattice_view
from econv_convert.examples import randomize_batchnorm
from econv_convert.proof import PhaseProof
from econv_convert.torch import phases

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures"

if __import__("os").environ.get("PYTEST_XDIST_WORKER"):
    # one pytest-xdist worker per core: each runs torch on one thread, not on all of them
    torch.set_num_threads(1)


# The rule matrix runs through both captures (issue 21: every rule holds on both): each test
# of these modules that asserts through ``assert_lattice_equal`` runs once with the default
# capture (torch.fx first) and once with torch.export. ECONV_TEST_CAPTURE=torch.export (or
# torch.fx) runs every such test through that one capture instead.
RULE_MODULES = {"test_rules_conv", "test_rules_pool", "test_rules_graph", "test_window_pool"}
_CAPTURE = {"with": __import__("os").environ.get("ECONV_TEST_CAPTURE", "auto")}


def pytest_generate_tests(metafunc):
    import inspect
    import os

    if (metafunc.module.__name__.rsplit(".", 1)[-1] in RULE_MODULES
            and "ECONV_TEST_CAPTURE" not in os.environ
            and "assert_lattice_equal(" in inspect.getsource(metafunc.function)):
        metafunc.parametrize("rule_capture", ["auto", "torch.export"], ids=["fx", "export"],
                             indirect=True)


# torch.export costs about 1.5 s a rule test on CI's cores, torch.fx 0.08 s: CI runs the
# export capture on every EXPORT_EVERY-th parameter set of each rule test (spread over the
# kernels, strides and paddings the matrix draws) and all of them with ``-m extended``
EXPORT_EVERY = 8


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    seen: dict[str, int] = {}
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or spec.params.get("rule_capture") != "torch.export":
            continue
        key = f"{item.module.__name__}::{item.originalname}"
        n = seen[key] = seen.get(key, -1) + 1
        if n % EXPORT_EVERY:
            item.add_marker(pytest.mark.extended)


@pytest.fixture(autouse=True)
def rule_capture(request):
    """The capture ``assert_lattice_equal`` densifies with in this test (parametrized by
    ``pytest_generate_tests``; every other test keeps the default)."""
    if not hasattr(request, "param"):
        yield None
        return
    _CAPTURE["with"] = request.param
    yield request.param
    _CAPTURE["with"] = "auto"


def whole(dense: nn.Module, a: np.ndarray) -> np.ndarray:
    """One whole-image pass of ``dense`` over the ``H, W, C`` image ``a`` (integer images
    scaled as predict reads them): the reference every block, sink and worker count must
    equal. Returns ``(C, H', W')``."""
    from econv_convert.run.sources import normalize

    x = torch.from_numpy(normalize(np.moveaxis(a, -1, 0), None, None))[None]
    with torch.no_grad():
        y = dense(x)
    return y.reshape(-1, *y.shape[-2:]).numpy()


def rand_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics (a fresh BatchNorm is the identity and hides bugs), eval."""
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed)).eval()


def assert_lattice_equal(
    model: nn.Module,
    example: Sequence[int],
    sizes: Sequence[Sequence[int]] = (),
    *,
    global_pool: str = "phase",
    dense: nn.Module | None = None,
    seed: int = 0,
) -> nn.Module:
    """Densify ``model`` at ``example`` and check ``baseline(x) == lattice(dense(x))`` at the
    example and at every size in ``sizes`` (spatial sizes; batch 2, the example's channels),
    then every phase of every node at the example (:func:`assert_every_phase`)."""
    model = model.eval()
    if dense is None:
        dense = densify(model, example, global_pool=global_pool, capture_with=_CAPTURE["with"])
        assert _CAPTURE["with"] == "auto" or dense.econv.capture == _CAPTURE["with"]
    gen = torch.Generator().manual_seed(seed)
    for spatial in [tuple(example[2:]), *map(tuple, sizes)]:
        x = torch.randn((2, example[1], *spatial), generator=gen)
        with torch.no_grad():
            expected = model(x)
            got = lattice_view(dense, dense(x))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, s=spatial: f"input {s}: {m}")
    assert_every_phase(dense, example, seed=seed)
    return dense


def assert_every_phase(dense: nn.Module, example: Sequence[int], seed: int = 0,
                       allow_skipped: bool = True) -> PhaseProof:
    """Identity (*) of ``core.lattice`` at every node of ``dense``, every phase, in float64
    with its real weights, on one random input of ``example``'s size: the positions between
    the lattice points, layer by layer. Returns the proof."""
    wide = copy.deepcopy(dense).to(torch.float64).eval()
    wide.econv = dense.econv  # a GraphModule's copy drops it
    x = torch.randn((1, *example[1:]), generator=torch.Generator().manual_seed(seed + 7),
                    dtype=torch.float64)
    proof = phases.prove_model(wide, x, (1e-9, 1e-9))
    assert not proof.note, proof.note
    assert proof.nodes, f"no node proven ({proof.skipped})"
    worst = proof.worst
    assert proof.ok, f"node {worst.node}: {worst.detail}"
    if not allow_skipped:
        assert not proof.skipped, proof.skipped
    return proof


def assert_baseline_on_crops(baseline: nn.Module, heat, x: torch.Tensor, patch: Sequence[int],
                             step: Sequence[int], offset: Sequence[int] = (0, 0),
                             samples: int = 12, seed: int = 0) -> int:
    """A heat map ``heat`` (classes, H', W') of a patch classifier equals the baseline run on
    the crop under each output's window: output ``(i, j)`` is the patch starting at pixel
    ``offset + (i, j) * step``. Checked at every output position of the first rows and
    columns (every phase of the lattice), the last ones, and random ones. Returns how many
    positions were compared."""
    heat = torch.as_tensor(heat)
    rows, cols = heat.shape[-2:]
    rng = torch.Generator().manual_seed(seed)
    first = [(i, j) for i in range(min(8, rows)) for j in range(min(8, cols))]
    last = [(rows - 1, cols - 1), (rows - 1, 0), (0, cols - 1)]
    rand = list(zip(torch.randint(rows, (samples,), generator=rng).tolist(),
                    torch.randint(cols, (samples,), generator=rng).tolist()))
    where = list(dict.fromkeys(first + last + rand))
    crops = torch.cat([x[..., offset[0] + i * step[0]:offset[0] + i * step[0] + patch[0],
                         offset[1] + j * step[1]:offset[1] + j * step[1] + patch[1]]
                       for i, j in where])
    with torch.no_grad():
        want = baseline.eval()(crops)
    got = torch.stack([heat[..., i, j].reshape(-1) for i, j in where]).to(want.dtype)
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-4, atol=1e-5)
    return len(where)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
