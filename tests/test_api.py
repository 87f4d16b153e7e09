"""The Python API: dense checkpoints, inverse transfer, training-mode models, .pt2 input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import FIXTURES, rand_bn

from econv_convert import (
    InvalidInputError,
    densify,
    inverse,
    lattice_view,
    load_dense,
    save_dense,
    verify,
)
from econv_convert.examples import tiny_resnet
from econv_convert.torch.loading import load_model


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return rand_bn(tiny_resnet(num_classes=5, width=8))


def test_dense_checkpoint_round_trip(resnet, tmp_path):
    dense = densify(resnet, (1, 3, 48, 48))
    path = save_dense(dense, tmp_path / "dense.pt")
    loaded = load_dense(path)
    x = torch.randn(2, 3, 53, 47)
    torch.testing.assert_close(loaded(x), dense(x))
    assert loaded.econv.records == dense.econv.records
    # trainable: the parameters are Parameters and receive gradients
    loaded(x).sum().backward()
    assert loaded.get_parameter("fc.weight").grad is not None


def test_a_copy_of_a_dense_model_is_dense(resnet, tmp_path):
    """``copy.deepcopy`` (as training loops keep a best model) keeps the record: the copy
    saves, verifies and is told apart from a baseline."""
    import copy

    from econv_convert import is_dense

    dense = densify(resnet, (1, 3, 48, 48))
    twin = copy.deepcopy(dense)
    assert is_dense(twin) and twin.econv == dense.econv and twin.econv is not dense.econv
    x = torch.randn(1, 3, 53, 47)
    torch.testing.assert_close(twin(x), dense(x))
    assert verify(resnet, twin).ok
    loaded = load_dense(save_dense(twin, tmp_path / "twin.pt"))
    torch.testing.assert_close(loaded(x), dense(x))


def test_dense_checkpoint_loads_with_weights_only(resnet, tmp_path):
    path = save_dense(densify(resnet, (1, 3, 48, 48)), tmp_path / "dense.pt")
    payload = torch.load(path, weights_only=True)  # no code is unpickled
    assert payload["format"] == "econv-convert/dense"
    json.loads(payload["graph"])


def test_inverse_after_fine_tuning_the_dense_model(resnet):
    dense = densify(resnet, (1, 3, 48, 48))
    with torch.no_grad():  # stand-in for dense training: move every weight
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    baseline = inverse(dense)
    fresh = tiny_resnet(num_classes=5, width=8).eval()
    fresh.load_state_dict(baseline.state_dict())  # strict: the baseline's own class
    x = torch.randn(2, 3, 51, 45)
    torch.testing.assert_close(fresh(x), lattice_view(dense, dense(x)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fresh(x), resnet(x))  # the fine-tuned weights, not the old ones


def test_training_mode_model_is_densified_in_eval_mode_and_says_so(resnet):
    resnet.train()
    dense = densify(resnet, (1, 3, 48, 48))
    assert any("training mode" in n for n in dense.econv.notes)
    assert resnet.training  # the caller's model is not modified
    assert verify(resnet.eval(), dense).ok


def test_export_program_input(tmp_path, resnet):
    program = torch.export.export(resnet, (torch.randn(1, 3, 48, 48),))
    torch.export.save(program, tmp_path / "m.pt2")
    model = load_model(tmp_path / "m.pt2").model
    dense = densify(model, (1, 3, 48, 48))
    report = verify(resnet, dense)
    assert report.ok and len(report.checked) >= 3


def test_fixtures_load_without_arch_and_verify():
    for name in ("patch_classifier", "tiny_vgg", "tiny_resnet"):
        loaded = load_model(FIXTURES / f"{name}.pt")
        dense = densify(loaded.model, loaded.input_shape)
        report = verify(loaded.model, dense)
        assert report.ok, (name, report.failures())


def test_global_pool_mode_is_checked():
    with pytest.raises(InvalidInputError, match="global pool mode"):
        densify(nn.Conv2d(3, 3, 1), (1, 3, 8, 8), global_pool="median")


def test_verify_reports_a_wrong_dense_model(resnet):
    dense = densify(resnet, (1, 3, 48, 48))
    with torch.no_grad():
        dense.get_parameter("layer2.conv1.weight").mul_(1.01)
    report = verify(resnet, dense)
    assert not report.ok
    assert report.failures()[0].detail.startswith("output at ")


def test_verify_checks_any_size_models_at_small_sizes(resnet):
    dense = densify(resnet, (1, 3, 96, 112))  # total step 16
    report = verify(resnet, dense)
    assert report.ok and len(report.checked) >= 3
    assert max(c.shape[2] for c in report.checked) <= 17 + 16
    assert any("small sizes from 17x17" in n for n in report.notes)
    near = verify(resnet, dense, near_example=True)
    assert near.ok and (2, 3, 96, 112) in [c.shape for c in near.checked]
    assert not any("small sizes" in n for n in near.notes)


def test_verify_takes_more_lattice_points_when_the_smallest_sizes_are_rejected():
    """Unpadded 7 x 7 convolutions need more than one lattice step plus one pixel: the check
    doubles the lattice points until the baseline takes the size, and only then falls back to
    the example."""
    torch.manual_seed(0)
    model = rand_bn(nn.Sequential(
        nn.Conv2d(3, 4, 7), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 7), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    dense = densify(model, (1, 3, 40, 40))
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert [c.shape for c in report.checked][0] == (2, 3, 31, 31)
    assert any("(16 lattice points)" in n for n in report.notes)
    # the example is the smallest size the model takes, with one lattice point of its last
    # map: checked at the smallest size past it that has two
    tight = densify(model, (1, 3, 20, 20))
    report = verify(model, tight)
    assert report.ok and [c.shape for c in report.checked][0] == (2, 3, 31, 31)


def test_verify_keeps_fixed_head_models_near_the_example():
    from econv_convert.examples import patch_classifier

    torch.manual_seed(0)
    model = rand_bn(patch_classifier(num_classes=3))
    dense = densify(model, (1, 3, 65, 65))
    report = verify(model, dense)
    assert report.ok and report.checked[0].shape == (2, 3, 65, 65)


def test_flatten_head_models_are_checked_near_the_example():
    """A Flatten + Linear head fixes the input size: no small-size shortcut (the dense model
    would be asked for sizes its head convolution cannot take)."""
    torch.manual_seed(0)
    model = rand_bn(nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.Conv2d(6, 6, 1, 3),
                                  nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4)))
    dense = densify(model, (1, 3, 13, 9))
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.checked[0].shape == (2, 3, 13, 9)
    assert not any("small sizes" in n for n in report.notes)


def test_plan_counts_layers_that_keep_their_stride(resnet):
    from econv_convert.core.costs import plan

    p = plan(densify(resnet, (1, 3, 64, 64), output_stride=8))
    kept = [layer for layer in p.layers if "stride kept" in layer.note]
    assert kept and all(layer.base_macs > 0 and layer.dense_macs == layer.base_macs
                        for layer in kept)
