"""The FP score embedding's process, loss, method and data (processes/fp_embedding.py,
losses/score_embedding.py, methods/fp_embedding.py, data/few.py) against independent
computations; the solver itself is tested in test_fokker_planck.py."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from diffusion_lab.data.base import TensorPairDataset
from diffusion_lab.data.few import FewImagesDataModule
from diffusion_lab.data.images import NaturalCropsDataModule, SingleImageDataModule
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.losses.dsm import DenoisingScoreMatching
from diffusion_lab.losses.score_embedding import ScoreEmbeddingLoss
from diffusion_lab.methods.fp_embedding import distinct_images
from diffusion_lab.metrics import image_quality
from diffusion_lab.processes.fp_embedding import (
    FPEmbeddingProcess,
    ImageScoreModel,
    distinct_in_order,
)
from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.score_model import ScoreModel


class TinyNet(nn.Module):
    """An output depending on x and the label (float64)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(0.2 * torch.randn(dim, dim, generator=g, dtype=torch.float64))

    def forward(self, x, label):
        out = torch.tanh(x.flatten(1) @ self.weight.T) * (1 + 0.3 * label.to(x)[:, None])
        return out.reshape(x.shape)


def images(k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, 1, 4, 4, generator=g, dtype=torch.float64)


def fitted(embedding="zero_score", base=None, **kwargs):
    process = FPEmbeddingProcess(base or VESDE(sigma_min=0.01, sigma_max=5.0), num_steps=5,
                                 embedding=embedding, cache=False, **kwargs)  # fmt: skip
    x = images()
    process.fit(torch.cat([x, x[1:], x]))  # repeated copies, as a DataModule gives them
    return process, x


def test_fit_keeps_each_distinct_image_once_in_dataset_order():
    x = images(3)
    data = torch.cat([x[2:], x[:1], x[2:], x[1:2], x[:1]])
    assert torch.equal(distinct_in_order(data), torch.stack([x[2], x[0], x[1]]))
    process, x = fitted()
    assert torch.allclose(process.images.double(), x, atol=1e-7)
    assert process.table.shape == (2, 6, 1, 4, 4)


def test_with_zero_score_and_ve_the_table_is_the_image_and_with_vp_it_follows_the_drift():
    process, x = fitted()
    assert torch.allclose(process.table.double(), x[:, None].expand(-1, 6, -1, -1, -1), atol=1e-6)
    process, x = fitted(base=VPSDE())
    expected = [x]  # x^n = x^{n-1} + dt f(x^{n-1}, t_{n-1}) (eq. 21 with grad m = 0)
    for n in range(5):
        drift = VPSDE().sde(expected[-1], torch.full((2,), n / 5, dtype=torch.float64))[0]
        expected.append(expected[-1] + 0.2 * drift)
    assert torch.allclose(process.table.double(), torch.stack(expected, 1), rtol=1e-5)


def test_the_table_is_read_by_index_at_grid_times_and_linear_in_between():
    process, x = fitted(base=VPSDE())
    index = torch.tensor([1, 0, 1])
    t = torch.tensor([0.4, 0.6, 0.5])  # grid 0, 0.2, ..., 1
    mean = process.table_at(index, t)
    table = process.table
    assert torch.allclose(mean[0], table[1, 2], atol=1e-6)
    assert torch.allclose(mean[1], table[0, 3], atol=1e-6)
    assert torch.allclose(mean[2], 0.5 * (table[1, 2] + table[1, 3]), atol=1e-6)
    assert torch.allclose(process.std(t), VPSDE().std(t))
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = VPSDE().std(t)[:, None, None, None]
    assert torch.allclose(process.perturb(index, t, z), mean + sigma * z, atol=1e-6)


def test_the_mean_of_an_image_without_its_index_is_one_clear_error():
    process, x = fitted()
    with pytest.raises(ConfigError, match="needs each example's image index|read by each"):
        process.mean(x[:1].float(), torch.tensor([0.5]))
    with pytest.raises(ConfigError, match="image index"):
        process.sample_marginal(x[:1].float(), torch.tensor([0.5]), torch.zeros(1, 1, 4, 4))


def test_separate_intervals_label_image_k_with_k_plus_t():
    """The label of examples of images ``index`` is index + t (sec. 4.4), t without separate
    intervals; without an index, sample b is image b mod K; the image model labels so."""
    process, _ = fitted(separate_intervals=True)
    t = torch.tensor([0.3, 0.7, 0.25, 0.5], dtype=torch.float64)
    index = torch.tensor([1, 0, 0, 1])
    expected = torch.tensor([1.3, 0.7, 0.25, 1.5], dtype=torch.float64)  # index + t
    assert torch.equal(process.noise_label(t, index), expected)
    assert torch.equal(process.noise_label(t), t + torch.tensor([0.0, 1.0, 0.0, 1.0]).to(t))
    shared, _ = fitted()
    assert torch.equal(shared.noise_label(t, index), t)
    assert torch.equal(shared.noise_label(t), t)
    model = ImageScoreModel(ScoreModel(TinyNet(16), process, "score"), index)
    assert torch.equal(model.label(t), t + index.to(t))
    with pytest.raises(ConfigError, match="needs process=fp_embedding"):
        ImageScoreModel(ScoreModel(TinyNet(16), VPSDE(), "score"), index)


