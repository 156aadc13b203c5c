"""Soft Diffusion's corruptions and processes (issue 10, item 1): the Gaussian blur against a
direct zero-padded 2-D convolution, the masks, the adjoints, the marginals of x_t given x_0, the
noise / blur stages, the fitted prior through a checkpoint, and the Hydra configs."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF, EXPERIMENTS
from helpers.soft_schedules import linear_levels
from omegaconf import OmegaConf

from diffusion_lab.build import compose_config, instantiate
from diffusion_lab.errors import ConfigError
from diffusion_lab.operators import (
    BLUR_METHODS,
    CentredWindowMask,
    GaussianBlur,
    LinearOperator,
    Mask,
)
from diffusion_lab.processes.soft import SoftBlurProcess, SoftMaskProcess
from diffusion_lab.samplers.base import check_sampler
from diffusion_lab.samplers.ddim import ddim
from diffusion_lab.schedules.soft import (
    BlurScheduleSettings,
    gaussian_blur,
    wasserstein_path_levels,
)
from diffusion_lab.schema import check_tree

F64 = torch.float64


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct_blur(x: torch.Tensor, std: torch.Tensor, half: int) -> torch.Tensor:
    """The reference, written independently of GaussianBlur: per example, the full 2-D kernel
    exp(-(i^2 + j^2) / (2 std^2)) / sum on (2h+1)^2 taps, built with explicit loops, then
    conv2d on the input zero-padded by h on every side."""
    out = []
    for b in range(x.shape[0]):
        s = float(std[b])
        size = 2 * half + 1
        kernel = torch.empty(size, size, dtype=F64)
        for i in range(size):
            for j in range(size):
                kernel[i, j] = math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * s * s))
        kernel /= kernel.sum()
        image = x[b].reshape(-1, 1, *x.shape[-2:])  # channels as a batch
        padded = F.pad(image, (half, half, half, half))  # zero padding
        out.append(F.conv2d(padded, kernel[None, None]).reshape(x[b].shape))
    return torch.stack(out)


@pytest.mark.parametrize("method", BLUR_METHODS)
@pytest.mark.parametrize(
    ("shape", "half"),
    [((3, 2, 11, 9), 4), ((3, 1, 12, 12), 20), ((2, 3, 8, 16), 0), ((2, 3, 16, 16), 80)],
)
def test_blur_equals_a_direct_zero_padded_convolution(method, shape, half):
    """To 1e-12 in float64, for kernels smaller and larger (h = 80 on 16x16) than the image."""
    x = torch.randn(shape, generator=_generator(), dtype=F64)
    std = torch.tensor([0.3, 1.7, 23.0][: shape[0]], dtype=F64)
    blurred = GaussianBlur(std, half, method).apply(x)
    assert blurred.shape == x.shape
    torch.testing.assert_close(blurred, _direct_blur(x, std, half), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", BLUR_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_std_001_is_the_identity_to_float_precision(method, dtype):
    """The sampled kernel at std 0.01 is a single tap: exp(-1 / (2e-4)) = 0 in floating point."""
    x = torch.randn(4, 3, 16, 16, generator=_generator(), dtype=F64).to(dtype)
    blurred = GaussianBlur(torch.full((4,), 0.01, dtype=dtype), 80, method).apply(x)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(blurred, x, rtol=0, atol=8 * eps * float(x.abs().max()))


def test_a_blurred_constant_is_bright_in_the_centre_and_dark_at_the_corners():
    """Zero padding (App. D): the prior is not 'a single colour'."""
    ones = torch.ones(1, 1, 64, 64, dtype=F64)
    blurred = GaussianBlur(torch.tensor([23.0], dtype=F64), 80).apply(ones)[0, 0]
    assert 0.6 < float(blurred[32, 32]) < 1 and float(blurred[0, 0]) < 0.3


def _adjoint_gap(op: LinearOperator, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lhs = (op.apply(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y, x)).flatten(1).sum(1)
    return (lhs - rhs).abs().max() / lhs.abs().max()


def _operators() -> dict[str, LinearOperator]:
    std = torch.tensor([0.01, 0.8, 4.0, 30.0], dtype=F64)
    ops = {f"blur_{m}": GaussianBlur(std, 9, m) for m in BLUR_METHODS}
    ops["blur_kernel_larger_than_image"] = GaussianBlur(std, 80)
    ops["mask_window"] = CentredWindowMask(torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64))
    ops["mask_random"] = Mask((torch.rand(4, 1, 10, 12, generator=_generator(3)) < 0.5).to(F64))
    return ops


@pytest.mark.parametrize("name", list(_operators()))
def test_adjoint_identity_and_the_autograd_adjoint(name):
    """<C x, y> = <x, C^T y>, and C^T agrees with the vector-Jacobian product of apply (the
    blur's C^T = C is a claim to check, not to assume)."""
    op = _operators()[name]
    g = _generator(1)
    x = torch.randn(4, 3, 10, 12, generator=g, dtype=F64)
    y = torch.randn(4, 3, 10, 12, generator=g, dtype=F64)
    assert float(_adjoint_gap(op, x, y)) < 1e-12
    by_autograd = LinearOperator.adjoint(op, y, x)
    torch.testing.assert_close(op.adjoint(y, x), by_autograd, rtol=0, atol=1e-12)


def test_the_blur_matrix_is_symmetric_with_rows_summing_to_at_most_one():
    op = GaussianBlur(torch.tensor([2.5], dtype=F64), 6)
    basis = torch.eye(7 * 5, dtype=F64).reshape(-1, 1, 7, 5)
    matrix = torch.cat([GaussianBlur(op.std.expand(len(basis)), 6).apply(basis)]).flatten(1).T
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-15)
    assert float(matrix.sum(1).max()) <= 1 + 1e-12 and float(matrix.min()) >= 0


