"""Sampling in batches: sample i is seeded from (sample_seed, i), so batches of 1, 3 or all N
samples give the same images; the batches cover 0..N-1 in order, aligned where a method asks."""

import functools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers.gloo import run_gloo_ranks

from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.networks.unet import UNet
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.samplers.ancestral import ancestral
from diffusion_lab.samplers.dpm_solver import dpm_solver_pp

SHAPE = (1, 8, 8)
N = 7


def image_method(sampler, sample_seed: int = 0, sample_batch_size: int = 256) -> DiffusionMethod:
    """An untrained 8x8 DDPM U-Net: random weights draw varied images."""
    torch.manual_seed(0)
    network = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(), dropout=0.0)  # fmt: skip
    return DiffusionMethod(
        network, VPSDE(), None, sampler, None, "eps", (0.0, 1.0), (-1.0, 1.0),
        sample_seed=sample_seed, sample_batch_size=sample_batch_size,
    )  # fmt: skip


@pytest.mark.parametrize(
    "sampler",
    [functools.partial(ancestral, steps=5, progress=False),
     functools.partial(dpm_solver_pp, steps=5, stochastic=True, progress=False)],
    ids=["ancestral", "sde_dpm_solver_pp"],
)  # fmt: skip
def test_batch_sizes_one_three_and_n_give_the_same_images(sampler):
    method = image_method(sampler)
    whole, nfe = method.generate(N, SHAPE, batch_size=N)
    assert whole.shape == (N, *SHAPE) and nfe == 5
    for batch_size in (1, 3):
        batched, _ = method.generate(N, SHAPE, batch_size=batch_size)
        torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)  # float rounding at most
    alone, _ = method.draw(range(4, 5), SHAPE)  # sample 4 drawn by itself
    torch.testing.assert_close(alone[0], whole[4], rtol=0, atol=1e-5)
    other_seed, _ = image_method(sampler, sample_seed=1).generate(N, SHAPE)
    assert (other_seed - whole).abs().amax() > 0.1  # the seed matters: the check can fail
    assert (whole[1:] - whole[:1]).abs().amax() > 0.1  # and the samples differ


def test_the_default_batch_size_is_sample_batch_size():
    sampler = functools.partial(ancestral, steps=2, progress=False)
    method = image_method(sampler, sample_batch_size=3)
    assert method.sample_batches(N) == [range(0, 3), range(3, 6), range(6, 7)]
    assert method.sample_batches(N, 256) == [range(0, 7)]


def test_batches_are_a_multiple_of_the_alignment():
    class EveryThird(DiffusionMethod):
        batch_alignment = 3  # as the FP embedding's three images would ask

    sampler = functools.partial(ancestral, steps=2, progress=False)
    method = EveryThird(UNet(1, 8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                             attn_resolutions=(), dropout=0.0),
                        VPSDE(), None, sampler, None, "eps", (0.0, 1.0), (-1.0, 1.0))  # fmt: skip
    assert method.sample_batches(8, 1) == [range(0, 3), range(3, 6), range(6, 8)]
    assert method.sample_batches(8, 4) == [range(0, 6), range(6, 8)]


def validation_worker() -> None:
    """One DDP rank (gloo, from RANK / WORLD_SIZE / MASTER_*): the validation samples of
    ``generate_across_ranks`` and the sample numbers this rank drew, saved to $OUT/rank{r}.pt."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    method = image_method(functools.partial(ancestral, steps=3, progress=False),
                          sample_batch_size=2)  # fmt: skip
    method._trainer = SimpleNamespace(
        world_size=world, global_rank=rank, datamodule=SimpleNamespace(data_shape=SHAPE)
    )
    drawn, draw = [], method.draw
    method.draw = lambda indices, shape: (drawn.append(list(indices)), draw(indices, shape))[1]
    result = method.generate_across_ranks(N)
    torch.save({"result": result, "drawn": drawn}, Path(os.environ["OUT"]) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_validation_samples_are_shared_out_over_ranks_and_gathered_on_rank_zero(tmp_path):
    """Every rank drew all validation samples (the same ones); now rank r of 2 draws batches
    r, r + 2, ... and rank 0 holds the N samples one process draws."""
    run_gloo_ranks(__file__, "validation_worker", [{"OUT": str(tmp_path)}] * 2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert zero["drawn"] == [[0, 1], [4, 5]] and one["drawn"] == [[2, 3], [6]]
    assert one["result"] is None
    samples, nfe = zero["result"]
    method = image_method(functools.partial(ancestral, steps=3, progress=False))
    single, single_nfe = method.generate(N, SHAPE, batch_size=2)
    torch.testing.assert_close(samples, single, rtol=0, atol=1e-5)
    assert nfe == single_nfe == 3


def test_samples_are_drawn_under_the_runs_autocast(tmp_path):
    """Under trainer.precision=bf16-mixed Lightning autocasts its steps only: validation and
    final samples (drawn in hooks) and `sample`'s batches ran in float32. Now the network runs
    under the run's autocast there too, and under 32-true under none."""
    import lightning as L

    from diffusion_lab.sharded_sampling import draw_on_devices

    method = image_method(functools.partial(ancestral, steps=2, progress=False))
    seen: list[bool] = []
    method.model.network.register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_autocast_enabled("cpu"))
    )
    for precision, autocast in (("bf16-mixed", True), ("32-true", False)):
        seen.clear()
        method._trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False,
                                    enable_checkpointing=False)  # fmt: skip
        method.draw(range(2), SHAPE)
        assert seen == [autocast] * 2
    method._trainer = None
    seen.clear()
    draw_on_devices(method, 2, SHAPE, None, "cpu", 1, tmp_path, precision="bf16-mixed")
    assert seen == [True] * 2
