"""ForwardProcess.level_index at ties: a time exactly halfway between two levels, and a level time
up to float rounding or in another dtype (issue 19: deterministic on any machine)."""

import torch

from diffusion_lab.processes.sde import VESDE


def test_a_time_halfway_between_two_levels_goes_to_the_lower_time():
    process = VESDE(sigma_max=1.0, sigma_min=0.01, num_steps=10)
    levels = process.level_times()  # float32, increasing; label 0 is the noisiest (t = 1)
    a, b = levels[3].double(), levels[4].double()
    halfway = ((a + b) / 2)[None]  # exact in float64: |t - a| == |t - b| exactly
    assert (halfway - a).abs() == (halfway - b).abs()
    assert process.level_index(halfway).tolist() == [10 - 1 - 3]
    assert process.level_index(torch.nextafter(halfway, b)).tolist() == [10 - 1 - 4]


def test_level_times_in_any_dtype_or_one_ulp_off_are_their_level():
    process = VESDE(sigma_max=1.0, sigma_min=0.01, num_steps=1000)
    levels = process.level_times()
    expected = list(range(999, -1, -1))
    for t in (levels, levels.double(), 1 - torch.arange(1000, dtype=torch.float64).flip(0) / 999):
        assert process.level_index(t).tolist() == expected
    for direction in (0.0, 2.0):
        assert process.level_index(torch.nextafter(levels, torch.full_like(levels, direction))
                                   ).tolist() == expected  # fmt: skip
