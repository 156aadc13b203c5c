"""The forward-process contract: a scalar corruption against the SDEs, the model's output kinds,
samplers that take the model, the build-time sampler check and the fitted-buffer hook."""

import functools

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.networks.mlp import MLP
from diffusion_lab.processes.corruption import ScalarCorruption
from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.samplers.ancestral import ancestral
from diffusion_lab.samplers.annealed_langevin import annealed_langevin
from diffusion_lab.samplers.base import check_sampler
from diffusion_lab.samplers.ddim import ddim
from diffusion_lab.samplers.ode import probability_flow
from diffusion_lab.samplers.pc import predictor_corrector
from diffusion_lab.score_model import ScoreModel

PROCESSES = {"ve": lambda: VESDE(sigma_max=5.0, num_steps=50), "vp": lambda: VPSDE(num_steps=100)}
MU, S0 = 0.7, 0.3  # data N(MU, S0^2 I): every marginal is Gaussian in closed form


def _times(n: int) -> torch.Tensor:
    return torch.linspace(0.05, 1.0, n, dtype=torch.float64)


def _gaussian_score(sde, x, t):
    """grad log N(x; alpha MU, (alpha^2 S0^2 + sigma^2) I), written out."""
    alpha, sigma = sde.marginal_coefficients(t)
    var = (alpha**2 * S0**2 + sigma**2)[:, None]
    return -(x - alpha[:, None] * MU) / var


def _gaussian_denoised(sde, x, t):
    """E[x0 | x_t = x] = MU + alpha S0^2 / (alpha^2 S0^2 + sigma^2) (x - alpha MU), written out."""
    alpha, sigma = sde.marginal_coefficients(t)
    gain = (alpha * S0**2 / (alpha**2 * S0**2 + sigma**2))[:, None]
    return MU + gain * (x - alpha[:, None] * MU)


@pytest.mark.parametrize("name", PROCESSES)
def test_scalar_corruption_reproduces_the_sde_marginals_and_scores(name):
    sde = PROCESSES[name]()
    corruption = ScalarCorruption(sde)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = _times(8)
    torch.testing.assert_close(corruption.mean(x0, t), sde.marginal_prob(x0, t)[0], rtol=0, atol=0)
    torch.testing.assert_close(corruption.std(t), sde.marginal_prob(x0, t)[1], rtol=0, atol=0)
    torch.testing.assert_close(
        corruption.sample_marginal(x0, t, noise), sde.sample_marginal(x0, t, noise)
    )
    torch.testing.assert_close(corruption.noise_label(t), sde.noise_label(t))
    # Eq. 8 from the exact clean-image estimate gives the exact score, through either process.
    x = sde.sample_marginal(MU + S0 * x0, t, noise)
    exact = _gaussian_score(sde, x, t)
    for process in (sde, corruption):
        score = process.score_from_denoised(x, t, _gaussian_denoised(sde, x, t))
        torch.testing.assert_close(score, exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sde.denoise(x, t, exact), _gaussian_denoised(sde, x, t))


@pytest.mark.parametrize("name", PROCESSES)
def test_generic_reverse_step_is_the_ancestral_step(name):
    sde = PROCESSES[name]()
    corruption = ScalarCorruption(sde)
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t, t_prev = _times(6), _times(6) - 0.04
    score = _gaussian_score(sde, x, t)
    mean, std = sde.ancestral_step(x, t, t_prev, score, "posterior")
    x0_hat = sde.denoise(x, t, score)
    stepped = corruption.reverse_step(x, t, t_prev, x0_hat, std, z)
    torch.testing.assert_close(stepped, mean + std[:, None] * z, rtol=1e-10, atol=1e-10)


class _Fixed(torch.nn.Module):
    """A network whose output is a fixed function of x and the label, to read it directly."""

    def forward(self, x, label):
        return torch.sin(3 * x) + label.double()[:, None] * 1e-3


