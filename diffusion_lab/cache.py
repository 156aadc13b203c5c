"""The project's cache folder (the digits classifier's weights, the data-check index).

``$DIFFUSION_LAB_CACHE`` when set, else ``~/.cache/diffusion_lab``. Everything in it can be
deleted: it is rebuilt on the next use (the first use says so in the log).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CACHE_ENV = "DIFFUSION_LAB_CACHE"


def cache_dir() -> Path:
    """``$DIFFUSION_LAB_CACHE``, else ``~/.cache/diffusion_lab`` (not created here)."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "diffusion_lab")
    return Path(root).expanduser()


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` by ``write(handle)`` on a temporary file in its folder, then a rename.

    A failed write removes the temporary file and leaves any previous ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
