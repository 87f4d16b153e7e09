"""Patterns of real library code (``library_style.py``) that our own family models never
showed: each densifies and verifies, or is refused for a true reason."""

from __future__ import annotations

import torch

from conftest import rand_bn
from econv_convert import densify, verify
from library_style import FeaturesThenInplace


def test_verify_with_until_is_not_fooled_by_an_in_place_op_after_the_cut():
    torch.manual_seed(0)
    model = rand_bn(FeaturesThenInplace())
    dense = densify(model, (1, 3, 33, 33), until="features")
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert report.max_rel < 1e-5