@pytest.mark.parametrize("name", PROCESSES)
def test_denoised_of_each_parameterisation_against_a_direct_computation(name):
    process = PROCESSES[name]()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    t = _times(7)
    out = _Fixed()(x, process.noise_label(t))
    alpha, sigma = (c[:, None] for c in process.marginal_coefficients(t))
    rate_alpha, rate_sigma = (c[:, None] for c in process.marginal_rates(t))
    expected = {
        "eps": (x - sigma * out) / alpha,
        "score": (x + sigma**2 * out) / alpha,
        "score_over_sigma": (x + sigma * out) / alpha,
        "x0": out,
        "x0_residual": out + x,
        # v = alpha z - sigma x0 (Salimans & Ho 2022): alpha x - sigma v on VP
        "v": (alpha * x - sigma * out) / (alpha**2 + sigma**2),
        # u = alpha' x0 + sigma' z (flow matching's velocity), x = alpha x0 + sigma z solved for x0
        "velocity": (rate_sigma * x - sigma * out) / (alpha * rate_sigma - sigma * rate_alpha),
    }
    if name == "vp":
        torch.testing.assert_close(expected["v"], alpha * x - sigma * out)
    # The model evaluates the schedule at float32 times (as in training): float32 tolerance.
    for parameterization, x0_hat in expected.items():
        model = ScoreModel(_Fixed(), process, parameterization)
        torch.testing.assert_close(model.denoised(x, t), x0_hat, rtol=1e-5, atol=1e-6)
        # and the score is eq. 8 of that estimate, (alpha x0_hat - x) / sigma^2
        score = (alpha * x0_hat - x) / sigma**2
        torch.testing.assert_close(model.score(x, t), score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eps(x, t), -sigma * score, rtol=1e-5, atol=1e-5)


def test_v_needs_a_process_with_gaussian_marginals():
    """v is read with alpha(t): Soft Diffusion's blur has no scalar mean, so it is refused when
    the model is built, in one line naming what to use instead."""
    from diffusion_lab.errors import ConfigError
    from diffusion_lab.processes.soft import SoftBlurProcess

    with pytest.raises(ConfigError, match="'v' reads alpha.*SoftBlurProcess.*use eps"):
        ScoreModel(_Fixed(), SoftBlurProcess(num_steps=10, blur_max=2.0), "v")


SAMPLERS = {
    "ddim": (functools.partial(ddim, steps=5, eta=0.5), "vp"),
    "ancestral": (functools.partial(ancestral, steps=5), "vp"),
    "pc": (functools.partial(predictor_corrector, steps=4), "ve"),
    "annealed_langevin": (functools.partial(annealed_langevin, steps=3, n_steps_each=2), "ve"),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_model_and_its_plain_score_function_give_identical_samples(name):
    sample, process_name = SAMPLERS[name]
    process = PROCESSES[process_name]()
    torch.manual_seed(0)
    embedding = "fourier" if process_name == "ve" else "sinusoidal"
    network = MLP(dim=2, hidden=16, depth=2, embed_dim=8, embedding=embedding)
    torch.nn.init.normal_(network.out.weight, std=0.1)  # not the zero output of a fresh MLP
    model = ScoreModel(network, process, "eps" if process_name == "vp" else "score_over_sigma")
    runs = []
    for score in (model, model.score, lambda x, t: model.score(x, t)):
        generator = torch.Generator().manual_seed(3)
        runs.append(sample(score, process, (16, 2), generator=generator, progress=False))
    for other in runs[1:]:
        assert torch.equal(runs[0].samples, other.samples) and runs[0].nfe == other.nfe


def test_a_sampler_a_process_cannot_serve_stops_at_build():
    with pytest.raises(
        ConfigError, match="annealed_langevin needs a process that keeps noise at t = 0"
    ):
        check_sampler(functools.partial(annealed_langevin, steps=None), VPSDE())
    with pytest.raises(ConfigError, match="ddim needs a process that has Gaussian marginals"):
        check_sampler(functools.partial(ddim, steps=10), ScalarCorruption(VPSDE()))
    with pytest.raises(ConfigError, match="steps must lie in"):
        check_sampler(functools.partial(ddim, steps=0), VPSDE())
    with pytest.raises(ConfigError, match="chooses its own steps"):
        check_sampler(functools.partial(probability_flow, steps=10), VPSDE())
    check_sampler(functools.partial(annealed_langevin, steps=None), VESDE(num_steps=10))
    check_sampler(functools.partial(predictor_corrector, steps=10), VPSDE())


def test_conditioning_on_time_and_the_linear_embedding():
    process = VPSDE(num_steps=100, conditioning="time")
    t = torch.tensor([0.25, 1.0])
    assert torch.equal(process.noise_label(t), t)
    assert torch.equal(VPSDE(num_steps=100).noise_label(t), torch.tensor([24.0, 99.0]))
    assert torch.equal(VESDE().noise_label(t), VESDE().std(t))
    with pytest.raises(ConfigError, match="conditioning"):
        VESDE(conditioning="index")
    network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="linear_time")
    torch.nn.init.normal_(network.out.weight)
    model = ScoreModel(network, process)
    x = torch.zeros(2, 2)
    assert not torch.equal(model.eps(x, torch.full((2,), 0.1)), model.eps(x, torch.full((2,), 0.9)))


