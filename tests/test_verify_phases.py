"""verify proves every dense position, not only the lattice: a dense model wrong only between
the lattice points fails, for every seed, on padded and unpadded networks, whether the error
sits in a node's op, in a node inserted between two layers, or in a wrapper around the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import assert_every_phase, rand_bn

from econv_convert import densify, verify
from econv_convert.core.lattice import Field, interior
from econv_convert.torch import ops

SEEDS = range(5)


def _bump(y: torch.Tensor, step: int) -> torch.Tensor:
    """+1 on rows 1 (mod ``step``) of a map: rows off the lattice of ``step``."""
    y = y.clone()
    y[..., 1::step, :] += 1.0
    return y


def _bumped_conv(*args, **kwargs):
    return _bump(ops.conv(*args, **kwargs), 4)


class Bumped(nn.Module):
    """The dense model behind a wrapper that adds the error to its output (rows 1 mod 4)."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense
        self.econv = dense.econv

    def forward(self, x):
        return _bump(self.dense(x), 4)


def net(pad: int) -> nn.Module:
    torch.manual_seed(0)
    return rand_bn(nn.Sequential(nn.Conv2d(3, 4, 3, 2, pad), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 5, 3, 2, pad), nn.BatchNorm2d(5)))


def mutate(dense: nn.Module, how: str) -> nn.Module:
    """A copy of ``dense`` wrong only off the lattice: ``node`` inserts a bump after the first
    convolution (rows 1 mod 2 of a map at step 2), ``op`` makes the second convolution's own
    op bump rows 1 mod 4 of its output, ``wrapper`` wraps the model."""
    if how == "wrapper":
        return Bumped(dense)
    meta = dense.econv
    dense = copy.deepcopy(dense)
    dense.econv = meta  # a GraphModule's copy drops it
    records = meta.records
    nodes = {n.name: n for n in dense.graph.nodes}
    if how == "node":
        target = nodes[records[0]["dense_name"]]
        with dense.graph.inserting_after(target):
            bumped = dense.graph.call_function(_bump, (target, 2))
        target.replace_all_uses_with(bumped, delete_user_cb=lambda u: u is not bumped)
    else:
        nodes[records[1]["dense_name"]].target = _bumped_conv
    dense.recompile()
    return dense


@pytest.mark.parametrize("how", ["node", "op", "wrapper"])
@pytest.mark.parametrize("pad", [0, 1], ids=["unpadded", "padded"])
def test_an_error_only_between_the_lattice_points_fails_verify_for_every_seed(pad, how):
    model = net(pad)
    dense = densify(model, (1, 3, 31, 27))
    wrong = mutate(dense, how)
    x = torch.randn(1, 3, 31, 27)
    with torch.no_grad():  # the mutation leaves the lattice alone
        torch.testing.assert_close(dense(x)[..., ::4, ::4], wrong(x)[..., ::4, ::4])
    assert verify(model, dense).ok
    for seed in SEEDS:
        report = verify(model, wrong, seed=seed)
        assert not report.ok, f"seed {seed}: an off-lattice error passed"
        assert all(c.ok for c in report.checked if c.check == "lattice")
        failed = {c.check for c in report.failures()}
        # a graph is caught node by node, at the node the error first reaches; a wrapper
        # (not the graph econv-convert made) end to end, between the lattice points
        assert failed == ({"shift"} if how == "wrapper" else {"phases", "shift"} & failed)
        if how != "wrapper":
            case = next(c for c in report.failures() if c.check == "phases")
            culprit = "batch_norm" if how == "node" else records_name(dense, 1)
            assert case.detail.startswith(f"node {culprit}:"), case


def records_name(dense, k: int) -> str:
    return dense.econv.records[k]["fx_name"]


def test_the_report_says_what_was_proven():
    model = net(1)
    report = verify(model, densify(model, (1, 3, 31, 27)))
    assert report.ok
    proven = report.to_dict()["proven"]
    assert len(proven["lattice"]["sizes"]) >= 3
    # phases: (a, j) pairs of each node, per axis: step_in x stride
    assert proven["phases"]["nodes"] == 5 and proven["phases"]["not_checked"] == {}
    assert proven["phases"]["phase_checks"] == 4 + 4 + 4 + 16 + 16
    # every combination of the 4 x 4 output phases, away from the padding: its reach is
    # 1 + 1*2 = 3 px at the start, so the interior starts at output 1
    assert proven["shift"]["offsets"] == 16
    assert all(first == 1 for first, _ in proven["shift"]["interior"])
    assert report.seconds > 0


