"""``python -m diffusion_lab.run ...`` for the end-to-end tests, without paying the imports each
time: a drop-in for ``subprocess.run`` / ``subprocess.Popen`` on ``[sys.executable, "-m", MODULE,
*args]`` and ``[sys.executable, "-c", CODE, *args]``.

A fresh interpreter spends ~7 s importing Lightning before a run does anything; the suite starts
~110 runs. Here a forkserver (one per pytest worker, started on the first run) imports
``diffusion_lab.run`` and ``diffusion_lab.sample`` once, and every run is a fork of it: a process
of its own (own pid, own signals, own exit status, own stdout and stderr), in the state a fresh
``python -m`` reaches after its imports. What the fork sets as the interpreter would:

- ``sys.argv``, ``os.environ`` (the ``env`` given) and the working directory;
- stdout and stderr on the given files (fds 1 and 2, unbuffered);
- Ctrl-C's default action as a terminal's foreground job has it (KeyboardInterrupt), SIGTERM's
  default, and ``runpy`` with ``alter_sys`` so that ``__main__.__spec__`` names the module (as
  Lightning's DDP launcher needs to start the other ranks with ``python -m``);
- the ``atexit`` handlers at the end (multiprocessing ends a child with ``os._exit``).

What a fork cannot redo: settings read at import time (``OMP_NUM_THREADS`` and the like) are the
pytest worker's. A command of another form runs as a real subprocess; the packaging test keeps a
real interpreter for the installed entry points.
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

PRELOAD = ["diffusion_lab.run", "diffusion_lab.sample"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


KEEP, SAME_AS_STDOUT = "", "&1"  # a stream left as the server's; stderr onto stdout


def _redirect(out_path: str, err_path: str) -> None:
    """fds 1 and 2 onto the given files, and Python's streams over them unbuffered (as with
    PYTHONUNBUFFERED); log handlers made at import time on the old streams follow."""
    for fd, path in ((1, out_path), (2, err_path)):
        if path == SAME_AS_STDOUT:
            os.dup2(1, 2)
        elif path != KEEP:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(handle, fd)
            os.close(handle)
    old = {id(sys.stdout): 1, id(sys.stderr): 2}
    streams = {fd: io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True,
                                    errors="backslashreplace") for fd in (1, 2)}  # fmt: skip
    sys.stdout = sys.__stdout__ = streams[1]
    sys.stderr = sys.__stderr__ = streams[2]
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            fd = old.get(id(getattr(handler, "stream", None)))
            if isinstance(handler, logging.StreamHandler) and fd:
                handler.setStream(streams[fd])


def _child(kind: str, what: str, args: list[str], env: dict[str, str], cwd: str,
           out_path: str, err_path: str) -> None:  # fmt: skip
    """In the fork: become ``python -m what args`` (``kind`` "-m") or ``python -c what args``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() caches TMPDIR as the server saw it
    warnings.filterwarnings("ignore", "'diffusion_lab", RuntimeWarning, "runpy")  # preloaded
    _redirect(out_path, err_path)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        if kind == "-m":
            sys.argv = [what, *args]
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def _target(stream, stdout: bool) -> tuple[str, Path | None]:
    """Where a stream of the child goes (a path, KEEP or SAME_AS_STDOUT) and the temporary file
    to read back, from a subprocess-style argument: None, PIPE, DEVNULL, STDOUT or an open file
    (the child appends to it)."""
    if stream is None:
        return KEEP, None
    if stream == subprocess.DEVNULL:
        return os.devnull, None
    if stream == subprocess.STDOUT and not stdout:
        return SAME_AS_STDOUT, None
    if stream == subprocess.PIPE:
        handle, name = tempfile.mkstemp(prefix="cli-", suffix=".log")
        os.close(handle)
        return name, Path(name)
    return stream.name, None


class Popen:
    """A forked ``python -m`` (or ``-c``) with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list[str], *, stdout=None, stderr=None, env=None, cwd=None,
                 text: bool = False) -> None:  # fmt: skip
        if len(args) < 3 or args[0] != sys.executable or args[1] not in ("-m", "-c"):
            raise ValueError(f"not a python -m / -c command: {args}")
        self.args, self.text = args, text
        out_path, self._out = _target(stdout, stdout=True)
        err_path, self._err = _target(stderr, stdout=False)
        self._process = _context.Process(
            target=_child,
            args=(args[1], args[2], list(args[3:]), dict(os.environ if env is None else env),
                  str(cwd or os.getcwd()), out_path, err_path),
        )  # fmt: skip
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read(self, path: Path | None):
        if path is None:
            return None
        data = path.read_bytes()
        path.unlink()
        if not self.text:
            return data
        # as subprocess's text mode: universal newlines (a bar's carriage returns end lines)
        return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")

    def communicate(self, timeout: float | None = None):
        """Wait (killing the run when ``timeout`` passes), then what went to the PIPEs."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self._read(self._out), self._read(self._err)


def run(args: list[str], *, capture_output: bool = False, stdout=None, stderr=None,
        timeout: float | None = None, text: bool = False, env=None, cwd=None,
        stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run`` of a ``python -m`` / ``-c`` command, forked from the preloaded server
    (its stdin is /dev/null); any other command runs as a real subprocess."""
    if stdin is not subprocess.DEVNULL:
        raise ValueError("a forked run reads no stdin: stdin=subprocess.DEVNULL")
    if capture_output:
        stdout = stderr = subprocess.PIPE
    if len(args) < 3 or args[0] != sys.executable or args[1] not in ("-m", "-c"):
        return subprocess.run(args, stdout=stdout, stderr=stderr, timeout=timeout, text=text,
                              env=env, cwd=cwd, stdin=stdin)  # fmt: skip
    process = Popen(args, stdout=stdout, stderr=stderr, env=env, cwd=cwd, text=text)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess(args, process.returncode, out, err)
