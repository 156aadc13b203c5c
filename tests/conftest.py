"""Shared test settings: a private cache for the digits classifier, one thread per process.

Small tensors gain nothing from two OpenMP threads, and on a 2-core machine busy with another
process they lose 10-20x; `make test` runs two pytest workers of one thread each instead.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocess runs
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _project_cache(tmp_path_factory):
    os.environ.setdefault("DIFFUSION_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
