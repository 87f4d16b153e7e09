"""Every family structure densifies exactly: whole network, feature extractor, output stride,
and exports. The models are in ``families.py`` (small, self-written)."""

from __future__ import annotations

import pytest
import torch
from conftest import rand_bn
from families import FAMILIES, REFUSED

from econv_convert import InvalidInputError, UnsupportedLayerError, densify, verify
from econv_convert.torch.exports import export_onnx, export_pt2

NAMES = list(FAMILIES)


def build(name):
    torch.manual_seed(0)
    return rand_bn(FAMILIES[name][0]())


def check(model, dense, min_checked=2):
    report = verify(model, dense)
    assert report.ok, report.failures()
    assert len(report.checked) >= min_checked
    return report


@pytest.mark.parametrize("mode", ["phase", "lattice"])
@pytest.mark.parametrize("name", NAMES)
def test_family_densifies_exactly(name, mode):
    model = build(name)
    _, shape, stride = FAMILIES[name]
    dense = densify(model, shape, global_pool=mode)
    assert max(dense.econv.total_step) == stride
    check(model, dense)
    assert sorted(dense.state_dict()) == sorted(model.state_dict())


def _middle_child(model) -> str:
    children = [n for n, _ in model.named_children()]
    return children[len(children) // 2]


@pytest.mark.parametrize("name", NAMES)
def test_family_feature_extractor(name):
    model = build(name)
    until = _middle_child(model)
    dense = densify(model, FAMILIES[name][1], until=until)
    check(model, dense)


@pytest.mark.parametrize("k", [8, 16])
@pytest.mark.parametrize("name", NAMES)
def test_family_output_stride(name, k):
    model = build(name)
    _, shape, stride = FAMILIES[name]
    if stride % k:
        with pytest.raises(InvalidInputError, match="cannot be reached"):
            densify(model, shape, output_stride=k)
        return
    dense = densify(model, shape, output_stride=k)
    assert max(dense.econv.total_step) == stride // k
    check(model, dense)


# CI exports the families whose layers stress the exporters differently (a ceil-mode pool,
# channels-first LayerNorm through permutes, 1-D and 3-D maps, plain residuals); every family
# in both formats runs with ``-m extended`` (an ONNX export of a family costs 6-20 s on CI's
# two cores)
IN_CI = {"pt2": {"squeezenet", "convnext", "cnn3d", "resnet-basic"},
         "onnx": {"convnext", "cnn1d", "resnet-basic"}}


EXPORTS = [pytest.param(name, fmt, id=f"{name}-{fmt}",
                        marks=() if name in IN_CI[fmt] else pytest.mark.extended)
           for name in NAMES for fmt in ("pt2", "onnx")]


@pytest.mark.parametrize(("name", "fmt"), EXPORTS)
def test_family_exports_match_at_a_new_size(name, fmt):
    model = build(name)
    dense = densify(model, FAMILIES[name][1], global_pool="lattice")
    _, result = (export_pt2 if fmt == "pt2" else export_onnx)(dense)  # raises on a mismatch
    assert result.shape[2:] != tuple(FAMILIES[name][1][2:])
    assert result.max_abs < 1e-4


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_equivariant_families_are_refused_naming_the_node(name):
    build_fn, shape, match = REFUSED[name]
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        densify(rand_bn(build_fn()), shape)
    assert "\n" not in str(err.value)
    # and what to do: densify the part before it (which then works), or an option
    assert "; to go on: " in str(err.value) and err.value.hint
    prefix = "densify the part before it with until="
    if err.value.hint.startswith(prefix):
        model = rand_bn(build_fn())
        assert verify(model, densify(model, shape, until=err.value.hint[len(prefix):])).ok


def test_exports_of_a_model_of_any_size_run_at_its_smallest_sizes():
    """The export's trace and check run the dense model at two lattice points (plus two
    pixels), not at sizes chosen from the example: a dense model at total stride s costs
    about s * s times the baseline per pixel (a ResNet-50 trunk re-run at 323 x 323 took
    more than 12 GB)."""
    from econv_convert.torch.exports import export_shapes

    model = build("resnet-basic")
    dense = densify(model, (1, 3, 224, 224), until="layer3")
    s = max(dense.econv.size_steps)
    trace, rerun = export_shapes(dense)
    assert trace == (2, 3, s + 1, s + 1)
    assert rerun == (3, 3, s + 3, s + 3)
    fixed = densify(model, (1, 3, 64, 64))  # any size too: a global pool
    assert export_shapes(fixed)[0][2:] == (s + 1, s + 1)
