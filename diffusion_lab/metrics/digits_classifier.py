"""A small CNN classifier of scikit-learn's 8x8 digits, for offline FID/KID features and coverage.

Protocol (written down once; README, "Metrics"):

- data and split: ``diffusion_lab.data.digits.load_digits_arrays`` (``load_digits`` / 16 in [0, 1],
  1437 train / 180 val / 180 test by a permutation seeded with ``seed``, default 0); the classifier
  trains on the train split only, its accuracy is measured on the test split;
- any image size: the classifier converts its input to grayscale and resizes it to a fixed 16x16
  (bilinear, antialiased ``F.interpolate``), so one trained net serves every image size;
- training: seeded, light augmentation (random shifts by up to 1 px at 8x8 and a random intermediate
  size), and outlier exposure (Hendrycks et al. 2019): every batch also holds as many non-digit
  images (uniform and Gaussian noise, blurred noise, pixel-shuffled digits)
  trained towards the uniform distribution, so that "confidence >= 0.9" means a digit and not
  just any image (without it, 57% of uniform-noise images were labelled with confidence >= 0.9);
  weights cached as a ``state_dict`` and loaded with ``weights_only=True`` only.

Cache: ``$DIFFUSION_LAB_CACHE/digits_classifier_v2.pt`` (default ``~/.cache/diffusion_lab``; see
:mod:`diffusion_lab.cache`). The first use trains it (about 20-30 s on one CPU thread), saying so in
the log with a progress bar; every later use, in any run, loads the file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from diffusion_lab.cache import CACHE_ENV, cache_dir, write_atomic

CACHE_NAME = "digits_classifier_v2.pt"
INTERNAL_SIZE = 16
NUM_CLASSES = 10
NUM_FEATURES = 128

_LOADED: dict[tuple[str, str], DigitsClassifier] = {}
log = logging.getLogger(__name__)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) images to ``size`` x ``size`` with bilinear antialiased interpolation."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load_digits_split(
    split: str = "train", image_size: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, image_size, image_size) in [0, 1] and labels (N,) of one split (or ``"all"``).

    The data package's own loader, so that the classifier's train/test split is the DataModule's for
    the same seed; imported here only (it pulls in Lightning), a cached classifier never needs it.
    """
    from diffusion_lab.data.digits import load_digits_arrays

    return load_digits_arrays(image_size, split, seed)


class DigitsClassifier(nn.Module):
    """CNN on 16x16 grayscale digits; ``features`` is the penultimate layer (for FID/KID)."""

    num_features: int = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, NUM_FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> grayscale (N, 1, 16, 16) float32."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return resize_images(x, INTERNAL_SIZE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, 128) of images in [0, 1]."""
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10) of images in [0, 1]."""
        return self.head(self.features(x))


def _augment(images8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 1 px at 8x8 and a random intermediate size, returned at 16x16."""
    n = images8.shape[0]
    padded = F.pad(images8, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    shifted = padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)
    size = [8, 16, 24, 32][int(torch.randint(0, 4, (1,), generator=generator))]
    return resize_images(resize_images(shifted, size), INTERNAL_SIZE)


