"""A restricted unpickler for CIFAR-10's python batches: it builds only what the format holds.

CIFAR-10's batches are pickles (Python 2's cPickle, protocol 2); an unrestricted ``pickle.load``
would run whatever code a crafted file names. :class:`CifarUnpickler` admits dicts, lists,
bytes, str, numbers and numpy arrays, and refuses any other global before it is looked up.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np


def _numpy_core(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy 2), or ``numpy.core.<module>.<name>`` (numpy 1)."""
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module), name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, for latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """What a CIFAR-10 python batch may reference: numpy's array reconstruction (under both
    numpy 1's ``numpy.core`` and numpy 2's ``numpy._core`` names), plain builtin types, and
    latin-1 ``_codecs.encode`` (bytes in a protocol-2 pickle written by Python 3)."""
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                             ("numeric", "_frombuffer")):  # fmt: skip
            allowed[(f"{core}.{module}", name)] = _numpy_core(module, name)
    kinds = (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, bool, complex)
    for module in ("builtins", "__builtin__"):
        allowed.update({(module, kind.__name__): kind for kind in kinds})
    return allowed


class ForbiddenPickleGlobal(pickle.UnpicklingError):
    """A pickle that references something beyond a CIFAR-10 batch's arrays and lists."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the CIFAR-10 python format holds (dicts, lists,
    bytes, str, numbers, numpy arrays and dtypes): any other global, such as ``os.system`` in a
    crafted ``__reduce__``, is refused before it is looked up, so no code of the file runs."""

    allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``; anything else raises."""
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise ForbiddenPickleGlobal(f"{module}.{name}") from None


def load_cifar_pickle(path: Path) -> Any:
    """The object of a CIFAR-10 batch file, read with :class:`CifarUnpickler` (latin-1 strings,
    as the Python 2 originals need)."""
    with open(path, "rb") as f:
        return CifarUnpickler(f, encoding="latin1").load()
