"""Schedule tables and level times reach a device once: a process looked up on a GPU at every
step or model call copied its CPU tables host -> device each time (3-4 blocking copies per
training step). The meta device stands in for a GPU: a copy from the CPU to it is counted."""

import pytest
import torch

from diffusion_lab.losses.base import sample_times
from diffusion_lab.processes.sde import VESDE, VPSDE, SubVPSDE


@pytest.fixture
def host_to_device(monkeypatch) -> list[torch.Size]:
    """The shapes of CPU tensors copied to another device by ``Tensor.to``."""
    copies: list[torch.Size] = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        moved = original(self, *args, **kwargs)
        if self.device.type == "cpu" and moved.device.type != "cpu":
            copies.append(self.shape)
        return moved

    monkeypatch.setattr(torch.Tensor, "to", counted)
    return copies


def one_step(process, t: torch.Tensor, x: torch.Tensor) -> None:
    """What a training step and a sampler step ask of the process."""
    sample_times(process, x, "levels")
    process.marginal_coefficients(t)
    process.sde(x, t)
    process.level_index(t)


@pytest.mark.parametrize("process", [VESDE(), VPSDE(), SubVPSDE()], ids=type)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_step_on_a_device_copies_no_table_after_the_first(process, dtype, host_to_device):
    t = torch.rand(8, dtype=dtype).to("meta")
    x = torch.randn(8, 3, dtype=dtype).to("meta")
    host_to_device.clear()
    one_step(process, t, x)
    assert host_to_device  # the first step copies the tables
    host_to_device.clear()
    for _ in range(3):
        one_step(process, t, x)
    assert host_to_device == []


@pytest.mark.parametrize("process", [VESDE(), VPSDE(), SubVPSDE()], ids=type)
def test_a_kept_copy_is_the_table_in_the_asked_dtype(process):
    for name in ("level_times", "_log_sigmas" if isinstance(process, VESDE) else "_log_alpha_bars"):
        table = process.level_times() if name == "level_times" else getattr(process, name)
        for dtype in (torch.float32, torch.float64):
            kept = process.fixed_table(name, "cpu", dtype)
            assert kept.dtype == dtype and torch.equal(kept, table.to(dtype))
            assert process.fixed_table(name, "cpu", dtype) is kept