def _outliers(images8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Non-digit images at 8x8 in [0, 1], as many as ``images8``, for outlier exposure."""
    n = len(images8)
    kinds = torch.randint(0, 4, (n,), generator=generator)
    uniform = torch.rand(images8.shape, generator=generator)
    gauss = (0.5 + 0.35 * torch.randn(images8.shape, generator=generator)).clamp(0, 1)
    blurred = F.avg_pool2d(F.pad(uniform, (1, 1, 1, 1), mode="reflect"), 3, 1)
    order = torch.argsort(torch.rand(n, 64, generator=generator), dim=1)
    shuffled = images8.flatten(1).gather(1, order).reshape(images8.shape)
    choices = torch.stack([uniform, gauss, blurred, shuffled])
    return choices[kinds, torch.arange(n)]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``model`` classifies as ``labels``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = torch.cat([model(b.to(device)).argmax(1).cpu() for b in images.split(512)])
    model.train(was_training)
    return float((preds == labels).float().mean())


def train_digits_classifier(
    seed: int = 0, epochs: int = 30, batch_size: int = 32, lr: float = 1.5e-3
) -> DigitsClassifier:
    """Train a classifier on the train split (deterministic for a seed); returns it in eval mode.

    Runs on one CPU thread (restored afterwards): the net is too small to gain from more, and
    OpenMP threads on a busy machine made it several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float) -> DigitsClassifier:
    images, labels = load_digits_split("train", image_size=8, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    # The global RNG is left as it was (dropout, init): training the classifier on first use
    # must not change the draws of the run that asked for it (same seed, same samples).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        model.train()
        for _ in tqdm(range(epochs), desc="training the digits classifier", unit="epoch"):
            perm = torch.randperm(len(labels), generator=generator)
            for idx in perm.split(batch_size):
                x = _augment(images[idx], generator)
                outliers = resize_images(_outliers(images[idx], generator), INTERNAL_SIZE)
                # one pass over digits and outliers together (the net has no batch statistics)
                logits = model.head(model.body(torch.cat([x, outliers])))
                loss = F.cross_entropy(logits[: len(idx)], labels[idx])
                uniform_target = -F.log_softmax(logits[len(idx) :], dim=1).mean()
                loss = loss + 0.25 * uniform_target
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return _freeze(model)


def _freeze(model: DigitsClassifier) -> DigitsClassifier:
    model.eval()
    model.requires_grad_(False)
    return model


def cache_path() -> Path:
    """``$DIFFUSION_LAB_CACHE/digits_classifier_v2.pt`` (default ``~/.cache/diffusion_lab``)."""
    return cache_dir() / CACHE_NAME


def _load_cached(path: Path) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is missing or unusable (never unpickled)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: their
            model = DigitsClassifier()  # draws must not move the run's global RNG
        model.load_state_dict(state)
    except Exception as exc:  # corrupt or incompatible file: retrain, never weights_only=False
        warnings.warn(
            f"ignoring unusable digits classifier cache {path} ({exc}); retraining", stacklevel=3
        )
        return None
    return _freeze(model)


def get_digits_classifier(device: str | torch.device = "cpu") -> DigitsClassifier:
    """The trained digits classifier (seed 0) in eval mode, from the cache or trained and cached.

    Processes that start together (DDP ranks, a sweep's parallel jobs) train it once: the
    first holds a lock beside the cache while it trains; the others wait, then load its file.
    """
    path = cache_path()
    key = (str(path), str(device))
    if key not in _LOADED:
        model = _load_cached(path)
        if model is None:
            model = _train_once(path)
        _LOADED[key] = model.to(device)
    return _LOADED[key]


def _train_once(path: Path) -> DigitsClassifier:
    """Train and cache the classifier under a lock beside ``path`` (or load what the process
    that held the lock before cached); train it uncached where the folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError:
        return _train_and_cache(path)
    try:
        cached = _load_cached(path)
        return cached if cached is not None else _train_and_cache(path)
    finally:
        lock.release()


def _train_and_cache(path: Path) -> DigitsClassifier:
    log.info(
        "training the digits classifier for the *_digits metrics and class coverage "
        "(once, about 30 s); its weights go to %s (set %s to move the cache)",
        path, CACHE_ENV,
    )  # fmt: skip
    model = train_digits_classifier(seed=0)
    state = model.state_dict()
    try:
        write_atomic(path, lambda handle: torch.save(state, handle))
    except OSError as exc:
        warnings.warn(
            f"could not cache the digits classifier at {path} ({exc}): every run will "
            f"train it again; set {CACHE_ENV} to a writable folder",
            stacklevel=3,
        )
    return model
