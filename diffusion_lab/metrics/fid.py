"""FID and KID with torchmetrics: Inception features when their weights can be had, else digits features.

Names are part of the result: ``fid``/``kid`` only for torchmetrics' Inception network (needs
torch-fidelity, ``pip install 'diffusion_lab[fid]'``, and its weights file: ``weights_path`` or
torch-fidelity's file already in the torch hub cache; nothing is downloaded), ``fid_digits`` /
``kid_digits`` for the features of the project's digits classifier (``digits_classifier.py``). The
two are not comparable and are never reported under one name. Both depend on the number of
samples (README, "Metrics"): the ``compute_*`` helpers return it.

The reference side (the real images' feature statistics: FID's sums, KID's features) is computed
once per reference set and feature network and kept in ``$DIFFUSION_LAB_CACHE/reference_features``,
keyed by a hash of the images and of the network's weights: every later validation and run on the
same reference feeds only its samples.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lab.cache import cache_dir, write_atomic
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.digits_classifier import get_digits_classifier

FEATURES = ("auto", "inception", "digits")
INCEPTION_FEATURES = 2048
# The file torch-fidelity's InceptionV3 downloads into ``torch.hub.get_dir()/checkpoints``.
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_WEIGHTS
)


class DigitsFeatures(nn.Module):
    """The digits classifier's penultimate features as a torchmetrics feature extractor.

    Takes images in [0, 1] of shape (N, 1 or 3, H, W) and returns (N, ``num_features``); it never
    leaves eval mode and has no trainable parameters.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.classifier = get_digits_classifier(device)
        self.num_features = self.classifier.num_features

    def train(self, mode: bool = True) -> DigitsFeatures:
        """Stay in eval mode whatever is asked."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, d) of images in [0, 1]."""
        return self.classifier.features(x)


def _inception_weights(weights_path: str | None) -> str | None:
    """Why Inception cannot be used (one line), or None when it can be tried without a download."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity is not installed: pip install 'diffusion_lab[fid]'"
    if weights_path is not None:
        if Path(weights_path).is_file():
            return None
        return f"no Inception weights file at inception_weights={weights_path}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if cached.is_file():
        return None
    return (
        f"its weights are not on this machine: put {TORCH_FIDELITY_URL} at {cached}, "
        "or set inception_weights=PATH"
    )


def _build(
    kind: str, feature: str, weights_path: str | None, device: str | torch.device, **kwargs: object
) -> tuple[nn.Module, str]:
    """The torchmetrics FID or KID metric (``kind``) and its reported name."""
    if feature not in FEATURES:
        raise ConfigError(f"metric feature must be one of {FEATURES}, got {feature!r}")
    cls = FrechetInceptionDistance if kind == "fid" else KernelInceptionDistance
    # Scores are computed on the samples a process holds: no cross-process sync (under DDP the
    # other ranks may have finished already).
    kwargs = {"sync_on_compute": False, **kwargs}
    if feature in ("auto", "inception"):
        problem = _inception_weights(weights_path)
        if problem is None:
            try:
                metric = cls(
                    feature=INCEPTION_FEATURES,
                    normalize=True,
                    feature_extractor_weights_path=weights_path,
                    **kwargs,
                )
                return metric.to(device), kind
            except Exception as exc:  # a bad weights file: fall back (auto) or stop (inception)
                problem = f"{type(exc).__name__}: {exc}"
        if feature == "inception":
            raise ConfigError(f"Inception {kind} unavailable ({problem}); use feature=digits")
        warnings.warn(
            f"Inception {kind} unavailable ({problem}); reporting {kind}_digits instead",
            stacklevel=3,
        )
    metric = cls(feature=DigitsFeatures(device), normalize=True, **kwargs)
    return metric.to(device), f"{kind}_digits"


def build_fid(
    feature: str = "auto", weights_path: str | None = None, device: str | torch.device = "cpu"
) -> tuple[FrechetInceptionDistance, str]:
    """A torchmetrics FID metric taking images in [0, 1] and its name (``fid`` or ``fid_digits``).

    ``feature``: ``auto`` (Inception if possible, else digits), ``inception`` (ConfigError if not
    possible) or ``digits``. Feed it with ``metric.update(images, real=...)``; grayscale images are
    repeated to 3 channels only for Inception (``as_rgb``).
    """
    return _build("fid", feature, weights_path, device)  # type: ignore[return-value]


def build_kid(
    feature: str = "auto",
    weights_path: str | None = None,
    subset_size: int = 1000,
    subsets: int = 100,
    device: str | torch.device = "cpu",
) -> tuple[KernelInceptionDistance, str]:
    """A torchmetrics KID metric and its name (``kid`` or ``kid_digits``); see ``build_fid``.

    ``subset_size`` must not exceed the number of real or fake samples given to it.
    """
    return _build(  # type: ignore[return-value]
        "kid", feature, weights_path, device, subset_size=subset_size, subsets=subsets
    )


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat grayscale (N, 1, H, W) images to 3 channels; others unchanged."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _check_finite(fake: torch.Tensor, real: torch.Tensor) -> None:
    if fake.ndim != 4 or real.ndim != 4:
        raise ValueError("fake and real must be image batches of shape (N, C, H, W)")
    for images, which in ((fake, "fake"), (real, "real")):
        if not torch.isfinite(images).all():  # the eigenvalue solver would crash the process
            raise ValueError(f"the {which} images hold NaN or infinite values: no FID/KID of them")


def _update(metric: nn.Module, name: str, images: torch.Tensor, real: bool, batch: int) -> None:
    """Feed one side of ``metric`` in batches, on the metric's device."""
    for chunk in images.split(batch):
        chunk = chunk.to(metric.device).float().clamp(0.0, 1.0)
        metric.update(chunk if name.endswith("_digits") else as_rgb(chunk), real=real)