def test_the_uniform_prior_and_its_log_density():
    process = VESDE(prior="uniform", prior_range=(0.0, 2.0))
    draw = process.prior_sampling((1000, 3), torch.Generator().manual_seed(0))
    assert (
        float(draw.min()) >= 0.0 and float(draw.max()) <= 2.0 and abs(float(draw.mean()) - 1) < 0.05
    )
    logp = process.prior_logp(torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 2.5]]))
    assert logp[0].item() == pytest.approx(-3 * torch.log(torch.tensor(2.0)).item())
    assert logp[1].item() == float("-inf")


class _FittedMean(VESDE):
    """A VE process whose prior is centred on the training mean: a fitted buffer."""

    def __init__(self) -> None:
        super().__init__(sigma_max=1.0, num_steps=10)
        self.register_fitted("data_mean")

    def fit(self, data: torch.Tensor) -> None:
        self.data_mean = data.mean(0)

    def prior_sampling(self, shape, generator=None, device="cpu"):
        return self.data_mean + super().prior_sampling(shape, generator, device)


def test_a_fitted_process_travels_in_the_checkpoint():
    assert _FittedMean().needs_fit and not VESDE().needs_fit
    data = torch.randn(50, 2) + torch.tensor([3.0, -2.0])

    def method():
        network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="fourier")
        return DiffusionMethod(network, _FittedMean(), None, None, None, "score", None, None)

    trained = method()
    trained.process.fit(data)
    state = trained.state_dict()
    assert torch.equal(state["process.data_mean"], data.mean(0))
    restored = method()  # a fresh process knows nothing of the data
    assert restored.process.data_mean.numel() == 0
    restored.load_state_dict(state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        restored.process.prior_sampling((4, 2), g1), trained.process.prior_sampling((4, 2), g2)
    )


def test_training_fits_the_process_once_and_a_resume_restores_it(tmp_path):
    import lightning as L

    from diffusion_lab.data.toy2d import Toy2DDataModule
    from diffusion_lab.losses.dsm import DenoisingScoreMatching

    data = Toy2DDataModule(name="gmm8", n_train=300, n_val=50, n_test=50, batch_size=100)

    def fit(steps, ckpt_path=None):
        network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="fourier")
        method = DiffusionMethod(
            network, _FittedMean(), DenoisingScoreMatching(), None,
            functools.partial(torch.optim.Adam, lr=1e-3), "score", None, None, num_eval_samples=0,
        )  # fmt: skip
        fits = []
        method.process.fit = lambda x, fit=method.process.fit: fits.append(fit(x))
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False)
        trainer.fit(method, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        return trainer, method, len(fits)

    trainer, method, fits = fit(2)
    train_x = data.tensors("train")[0]
    assert fits == 1
    torch.testing.assert_close(method.process.data_mean, train_x.mean(0))
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    checkpoint = torch.load(tmp_path / "fitted.ckpt", weights_only=True)
    torch.testing.assert_close(checkpoint["state_dict"]["process.data_mean"], train_x.mean(0))
    _, resumed, fits = fit(3, tmp_path / "fitted.ckpt")
    assert fits == 0  # restored from the checkpoint, not fitted again
    torch.testing.assert_close(resumed.process.data_mean, train_x.mean(0))