@pytest.mark.parametrize("name", ["mask_window", "mask_random"])
def test_masks_are_diagonal_and_idempotent(name):
    op = _operators()[name]
    shape = (1, 10, 12)
    basis = torch.eye(math.prod(shape), dtype=F64).reshape(-1, *shape)
    for b in range(4):
        single = (
            CentredWindowMask(op.fraction[b : b + 1].expand(len(basis)))
            if isinstance(op, CentredWindowMask)
            else Mask(op.mask[b : b + 1])
        )
        matrix = single.apply(basis).flatten(1).T
        diagonal = matrix.diagonal()
        assert torch.equal(matrix, torch.diag(diagonal))  # diagonal
        assert set(diagonal.unique().tolist()) <= {0.0, 1.0}  # 0/1
    x = torch.randn(4, 3, 10, 12, generator=_generator(), dtype=F64)
    assert torch.equal(op.apply(op.apply(x)), op.apply(x))  # idempotent


def test_centred_windows_are_nested_centred_and_span_empty_to_full():
    fractions = torch.linspace(0, 1, 65, dtype=F64)
    masks = CentredWindowMask(fractions).window(torch.zeros(65, 1, 64, 64)).mask[:, 0]
    assert masks[0].sum() == 0 and bool(masks[-1].all())
    assert bool((masks[1:] >= masks[:-1]).all())  # each window contains the smaller ones
    assert torch.equal(masks, masks.flip(-1)) and torch.equal(masks, masks.flip(-2))
    sides = masks.sum((1, 2)).sqrt()
    assert sides.tolist() == [2 * math.floor(32 * float(f) + 1e-9) for f in fractions]


