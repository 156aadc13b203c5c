"""Which rank died (diffusion_lab.callbacks.ranks): pid files with their host; only this host's
ranks are judged, since a pid of another node says nothing here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from diffusion_lab.callbacks.ranks import dead_ranks, launch_folder


def test_only_this_hosts_gone_processes_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29512")
    folder = launch_folder(tmp_path)
    folder.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is free
    here = socket.gethostname()
    (folder / "0.pid").write_text(f"{os.getpid()} 4 {here}\n")  # this process
    (folder / "1.pid").write_text(f"{gone.pid} 4 {here}\n")  # died here
    (folder / "2.pid").write_text(f"{gone.pid} 4 other-node-{here}\n")  # not judged from here
    (folder / "3.pid").write_text(f"{os.getppid()} 4 {here}\n")  # alive here
    assert dead_ranks(tmp_path) == [(1, 4, gone.pid)]
    monkeypatch.setenv("MASTER_PORT", "29513")  # another launch's folder: none of these
    assert dead_ranks(tmp_path) == []
