"""Shared test settings: a private cache for the digits classifier, one thread per process,
and hypothesis's profile.

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
    os.environ.setdefault("DIFFUSION_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
