"""Helpers of the end-to-end run tests: wait for an event of a running ``python -m
diffusion_lab.run`` (a checkpoint at a step, a logged step, a log line) instead of sleeping, and
read what the user sees. Every wait that gives up fails with what it waited for and kills the run.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    what: str,
    process: subprocess.Popen | None = None,
    timeout: float = 300.0,
    poll: float = 0.02,
) -> T:
    """Poll ``condition`` until it returns a true value (returned); fail with an assertion naming
    ``what`` when ``timeout`` passes or ``process`` ends first (the process is killed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > deadline:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            why = (
                f"the run ended (exit {process.returncode})" if ended else f"{timeout:.0f} s passed"
            )
            raise AssertionError(f"{why} before {what}")
        time.sleep(poll)


def checkpoint_step(path: Path) -> int | None:
    """The global step of the checkpoint at ``path`` (written atomically), None without one."""
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def last_logged_step(run_dir: Path) -> int:
    """The largest training step in Lightning's ``logs/metrics.csv`` so far (-1 for none); a
    row being written is skipped."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return -1
    steps = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                steps.append(int(row["step"]))
            except (KeyError, TypeError, ValueError):
                pass
    return max(steps, default=-1)


def text_of(path: Path) -> str:
    """The text a run has written to ``path`` so far ("" before it exists)."""
    return path.read_text(errors="replace") if path.is_file() else ""


def error_lines(output: str) -> list[str]:
    """The lines that report a stop (``diffusion_lab: error:`` or ``... interrupted:``)."""
    kinds = ("diffusion_lab: error:", "diffusion_lab: interrupted:")
    return [line for line in output.split("\n") if line.startswith(kinds)]


def last_line(output: str) -> str:
    """The last non-empty line as a terminal shows it: split on newlines only, so that a
    progress bar's carriage-return redraws stay on the line they share with what follows."""
    lines = [line for line in output.split("\n") if line.strip()]
    return lines[-1] if lines else ""
