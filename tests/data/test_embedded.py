"""Embedded data sets: Gaussian-mixture closed forms, DataModule contract, determinism, configs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONF
from PIL import Image

from diffusion_lab.data.base import SplitDataModule, derive_seed
from diffusion_lab.data.digits import DigitsDataModule, load_digits_arrays
from diffusion_lab.data.images import (
    ImageFolderDataModule,
    NaturalCropsDataModule,
    SingleImageDataModule,
)
from diffusion_lab.data.toy2d import (
    MIXTURES,
    TOY2D_NAMES,
    GaussianMixture,
    Toy2DDataModule,
    make_toy2d,
)
from diffusion_lab.errors import ConfigError, DataError

DATA_CONF = CONF / "data"


# ----------------------------------------------------------------------------- Gaussian mixture
def _reference_log_prob(gm: GaussianMixture, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Independent log density of the convolved mixture, in float64, via torch.distributions."""
    b = x.shape[0]
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(b)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(b)
    out = []
    for i in range(b):
        std = torch.sqrt(alpha[i] ** 2 * gm.stds**2 + sigma[i] ** 2)  # (K,)
        comp = torch.distributions.Independent(
            torch.distributions.Normal(alpha[i] * gm.means, std[:, None].expand_as(gm.means)), 1
        )
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=gm.weights), comp
        )
        out.append(mix.log_prob(x[i].double()))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_mixture_log_prob_matches_closed_form(name: str) -> None:
    gm = make_toy2d(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64) * 4
    alpha = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.1
    sigma = torch.rand(16, generator=g, dtype=torch.float64) * 3
    got = gm.log_prob(x, alpha, sigma)
    torch.testing.assert_close(got, _reference_log_prob(gm, x, alpha, sigma))
    # default alpha=1, sigma=0 is the data density
    torch.testing.assert_close(gm.log_prob(x), _reference_log_prob(gm, x, 1.0, 0.0))


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("scalar", [True, False])
def test_mixture_score_is_gradient_of_log_prob(name: str, scalar: bool) -> None:
    gm = make_toy2d(name)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 2, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    if scalar:
        alpha, sigma = 0.7, 0.4
    else:
        alpha = torch.rand(32, generator=g, dtype=torch.float64) + 0.05
        sigma = torch.rand(32, generator=g, dtype=torch.float64) * 2 + 0.01
    lp = _reference_log_prob(gm, x, alpha, sigma).sum()
    (grad,) = torch.autograd.grad(lp, x)
    torch.testing.assert_close(gm.score(x.detach(), alpha, sigma), grad)


def test_mixture_score_is_stable_far_from_the_data() -> None:
    gm = make_toy2d("grid25")
    x = torch.tensor([[1e3, -1e3], [50.0, 0.0]])
    s = gm.score(x, 1.0, 0.0)
    assert torch.isfinite(s).all() and torch.isfinite(gm.log_prob(x)).all()
    # far away, the score points back toward the nearest mode at rate 1 / s^2
    torch.testing.assert_close(s[1], torch.tensor([-(50.0 - 4.0) / 0.04, 0.0]))
    assert s.dtype == torch.float32


def test_mixture_large_noise_score_tends_to_gaussian() -> None:
    gm = make_toy2d("two_modes")
    x = torch.randn(8, 2)
    sigma = 1e4
    torch.testing.assert_close(
        gm.score(x, 1.0, sigma), -(x - gm.mean()) / sigma**2, rtol=1e-3, atol=1e-9
    )


def test_mixture_sampling_moments() -> None:
    gm = make_toy2d("two_modes")
    x, comp = gm.sample(200_000, torch.Generator().manual_seed(0))
    assert x.shape == (200_000, 2) and x.dtype == torch.float32 and comp.dtype == torch.int64
    assert abs((comp == 0).float().mean().item() - 0.8) < 0.005
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.1, rtol=0.01)
    torch.testing.assert_close(gm.mean(), torch.tensor([3.0, 3.0]))
    # per-component spread equals its std
    assert abs(x[comp == 1].std(0).mean().item() - 1.0) < 0.02


