"""Count the host syncs a piece of code makes: every call of a ``torch.Tensor`` method that
makes the host wait for the device (a value read back: ``item``, ``bool``, ``tolist``, ...).
On a CPU nothing waits, but the calls are the same ones a GPU would wait on."""

from __future__ import annotations

import pytest
import torch

#: The Tensor methods that copy a value to the host and so wait for the device.
SYNCING = ("item", "__int__", "__bool__", "__float__", "tolist", "cpu", "numpy")


def count_host_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch the syncing methods; the returned list gets one name per call until
    ``monkeypatch.undo()``."""
    syncs: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return syncs
