"""How a run stops: one last line on stderr, after the progress bars are closed.

Bad input, a divergence or a crash: exit 2 and ``diffusion_lab: error: ...``; Ctrl-C (130) or
SIGTERM (143): ``diffusion_lab: interrupted: ...``. Each line names the checkpoint kept and the
command that goes on (resume, sample or score again).
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus

from diffusion_lab.build import last_checkpoint_path
from diffusion_lab.callbacks.ranks import dead_ranks
from diffusion_lab.errors import DiffusionLabError, TrainingDivergedError, TrainingFailedError
from diffusion_lab.metrics.evaluator import NonFiniteSamplesError

#: Exit codes of an interrupted run: 128 + the signal's number, the shells' convention.
SIGINT_EXIT, SIGTERM_EXIT = 130, 143


class RunInterrupted(DiffusionLabError):
    """Ctrl-C or SIGTERM: the message says what was kept and the command that goes on."""

    def __init__(self, message: str, exit_code: int = SIGINT_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM outside the fit (whose SIGTERM Lightning handles), raised like Ctrl-C's
    ``KeyboardInterrupt`` so that the stage it stops can say what was kept."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (Python's default would end the
    process at once, with no line); the previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def close_progress_bars() -> bool:
    """Close every open tqdm bar (Lightning's write to stdout, the samplers' to stderr), the
    innermost first, and flush both streams, so that no bar redraws after what is printed next
    (an open bar is redrawn when it is closed at exit); whether any bar was open."""
    from tqdm import tqdm

    # tqdm registers a bar in __new__: one that Ctrl-C stopped inside __init__ has no
    # ``disable`` yet and nothing drawn, so it is left alone
    bars = [
        bar for bar in list(getattr(tqdm, "_instances", ())) if not getattr(bar, "disable", True)
    ]
    for bar in sorted(bars, key=lambda bar: -abs(getattr(bar, "pos", 0) or 0)):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone: nothing left to clear
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    return bool(bars)


def stop_line(exc: DiffusionLabError) -> str:
    """The one line a stop prints: ``diffusion_lab: interrupted: ...`` or ``... error: ...``."""
    kind = "interrupted" if isinstance(exc, RunInterrupted) else "error"
    return f"diffusion_lab: {kind}: {exc}"


def print_last_lines(*lines: str) -> None:
    """Print ``lines`` to stderr as the last output, each on its own line: after the progress
    bars are closed, and after a newline if one was drawing (a bar cleared or moved up leaves
    the cursor inside a line)."""
    if close_progress_bars():
        print(file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr, flush=True)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Stop with one clear line, not a traceback, on the project's own errors: exit 2, or the
    interrupt's code (130, 143)."""
    try:
        yield
    except DiffusionLabError as exc:
        print_last_lines(stop_line(exc))
        sys.exit(getattr(exc, "exit_code", 2))


def resume_hint(run_dir: Path) -> str:
    """The last good checkpoint (or "none written yet") and the command line to resume."""
    path = last_checkpoint_path(run_dir)
    if not path.is_file():
        return "(last good checkpoint: none written yet)"
    return f"(last good checkpoint: {path}: resume with hydra.run.dir={run_dir} ckpt_path=last)"


def kept_checkpoint(run_dir: Path) -> str:
    """The words "checkpoint kept at <path>", or that none was written."""
    path = last_checkpoint_path(run_dir)
    return f"checkpoint kept at {path}" if path.is_file() else "no checkpoint was written"


def interrupt_of(trainer: L.Trainer) -> tuple[str, int]:
    """What stopped a Lightning loop (``Ctrl-C`` or ``SIGTERM``) and the exit code it gets."""
    return ("SIGTERM", SIGTERM_EXIT) if trainer.received_sigterm else ("Ctrl-C", SIGINT_EXIT)


def interrupted_in_training(run_dir: Path, trainer: L.Trainer, resume: str) -> RunInterrupted:
    """The line of a fit stopped by Ctrl-C or SIGTERM (Lightning has saved last.ckpt);
    ``resume`` is the command that resumes it."""
    what, code = interrupt_of(trainer)
    if not last_checkpoint_path(run_dir).is_file():
        return RunInterrupted(
            f"interrupted ({what}) at step {trainer.global_step}: no checkpoint was written, "
            "so there is nothing to resume: run the command again",
            code,
        )
    return RunInterrupted(
        f"interrupted ({what}) at step {trainer.global_step}: {kept_checkpoint(run_dir)}; resume "
        f"with {resume}",
        code,
    )


