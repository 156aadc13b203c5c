"""Tests of diffusion_lab.metrics against closed forms, scipy and the digits data."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from scipy.stats import wasserstein_distance

from diffusion_lab.cache import cache_dir
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics import digits_classifier as dc
from diffusion_lab.metrics import fid as fid_module
from diffusion_lab.metrics.coverage import class_coverage, plot_class_histogram
from diffusion_lab.metrics.fid import build_fid, compute_fid, compute_kid
from diffusion_lab.metrics.image_quality import mse, psnr, ssim, ssim_kernel_size
from diffusion_lab.metrics.sliced_wasserstein import sliced_wasserstein


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dc.DigitsClassifier]:
    """The digits classifier, trained once per session into a temporary cache dir."""
    old = os.environ.get("DIFFUSION_LAB_CACHE")
    os.environ["DIFFUSION_LAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield dc.get_digits_classifier()
    finally:
        if old is None:
            os.environ.pop("DIFFUSION_LAB_CACHE")
        else:
            os.environ["DIFFUSION_LAB_CACHE"] = old


# --- image quality -----------------------------------------------------------------------------


def test_psnr_and_mse_of_constant_offset() -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    offset = 0.1
    expected = -10 * math.log10(offset**2)
    assert mse(x + offset, x) == pytest.approx(offset**2, rel=1e-4)
    assert psnr(x + offset, x) == pytest.approx(expected, rel=1e-4)
    assert psnr(x + offset, x, per_image=True) == pytest.approx(expected, rel=1e-4)
    assert psnr(x, x) == math.inf


def test_ssim_identical_and_constant_images() -> None:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    # Constant images: no variance, SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2.
    a, b, c1 = 0.3, 0.5, 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((2, 1, 8, 8), a), torch.full((2, 1, 8, 8), b))
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("size, kernel", [(8, 7), (32, 11), (11, 11), (4, 3), (1, 1)])
def test_ssim_kernel_shrinks_for_tiny_images(size: int, kernel: int) -> None:
    assert ssim_kernel_size(size, size) == kernel
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(2))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, x * 0.5) < 1.0


def test_image_quality_rejects_bad_inputs() -> None:
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        ssim(x, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        psnr(x * 2 - 1, x)


# --- sliced Wasserstein -------------------------------------------------------------------------


def test_sliced_wasserstein_identical_sets_is_zero() -> None:
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x.flip(0)) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_translation_closed_form() -> None:
    # For y = x + v: each projection shifts by <theta, v>, so SW_2^2 = E <theta, v>^2 = |v|^2 / d.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = sliced_wasserstein(x, x + v, n_projections=20000, generator=g)
    assert got == pytest.approx(float(v.norm()) / 2.0, rel=0.03)


def test_sliced_wasserstein_1d_matches_scipy_for_unequal_sizes() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(301, 1, generator=g, dtype=torch.float64)
    y = 0.5 + 2.0 * torch.randn(157, 1, generator=g, dtype=torch.float64)
    expected = wasserstein_distance(x.squeeze(1).numpy(), y.squeeze(1).numpy())
    assert sliced_wasserstein(x, y, n_projections=3, p=1) == pytest.approx(expected, rel=1e-9)


def test_sliced_wasserstein_1d_p2_equal_sizes_is_sorted_mean() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(100, 1, generator=g), torch.randn(100, 1, generator=g) + 1
    expected = ((x.sort(0).values - y.sort(0).values) ** 2).mean().sqrt()
    assert sliced_wasserstein(x, y, n_projections=2) == pytest.approx(float(expected), rel=1e-6)


def test_sliced_wasserstein_is_seeded() -> None:
    x, y = torch.randn(50, 3), torch.randn(70, 3)
    first = sliced_wasserstein(x, y, 16, torch.Generator().manual_seed(5))
    assert first == sliced_wasserstein(x, y, 16, torch.Generator().manual_seed(5))


# --- digits classifier --------------------------------------------------------------------------


def test_digits_splits_are_disjoint() -> None:
    sizes = {"train": 1437, "val": 180, "test": 180}
    images = {}
    for split, n in sizes.items():
        x, y = dc.load_digits_split(split, image_size=16)
        assert x.shape == (n, 1, 16, 16) and y.shape == (n,)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        images[split] = {tuple(row.tolist()) for row in dc.load_digits_split(split)[0].flatten(1)}
    assert not images["train"] & images["test"] and not images["val"] & images["test"]


@pytest.mark.parametrize("image_size", [8, 32])
def test_digits_classifier_accuracy(classifier: dc.DigitsClassifier, image_size: int) -> None:
    images, labels = dc.load_digits_split("test", image_size=image_size)
    acc = dc.accuracy(classifier, images, labels)
    print(f"digits classifier test accuracy at {image_size}px: {acc:.4f}")
    assert acc >= 0.97
    assert not classifier.training
    assert classifier.features(images[:5]).shape == (5, dc.NUM_FEATURES)
    assert classifier(images[:5].expand(-1, 3, -1, -1)).shape == (5, 10)


def test_digits_classifier_cache(classifier: dc.DigitsClassifier, tmp_path) -> None:
    path = dc.cache_path()
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    reloaded = dc._load_cached(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(reloaded(x), classifier(x))
    corrupt = tmp_path / dc.CACHE_NAME
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        assert dc._load_cached(corrupt) is None


def test_digits_classifier_first_use_says_so_then_loads(tmp_path, monkeypatch, caplog) -> None:
    trained: list[int] = []

    def fake_train(seed: int = 0) -> dc.DigitsClassifier:
        trained.append(seed)
        return dc._freeze(dc.DigitsClassifier())

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    monkeypatch.delenv("DIFFUSION_LAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh account: the documented default folder
    assert cache_dir() == tmp_path / ".cache" / "diffusion_lab"
    monkeypatch.setattr(dc, "_LOADED", {})
    with caplog.at_level(logging.INFO, logger="diffusion_lab"):
        first = dc.get_digits_classifier()
    path = tmp_path / ".cache" / "diffusion_lab" / dc.CACHE_NAME
    assert trained == [0] and path.is_file()
    assert "training the digits classifier" in caplog.text and str(path) in caplog.text
    monkeypatch.setattr(dc, "_LOADED", {})  # the next run: nothing in memory, the file on disk
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffusion_lab"):
        second = dc.get_digits_classifier()
    assert trained == [0] and "training" not in caplog.text
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(first(x), second(x))


def test_the_digits_classifier_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """Trained (the first time) or loaded from the cache, after a run has seeded its RNG: the
    run's draws are the same either way."""
    real_train = dc.train_digits_classifier
    monkeypatch.setattr(dc, "train_digits_classifier", lambda seed=0: real_train(seed, epochs=1))
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path))
    for what in ("trained", "loaded"):
        monkeypatch.setattr(dc, "_LOADED", {})
        before = torch.get_rng_state()
        dc.get_digits_classifier()
        assert torch.equal(torch.get_rng_state(), before), what


