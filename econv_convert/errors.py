"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Every message is one line that says what is wrong and where (the node or file), so the CLI can
print it as it is. A message names an option as the API argument it is, followed by ``=``
(``until=layer3``, ``input_shape=...``, ``force=True``); the CLI shows those as its flags
(``--until layer3``).
"""

from __future__ import annotations


def describe(e: BaseException, limit: int | None = 200) -> str:
    """``Type: first line of the message`` (cut at ``limit``): a cause to quote in a one-line
    error of our own."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0][:limit]}"


class EConvError(Exception):
    """Base class of every error econv-convert raises on purpose. CLI exit code 2."""

    exit_code = 2


class InvalidInputError(EConvError):
    """A file, option or argument the user gave cannot be used."""


class OutputWriteError(EConvError):
    """An output could not be written (a full disk, permissions): the environment's, not a
    bug; what was written before is kept for resuming."""


class InvalidModelError(EConvError):
    """The model cannot be traced or run as given (wrong weights, untraceable control flow)."""


class UnsupportedLayerError(EConvError):
    """A layer is not translation-equivariant on the lattice, or has no rule yet.

    ``node`` names the graph node (and module path where there is one); ``reason`` says why;
    ``hint`` what the user can do (an option, or ``until=`` to densify the part before it).
    """

    def __init__(self, node: str, reason: str, hint: str = "") -> None:
        self.node = node
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot densify node '{node}': {reason}"
                         + (f"; to go on: {hint}" if hint else ""))


class EquivalenceError(EConvError):
    """The dense model does not reproduce the baseline. CLI exit code 1."""

    exit_code = 1


class TransferError(EConvError):
    """Weights cannot be moved between a dense model and its baseline."""


class UnsafeCheckpointError(InvalidInputError):
    """A checkpoint needs arbitrary code to load and ``trust_pickle`` was not given."""


class SizeNotCovered(RuntimeError):
    """Raised by a dense model captured with torch.export when the input size makes the
    model's Python code take another branch than at the example input: the dense model does
    not cover that size (a RuntimeError, as PyTorch's own checks at run time are)."""
