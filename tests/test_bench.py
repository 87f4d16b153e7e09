"""Shift-and-stitch: the baseline on every shifted input, interleaved, is an independent
computation of the dense output (exactly so for models without padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import FIXTURES, rand_bn

from econv_convert import densify
from econv_convert.run.bench import bench, shift_and_stitch, stitch
from econv_convert.torch.loading import load_model


def fcn():
    return rand_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, 2), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(3, 1),
        nn.Conv2d(6, 4, 3)))


@pytest.mark.parametrize("size", [(40, 40), (47, 53), (61, 44)])
@pytest.mark.parametrize("output_stride", [None, 2])
def test_shift_and_stitch_equals_the_dense_output(size, output_stride):
    model = fcn()
    dense = densify(model, (1, 3, 40, 40), output_stride=output_stride)
    step = dense.econv.total_step
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = dense(x)
        stitched = stitch(shift_and_stitch(model, x, step, output_stride), step, y.shape[2:],
                          output_stride)
    covered = ~torch.isnan(stitched)
    assert covered.float().mean() > 0.8  # shifts past the last window leave a few holes
    torch.testing.assert_close(y[covered], stitched[covered], rtol=1e-4, atol=1e-5)


def test_bench_reports_every_case_with_multiply_adds():
    loaded = load_model(FIXTURES / "tiny_resnet.pt")
    dense = densify(loaded.model, loaded.input_shape, output_stride=8)
    result = bench(loaded.model, dense, (1, 3, 64, 64), runs=1, warmup=0)
    assert set(result.timings) == {"baseline", "dense", "shift_and_stitch"}
    data = result.to_dict()
    assert data["mac_ratios"]["shift_and_stitch_vs_dense"] > 1
    assert result.timings["shift_and_stitch"].note == "4 shifted baseline passes"


def test_bench_patch_classifier_scales_a_sliding_window_sample():
    loaded = load_model(FIXTURES / "patch_classifier.pt")
    dense = densify(loaded.model, loaded.input_shape)
    result = bench(loaded.model, dense, (1, 3, 96, 96), runs=1, warmup=0, window_sample=8)
    sliding = result.timings["sliding_window"]
    assert "scaled up" in sliding.note and sliding.macs > result.timings["dense"].macs


@pytest.mark.parametrize("dilation,pad", [(4, 4), (8, 0), (6, 12)])
def test_space_to_batch_form_is_exact(dilation, pad):
    from econv_convert.run.bench import space_to_batch_conv

    x = torch.nn.functional.pad(torch.randn(2, 4, 37, 30), (pad, pad, pad, pad))
    w = torch.randn(5, 4, 3, 3)
    expected = torch.nn.functional.conv2d(x, w, None, 1, 0, dilation)
    torch.testing.assert_close(space_to_batch_conv(x, w, None, (dilation, dilation), 1), expected,
                               rtol=1e-4, atol=1e-4)
