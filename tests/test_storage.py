"""Dense checkpoints store whatever the rewrite emits, under any module name PyTorch accepts,
and a file that would not load back is never written."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from conftest import rand_bn
from library_style import DashNamedNet, MultiScaleNet

from econv_convert import InvalidInputError, densify, load_dense, save_dense, verify
from econv_convert.torch import rewrite, targets
from econv_convert.torch.storage import graph_from_json, graph_to_json

assert rewrite  # importing the rewrite fills the registry of targets


@pytest.mark.parametrize("name", sorted(targets.registered()))
def test_every_registered_target_round_trips_through_storage(name):
    fn = targets.registered()[name]
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(fn, (x,)))
    (node,) = [n for n in graph_from_json(graph_to_json(g)).nodes if n.op == "call_function"]
    assert node.target is fn


@pytest.mark.parametrize("build", [MultiScaleNet, DashNamedNet], ids=["torch-split", "dash-names"])
def test_library_style_models_save_and_load(build, tmp_path):
    torch.manual_seed(0)
    model = rand_bn(build())
    dense = densify(model, (1, 3, 32, 32))
    assert verify(model, dense).ok
    loaded = load_dense(save_dense(dense, tmp_path / "dense.pt"))
    x = torch.randn(2, 3, 37, 35)
    torch.testing.assert_close(loaded(x), dense(x))
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_a_checkpoint_that_would_not_load_is_never_written(tmp_path):
    torch.manual_seed(0)
    dense = densify(rand_bn(DashNamedNet()), (1, 3, 32, 32))
    node = next(n for n in dense.graph.nodes if n.op == "call_function")
    node.target = torch.save  # a call no checkpoint may make
    dense.recompile()
    with pytest.raises(InvalidInputError, match="would not load back.*torch.serialization.save"):
        save_dense(dense, tmp_path / "dense.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ['a".b', "a\\b", "a'b", "a\nb"])
def test_attribute_paths_that_could_break_generated_code_are_refused(target):
    """fx writes a path that is not an identifier into code as getattr(self, "..."), without
    escaping: quotes, backslashes and control characters are refused; '-' and spaces load."""
    g = fx.Graph()
    g.output(g.get_attr(target))
    text = graph_to_json(g)
    with pytest.raises(InvalidInputError, match="bad attribute path"):
        graph_from_json(text)


@pytest.mark.parametrize("target", ["block1-0.weight", "conv 1.weight", "a.b-c.d"])
def test_attribute_paths_pytorch_accepts_load(target):
    g = fx.Graph()
    g.output(g.get_attr(target))
    (node,) = [n for n in graph_from_json(graph_to_json(g)).nodes if n.op == "get_attr"]
    assert node.target == target


def test_checkpoints_written_before_the_subpackages_still_load():
    """Dense graphs written by 0.1 name their run-time ops econv_convert.ops.NAME."""
    from econv_convert.torch import ops

    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(ops.append_extras, (x, 2)))
    text = graph_to_json(g).replace("econv_convert.torch.ops.", "econv_convert.ops.")
    assert "econv_convert.ops.append_extras" in text
    (node,) = [n for n in graph_from_json(text).nodes if n.op == "call_function"]
    assert node.target is ops.append_extras