def test_mixture_validation_and_general_dimension() -> None:
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0]], 0.0)
    with pytest.raises(ValueError):
        GaussianMixture([0.0, 1.0], 1.0)
    gm = GaussianMixture(torch.zeros(3, 5), [1.0, 2.0, 3.0], [1, 1, 2])
    x, _ = gm.sample(10)
    assert x.shape == (10, 5)
    torch.testing.assert_close(gm.weights.sum().item(), 1.0)


def test_mixture_score_fn_reads_alpha_and_sigma_from_a_process() -> None:
    class VP:
        def marginal_coefficients(self, t: torch.Tensor):
            a = torch.exp(-t)
            return a, torch.sqrt(1 - a**2)

    gm = make_toy2d("gmm8")
    x, t = torch.randn(6, 2), torch.rand(6) * 0.9 + 0.05
    a = torch.exp(-t)
    torch.testing.assert_close(gm.score_fn(VP())(x, t), gm.score(x, a, torch.sqrt(1 - a**2)))


def test_the_mixtures_denoised_is_the_gaussian_posterior_mean_finite_at_alpha_zero() -> None:
    """One component N(mu, s^2): E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2)
    (x - alpha mu), the mean mu itself at alpha = 0; Tweedie's formula on the score where
    alpha > 0."""
    from diffusion_lab.data.toy2d import GaussianMixture

    gaussian = GaussianMixture([[0.5, -1.0]], 0.4)
    x = torch.randn(5, 2, dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
    mu = gaussian.means[0]
    gain = (alpha * 0.16 / (alpha**2 * 0.16 + sigma**2))[:, None]
    expected = mu + gain * (x - alpha[:, None] * mu)
    torch.testing.assert_close(gaussian.denoised(x, alpha, sigma), expected)
    score = gaussian.score(x, alpha, sigma)
    tweedie = (x[1:] + sigma[1:, None] ** 2 * score[1:]) / alpha[1:, None]
    torch.testing.assert_close(gaussian.denoised(x, alpha, sigma)[1:], tweedie)


def test_sample_only_sets_raise_a_clear_error() -> None:
    for name in ("two_moons", "rings", "checkerboard"):
        src = make_toy2d(name)
        x, part = src.sample(100, torch.Generator().manual_seed(0))
        assert x.shape == (100, 2) and part.dtype == torch.int64
        with pytest.raises(ConfigError, match="gmm8"):
            src.score(x, 1.0, 0.0)
        dm = Toy2DDataModule(name, n_train=10, n_val=10, n_test=10)
        assert dm.distribution is None


# ----------------------------------------------------------------------------- DataModules
def _check_contract(dm: SplitDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == dm.data_shape and x.shape[0] <= dm.batch_size
    if dm.image_size is not None:
        assert x.ndim == 4 and x.shape[-2:] == (dm.image_size, dm.image_size)
        assert x.min() >= 0.0 and x.max() <= 1.0
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        xv, yv = next(iter(loader))
        assert xv.shape[1:] == x.shape[1:] and yv.dtype == torch.int64
    ref = dm.reference_samples(5)  # never more than the split holds
    n = min(5, len(dm.dataset("test"))) if not isinstance(dm, Toy2DDataModule) else 5
    assert ref.shape == (n, *dm.data_shape) and ref.dtype == torch.float32
    return x, y


def _batches(dm: SplitDataModule, n: int = 2) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it)[0] for _ in range(n)]


def _make_digits(**kw) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, **kw)


def _make_toy(**kw) -> Toy2DDataModule:
    return Toy2DDataModule("two_modes", n_train=200, n_val=50, n_test=50, batch_size=32, **kw)


def _make_single(**kw) -> SingleImageDataModule:
    return SingleImageDataModule("chelsea", n_copies=40, image_size=16, batch_size=8, **kw)


def _make_crops(**kw) -> NaturalCropsDataModule:
    return NaturalCropsDataModule(
        ["astronaut", "camera"], crop_size=64, n_train=40, n_val=8, n_test=8,
        image_size=16, batch_size=8, **kw,
    )  # fmt: skip