def test_interior_is_where_padding_does_not_reach():
    """The statement the README makes: a dense output whose window starts ``lo`` pixels or
    more after the input's start and ends ``hi`` pixels or more before its end equals the
    baseline on the crop under that window, at every phase."""
    torch.manual_seed(1)
    model = rand_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 4, 3, 1, 2, dilation=2),
        nn.ReflectionPad2d(1), nn.Conv2d(4, 3, 3, 1, 0)))
    dense = densify(model, (1, 3, 40, 40))
    f = Field(*dense.econv.out_field[0])
    assert (f.step, f.lo) == (4, 1 + 1 * 2 + 2 * 4 + 1 * 4)
    crop = f.lo + f.size + f.hi + 9
    first, last = interior(crop, f)
    assert first <= last
    x = torch.randn(1, 3, crop + 8, crop + 8, dtype=torch.float64)
    wide, base = copy.deepcopy(dense).double(), copy.deepcopy(model).double()
    with torch.no_grad():
        y = wide(x)
        for r in range(4):
            b = base(x[..., r:r + crop, r:r + crop])[..., first:last + 1, first:last + 1]
            got = y[..., r + 4 * first:r + 4 * last + 1:4, r + 4 * first:r + 4 * last + 1:4]
            torch.testing.assert_close(got, b, rtol=1e-9, atol=1e-9)
    report = verify(model, dense)
    assert report.ok and any(c.check == "shift" for c in report.checked)


def test_every_node_of_a_residual_net_is_proven():
    torch.manual_seed(2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 2, 1)
            self.bn = nn.BatchNorm2d(4)
            self.down = nn.Conv2d(4, 4, 1, 2)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += self.down(x)
            return torch.relu(out)

    model = rand_bn(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), Block(), Block(),
                                  nn.AvgPool2d(3, 2, 1, count_include_pad=False)))
    dense = densify(model, (1, 3, 37, 41))
    proof = assert_every_phase(dense, (1, 3, 37, 41), allow_skipped=False)
    assert proof.phases > 500 and proof.complete


def test_a_wrapper_is_checked_end_to_end_only():
    model = net(0)
    report = verify(model, Bumped(densify(model, (1, 3, 31, 27))))
    assert any("not the graph econv-convert made" in n for n in report.notes)


def test_graph_mutation_is_named_in_the_failure():
    model = net(1)
    wrong = mutate(densify(model, (1, 3, 31, 27)), "op")
    case = next(c for c in verify(model, wrong).failures() if c.check == "phases")
    # the exact phase per axis and the point: rows 1 (mod 4) of the second convolution
    assert case.detail.startswith("node conv2d_1: phase (1, ") and "dense" in case.detail, case
    assert isinstance(wrong, fx.GraphModule)


def test_the_command_says_what_was_proven(tmp_path):
    from typer.testing import CliRunner

    from econv_convert.cli import app

    model = net(1)
    torch.save({"model": model}, tmp_path / "m.pt")
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "m.pt"), "--input-shape",
                                      "1,3,31,27", "--trust-pickle"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "proven: the lattice end to end at" in text, text
    assert "every phase of 5 nodes, each alone on small random maps (float64" in text, text
    assert "shifted windows at 16 offsets, outputs 1.." in text
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "m.pt"), "--input-shape",
                                      "1,3,31,27", "--trust-pickle", "--json"])
    proven = __import__("json").loads(result.stdout)["verification"]["proven"]
    assert proven["phases"]["nodes"] == 5 and proven["shift"]["offsets"] == 16


def _bumped_onnx(dense, step: int = 4):
    """An ONNX dense graph whose output gets +1 on rows 1 (mod ``step``): Shape, Range, Mod,
    Equal and a broadcast Add appended after the output."""
    import onnx
    from onnx import TensorProto, helper

    model = copy.deepcopy(dense)
    g = model.graph
    out = g.output[0].name
    raw = out + "_raw"
    for n in g.node:
        n.output[:] = [raw if o == out else o for o in n.output]

    def const(name, value, dtype=TensorProto.INT64):
        g.initializer.append(helper.make_tensor(name, dtype, [len(value)] if len(value) > 1
                                                else [], value))

    const("b_two", [2])
    const("b_zero", [0])
    const("b_one", [1])
    const("b_step", [step])
    const("b_which", [1])
    const("b_shape", [1, 1, -1, 1], TensorProto.INT64)
    g.node.extend([
        helper.make_node("Shape", [raw], ["b_s"]),
        helper.make_node("Gather", ["b_s", "b_two"], ["b_h"], axis=0),
        helper.make_node("Range", ["b_zero", "b_h", "b_one"], ["b_rows"]),
        helper.make_node("Mod", ["b_rows", "b_step"], ["b_mod"]),
        helper.make_node("Equal", ["b_mod", "b_which"], ["b_hit"]),
        helper.make_node("Cast", ["b_hit"], ["b_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["b_f", "b_shape"], ["b_col"]),
        helper.make_node("Add", [raw, "b_col"], [out]),
    ])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("pad", [0, 1], ids=["unpadded", "padded"])
def test_an_onnx_graph_wrong_only_between_the_lattice_points_fails_for_every_seed(pad):
    from onnx_graphs import export

    from econv_convert import onnx_api

    graph = export(net(pad), (1, 3, 31, 27))
    dense = onnx_api.densify(graph)
    assert onnx_api.verify(graph, dense).ok
    wrong = _bumped_onnx(dense)
    for seed in SEEDS:
        report = onnx_api.verify(graph, wrong, seed=seed)
        assert not report.ok, f"seed {seed}: an off-lattice error passed"
        assert all(c.ok for c in report.checked if c.check == "lattice")
        # caught node by node (at the last node, whose dense value is the bumped one) and
        # end to end between the lattice points
        assert {c.check for c in report.failures()} == {"phases", "shift"}
        case = next(c for c in report.failures() if c.check == "phases")
        assert "phase (1, " in case.detail, case
