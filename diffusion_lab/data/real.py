"""DataModules of the real data sets: MNIST, CIFAR-10, CelebA (64x64) and ImageNet crops.

``root`` is resolved against the current working directory (``run.py`` runs jobs from the
directory the user launched them in; pass an absolute path otherwise). MNIST and CIFAR-10 download
with MD5 checks when ``download: true`` and the network allows; CelebA and ImageNet must be put in
place by hand. A missing set fails in ``prepare_data`` / ``setup`` with one DataError line that names
the folder and the offline alternative (``data=digits``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion_lab.data import formats
from diffusion_lab.data.base import (
    ImageFileDataset,
    SplitDataModule,
    TensorDataModule,
    check_choice,
    check_int,
    check_optional_int,
    resolve_root,
    seeded_split,
)
from diffusion_lab.data.pixels import convert_channels, load_image, resize_images, to_float_images
from diffusion_lab.data.verify import BAD_FILE_POLICIES, readable_files
from diffusion_lab.errors import ConfigError


class _TrainTestDataModule(TensorDataModule):
    """In-memory set with a train and a test file set; ``n_val`` seeded holdout from train.

    With ``n_val: 0`` the val loader serves the test set (the usual practice for generative models,
    which train on the whole training set). ``image_size`` / ``channels`` default to the native
    ones; another size is a bilinear antialiased resize, 1 <-> 3 channels a luma / gray repeat.
    """

    native_size: int = 32
    native_channels: int = 3
    num_classes = 10
    read: Callable[[str | Path, bool], tuple[np.ndarray, np.ndarray]]
    fetch: Callable[[str | Path], None]
    available: Callable[[str | Path], bool]

    def __init__(
        self,
        root: str = "datasets",
        download: bool = False,
        n_val: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int | None = None,
        channels: int | None = None,
        value_range: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        image_size = self.native_size if image_size is None else image_size
        channels = self.native_channels if channels is None else channels
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.require_image_args()
        self.root = resolve_root(root)
        self.download = bool(download)
        self.n_val = check_int("n_val", n_val, 0)

    def prepare_data(self) -> None:
        """Download when asked and missing (Lightning calls this on one process only)."""
        if self.download and not type(self).available(self.root):
            type(self).fetch(self.root)

    def _images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = convert_channels(x.unsqueeze(1) if x.ndim == 3 else x, self.channels)
        if self.image_size == self.native_size:
            return x  # uint8, scaled per batch
        chunks = [resize_images(to_float_images(c), self.image_size) for c in x.split(4096)]
        return torch.cat(chunks)

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Read train and test; hold out ``n_val`` training examples (seeded) for validation."""
        self.prepare_data()
        xtr, ytr = type(self).read(self.root, True)
        xte, yte = type(self).read(self.root, False)
        xtr, xte = self._images(xtr), self._images(xte)
        ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
        if self.n_val == 0:
            return {"train": (xtr, ytr), "val": (xte, yte), "test": (xte, yte)}
        if self.n_val >= len(xtr):
            raise ConfigError(
                f"data.n_val={self.n_val} leaves no training data ({len(xtr)} in all)"
            )
        tr, va = seeded_split(len(xtr), [len(xtr) - self.n_val, self.n_val], self.seed)
        tr, va = tr.sort().values, va.sort().values
        return {"train": (xtr[tr], ytr[tr]), "val": (xtr[va], ytr[va]), "test": (xte, yte)}


class MNISTDataModule(_TrainTestDataModule):
    """MNIST, 28x28 grayscale (``image_size: 32`` resizes, bilinear antialiased); 10 classes.

    Arguments: see :class:`_TrainTestDataModule` (root, download, n_val, batch_size, num_workers,
    seed, image_size = 28, channels = 1, value_range).
    """

    native_size = 28
    native_channels = 1
    read = staticmethod(formats.read_mnist)
    fetch = staticmethod(formats.download_mnist)
    available = staticmethod(formats.mnist_available)


class CIFAR10DataModule(_TrainTestDataModule):
    """CIFAR-10, 32x32 RGB, 50,000 train / 10,000 test; 10 classes.

    Arguments: see :class:`_TrainTestDataModule` (image_size = 32, channels = 3).
    """

    native_size = 32
    native_channels = 3
    read = staticmethod(formats.read_cifar10)
    fetch = staticmethod(formats.download_cifar10)
    available = staticmethod(formats.cifar10_available)