def test_processes_starting_together_train_the_digits_classifier_once(tmp_path, monkeypatch):
    """Two starts at once (as DDP ranks or a sweep's parallel jobs): one trains under the lock,
    the other waits and loads its file. A start that arrives after the training loads the file
    too, so no interleaving trains twice."""
    trained: list[int] = []

    def slow_fake_train(seed: int = 0) -> dc.DigitsClassifier:
        trained.append(seed)
        time.sleep(0.3)  # long enough for the other start to reach the lock
        return dc._freeze(dc.DigitsClassifier())

    monkeypatch.setattr(dc, "train_digits_classifier", slow_fake_train)
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(dc, "_LOADED", {})
    loaded = []
    starts = [threading.Thread(target=lambda: loaded.append(dc._train_once(dc.cache_path())))
              for _ in range(2)]  # fmt: skip
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert trained == [0] and len(loaded) == 2
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded[0](x), loaded[1](x))


def test_digits_classifier_training_shows_progress(capsys) -> None:
    dc.train_digits_classifier(epochs=1)
    assert "training the digits classifier" in capsys.readouterr().err


# --- FID / KID ----------------------------------------------------------------------------------


def test_fid_digits_real_vs_real_far_below_noise(classifier: dc.DigitsClassifier) -> None:
    images, _ = dc.load_digits_split("all", image_size=16)
    first, second = images[::2], images[1::2]
    real = compute_fid(first, second)
    noise = compute_fid(torch.rand(first.shape, generator=torch.Generator().manual_seed(0)), second)
    print(f"fid_digits real-vs-real {real['fid_digits']:.2f}, noise {noise['fid_digits']:.2f}")
    assert real["metric"] == "fid_digits" and "fid" not in real
    assert real["num_fake"] == 899 and real["num_real"] == 898
    assert real["fid_digits"] < 0.1 * noise["fid_digits"]


