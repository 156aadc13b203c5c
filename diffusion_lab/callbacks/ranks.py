"""Which process of a distributed run died: gloo and NCCL only tell the survivors that a
connection closed, so every rank leaves its process id and host name in the run folder and the
survivors look up which of them is gone. A process id means something only on its own host:
the ranks of other nodes are not judged (their pid could be a live process here, or none)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L


def launch_folder(dirpath: str | Path) -> Path:
    """The registry of this launch: ranks of one launch share its rendezvous port, so files
    left by an earlier launch in the same run folder are never read as this one's."""
    return Path(dirpath) / os.environ.get("MASTER_PORT", "local")


class RankRegistry(L.Callback):
    """Each rank of a multi-process run writes ``<dirpath>/<port>/<rank>.pid`` at setup and
    removes it at teardown; :func:`dead_ranks` reads them back."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def _path(self, trainer: L.Trainer) -> Path:
        return launch_folder(self.dirpath) / f"{trainer.global_rank}.pid"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self._path(trainer).parent.mkdir(parents=True, exist_ok=True)
            line = f"{os.getpid()} {trainer.world_size} {socket.gethostname()}\n"
            self._path(trainer).write_text(line)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._path(trainer).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a killed child not yet reaped, a zombie, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X"))


def dead_ranks(dirpath: str | Path) -> list[tuple[int, int, int]]:
    """(rank, world size, pid) of every rank of this launch on this host whose process is
    gone (ranks on other hosts are not judged)."""
    dead, here = [], socket.gethostname()
    for path in sorted(launch_folder(dirpath).glob("*.pid")):
        pid, world_size, host = path.read_text().split(maxsplit=2)
        if host.strip() != here:
            continue
        if int(pid) != os.getpid() and not process_alive(int(pid)):
            dead.append((int(path.stem), int(world_size), int(pid)))
    return dead
