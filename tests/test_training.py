"""The methods' shared base: argument checks, range maps, the divergence guard and its message."""

import pytest
import torch

from diffusion_lab.errors import ConfigError, TrainingDivergedError
from diffusion_lab.methods.training import TrainingModule
from diffusion_lab.run import naming_last_checkpoint


def module(**kwargs) -> TrainingModule:
    args = {"optimizer": torch.optim.Adam, "data_range": (0.0, 1.0), "model_range": (-1.0, 1.0),
            "warmup_steps": 0, "run_config": None} | kwargs  # fmt: skip
    return TrainingModule(**args)


def test_arguments_are_checked():
    with pytest.raises(ConfigError, match="warmup_steps must be >= 0"):
        module(warmup_steps=-1)
    with pytest.raises(ConfigError, match="both data_range and model_range"):
        module(model_range=None)


def test_range_maps_invert_each_other():
    m = module()
    x = torch.rand(5, 3)
    assert torch.allclose(m.to_model_range(x), 2 * x - 1)
    assert torch.allclose(m.to_data_range(m.to_model_range(x)), x)
    raw = module(data_range=None, model_range=None)
    assert raw.to_model_range(x) is x and raw.to_data_range(x) is x


def test_divergence_names_the_step_and_the_last_checkpoint(tmp_path):
    m = module()
    m.check_finite(torch.tensor(1.0))
    with pytest.raises(TrainingDivergedError) as caught, naming_last_checkpoint(tmp_path):
        m.check_finite(torch.tensor(float("nan")))
    message = str(caught.value)
    assert "at step 0" in message and "lower the learning rate" in message
    assert "ckpt_path=last" in message and "none written yet" in message
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    with pytest.raises(TrainingDivergedError, match="last good checkpoint: .*last.ckpt"):
        with naming_last_checkpoint(tmp_path):
            m.check_finite(torch.tensor(float("inf")))