MAKERS = {"digits": _make_digits, "toy2d": _make_toy, "single": _make_single, "crops": _make_crops}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_datamodule_contract_and_determinism(kind: str) -> None:
    make = MAKERS[kind]
    dm = make(seed=3)
    _check_contract(dm)
    same = [torch.equal(a, b) for a, b in zip(_batches(dm), _batches(make(seed=3)), strict=True)]
    assert all(same), "same seed must give the same batches"
    if kind != "single":  # every copy of one image is the same
        other = _batches(make(seed=4))
        assert not torch.equal(_batches(dm)[0], other[0])


def test_digits_split_sizes_ranges_and_reuse() -> None:
    dm = DigitsDataModule()
    dm.setup()
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    assert dm.num_classes == 10 and dm.channels == 1 and dm.image_size == 8
    x, y = dm.tensors("train")
    assert x.shape == (1437, 1, 8, 8) and x.max() == 1.0 and x.min() == 0.0
    # values are k / 16 exactly at the native size
    torch.testing.assert_close(x * 16, (x * 16).round())
    # the splits are disjoint and cover the 1,797 digits
    all_x, _ = load_digits_arrays(8, "all")
    assert len(all_x) == 1797
    parts = torch.cat([dm.tensors(s)[0] for s in ("train", "val", "test")])
    assert torch.equal(parts.flatten(1).sum(1).sort().values, all_x.flatten(1).sum(1).sort().values)
    # the metrics package sees the same split as the DataModule
    xt, yt = load_digits_arrays(8, "test", seed=0)
    assert torch.equal(xt, dm.tensors("test")[0]) and torch.equal(yt, dm.tensors("test")[1])
    assert not torch.equal(load_digits_arrays(8, "test", seed=1)[0], xt)


def test_digits_resize_and_channels() -> None:
    dm = DigitsDataModule(image_size=16, channels=3, batch_size=4)
    x, _ = _check_contract(dm)
    assert x.shape == (4, 3, 16, 16) and torch.equal(x[:, 0], x[:, 2])


def test_toy2d_datamodule_attributes_and_reference() -> None:
    dm = Toy2DDataModule("gmm8", n_train=100, n_val=20, n_test=30)
    assert dm.channels == 2 and dm.image_size is None and dm.num_classes == 8
    assert isinstance(dm.distribution, GaussianMixture) and dm.value_range is None
    x, y = dm.tensors("train")
    assert x.shape == (100, 2) and y.max() < 8
    ref = dm.reference_samples(50)  # beyond the 30 test points: fresh seeded draws
    assert ref.shape == (50, 2) and torch.equal(ref[:30], dm.tensors("test")[0])
    assert torch.equal(ref, dm.reference_samples(50))
    # changing n_train leaves the test points alone
    dm2 = Toy2DDataModule("gmm8", n_train=150, n_val=20, n_test=30)
    assert torch.equal(dm2.tensors("test")[0], dm.tensors("test")[0])
    assert set(TOY2D_NAMES) == {"gmm8", "two_modes", "grid25", "two_moons", "rings", "checkerboard"}


