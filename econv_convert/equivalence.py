"""``verify``: one function for both backends' models, its options checked once.

Each backend supplies how its two models run (:func:`econv_convert.torch.verify.checked`,
:func:`econv_convert.onnx.api.checked`); the checks are :func:`econv_convert.check.check`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from econv_convert.cases import VerifyReport
from econv_convert.check import PRECISIONS, Checks, Progress
from econv_convert.errors import InvalidInputError
from econv_convert.kinds import is_onnx_model


def verify(
    baseline: Any,
    dense: Any,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    trials: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    shift: bool = True,
    progress: Progress | None = None,
    near_example: bool = False,
    precision: str = "float64",
    outputs: Sequence[str] | None = None,
) -> VerifyReport:
    """Check ``dense`` against ``baseline`` on random inputs; never raises on a mismatch.
    Either backend's pair: PyTorch modules, or ONNX graphs (both run in onnxruntime, CPU
    provider, graph optimizations off).

    ``shapes`` defaults to :func:`~econv_convert.check.default_shapes` (small sizes for
    models that take any size, else around the example input; ``near_example`` forces the
    latter); sizes the baseline does not accept (a fixed-size head) are replaced by others or
    reported as skipped. ``precision`` ``float64`` (default) runs both in float64 (CPU copies
    of PyTorch models; ONNX graphs converted to double where onnxruntime has a double kernel
    for every op: it has none for Conv, so most CNN graphs are checked in their own dtype with
    a tolerance that grows with the number of layers, and the report says so); ``model`` runs
    them as they are. ``outputs`` names the outputs to compare (default: all). Every check
    also proves every phase of every node (:mod:`econv_convert.proof`)."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision '{precision}' is not one of "
                                f"{', '.join(PRECISIONS)}")
    options = Checks(shapes, trials, seed, atol, rtol, shift, progress, near_example, precision,
                     outputs)
    if is_onnx_model(dense):
        from econv_convert.onnx.api import checked
    else:
        from econv_convert.torch.verify import checked
    return checked(baseline, dense, options)
