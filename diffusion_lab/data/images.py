"""Photographs: scikit-image's bundled pictures (offline) and any folder of PNG / JPEG files.

Resizing protocol for photographs: centre crop to a square, then PIL bicubic (antialiased) to
``image_size`` (see :func:`diffusion_lab.data.pixels.center_crop_resize`); crops of
``natural_crops`` are resized in torch (bilinear, antialiased) in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_lab.data.base import (
    SPLITS,
    TensorDataModule,
    check_choice,
    check_int,
    check_optional_int,
    check_split_sizes,
    resolve_root,
    seeded_generator,
    seeded_split,
)
from diffusion_lab.data.pixels import (
    convert_channels,
    image_tensor,
    load_pixels,
    resize_images,
    to_float_images,
)
from diffusion_lab.data.verify import BAD_FILE_POLICIES, report_bad_files
from diffusion_lab.errors import ConfigError, DataError

# Photographs bundled inside the scikit-image wheel (no download through pooch).
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def skimage_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 (H, W, 3) or (H, W)."""
    import skimage.data

    check_choice("name", name, SKIMAGE_PHOTOS)
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _photo_tensor(name: str, channels: int) -> torch.Tensor:
    """A bundled photograph as uint8 (channels, H, W)."""
    arr = skimage_photo(name)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)[:3]
    return convert_channels(t.contiguous(), channels)