def test_single_image_is_one_centre_cropped_photo() -> None:
    dm = SingleImageDataModule("coffee", n_copies=3, image_size=24, channels=1)
    x, _ = dm.tensors("train")
    assert x.shape == (3, 1, 24, 24) and torch.equal(x[0], x[2])
    assert torch.equal(dm.reference_samples(2)[1], dm.image())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DigitsDataModule(batch_size=0), "batch_size"),
        (lambda: DigitsDataModule(num_workers=-1), "num_workers"),
        (lambda: DigitsDataModule(image_size=0), "image_size"),
        (lambda: DigitsDataModule(channels=2), "channels"),
        (lambda: DigitsDataModule(value_range=[1, 0]), "value_range"),
        (lambda: Toy2DDataModule("spiral"), "gmm8, two_modes, grid25"),
        (lambda: Toy2DDataModule(image_size=8), "image_size"),
        (lambda: Toy2DDataModule(n_train=0), "n_train"),
        (lambda: SingleImageDataModule("lena"), "astronaut"),
        (lambda: NaturalCropsDataModule(images=["nope"]), "astronaut"),
        (lambda: NaturalCropsDataModule(crop_size=400, n_train=1).setup(), "crop_size"),
    ],
)
def test_out_of_range_arguments_raise_config_error(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_derived_seeds_are_independent_streams() -> None:
    assert derive_seed(0, "train") != derive_seed(0, "test") != derive_seed(1, "train")
    assert derive_seed(5, "x") == derive_seed(5, "x") and 0 <= derive_seed(2**40, "x") < 2**63


# ----------------------------------------------------------------------------- image folder
def _write_images(folder: Path, n: int) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        arr = np.full((20, 30, 3), 40 * i, dtype=np.uint8)
        arr[:, :5] = 255  # cropped away by the centre square crop
        Image.fromarray(arr).save(folder / f"img_{i}.png")
        arrays.append(arr)
    (folder / "notes.txt").write_text("not an image")
    return arrays


def test_image_folder_reads_sorted_crops_and_splits(tmp_path: Path) -> None:
    _write_images(tmp_path, 4)
    dm = ImageFolderDataModule(str(tmp_path), image_size=10, batch_size=2, n_copies=2)
    _check_contract(dm)
    x, _ = dm.tensors("train")
    assert x.shape == (8, 3, 10, 10)
    expected = torch.tensor([40 * i / 255 for i in range(4)])
    torch.testing.assert_close(x[:4].mean((1, 2, 3)), expected, atol=1e-6, rtol=0)
    assert torch.equal(dm.tensors("test")[0], x[:4])
    held = ImageFolderDataModule(str(tmp_path), image_size=10, holdout=1)
    assert len(held.dataset("train")) == 3 and len(held.dataset("test")) == 1


def test_image_folder_missing_or_empty_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(str(tmp_path / "nope")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG images in .*empty"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataModule(str(tmp_path / "bad")).setup()


def test_image_folder_bad_file_policy(tmp_path: Path, caplog) -> None:
    _write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png.*replace or delete.*on_bad_file=skip"):
        ImageFolderDataModule(str(tmp_path)).setup()
    dm = ImageFolderDataModule(str(tmp_path), image_size=10, on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        x, _ = dm.tensors("train")
    assert x.shape == (3, 3, 10, 10) and "left out 1 unreadable image file(s) of 4" in caplog.text
    for f in tmp_path.glob("img_*.png"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match="none of the 4 images"):
        ImageFolderDataModule(str(tmp_path), on_bad_file="skip").setup()


# ----------------------------------------------------------------------------- configs
def test_every_data_config_instantiates() -> None:
    from hydra import compose, initialize_config_dir

    from diffusion_lab.build import build_datamodule

    names = sorted(p.stem for p in DATA_CONF.glob("*.yaml"))
    assert names == sorted(
        ["digits", "toy2d", "single_image", "natural_crops", "image_folder", "mnist", "cifar10",
         "celeba", "imagenet", "few_images", "cifar10_dogs", "fp_paper_celeba_single",
         "fp_paper_celeba_three", "fp_paper_imagenet_three"]
    )  # fmt: skip
    for name in names:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"data={name}", "seed=7"])
        for key in ("_target_", "batch_size", "num_workers", "seed", "image_size", "channels"):
            assert key in cfg.data, (name, key)
        # the sets decoded per batch read with workers; the in-memory ones gather in-process
        assert cfg.data.num_workers == (4 if name in ("celeba", "imagenet") else 0)
        assert "value_range" in cfg.data
        dm, _ = build_datamodule(cfg)  # metrics are read by build.py / the evaluator
        assert dm.seed == 7 and dm.channels == cfg.data.channels
        assert dm.image_size == cfg.data.image_size
        assert dm.value_range == (None if name == "toy2d" else (0.0, 1.0))