@contextmanager
def naming_last_checkpoint(
    run_dir: Path, trainer: L.Trainer | None = None, resume: str = ""
) -> Iterator[None]:
    """End a failed or interrupted fit with one line naming the run's last checkpoint and how
    to resume (``resume``: the command that does).

    A divergence error gets the checkpoint's path (the method says to resume, but only the run
    knows its folder); Ctrl-C or SIGTERM (Lightning saves the checkpoint, then exits) becomes a
    ``RunInterrupted`` line with the command that resumes (only rank 0 prints it); any other
    exception in training or validation (e.g. a sampler raising) becomes a
    ``TrainingFailedError`` line, its traceback written to ``<run_dir>/error.log``. Without
    ``trainer``, interrupts pass through as they are.
    """
    try:
        yield
    except DiffusionLabError as exc:
        if not isinstance(exc, TrainingDivergedError):
            raise
        raise type(exc)(f"{exc} {resume_hint(run_dir)}") from None
    except (SystemExit, KeyboardInterrupt) as exc:
        if trainer is None or (
            isinstance(exc, SystemExit) and trainer.state.status != TrainerStatus.INTERRUPTED
        ):
            raise
        stop = interrupted_in_training(run_dir, trainer, resume)
        if not trainer.is_global_zero:
            sys.exit(stop.exit_code)
        raise stop from None
    except Exception as exc:
        (run_dir / "error.log").write_text(traceback.format_exc())
        what = f"by {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        gone = dead_ranks(run_dir / "ranks")
        if gone:
            what = "on every rank: " + ", ".join(
                f"rank {rank} of {size} (pid {pid}) died or was killed" for rank, size, pid in gone
            )
        raise TrainingFailedError(
            f"training stopped {what} (traceback in {run_dir / 'error.log'}) {resume_hint(run_dir)}"
        ) from None


@contextmanager
def loop_interrupts_named(trainer: L.Trainer, where: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM in a Lightning loop other than fit (Lightning catches Ctrl-C, then
    exits 1; only fit acts on its SIGTERM flag, so SIGTERM raises here): one line,
    "interrupted (Ctrl-C) <where>", exit 130 (143); the other ranks exit with that code and no
    line."""
    try:
        with sigterm_raises():  # Lightning calls this handler after its own
            yield
    except (SystemExit, KeyboardInterrupt, Terminated) as exc:
        if isinstance(exc, SystemExit) and trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
    if trainer.state.status != TrainerStatus.INTERRUPTED:
        return
    what, code = interrupt_of(trainer)
    if not trainer.is_global_zero:
        sys.exit(code)
    raise RunInterrupted(f"interrupted ({what}) {where}", code)


@contextmanager
def interrupts_named(where: str) -> Iterator[None]:
    """Ctrl-C (exit 130) or SIGTERM (143) inside the block: one line, "interrupted (Ctrl-C)
    <where>", where says what was kept and the command that goes on."""
    try:
        with sigterm_raises():
            yield
    except (KeyboardInterrupt, Terminated) as exc:
        sigterm = isinstance(exc, Terminated)
        what, code = ("SIGTERM", SIGTERM_EXIT) if sigterm else ("Ctrl-C", SIGINT_EXIT)
        raise RunInterrupted(f"interrupted ({what}) {where}", code) from None


@contextmanager
def final_stage(run_dir: Path, stage: str, again: str) -> Iterator[None]:
    """Ctrl-C, NaN samples or a crash in the final ``stage`` (sampling, scoring) after training:
    one line naming the checkpoint kept (written at the end of training) and ``again``, the
    command that does the stage from it; a crash's traceback goes to ``<run_dir>/error.log``."""
    kept = kept_checkpoint(run_dir)
    try:
        with interrupts_named(f"during the final {stage}: {kept}; {again}"):
            yield
    except NonFiniteSamplesError as exc:
        raise NonFiniteSamplesError(f"{exc}; {kept}") from None
    except DiffusionLabError:
        raise
    except Exception as exc:
        (run_dir / "error.log").write_text(traceback.format_exc())
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise TrainingFailedError(
            f"the final {stage} stopped by {reason} (traceback in {run_dir / 'error.log'}); "
            f"{kept}; {again}"
        ) from None