class SingleImageDataModule(TensorDataModule):
    """One photograph, resized (shorter side = ``image_size``, centre crop), ``n_copies`` times.

    Every split holds the same image (stored once and expanded). ``channels: 1`` gives grayscale.
    """

    def __init__(
        self,
        name: str = "astronaut",
        n_copies: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 64,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.name = check_choice("name", name, SKIMAGE_PHOTOS)
        self.require_image_args()
        self.n_copies = check_int("n_copies", n_copies, 1)

    def image(self) -> torch.Tensor:
        """The processed photograph, float32 (channels, image_size, image_size) in [0, 1]."""
        return image_tensor(
            Image.fromarray(skimage_photo(self.name)), self.channels, self.image_size
        )

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The image expanded to ``n_copies`` in every split (labels 0)."""
        x = self.image().unsqueeze(0).expand(self.n_copies, -1, -1, -1)
        y = torch.zeros(self.n_copies, dtype=torch.int64)
        return {s: (x, y) for s in SPLITS}


class NaturalCropsDataModule(TensorDataModule):
    """Random ``crop_size`` crops of several bundled photographs, resized to ``image_size``.

    Each split draws its crops (photo uniformly, position uniformly) from its own seeded stream, so
    the splits are different crops of the same photographs; y is the photograph's index.
    """

    def __init__(
        self,
        images: Sequence[str] = ("astronaut", "camera", "chelsea", "coffee", "rocket"),
        crop_size: int = 128,
        n_train: int = 5000,
        n_val: int = 500,
        n_test: int = 500,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 32,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.require_image_args()
        names = [images] if isinstance(images, str) else list(images)
        if not names:
            raise ConfigError(
                "data.images is empty; list at least one of: " + ", ".join(SKIMAGE_PHOTOS)
            )
        self.images = [check_choice("images", n, SKIMAGE_PHOTOS) for n in names]
        self.num_classes = len(self.images)
        self.crop_size = check_int("crop_size", crop_size, 1)
        self.sizes = check_split_sizes(n_train, n_val, n_test)

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Crops of every split."""
        photos = [_photo_tensor(n, self.channels) for n in self.images]
        smallest = min(min(p.shape[-2:]) for p in photos)
        if self.crop_size > smallest:
            raise ConfigError(
                f"data.crop_size={self.crop_size} exceeds the smallest photograph side ({smallest})"
            )
        return {s: self._crops(photos, n, s) for s, n in self.sizes.items()}

    def _crops(
        self, photos: list[torch.Tensor], n: int, split: str, chunk: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = seeded_generator(self.seed, "crops", split)
        which = torch.randint(0, len(photos), (n,), generator=g)
        pos = torch.rand(n, 2, generator=g, dtype=torch.float64)
        c = self.crop_size
        # Every crop position of every photo as a strided view (C, H-c+1, W-c+1, c, c): gathering
        # from it is much faster than slicing crops one by one.
        windows = [p.unfold(1, c, 1).unfold(2, c, 1) for p in photos]
        out = torch.empty(n, self.channels, self.image_size, self.image_size)
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            for k, win in enumerate(windows):
                sel = idx[which[idx] == k]
                if len(sel) == 0:
                    continue
                top = (pos[sel, 0] * win.shape[1]).long()
                left = (pos[sel, 1] * win.shape[2]).long()
                crops = win[:, top, left].transpose(0, 1)  # (m, C, c, c)
                out[sel] = resize_images(to_float_images(crops), self.image_size)
        return out, which


class ImageFolderDataModule(TensorDataModule):
    """Every PNG / JPEG in ``root`` (sorted, not recursive), centre-cropped and resized.

    Any Pillow mode is read (see :func:`diffusion_lab.data.pixels.standard_mode`); all files are
    decoded at setup and held as uint8 (1 byte a sample: CelebA's 202,599 faces at 64x64 take
    2.5 GB, not float32's 10 GB; each batch is scaled to float32 in [0, 1]), or as float32 when a
    file has more than 8 bits a sample. ``on_bad_file`` says what an unreadable file does:
    ``error`` stops the run naming it, ``skip`` leaves it out (logged with a count).
    ``crop`` centre-crops that many pixels (None: the largest square) before the bicubic resize.
    ``holdout`` images (a seeded choice) are kept out of training and serve as val and test; with
    ``holdout: 0`` (default, for few-image studies) val and test are the training images.
    ``n_copies`` repeats the training images to lengthen an epoch. ``files`` keeps only the
    named files of the folder, in that order (e.g. the FP paper's ``[celeba_3.png]``). An image's
    label is its index in that order (the FP score embedding reads it).
    """

    def __init__(
        self,
        root: str = "images",
        image_size: int = 64,
        crop: int | None = None,
        holdout: int = 0,
        n_copies: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
        on_bad_file: str = "error",
        files: Sequence[str] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.require_image_args()
        self.root = resolve_root(root)
        self.names = None if files is None else [str(f) for f in files]
        self.crop = check_optional_int("crop", crop)
        self.holdout = check_int("holdout", holdout, 0)
        self.n_copies = check_int("n_copies", n_copies, 1)
        self.on_bad_file = check_choice("on_bad_file", on_bad_file, BAD_FILE_POLICIES)

    def files(self) -> list[Path]:
        """The image files, sorted; DataError naming the folder if it is missing or holds none."""
        if not self.root.is_dir():
            raise DataError(
                f"image folder {self.root} does not exist; set data.root to a folder of PNG/JPEG files"
            )
        files = sorted(
            p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"no PNG/JPEG images in {self.root}; set data.root to a folder of PNG/JPEG files"
            )
        if self.names is None:
            return files
        by_name = {f.name: f for f in files}
        missing = [n for n in self.names if n not in by_name]
        if missing:
            raise DataError(
                f"data.files: {missing} not in {self.root} (it holds {sorted(by_name)})"
            )
        return [by_name[n] for n in self.names]

    def decode(self) -> torch.Tensor:
        """Every readable file as (N, channels, image_size, image_size), by the policy: uint8
        when every file is 8-bit, else float32 in [0, 1]."""
        files, images, bad = self.files(), [], []
        for f in files:
            try:
                images.append(load_pixels(f, self.image_size, self.channels, self.crop))
            except DataError as err:
                bad.append(str(err))
        report_bad_files(bad, len(files), self.on_bad_file, self.root)
        if any(image.dtype != torch.uint8 for image in images):
            images = [to_float_images(image) for image in images]
        return torch.stack(images)

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """All images decoded once; the seeded holdout split; training copies."""
        x = self.decode()
        if self.holdout >= len(x):
            raise ConfigError(
                f"data.holdout={self.holdout} leaves no training image ({len(x)} in {self.root})"
            )
        y = torch.arange(len(x), dtype=torch.int64)
        if self.holdout:
            train_idx, held = seeded_split(len(x), [len(x) - self.holdout, self.holdout], self.seed)
            train_idx = train_idx.sort().values
            held = held.sort().values
        else:
            train_idx = held = torch.arange(len(x))
        train_idx = train_idx.repeat(self.n_copies)
        return {
            "train": (x[train_idx], y[train_idx]),
            "val": (x[held], y[held]),
            "test": (x[held], y[held]),
        }
