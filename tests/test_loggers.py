"""The W&B logger keeps its run across a resume: the run folder holds the run id."""

import pytest

from diffusion_lab.loggers import WANDB_ID_FILE, ResumableWandbLogger


def offline_run_id(save_dir) -> str:
    logger = ResumableWandbLogger(save_dir=str(save_dir), project="diffusion_lab", mode="offline")
    run = logger.experiment
    logger.log_metrics({"train/loss": 1.0}, step=1)
    run_id = run.id
    run.finish()
    return run_id


def test_a_resumed_run_continues_its_wandb_run_and_a_new_folder_starts_another(
    tmp_path, monkeypatch
):
    """Measured before: a resumed run was a new W&B run (d1jrsb3m -> 1nwlubqw)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    first = offline_run_id(tmp_path / "run")
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == first
    assert offline_run_id(tmp_path / "run") == first  # the resume
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(first) for run in runs)
    assert offline_run_id(tmp_path / "other") != first
