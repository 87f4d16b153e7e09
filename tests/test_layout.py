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

    for folder in ("core/rules", "torch/rewrite", "onnx/rewrite"):
        for path in (PACKAGE / folder).glob("*.py"):
            text = path.read_text()
            worded = re.findall(r"\brefuse\(\s*f?[\"']", text)
            assert not worded, f"{folder}/{path.name}: refuses in its own words"


def test_no_module_is_much_over_600_lines():
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        assert lines <= 620, f"{name}: {lines} lines"


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, at its top or inside a
    function (an import hidden in a function is still a tie). ``from a.b import c`` ties to
    ``a.b.c`` where that is a module, else to ``a.b``; a package's ``__init__`` run because a
    module below it is imported is not a tie."""
    import ast

    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("econv_convert", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    ties: dict[str, set[str]] = {m: set() for m in names}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                subs = [f"{base}.{a.name}" for a in node.names]
                found = [s for s in subs if s in names]
                if len(found) < len(subs):
                    found.append(known(base))
            else:
                continue
            ties[module] |= {t for t in found if t and t != module}
    return ties


def test_no_import_circles():
    """No module reaches itself through the modules it imports: a circle is hidden by an
    import inside a function until the order of first imports changes. The frames call their
    rule modules through hooks those register (``hook``), the CLI's commands share
    ``cli/common.py``, the block engine and tiling share ``run/geometry.py``."""
    ties = _imports()
    circles = []
    for start in sorted(ties):
        path, seen, todo = {start: None}, {start}, [start]
        while todo:  # breadth first: the shortest way back to start
            module = todo.pop(0)
            for nxt in sorted(ties[module]):
                if nxt == start:
                    way = [module]
                    while path[way[-1]] is not None:
                        way.append(path[way[-1]])
                    circles.append(" -> ".join([*reversed(way), start]))
                    todo = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    path[nxt] = module
                    todo.append(nxt)
    assert not circles, "\n".join(circles)


def test_the_add_a_layer_recipe_names_every_place():
    """The README's recipe for a new layer kind lists every module that registers rules or
    run-time targets (``<family>`` standing for each layer family), and every place it names
    exists: a new registry cannot be left out of it."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("Adding a layer kind touches these places")
    recipe = readme[start:readme.index("Power-average pooling", start)]
    places = set(re.findall(r"`((?:core|torch|onnx|run|tests)/[\w<>/*]+\.py)", recipe))
    assert places, "the recipe names no places"

    def expand(place: str) -> set[Path]:
        root = PACKAGE.parent if place.startswith("tests/") else PACKAGE
        if "<family>" in place:
            return {root / place.replace("<family>", f) for f in FAMILIES
                    if (root / place.replace("<family>", f)).exists()}
        return set(root.glob(place))

    named = set()
    for place in places:
        found = expand(place)
        assert found, f"the recipe names {place}, which does not exist"
        named |= found
    registers = re.compile(r"^@(rule|hook)\(|^def register(_as)?\(|^_LOWER\b", re.M)
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "rewrite" and path.stem in ("frame", "__init__"):
            continue  # where @rule and @hook are defined
        if registers.search(path.read_text()):
            assert path in named, f"{path.relative_to(PACKAGE)} registers rules but the " \
                "README's add-a-layer recipe does not name it"