def test_mask_gram_solve_is_exact():
    op = _operators()["mask_window"]
    g = _generator(2)
    like = torch.randn(4, 3, 10, 12, generator=g, dtype=F64)
    rhs = torch.randn(4, 3, 10, 12, generator=g, dtype=F64)
    gamma, lam = torch.rand(4, dtype=F64) + 0.5, torch.rand(4, dtype=F64) + 0.1
    u = op.gram_solve(rhs, like, gamma, lam)
    residual = (
        gamma[:, None, None, None] * op.apply(op.adjoint(u, like)) + lam[:, None, None, None] * u
    )
    torch.testing.assert_close(residual, rhs, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- processes
PROCESSES = {
    "blur": lambda **kw: SoftBlurProcess(kernel_half_size=12, blur_max=6.0, **kw),
    "mask": lambda **kw: SoftMaskProcess(**kw),
}


@pytest.mark.parametrize("name", PROCESSES)
def test_monte_carlo_mean_and_variance_of_x_t_given_x_0(name):
    """4,000 draws of x_t | x_0 at four times: mean C_t x_0 and variance sigma_t^2 per pixel,
    within 5 standard errors for the mean (sigma / sqrt(n)) and 6 for the variance
    (sigma^2 sqrt(2 / (n - 1)); the sample variance is a skewed chi-square and the bound is a
    maximum over 128 pixels at 4 times), and the pooled variance over all pixels within 5."""
    process = PROCESSES[name]()
    n, shape = 4000, (2, 8, 8)
    g = _generator(4)
    x0 = torch.rand(1, *shape, generator=g, dtype=F64) * 2 - 1
    for t_value in (0.05, 0.3, 0.6, 1.0):
        t = torch.full((n,), t_value, dtype=F64)
        noise = torch.randn(n, *shape, generator=g, dtype=F64)
        draws = process.sample_marginal(x0.expand(n, *shape), t, noise)
        mean = process.mean(x0, t[:1])[0]
        sigma = float(process.std(t[:1]))
        assert (draws.mean(0) - mean).abs().max() < 5 * sigma / math.sqrt(n)
        variance = draws.var(0)
        assert (variance - sigma**2).abs().max() < 6 * sigma**2 * math.sqrt(2 / (n - 1))
        pooled_se = sigma**2 * math.sqrt(2 / (n - 1) / variance.numel())
        assert abs(float(variance.mean()) - sigma**2) < 5 * pooled_se
        if t_value >= 0.6:  # the corruption is visible: C_t x_0 is not x_0
            assert (mean - x0[0]).abs().max() > 0.05


def test_the_noise_and_blur_stages_follow_their_formulas():
    f = 0.15
    process = SoftBlurProcess(noise_fraction=f, blur_max=23.0)
    t = torch.tensor([0.0, 0.05, f / 2, f, 0.15 + 0.85 / 4, 0.5, 0.9, 1.0], dtype=F64)
    sigma = process.std(t)
    expected = [0.01 * 10 ** (float(s) / f) if s <= f else 0.1 for s in t]
    torch.testing.assert_close(sigma, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    blur = process.blur_std(t)
    expected_blur = [0.01 if s <= f else 0.01 + (23 - 0.01) * (s - f) / (1 - f) for s in t]
    torch.testing.assert_close(blur, torch.tensor(expected_blur, dtype=F64), rtol=1e-6, atol=1e-9)
    # C_t is the identity over the whole noise stage, and C_1 is the widest blur.
    x = torch.randn(3, 3, 16, 16, generator=_generator(), dtype=F64)
    torch.testing.assert_close(process.mean(x, torch.tensor([0.0, 0.1, f], dtype=F64)), x)
    assert process.native_conditioning == "time" and process.conditioning == "time"
    torch.testing.assert_close(process.noise_label(t), t)


def test_given_blur_levels_are_placed_at_equal_t_and_interpolated_linearly():
    levels = [0.01, 0.5, 2.0, 9.0, 20.0]
    process = SoftBlurProcess(noise_fraction=0.2, blur_levels=levels)
    at = 0.2 + 0.8 * torch.arange(5, dtype=F64) / 4
    torch.testing.assert_close(process.blur_std(at), torch.tensor(levels, dtype=F64))
    midpoints = (at[1:] + at[:-1]) / 2
    expected = (torch.tensor(levels[1:]) + torch.tensor(levels[:-1])).to(F64) / 2
    torch.testing.assert_close(process.blur_std(midpoints), expected)
    geometric = SoftBlurProcess(
        blur_schedule={"method": "geometric", "num_levels": 5}, blur_max=100.0
    )
    torch.testing.assert_close(
        geometric.levels, torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=F64)
    )


def test_mask_stage_shrinks_the_window_from_full_to_empty():
    process = SoftMaskProcess(noise_fraction=0.1)
    t = torch.tensor([0.0, 0.1, 0.55, 1.0], dtype=F64)
    torch.testing.assert_close(
        process.observed_fraction(t), torch.tensor([1, 1, 0.5, 0.0], dtype=F64)
    )
    ones = torch.ones(4, 1, 16, 16, dtype=F64)
    assert process.mean(ones, t).sum((1, 2, 3)).tolist() == [256, 256, 64, 0]


def test_levels_are_n_times_in_zero_one():
    times = SoftBlurProcess(num_steps=280).level_times()
    assert len(times) == 280 and float(times[0]) == pytest.approx(1 / 280) and times[-1] == 1
    assert bool((times[1:] > times[:-1]).all())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"noise_fraction": 0.0}, "noise_fraction"), ({"noise_fraction": 1.0}, "noise_fraction"),
     ({"prior": "gaussian"}, "prior"), ({"blur_levels": [1.0]}, "blur_levels"),
     ({"blur_levels": [0.0, 2.0]}, "blur_levels"), ({"blur_method": "direct"}, "blur_method"),
     ({"blur_schedule": {"method": "cosine"}}, "blur_schedule.method"),
     ({"blur_schedule": {"num_levels": 1}}, "blur_schedule.num_levels"),
     ({"blur_schedule": {"levels": 3}}, "blur_schedule has no key levels"),
     ({"sigma_min": 0.2}, "sigma_min"),
     ({"conditioning": "sigma"}, "conditioning")],
)  # fmt: skip
def test_bad_values_stop_with_one_line_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SoftBlurProcess(**kwargs)


