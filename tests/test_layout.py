"""The layout the code promises: the core and both backends group their rules by the same
layer families (core/walk.FAMILIES), one module each, so a new layer kind is one core
function plus one same-named module's rule per backend; no module grows past ~600 lines
without it being a decision."""

from __future__ import annotations

from pathlib import Path

import econv_convert
from econv_convert.core.walk import FAMILIES

PACKAGE = Path(econv_convert.__file__).parent


def modules(folder: str) -> set[str]:
    return {p.stem for p in (PACKAGE / folder).glob("*.py") if not p.stem.startswith("__")}


def test_the_core_and_both_backends_have_the_same_layer_families():
    assert modules("torch/rewrite") - {"frame"} == set(FAMILIES)
    assert modules("onnx/rewrite") - {"frame"} == set(FAMILIES)
    assert modules("core/rules") - {"common", "reasons"} == set(FAMILIES) - {"shape_values"}


def test_the_backends_refuse_in_the_cores_words():
    """Every reason a backend refuses with is keyed in core/rules/reasons.py: a backend passes
    the key and the names to fill in (``rules.refuse_kind``), never words of its own."""
    import re

    for folder in ("torch/rewrite", "onnx/rewrite"):
        for path in (PACKAGE / folder).glob("*.py"):
            text = path.read_text()
            worded = re.findall(r"\brefuse\(\s*f?[\"']", text)
            assert not worded, f"{folder}/{path.name}: refuses in its own words"


def test_no_module_is_much_over_600_lines():
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        assert lines <= 620, f"{name}: {lines} lines"