def _reference_key(metric: nn.Module, name: str, real: torch.Tensor) -> str:
    """A hash of what the reference statistics depend on: the metric and its settings, the
    feature network's weights and the real images as fed."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(metric).__name__} {name} {getattr(metric, 'subset_size', '')}".encode())
    for tensor in metric.inception.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    images = real.detach().float().clamp(0.0, 1.0).cpu().contiguous()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def _real_states(metric: nn.Module) -> list[str]:
    return [state for state in metric._defaults if state.startswith("real_")]


def _feed_reference(metric: nn.Module, name: str, real: torch.Tensor, batch: int) -> None:
    """The real side of ``metric``: loaded from the cache when these images and this feature
    network were seen before, else computed and cached (written atomically)."""
    path = cache_dir() / "reference_features" / f"{_reference_key(metric, name, real)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=metric.device, weights_only=True)
        for state in _real_states(metric):
            setattr(metric, state, saved[state])
        return
    _update(metric, name, real, True, batch)
    states = {state: getattr(metric, state) for state in _real_states(metric)}
    write_atomic(path, lambda handle: torch.save(states, handle))


def _feed(metric: nn.Module, name: str, fake: torch.Tensor, real: torch.Tensor, batch: int) -> None:
    """Update ``metric`` with both sets: the reference's features from the cache when it has
    them, the samples' in batches."""
    _check_finite(fake, real)
    _feed_reference(metric, name, real, batch)
    _update(metric, name, fake, False, batch)


def compute_fid(
    fake: torch.Tensor,
    real: torch.Tensor,
    feature: str = "digits",
    weights_path: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> dict[str, float | int | str]:
    """FID between two image sets in [0, 1]: ``{name: value, "num_fake": N, "num_real": M}``.

    ``name`` is ``fid`` (Inception) or ``fid_digits``; also under the key ``"metric"``.
    """
    metric, name = build_fid(feature, weights_path, device)
    _feed(metric, name, fake, real, batch_size)
    value = float(metric.compute())
    return {name: value, "metric": name, "num_fake": len(fake), "num_real": len(real)}


def compute_kid(
    fake: torch.Tensor,
    real: torch.Tensor,
    feature: str = "digits",
    weights_path: str | None = None,
    subset_size: int = 1000,
    subsets: int = 100,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """KID between two image sets: ``{name: mean, name_std: std, num_fake, num_real, subset_size}``.

    ``subset_size`` is lowered to the smaller set's size; subsets are drawn with ``seed`` (the global
    RNG is left as it was).
    """
    subset_size = min(subset_size, len(fake), len(real))
    metric, name = build_kid(feature, weights_path, subset_size, subsets, device)
    _feed(metric, name, fake, real, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {
        name: float(mean),
        f"{name}_std": float(std),
        "metric": name,
        "num_fake": len(fake),
        "num_real": len(real),
        "subset_size": subset_size,
    }
