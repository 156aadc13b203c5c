"""Shared test settings: a private cache for the digits classifier, quiet progress bars."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _project_cache(tmp_path_factory):
    os.environ.setdefault("DIFFUSION_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