def test_kid_digits(classifier: dc.DigitsClassifier) -> None:
    images, _ = dc.load_digits_split("all", image_size=8)
    noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    real = compute_kid(images[:400], images[400:800], subset_size=200, subsets=20)
    fake = compute_kid(noise, images[400:800], subset_size=200, subsets=20)
    assert fake["metric"] == "kid_digits" and fake["subset_size"] == 50
    assert real["kid_digits"] < 0.1 * fake["kid_digits"]


def test_fid_names_never_mix(classifier: dc.DigitsClassifier) -> None:
    _, name = build_fid("digits")
    assert name == "fid_digits"
    with pytest.raises(ConfigError):
        build_fid("inception", weights_path="/nonexistent/inception.pth")
    with pytest.raises(ConfigError):
        build_fid("resnet")
    with pytest.warns(UserWarning, match="fid_digits"):
        _, name = build_fid("auto", weights_path="/nonexistent/inception.pth")
    assert name == "fid_digits"


@pytest.mark.parametrize("compute", [compute_fid, compute_kid])
def test_the_reference_features_are_computed_once_and_cached(
    classifier: dc.DigitsClassifier, tmp_path, monkeypatch, compute
) -> None:
    """A second score against the same reference images feeds only the samples through the
    feature network and gives the same value to the last bit; one changed reference pixel is
    another reference, computed afresh."""
    monkeypatch.setattr(fid_module, "cache_dir", lambda: tmp_path)
    seen: list[int] = []
    forward = fid_module.DigitsFeatures.forward

    def counted(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(fid_module.DigitsFeatures, "forward", counted)
    images, _ = dc.load_digits_split("all", image_size=16)
    fake, real = images[:300], images[300:900]
    kwargs = {"subset_size": 100, "subsets": 10} if compute is compute_kid else {}
    first = compute(fake, real, **kwargs)
    assert sum(seen) == 900
    seen.clear()
    assert compute(fake, real, **kwargs) == first and sum(seen) == 300
    assert len(list((tmp_path / "reference_features").glob("*.pt"))) == 1
    other = real.clone()
    other[0, 0, 0, 0] = 1.0 - other[0, 0, 0, 0]
    seen.clear()
    compute(fake, other, **kwargs)
    assert sum(seen) == 900
    assert len(list((tmp_path / "reference_features").glob("*.pt"))) == 2


def test_an_inception_score_without_its_weights_says_where_to_put_them(
    classifier: dc.DigitsClassifier, tmp_path, monkeypatch
) -> None:
    """fid (Inception) on a machine without torch-fidelity or its weights file: one line that
    says what is missing and how to get it, and fid_digits is not reported as fid."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError) as error:
        build_fid("inception")
    message = str(error.value)
    assert "\n" not in message and message.endswith("; use feature=digits")
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "pip install 'diffusion_lab[fid]'" in message
    else:
        cached = tmp_path / "checkpoints" / fid_module.TORCH_FIDELITY_WEIGHTS
        assert f"put {fid_module.TORCH_FIDELITY_URL} at {cached}" in message


# --- coverage -----------------------------------------------------------------------------------


def test_coverage_of_real_test_digits(classifier: dc.DigitsClassifier, tmp_path) -> None:
    images, _ = dc.load_digits_split("test", image_size=16)
    result = class_coverage(images, classifier, confidence=0.9)
    assert result["num_samples"] == 180 and len(result["counts"]) == 10
    assert result["classes_present"] == 10
    assert result["confident_fraction"] >= 0.9
    assert result["balance"] > 0.95
    png = plot_class_histogram(result, tmp_path / "hist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FixedLogits(torch.nn.Module):
    """A stand-in classifier returning preset logits, one row per sample in order."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_coverage_counts_and_balance() -> None:
    logits = torch.zeros(30, 10)
    logits[:20, 3] = 10.0  # 20 confident threes; 10 uniform (p = 0.1, argmax 0)
    result = class_coverage(torch.rand(30, 1, 8, 8), FixedLogits(logits), confidence=0.9)
    assert result["counts"] == [0, 0, 0, 20, 0, 0, 0, 0, 0, 0]
    assert result["counts_all"] == [10, 0, 0, 20, 0, 0, 0, 0, 0, 0]
    assert result["confident_fraction"] == pytest.approx(2 / 3)
    assert result["classes_present"] == 1 and result["balance"] == 0.0
    logits = torch.eye(10).repeat(3, 1) * 10.0  # three confident samples of every class
    result = class_coverage(torch.rand(30, 1, 8, 8), FixedLogits(logits), confidence=0.9)
    assert result["classes_present"] == 10 and result["balance"] == pytest.approx(1.0)
    assert result["histogram"] == pytest.approx([0.1] * 10)
