"""Shared test settings: a private cache for the digits classifier (one for all workers), one
thread per process, hypothesis's profile, and tests marked ``gpu`` skipped where CUDA is absent.

Small tensors gain nothing from two OpenMP threads, and on a 2-core machine busy with another
process they lose 10-20x; `make test` runs two pytest workers of one thread each instead.
"""

import os

import pytest
import torch
from hypothesis import settings

# The same examples on every machine and every run (a failure found here is found everywhere),
# no deadline (a loaded machine is no failure), few enough examples to keep each test to
# seconds. HYPOTHESIS_PROFILE=explore draws fresh examples, 10x as many, for a deeper search.
settings.register_profile("default", derandomize=True, deadline=None, max_examples=50,
                          database=None)  # fmt: skip
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocess runs
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _project_cache(tmp_path_factory):
    """One cache for the whole session: under xdist, the folder above the workers' own, so
    the digits classifier is trained once (under its lock) rather than once per worker."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = shared / "project-cache"
    cache.mkdir(exist_ok=True)
    os.environ.setdefault("DIFFUSION_LAB_CACHE", str(cache))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped here with a reason, run by ``pytest -m gpu`` on a
    GPU machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
