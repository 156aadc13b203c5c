"""Checkpoints that survive a kill: atomic writes; ``last.ckpt`` at a cadence and on interrupt."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.callbacks.ema import WarmupEMA
from diffusion_lab.callbacks.ranks import process_alive
from diffusion_lab.errors import CheckpointError, ConfigError, DiffusionLabError

log = logging.getLogger("diffusion_lab")

# weights, their EMA copy and Adam's two moments
COPIES_IN_A_CHECKPOINT = 4
#: ``.<name>.<pid>.tmp`` (this version's temporaries) or ``.<name>.tmp`` (earlier versions').
TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.tmp$")
#: What ``tempfile.mkstemp`` names files: where Lightning's fsspec transaction wrote checkpoints
#: before diffusion_lab wrote them itself (a kill during the write left them there).
LEGACY_SYSTEM_TEMPORARY = re.compile(r"^tmp[a-z0-9_]{8}$")


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """Where the writer ``pid`` (this process by default) writes ``path`` first: a hidden
    ``.<name>.<pid>.tmp`` beside it (the same file system, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the checkpoint temporaries in ``folder`` that no live writer owns and return them:
    ``.<name>.<pid>.tmp`` of a pid that is gone (a writer killed mid-write) or of this process
    (which, between writes, has none open), and the pid-less ``.<name>.tmp`` of earlier versions.
    A live writer's temporary (another process in the same folder) is left alone."""
    removed = []
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        match = TEMPORARY.match(tmp.name)
        if match is None or not tmp.is_file():
            continue
        pid = match["pid"]
        if pid is None or int(pid) == os.getpid() or not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def legacy_system_temporaries(folder: str | Path | None = None) -> list[Path]:
    """Checkpoints that earlier versions left in the system temp folder when killed mid-write
    (Lightning's fsspec transaction wrote them to ``tempfile.mkstemp()`` files): this user's
    ``tmpXXXXXXXX`` files that are torch zip archives of a diffusion_lab Lightning checkpoint.
    They cannot be tied to a writer (no pid), so they are only reported, never removed."""
    folder = Path(tempfile.gettempdir() if folder is None else folder)
    found = []
    for path in folder.glob("tmp????????"):
        try:
            if (
                LEGACY_SYSTEM_TEMPORARY.match(path.name)
                and path.is_file()
                and path.stat().st_uid == os.getuid()
                and is_diffusion_lab_checkpoint(path)
            ):
                found.append(path)
        except OSError:  # gone or unreadable meanwhile: not ours to report
            continue
    return found


def is_diffusion_lab_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a torch zip archive whose pickle is a Lightning checkpoint with
    diffusion_lab's ``run_config`` (read as bytes, never unpickled)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            return False
        with archive.open(pickles[0]) as f:
            head = f.read(1 << 20)
    return b"pytorch-lightning_version" in head and b"run_config" in head


def write_durably(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` straight into ``path`` (no second copy in memory), flushed to the disk."""
    torch.save(checkpoint, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, then rename it into place.

    The temporary is ``.<name>.<pid>.tmp`` in the checkpoint's own folder, written by
    ``torch.save`` directly (Lightning's own writer serialises to memory, then writes a
    ``tempfile.mkstemp()`` file in the system temp folder, which a kill leaves there). A kill
    during the write leaves the previous checkpoint intact, never a truncated one, and a
    temporary that the next run's :class:`LastCheckpoint` removes; a failed write (e.g. a full
    disk) removes the temporary file and stops with one line.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        tmp = temporary_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(checkpoint, tmp)
            os.replace(tmp, path)
            sync_folder(path.parent)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            tmp.unlink(missing_ok=True)
            remove_stale_temporaries(path.parent)
            kept = "the previous one is kept" if path.is_file() else "none was written before"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"cannot write checkpoint {path} ({reason}); {kept}: free disk space in "
                f"{path.parent} (or set hydra.run.dir elsewhere) and resume with "
                f"hydra.run.dir={path.parent.parent} ckpt_path=last"
            ) from None


class LastCheckpoint(L.Callback):
    """``last.ckpt`` at a cadence of epochs, at the end of training, and on Ctrl-C / SIGTERM.

    Cadence checkpoints are written at epoch ends, so ``ckpt_path=last`` resumes them exactly
    (the shuffle stream and RNG are in the checkpoint). On Ctrl-C / SIGTERM and on an unexpected
    exception in training or validation (a sampler raising, say), ``last.ckpt`` is written with
    the weights of the last completed optimizer step (the EMA weights a validation swapped in
    are put back first); such a mid-epoch checkpoint saves the work but resumes at the next
    epoch (Lightning's loaders are not stateful), so it is not bit-exact. A diverged (NaN) run
    keeps its last good epoch-end ``last.ckpt``: the weights of the step before the NaN may
    already be ruined. A failed write or another project error writes nothing more. Before
    training, the folder must have room for a checkpoint. Resuming is never automatic: it takes
    ``ckpt_path=last`` (Lightning #19827).
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"checkpoint every_n_epochs must be >= 1, got {every_n_epochs}")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def clean_up(self) -> None:
        """Remove stale temporaries of this folder (logged); report, without touching them, the
        ones earlier versions left in the system temp folder."""
        for tmp in remove_stale_temporaries(self.dirpath):
            log.info("removed %s, left by a checkpoint write that was killed", tmp)
        legacy = legacy_system_temporaries()
        if legacy:
            size = sum(p.stat().st_size for p in legacy if p.exists()) / 2**20
            log.warning(
                "%d checkpoint file(s) (%.0f MiB) that an earlier diffusion_lab version left in %s "
                "when killed mid-write: remove them once no other run of that version is "
                "writing a checkpoint: rm %s",
                len(legacy), size, tempfile.gettempdir(), " ".join(map(str, legacy)),
            )  # fmt: skip

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.last_path, weights_only=False)  # full state, to resume

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remove the temporaries of writers killed mid-write (:func:`remove_stale_temporaries`),
        then stop before training when the folder cannot hold a checkpoint (estimated as the
        parameters x their bytes x weights, EMA and Adam's two moments)."""
        if getattr(trainer, "is_global_zero", True):  # the rank that writes checkpoints
            self.clean_up()
        need = COPIES_IN_A_CHECKPOINT * sum(
            p.numel() * p.element_size() for p in pl_module.parameters()
        )
        folder = next(p for p in (self.dirpath, *self.dirpath.parents) if p.exists())
        free = shutil.disk_usage(folder).free
        if free < need:
            raise CheckpointError(
                f"{folder} has {free / 2**20:.1f} MiB free but a checkpoint needs about "
                f"{need / 2**20:.1f} MiB: free disk space or set hydra.run.dir elsewhere"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-set the shuffle sampler's epoch to ``current_epoch``: after a restore from an
        epoch-end checkpoint, Lightning passes ``set_epoch`` a counter one ahead (2.6), which
        would change the permutation and break exact resume."""
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != "fit" or isinstance(exception, DiffusionLabError):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, WarmupEMA):
                callback.restore_training_weights(pl_module)
        self._save(trainer)
