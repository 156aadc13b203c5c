"""Run a test module's function as the ranks of a gloo process group on this machine."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from helpers import cli


def run_gloo_ranks(test_file: str, function: str, env_per_rank: list[dict[str, str]]) -> None:
    """Start one process per entry of ``env_per_rank`` (its extra environment), each calling
    ``function`` of the test module ``test_file`` with RANK, LOCAL_RANK, WORLD_SIZE and a free
    MASTER_ADDR / MASTER_PORT set for ``torch.distributed.init_process_group("gloo")``, and
    wait until each has exited 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = Path(test_file).parent
    module = Path(test_file).stem
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; "
            f"import {module}; {module}.{function}()")  # fmt: skip
    base = {**os.environ, "WORLD_SIZE": str(len(env_per_rank)), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}  # fmt: skip
    ranks = [
        cli.Popen(
            [sys.executable, "-c", code],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), **extra},
        )  # fmt: skip
        for r, extra in enumerate(env_per_rank)
    ]
    codes = [rank.wait(timeout=300) for rank in ranks]
    assert codes == [0] * len(ranks), f"rank exit codes {codes}"