def test_the_embedded_prior_is_each_images_last_entry_plus_sigma_max_noise():
    process, _ = fitted(prior="embedded", base=VPSDE())
    g = torch.Generator().manual_seed(0)
    x = process.prior_sampling((4000, 1, 4, 4), generator=g)
    table = process.table[:, -1]
    for k in range(2):
        rows = x[k::2]
        assert torch.allclose(rows.mean(0), table[k], atol=0.1)
        assert rows.std(0).mean().item() == pytest.approx(
            float(process.std(torch.ones(1))), rel=0.05
        )


@pytest.mark.parametrize("base", [VESDE(sigma_min=0.01, sigma_max=5.0), VPSDE()])
def test_eq_24_per_example_against_a_direct_computation_and_the_dsm(base):
    """Eq. 24 by hand: 1/(2 g^2) || lambda s(x^n + lambda z, t) + z ||^2 with lambda = sigma, and
    with zero score on VE (x^n = x^0) the framework's variance-weighted DSM / g^2 per example."""
    process, x = fitted(base=base)
    index = torch.tensor([0, 1, 1, 0])
    model = ImageScoreModel(ScoreModel(TinyNet(16), process, "score"), index)
    loss = ScoreEmbeddingLoss()
    x0 = x[index]
    t = torch.tensor([0.2, 0.4, 1.0, 0.6], dtype=torch.float64)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = base.std(t)[:, None, None, None]
    g = base.sde(x0, t)[1]
    xt = process.table[index, (5 * t).round().long()].double() + sigma * z  # t on the grid
    by_hand = (sigma * model.score(xt, t) + z).pow(2).flatten(1).sum(1) / (2 * g.pow(2))
    assert torch.allclose(loss.per_example(model, t, z), by_hand, rtol=1e-12)
    if isinstance(base, VESDE):
        plain = ScoreModel(
            model.network, VESDE(sigma_min=0.01, sigma_max=5.0, conditioning="time"), "score"
        )
        dsm = DenoisingScoreMatching.variance_weighted(plain, x0, t, z)
        assert torch.allclose(loss.per_example(model, t, z) * g.pow(2), dsm, rtol=1e-6)
    variance = ScoreEmbeddingLoss(weighting="variance")
    assert torch.allclose(variance.per_example(model, t, z) / g.pow(2), by_hand, rtol=1e-12)


def test_the_loss_of_a_step_is_the_mean_of_eq_24_at_its_level_and_needs_the_images_model():
    process, x = fitted(separate_intervals=True)
    index = torch.tensor([1, 0, 1])
    model = ImageScoreModel(ScoreModel(TinyNet(16), process, "score"), index)
    loss = ScoreEmbeddingLoss().at_step(7)  # level n = 7 mod 5 + 1 = 3, t = 0.6
    torch.manual_seed(4)
    value = loss(model, x[index])
    torch.manual_seed(4)
    z = torch.randn_like(x[index])
    t = torch.full((3,), 0.6, dtype=torch.float32)
    assert value.item() == pytest.approx(loss.per_example(model, t, z).mean().item(), rel=1e-12)
    with pytest.raises(ConfigError, match="reads each example's image index"):
        loss(ScoreModel(model.network, process, "score"), x[index])


def test_dsm_call_is_the_mean_of_its_per_example_terms():
    base = VESDE(sigma_min=0.01, sigma_max=5.0)
    model = ScoreModel(TinyNet(16), base, "score")
    x0 = images(8)
    torch.manual_seed(5)
    value = DenoisingScoreMatching(time_sampling="uniform")(model, x0)
    torch.manual_seed(5)
    t = (1e-5 + (1 - 1e-5) * torch.rand(8)).to(x0.dtype)  # drawn in float32, as sample_times
    z = torch.randn_like(x0)
    assert value.item() == pytest.approx(
        DenoisingScoreMatching.variance_weighted(model, x0, t, z).mean().item(), rel=1e-12
    )


def test_sequential_times_sweep_n_1_to_N_as_alg_2_and_uniform_stays_on_the_grid():
    process, _ = fitted()
    loss = ScoreEmbeddingLoss()
    seen = [loss.at_step(step).times(process, 3, "cpu") for step in range(11)]
    assert all(torch.all(s == s[0]) for s in seen)
    assert [round(float(s[0]) * 5) for s in seen] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1]
    assert loss.step == 0 and loss.at_step(4).weighting == "eq24"
    uniform = ScoreEmbeddingLoss(time_sampling="uniform").times(process, 1000, "cpu")
    assert set((uniform * 5).round().int().tolist()) == {1, 2, 3, 4, 5}


