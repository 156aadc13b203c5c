"""The FP embedding run's memory estimate (methods/fp_embedding.py, fokker_planck's solve
estimate) against what the code actually allocates at small sizes: numpy's allocations by
tracemalloc, torch's by the profiler's memory events."""

import tracemalloc

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffusion_lab.data.few import FewImagesDataModule
from diffusion_lab.data.images import NaturalCropsDataModule, SingleImageDataModule
from diffusion_lab.errors import ConfigError
from diffusion_lab.methods.fp_embedding import distinct_images, fit_bytes, step_peak_bytes
from diffusion_lab.networks.unet import UNet
from diffusion_lab.processes import fokker_planck
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess
from diffusion_lab.processes.sde import VESDE


def torch_peak(run) -> int:
    """The most bytes torch held at once on the CPU while ``run()`` ran (profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        live += change
        peak = max(peak, live)
    return peak


def numpy_peak(run) -> int:
    """The most bytes numpy (and Python) held at once while ``run()`` ran (tracemalloc), on a
    second call (the first one imports and caches what later calls reuse)."""
    run()
    fokker_planck.assembly.csr_pattern.cache_clear()  # built within the solve, as in a run
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


@pytest.mark.parametrize(
    "shape, steps, iteration",
    [((1, 32, 32), 5, "per_step"), ((3, 24, 40), 10, "per_step"), ((3, 24, 24), 4, "sweep")],
)
def test_the_solve_estimate_bounds_the_solves_peak_closely(shape, steps, iteration):
    drift, diffusion = fokker_planck.sde_coefficients(VESDE())
    measured = numpy_peak(
        lambda: fokker_planck.solve_embedding(
            image(shape), drift, diffusion, num_steps=steps, iteration=iteration
        )
    )
    estimate = fokker_planck.solve_memory_bytes(shape, steps, iteration)
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)


@pytest.mark.parametrize("embedding", ["fokker_planck", "zero_score"])
def test_the_fit_estimate_covers_the_embedding_of_repeated_images(embedding):
    shape, count, steps = (3, 24, 24), 2, 6
    images = torch.rand(count, *shape, generator=torch.Generator().manual_seed(0))
    data = images[torch.arange(count).repeat(4)] * 2 - 1  # model range, as the method gives it
    process = FPEmbeddingProcess(VESDE(), num_steps=steps, embedding=embedding, cache=False,
                                 value_range=(-1, 1))  # fmt: skip
    numpy_bytes = numpy_peak(lambda: process.fit(data))
    torch_bytes = torch_peak(lambda: process.fit(data))
    estimate = fit_bytes(shape, count, steps, "per_step", embedding == "fokker_planck")
    # the real peak lies between the larger of the two and their sum
    assert max(numpy_bytes, torch_bytes) <= estimate <= 1.5 * (numpy_bytes + torch_bytes)
    assert fit_bytes(shape, 0, steps, "per_step", True) == 0  # a resumed run embeds nothing


@pytest.mark.parametrize(
    "size, batch, attention, train",
    [(32, 4, [], True), (48, 2, [24], True), (32, 4, [], False)],
)
def test_the_network_estimate_matches_a_real_step_on_the_cpu(size, batch, attention, train):
    """The meta-device tally of a U-Net step (forward and backward, or forward alone) against
    the profiler's peak of the same step on real tensors."""
    torch.manual_seed(0)
    network = UNet(3, size, 16, [1, 2], 1, attention, 0.0, "sinusoidal")
    x, label = torch.rand(batch, 3, size, size), torch.rand(batch) * 1000

    def step() -> None:
        with torch.set_grad_enabled(train):
            out = network(x, label)
            if train:
                out.square().mean().backward()

    measured = torch_peak(step)
    estimate = step_peak_bytes(network, x.shape, label, train)
    assert 0.9 * measured <= estimate <= 1.2 * measured, (measured, estimate)


def test_an_attention_matrix_of_terabytes_is_estimated_without_allocating_it():
    network = UNet(3, 1000, 32, [1, 2], 1, [], 0.0, "sinusoidal")  # the offline line's preset
    estimate = step_peak_bytes(network, (16, 3, 1000, 1000), torch.zeros(16), train=True)
    assert estimate > 16 * 500**4 * 4  # the middle block's (500 x 500)^2 float32 scores


def test_distinct_images_come_in_order_without_stacking_the_copies():
    single = SingleImageDataModule(name="camera", n_copies=1000, image_size=8, channels=1)
    assert torch.equal(distinct_images(single.dataset("train")), single.image()[None])
    crops = NaturalCropsDataModule(n_train=5, n_val=1, n_test=1, image_size=8)
    few = FewImagesDataModule(crops, count=3, n_copies=50)
    expected = torch.stack([crops.dataset("train")[i][0] for i in range(3)])
    assert torch.equal(distinct_images(few.dataset("train")), expected)
    with pytest.raises(ConfigError, match="more than 2 distinct images"):
        distinct_images(few.dataset("train"), limit=2)
