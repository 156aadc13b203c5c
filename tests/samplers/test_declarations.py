"""A capability and a kind of time grid are declarations next to the code that brings them
(``processes.base.declare_capability``, ``samplers.grids.declare_time_grid``): a sampler that
uses new ones is checked at build like any other, with no central list edited."""

from __future__ import annotations

import functools

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import CAPABILITIES, declare_capability
from diffusion_lab.processes.flow import FlowProcess
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.samplers.base import SampleResult, check_sampler, sampler
from diffusion_lab.samplers.grids import TIME_GRIDS, declare_time_grid


@pytest.fixture
def declared():
    """A capability ("ends_in_noise") and a grid kind ("even") declared for one test only."""
    name = declare_capability("ends_in_noise", "ends in pure noise (alpha(1) = 0: a flow)")

    @declare_time_grid("even")
    def check_even(sampler_name, process, options):
        if options["steps"] % 2:
            raise ConfigError(f"sampler {sampler_name} takes an even number of steps")

    try:
        yield name
    finally:
        del CAPABILITIES[name], TIME_GRIDS["even"]


def test_a_new_capability_and_grid_kind_need_no_central_edit(declared):
    @sampler(requires=(declared,), time_grid="even")
    def sample(model, process, x_or_shape, steps: int = 4, **options) -> SampleResult:
        return SampleResult(torch.zeros(x_or_shape), 0)

    flow = FlowProcess()
    flow.provides = flow.provides | {declared}
    check_sampler(sample, flow)
    with pytest.raises(ConfigError, match="takes an even number of steps"):
        check_sampler(functools.partial(sample, steps=3), flow)
    with pytest.raises(ConfigError, match="needs a process that ends in pure noise.*VPSDE"):
        check_sampler(sample, VPSDE())


def test_an_undeclared_capability_or_grid_kind_is_refused_at_import():
    with pytest.raises(ValueError, match="unknown capabilities"):
        sampler(requires=("no_such_thing",))
    with pytest.raises(ValueError, match="time grid 'no_such_grid'"):
        sampler(time_grid="no_such_grid")


def test_a_capability_keeps_its_one_meaning():
    with pytest.raises(ValueError, match="already declared with another meaning"):
        declare_capability("sde", "something else")
