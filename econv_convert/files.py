"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from econv_convert.errors import InvalidInputError


def atomic_write(path: Path, write: Callable[[IO[bytes]], object],
                 check: Callable[[Path], object] | None = None) -> None:
    """Write through a temporary file in the target folder, renamed into place on success.
    ``check(tmp)``, if given, runs on the complete temporary file before the rename; if it
    raises, nothing is left behind."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidInputError(f"{path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
