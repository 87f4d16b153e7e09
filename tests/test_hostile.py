"""No model ends in an internal error: hostile model code converts exactly or is refused with
a typed error naming the cause, through the API (every capture) and the CLI (exit 0, 1 or 2,
never 3)."""

from __future__ import annotations

import pytest
import torch
from hostile import OUTCOMES
from typer.testing import CliRunner

from econv_convert import EConvError, densify, verify
from econv_convert.cli import app

MODELS = {cls.__name__: cls for cls in OUTCOMES}


@pytest.mark.parametrize("capture", ["auto", "torch.fx", "torch.export"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hostile_code_converts_or_is_refused_with_a_typed_error(name, capture):
    cls = MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    try:
        dense = densify(model, (1, 3, 32, 32), capture_with=capture)
    except EConvError as e:
        assert "\n" not in str(e)
        if capture == "auto":  # the outcome the model deserves, once both captures tried
            assert OUTCOMES[cls] != "exact", f"refused: {e}"
            kind, phrase = OUTCOMES[cls]
            assert type(e).__name__ == kind and phrase in str(e), str(e)
        return
    assert OUTCOMES[cls] == "exact" or capture != "auto", f"{name} converted"
    assert verify(model, dense).ok


@pytest.mark.parametrize("name", ["MakesConstants", "BranchesOnValues", "ReturnsNothing",
                                  "Raises"])
def test_the_command_never_ends_in_an_internal_error(tmp_path, name):
    path = tmp_path / "m.pt"
    torch.save({"model": MODELS[name]().eval()}, path)
    result = CliRunner().invoke(app, ["densify", str(path), "--input-shape", "1,3,32,32",
                                      "--trust-pickle", "-o", str(tmp_path / "d.pt")])
    assert result.exit_code in (0, 1, 2), result.output
    assert "internal error" not in result.output
    assert (result.exit_code == 0) == (tmp_path / "d.pt").exists()


def test_an_unexpected_error_inside_the_rewrite_is_a_typed_error(monkeypatch):
    from econv_convert import InvalidModelError
    from econv_convert.torch import api

    def broken(self):
        raise KeyError("something econv-convert did not foresee")

    monkeypatch.setattr(api.Rewriter, "run", broken)
    with pytest.raises(InvalidModelError, match="a limit of econv-convert: please report it"):
        densify(MODELS["AssignsAttr"]().eval(), (1, 3, 32, 32))