# ------------------------------------------------------------------------------------- prior
def _training_images(n: int = 200) -> torch.Tensor:
    """Images in [-1, 1] whose mean colours vary together across channels."""
    g = _generator(7)
    colour = torch.randn(n, 1, generator=g) * torch.tensor([0.3, 0.2, 0.1]) + torch.tensor(
        [0.2, -0.1, 0.0]
    )
    return (colour[:, :, None, None] + 0.2 * torch.randn(n, 3, 16, 16, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("prior", ["mean_colour", "blurred_data"])
def test_the_fitted_prior_travels_in_the_state_dict(name, prior):
    """fit on data, state_dict into a fresh process: the same draws, with no data."""
    trained = PROCESSES[name](prior=prior, prior_bank_size=50)
    with pytest.raises(ConfigError, match="no prior yet"):
        trained.prior_sampling((2, 3, 16, 16))
    assert trained.needs_fit
    trained.fit(_training_images())
    state = trained.state_dict()
    assert {"prior_colour_mean", "prior_colour_chol", "prior_bank"} <= set(state)
    assert torch.equal(state["levels"], trained.levels)  # the checkpoint keeps the schedule
    fresh = PROCESSES[name](prior=prior, prior_bank_size=50)
    fresh.load_state_dict(state)
    draws = [p.prior_sampling((6, 3, 16, 16), generator=_generator(9)) for p in (trained, fresh)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (6, 3, 16, 16)
    with pytest.raises(ConfigError, match="fitted to images of shape"):
        fresh.prior_sampling((2, 1, 16, 16))


def test_fitted_blur_levels_are_the_path_of_the_first_images_and_travel_in_the_state_dict(
    tmp_path, monkeypatch
):
    """A Wasserstein schedule is found by fit from the first num_images images (the path of
    ``schedules.soft`` on them) and loaded into a fresh process with no data and no cache."""
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path))
    settings = {"method": "wasserstein", "num_levels": 6, "num_candidates": 24, "num_images": 50}
    build = partial(SoftBlurProcess, kernel_half_size=12, blur_max=6.0, blur_schedule=settings)
    data = _training_images(80)
    trained = build()
    trained.fit(data)
    blur = partial(gaussian_blur, half_size=12)
    expected, _ = wasserstein_path_levels(data[:50].double(), blur, 6, 0.01, 6.0, 24)
    assert trained.levels.tolist() == expected and len(expected) == 6
    fresh = build()
    with pytest.raises(ConfigError, match="no process.blur_levels yet"):
        fresh.mean(data[:2], torch.ones(2))
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "empty"))
    fresh.load_state_dict(trained.state_dict())
    t = torch.linspace(0, 1, 11, dtype=F64)
    assert torch.equal(fresh.blur_std(t), trained.blur_std(t))
    assert not (tmp_path / "empty").exists()


def test_the_mean_colour_prior_matches_the_data_colours():
    """With C_1 the identity (blur 0.01 throughout), the prior's mean colours have the mean and
    covariance of the training images' mean colours."""
    data = _training_images(400)
    process = SoftBlurProcess(blur_max=0.01, sigma_max=0.1)
    process.fit(data)
    colours = data.flatten(2).mean(2).to(F64)
    draws = process.prior_sampling((20000, 3, 16, 16), generator=_generator(1)).to(F64)
    drawn = draws.flatten(2).mean(2)  # the noise adds 0.1^2 / 256 per channel
    torch.testing.assert_close(drawn.mean(0), colours.mean(0), rtol=0, atol=0.01)
    expected_cov = colours.T.cov() + 0.1**2 / 256 * torch.eye(3, dtype=F64)
    torch.testing.assert_close(drawn.T.cov(), expected_cov, rtol=0.1, atol=2e-3)