def test_global_ssim_is_eq_26_to_29_with_the_standard_constants():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 8, 8, generator=g)
    b = (a + 0.2 * torch.rand(2, 3, 8, 8, generator=g)).clamp(0, 1)
    assert image_quality.global_ssim(a, a) == pytest.approx(1.0)
    values = []
    for i in range(2):
        for c in range(3):
            x, y = a[i, c].double().flatten(), b[i, c].double().flatten()
            mx, my, sx, sy = x.mean(), y.mean(), x.std(unbiased=False), y.std(unbiased=False)
            sxy = ((x - mx) * (y - my)).mean()
            c1, c2 = 0.01**2, 0.03**2
            c3 = c2 / 2
            lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            con = (2 * sx * sy + c2) / (sx**2 + sy**2 + c2)
            struct = (sxy + c3) / (sx * sy + c3)
            values.append(float(lum * con * struct))
    assert image_quality.global_ssim(b, a) == pytest.approx(sum(values) / 6, rel=1e-6)
    assert math.isfinite(image_quality.global_ssim(torch.zeros(1, 1, 4, 4), a[:1, :1, :4, :4]))


def test_few_images_picks_the_first_of_a_class_and_repeats_them():
    source = SingleImageDataModule(name="chelsea", n_copies=5, image_size=8)
    few = FewImagesDataModule(source, count=1, label=0, n_copies=7)
    x, y = few.tensors("train")
    assert x.shape == (7, 3, 8, 8) and torch.equal(x[3], source.image())
    assert torch.equal(y, torch.zeros(7, dtype=torch.int64))
    assert torch.equal(few.tensors("val")[0][0], source.image())
    with pytest.raises(DataError, match="only 0 images of class 5"):
        FewImagesDataModule(source, count=1, label=5).tensors("train")


def test_few_images_label_every_example_with_its_images_index():
    """Example i of the training split is picked image i mod K with label i mod K, in every
    access (item, batch of items, loader) and split; the source's class labels are not used."""
    source = NaturalCropsDataModule(n_train=9, n_val=1, n_test=1, image_size=8)
    source_x, source_y = source.tensors("train")
    few = FewImagesDataModule(source, count=3, label=int(source_y[4]), n_copies=5, batch_size=4)
    picked = source_x[source_y == int(source_y[4])][:3]
    train = few.dataset("train")
    assert len(train) == 15
    for i in range(15):
        x, y = train[i]
        assert int(y) == i % 3 and torch.equal(x, picked[i % 3])
    batch = train.__getitems__([14, 0, 7])
    assert [int(y) for _, y in batch] == [2, 0, 1]
    assert all(torch.equal(x, picked[int(y)]) for x, y in batch)
    few.setup("fit")
    for x, y in few.train_dataloader():
        assert torch.equal(x, picked[y])
    for split in ("val", "test"):
        x, y = few.tensors(split)
        assert torch.equal(y, torch.arange(3)) and torch.equal(x, picked)
    assert torch.equal(distinct_images(train), picked)


def test_labels_that_are_not_the_image_index_are_one_clear_error():
    x = images(2).float()
    labelled = TensorPairDataset(x[torch.tensor([0, 1, 0])], torch.tensor([0, 0, 0]))
    with pytest.raises(ConfigError, match="example 1 is image 1 .* its label is 0"):
        distinct_images(labelled)
    with pytest.raises(ConfigError, match=r"\(image, image index\) examples"):
        distinct_images(TensorDataset(x))


@pytest.mark.parametrize("sampler", ["probability_flow", "reverse_diffusion"])
def test_the_framework_samplers_denoise_an_embedded_image_with_its_exact_score(sampler):
    """The score of N(x^n, sigma^2) for one embedded image (zero score on VE: x^n = x^0) drives
    the probability-flow ODE and the reverse-diffusion sampler back to the image; NFE reported."""
    from diffusion_lab.samplers import ode, pc

    process = FPEmbeddingProcess(VESDE(sigma_min=0.01, sigma_max=5.0), num_steps=5,
                                 embedding="zero_score", cache=False)  # fmt: skip
    image = images(1)
    process.fit(image)

    def score(x, t):
        mean = process.table_at(torch.zeros(len(x), dtype=torch.long), t).to(x)
        return -(x - mean) / process.std(t).to(x)[:, None, None, None] ** 2

    g = torch.Generator().manual_seed(0)
    x_init = process.prior_sampling((4, 1, 4, 4), generator=g).double()
    if sampler == "probability_flow":
        result = ode.probability_flow(score, process, x_init, progress=False)
    else:
        result = pc.reverse_diffusion(score, process, x_init, steps=200, generator=g,
                                      progress=False)  # fmt: skip
    assert result.nfe > 0
    assert (result.samples - image).abs().max().item() < 0.05
