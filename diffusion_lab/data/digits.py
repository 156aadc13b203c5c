"""scikit-learn's 1,797 handwritten 8x8 digits: the embedded, offline image data set."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from diffusion_lab.data.base import SPLITS, TensorDataModule, check_choice, check_int, seeded_split
from diffusion_lab.data.pixels import convert_channels, resize_images

N_DIGITS = 1797
SPLIT_SIZES = {"train": 1437, "val": 180, "test": 180}


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def load_digits_arrays(
    image_size: int = 8, split: str = "train", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split: x float32 (N, 1, image_size, image_size) in [0, 1], y int64 (N,).

    The split (1437 / 180 / 180, or ``"all"``) is a permutation seeded by ``seed``; sizes other than
    8 are bilinear-resized with antialias and clamped to [0, 1]. The metrics package reuses this for
    its digits classifier, so that classifier and DataModule see the same split for the same seed.
    """
    image_size = check_int("image_size", image_size, 1)
    check_choice("split", split, (*SPLITS, "all"))
    images, labels = _raw_digits()
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    if split != "all":
        idx = dict(
            zip(SPLITS, seeded_split(N_DIGITS, list(SPLIT_SIZES.values()), seed), strict=True)
        )
        x, y = x[idx[split]], y[idx[split]]
    return resize_images(x, image_size).contiguous(), y.clone()


class DigitsDataModule(TensorDataModule):
    """Digits as a DataModule: 10 classes, 1 channel (3 repeats the gray), ``image_size`` default 8.

    ``split_seed`` (default 0) fixes the train/val/test split apart from ``seed`` (which drives the
    shuffle), so that runs with different seeds are evaluated on the same 180 test digits; set
    ``split_seed: ${seed}`` to tie them together.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 8,
        channels: int = 1,
        value_range: Sequence[float] | None = (0.0, 1.0),
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.require_image_args()
        self.split_seed = check_int("split_seed", split_seed, 0)

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The three splits, resized and converted to ``channels``."""
        out = {}
        for split in SPLITS:
            x, y = load_digits_arrays(self.image_size, split, self.split_seed)
            out[split] = (convert_channels(x, self.channels), y)
        return out
