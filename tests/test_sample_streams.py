"""Per-sample streams: row i of a draw is what stream i draws alone, whichever rows share the
draw; a torch.Generator still draws as torch does; every prior draws per sample through them."""

import pytest
import torch

from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.processes.soft import SoftBlurProcess
from diffusion_lab.sample_streams import SampleStreams, rand, randint, randn, stream_seed


def alone(seed: int, index: int) -> torch.Generator:
    """Stream ``index`` built by hand, as a reader of the docs would."""
    return torch.Generator().manual_seed(stream_seed(seed, index))


def test_row_i_is_stream_i_drawn_alone():
    indices = [5, 6, 7, 40]
    streams = SampleStreams(3, indices)
    normal, uniform = randn((4, 2, 3), streams), rand((4, 5), streams, dtype=torch.float64)
    integers = randint(10, (4, 7), streams)
    for row, i in enumerate(indices):
        g = alone(3, i)
        assert torch.equal(normal[row], torch.randn(2, 3, generator=g))
        assert torch.equal(uniform[row], torch.rand(5, generator=g, dtype=torch.float64))
        assert torch.equal(integers[row], torch.randint(10, (7,), generator=g))


def test_streams_of_other_indices_or_seeds_differ():
    draws = [randn((1, 64), SampleStreams(s, [i])) for s, i in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(draws[a], draws[b])


def test_a_torch_generator_draws_as_torch_does():
    shape = (3, 17)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(randn(shape, torch.Generator().manual_seed(4)), expected)
    expected = torch.randint(5, shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(randint(5, shape, torch.Generator().manual_seed(4)), expected)


def test_a_draw_without_one_row_per_stream_is_refused():
    with pytest.raises(ValueError, match="one row per sample, got shape"):
        randn((3, 2), SampleStreams(0, range(4)))


def fitted_soft(prior: str) -> SoftBlurProcess:
    process = SoftBlurProcess(prior=prior, prior_bank_size=20, kernel_half_size=4, blur_max=2.0)
    process.fit(torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    return process


@pytest.mark.parametrize(
    "make",
    [
        lambda: VPSDE(),
        lambda: VESDE(sigma_max=5.0),
        lambda: VESDE(sigma_max=5.0, prior="uniform"),
        lambda: fitted_soft("mean_colour"),
        lambda: fitted_soft("blurred_data"),
    ],
    ids=["vp", "ve", "ve_uniform", "soft_mean_colour", "soft_blurred_data"],
)
def test_a_prior_draws_each_sample_from_its_own_stream(make):
    """Samples 0-5 in one draw are samples 0-1 and 2-5 drawn apart."""
    process = make()
    whole = process.prior_sampling((6, 3, 8, 8), generator=SampleStreams(0, range(6)))
    parts = [
        process.prior_sampling((len(part), 3, 8, 8), generator=SampleStreams(0, part))
        for part in (range(2), range(2, 6))
    ]
    assert torch.equal(whole, torch.cat(parts))
    assert not torch.equal(whole[0], whole[1])


def test_the_gaussian_prior_is_sigma_max_times_each_streams_noise():
    x = VESDE(sigma_max=5.0).prior_sampling((3, 1, 4, 4), generator=SampleStreams(2, [0, 1, 9]))
    for row, i in enumerate([0, 1, 9]):
        assert torch.equal(x[row], 5.0 * torch.randn(1, 4, 4, generator=alone(2, i)))