class _FileDataModule(SplitDataModule):
    """Sets decoded lazily from image files; ``download`` is accepted but cannot be honoured.

    ``crop`` centre-crops that many pixels (None: the largest square) before the bicubic resize to
    ``image_size``; ``max_per_split`` keeps a seeded subset of each split (small runs). Every file
    used is checked decodable at setup, once (:mod:`diffusion_lab.data.verify`); ``on_bad_file``
    (``error`` or ``skip``) says what an unreadable one does.
    """

    def __init__(
        self,
        root: str = "datasets",
        download: bool = False,
        crop: int | None = 140,
        max_per_split: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 64,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
        on_bad_file: str = "error",
    ) -> None:
        super().__init__(batch_size, num_workers, seed, image_size, channels, value_range)
        self.require_image_args()
        self.root = resolve_root(root)
        self.download = bool(download)  # the DataError for a missing set says how to get it
        self.crop = check_optional_int("crop", crop)
        self.max_per_split = check_optional_int("max_per_split", max_per_split)
        self.on_bad_file = check_choice("on_bad_file", on_bad_file, BAD_FILE_POLICIES)

    def _datasets(
        self, splits: dict[str, tuple[Sequence[Path], Sequence[int]]]
    ) -> dict[str, ImageFileDataset]:
        """Lazy data sets of ``split -> (paths, labels)``: the files of all splits are checked at
        once and only the readable ones kept; with ``max_per_split``, a seeded subset of each split
        (in file order) is taken first."""
        for split, (paths, labels) in splits.items():
            if self.max_per_split is not None and self.max_per_split < len(paths):
                keep = seeded_split(len(paths), [self.max_per_split], self.seed)[0].sort().values
                splits[split] = ([paths[i] for i in keep], [labels[i] for i in keep])
        size = self.image_size
        assert size is not None
        files = list(dict.fromkeys(p for paths, _ in splits.values() for p in paths))
        readable = readable_files(
            files, lambda p: load_image(p, size, self.channels, self.crop), self.on_bad_file,
            self.root,
        )  # fmt: skip
        ok = {files[i] for i in readable}
        out = {}
        for split, (paths, labels) in splits.items():
            kept = [(p, y) for p, y in zip(paths, labels, strict=True) if p in ok]
            out[split] = ImageFileDataset(
                [p for p, _ in kept], [y for _, y in kept], size, self.channels, self.crop
            )
        return out


class CelebADataModule(_FileDataModule):
    """CelebA aligned faces: centre crop 140x140, resize to 64 (the standard 64x64 protocol).

    Splits from ``list_eval_partition.txt``; labels 0. Arguments: see :class:`_FileDataModule`
    (root, download, crop = 140, max_per_split, batch_size, num_workers, seed, image_size = 64,
    channels = 3, value_range).
    """

    def prepare_data(self) -> None:
        """Check that the files are there (fails at once with where to put them)."""
        formats.read_celeba_partition(self.root)

    def build_splits(self) -> dict[str, Dataset]:
        """One lazy data set per partition."""
        parts = formats.read_celeba_partition(self.root)
        return self._datasets({s: (p, [0] * len(p)) for s, p in parts.items()})


class ImageNetDataModule(_FileDataModule):
    """ImageNet in class folders: centre square crop resized to ``image_size``; 1 label per wnid.

    ``root/train`` is the training split; ``root/val`` (ImageNet's labelled held-out set) serves as
    both val and test. ``max_per_class`` keeps the first N files of each class (small runs).
    """

    def __init__(
        self,
        root: str = "datasets/imagenet",
        download: bool = False,
        image_size: int = 64,
        max_per_class: int | None = None,
        max_per_split: int | None = None,
        crop: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
        on_bad_file: str = "error",
    ) -> None:
        super().__init__(
            root, download, crop, max_per_split, batch_size, num_workers, seed, image_size,
            channels, value_range, on_bad_file,
        )  # fmt: skip
        self.max_per_class = check_optional_int("max_per_class", max_per_class)
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        """The sorted wnids of ``root/train``."""
        if self._classes is None:
            self._classes = formats.read_image_class_folders(self.root / "train", max_per_class=1)[
                2
            ]
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of class folders in ``root/train``."""
        return len(self.classes)

    def prepare_data(self) -> None:
        """Check that both folders are there (fails at once with where to put them)."""
        for split in ("train", "val"):
            formats.read_image_class_folders(self.root / split, self.classes, max_per_class=1)

    def build_splits(self) -> dict[str, Dataset]:
        """Lazy train set and val set (the val set doubles as test)."""
        folders = {
            split: formats.read_image_class_folders(
                self.root / split, self.classes, self.max_per_class
            )[:2]
            for split in ("train", "val")
        }
        out = self._datasets(folders)
        out["test"] = out["val"]
        return out