def test_the_blurred_data_prior_draws_corrupted_training_images():
    data = _training_images(30)
    process = SoftBlurProcess(prior="blurred_data", kernel_half_size=12, blur_max=5.0)
    process.fit(data)
    blurred = process.mean(data, torch.ones(30))
    assert process.prior_bank.shape == data.shape  # bank larger than the data: all of it
    mean = process.prior_mean((8, 3, 16, 16), generator=_generator(2))
    distances = torch.cdist(mean.flatten(1).double(), blurred.flatten(1).double()).min(1).values
    assert float(distances.max()) < 1e-5


def test_the_prior_travels_in_a_lightning_checkpoint(tmp_path):
    """Saved by torch.save in a checkpoint of the method and read with weights_only=True."""
    from diffusion_lab.methods.base import DiffusionMethod
    from diffusion_lab.networks.mlp import MLP

    def method():
        network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="fourier")
        process = SoftBlurProcess(kernel_half_size=12, blur_max=5.0)
        return DiffusionMethod(network, process, None, None, None, "x0_residual", None, None)

    trained = method()
    trained.process.fit(_training_images())
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "soft.ckpt")
    restored = method()
    restored.load_state_dict(torch.load(tmp_path / "soft.ckpt", weights_only=True)["state_dict"])
    draws = [
        m.process.prior_sampling((3, 3, 16, 16), generator=_generator(5))
        for m in (trained, restored)
    ]
    assert torch.equal(*draws)


# ------------------------------------------------------------------------------------ configs
def _compose(overrides):
    return compose_config(str(CONF), overrides)


@pytest.mark.parametrize(
    ("group", "cls"), [("soft_blur", SoftBlurProcess), ("soft_mask", SoftMaskProcess)]
)
def test_the_processes_build_from_their_configs(group, cls):
    cfg = _compose([f"process={group}", "data=digits", "data.image_size=16"])
    check_tree("process", OmegaConf.to_container(cfg.process, resolve=True))  # keys and types
    process = instantiate(cfg.process)
    assert isinstance(process, cls) and process.provides == frozenset(
        {"linear_mean", "noisy_at_zero"}
    )
    assert process.noise_fraction == 0.15 and process.sigma_max == 0.1
    with pytest.raises(ConfigError, match="is not one"):  # the SDE samplers are refused
        check_sampler(ddim, process)
    if cls is SoftBlurProcess:  # the Wasserstein path, found by fit: no levels before it
        assert process.kernel_half_size == 80 and process.levels.numel() == 0
        assert process.blur_schedule == BlurScheduleSettings(method="wasserstein")
        cifar = instantiate(
            _compose(["process=soft_blur", "process.kernel_half_size=32", "process.blur_max=18.0",
                      "process/blur_schedule=soft_linear"]).process
        )  # fmt: skip
        assert cifar.kernel_half_size == 32 and float(cifar.blur_std(torch.ones(1))) == 18.0
        assert cifar.levels.tolist() == linear_levels(32, 0.01, 18.0)


def test_a_bad_config_value_stops_at_the_schema():
    with pytest.raises(ConfigError, match="process.noise_fraction"):
        cfg = _compose(["process=soft_blur", "process.noise_fraction=fast"])
        check_tree("process", OmegaConf.to_container(cfg.process, resolve=True))


def test_the_blur_benchmark_runs_and_names_the_default(tmp_path):
    """A tiny run of experiments/blur_benchmark.py: every method timed, agreeing, and the JSON
    says which is fastest and which is the default (no timing is asserted)."""
    import json
    import os
    import subprocess
    import sys

    script = EXPERIMENTS / "blur_benchmark.py"
    out = tmp_path / "bench.json"
    args = ["--batch", "2", "--size", "8", "--half-size", "12", "--repeats", "2", "--out", out]
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["median_seconds"]) == set(BLUR_METHODS)
    assert result["default_method"] == "separable" and result["setting"]["effective_half_size"] == 7
    assert max(result["max_abs_difference_to_separable_conv"].values()) < 1e-5
