"""Shared DataModule machinery: validated arguments, split data sets, seeded loaders, references.

Every DataModule of the project derives from :class:`SplitDataModule` (or its in-memory subclass
:class:`TensorDataModule`) and only says how to build its three splits. The batches are ``(x, y)``:
images float32 in [0, 1] of shape (B, C, H, W) (toy 2-D points: (B, 2)) and int64 labels (0 where a
data set has none). Same ``seed``, same splits, crops and batch order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusion_lab.data.pixels import load_image, to_float_images
from diffusion_lab.errors import ConfigError

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- argument checks
def check_int(name: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"data.{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"data.{name} must be >= {minimum}{hi}, got {value}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int = 1) -> int | None:
    """None, or ``value`` checked by :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"data.{name}={value!r} is not valid; choose one of: {listed}")
    return value


def check_split_sizes(n_train: int, n_val: int, n_test: int) -> dict[str, int]:
    """``{"train": n_train, "val": n_val, "test": n_test}``, each checked to be >= 1."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {k: check_int(f"n_{k}", v, 1) for k, v in sizes.items()}


def check_value_range(value_range: Sequence[float] | None) -> tuple[float, float] | None:
    """The stored ``value_range`` (read by methods, not by the DataModule): None or (low, high)."""
    if value_range is None:
        return None
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ConfigError(
            f"data.value_range must be null or [low, high], got {value_range!r}"
        ) from None
    if not low < high:
        raise ConfigError(f"data.value_range must have low < high, got [{low}, {high}]")
    return (low, high)


# ----------------------------------------------------------------------------- seeding
def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (one independent stream per purpose)."""
    words = [int(seed) & 0xFFFFFFFF]
    words += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def seeded_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def seeded_split(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Index tensors of a seeded random permutation of ``range(n)`` cut into ``sizes``."""
    if sum(sizes) > n:
        raise ConfigError(f"split sizes {list(sizes)} add up to more than the {n} examples")
    perm = torch.randperm(n, generator=seeded_generator(seed, "split"))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


# ----------------------------------------------------------------------------- paths
def resolve_root(root: str | Path) -> Path:
    """A data root as an absolute path, relative paths taken from the current working directory."""
    return Path(root).expanduser().resolve()


# ----------------------------------------------------------------------------- data sets
class TensorPairDataset(Dataset):
    """``(x[i], y[i])`` with x converted to float32 (uint8 storage is scaled to [0, 1])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y.to(torch.int64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float_images(self.x[i]), self.y[i]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch (one gather instead of B small ones)."""
        x, y = to_float_images(self.x[idx]), self.y[idx]
        return list(zip(x, y, strict=True))


class ImageFileDataset(Dataset):
    """Images decoded lazily from files (for sets too large to hold in memory).

    Items: float32 (channels, size, size) in [0, 1] and the int64 label.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | torch.Tensor,
        size: int,
        channels: int,
        crop: int | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} files but {len(self.labels)} labels")
        self.size, self.channels, self.crop = size, channels, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image(self.paths[i], self.size, self.channels, self.crop), self.labels[i]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from an epoch-end
    checkpoint draws exactly the permutations of an uninterrupted run.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        generator = seeded_generator(self.seed, "shuffle", self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


# ----------------------------------------------------------------------------- DataModules
class SplitDataModule(L.LightningDataModule):
    """Base DataModule: three split data sets, seeded loaders and ``reference_samples``.

    Subclasses implement :meth:`build_splits` returning ``{"train", "val", "test"} -> Dataset``
    whose items are ``(x float32, y int64)``. Attributes: ``channels``, ``image_size`` (None for
    points), ``num_classes`` (None if the set has no labels), ``value_range`` (stored for the method,
    which maps [0, 1] to its own range), ``batch_size``, ``num_workers``, ``seed``.
    """

    num_classes: int | None = None

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int | None = None,
        channels: int = 3,
        value_range: Sequence[float] | None = (0.0, 1.0),
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else check_int("eval_batch_size", eval_batch_size, 1)
        )
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = check_int("seed", seed, 0)
        self.image_size = None if image_size is None else check_int("image_size", image_size, 1)
        self.channels = check_int("channels", channels, 1)
        self.value_range = check_value_range(value_range)
        self._splits: dict[str, Dataset] | None = None

    def require_image_args(self) -> None:
        """For image sets: ``image_size`` must be set and ``channels`` be 1 or 3."""
        if self.image_size is None:
            raise ConfigError("data.image_size must be set (an integer >= 1) for an image data set")
        check_choice("channels", self.channels, (1, 3))

    # -- to implement
    def build_splits(self) -> dict[str, Dataset]:
        """Build the train / val / test data sets (called once, lazily, by :meth:`setup`)."""
        raise NotImplementedError

    # -- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Load the splits once (every later call is free)."""
        if self._splits is None:
            splits = self.build_splits()
            missing = set(SPLITS) - set(splits)
            if missing:
                raise RuntimeError(f"{type(self).__name__}.build_splits lacks {sorted(missing)}")
            self._splits = splits

    def dataset(self, split: str = "train") -> Dataset:
        """The data set of one split (loads the data on first use)."""
        check_choice("split", split, SPLITS)
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(self.dataset(split)), self.seed) if shuffle else None,
            # its own generator for worker seeds: loading never draws from the global RNG
            generator=seeded_generator(self.seed, "loader", split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a generator seeded from ``seed``: same seed, same batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split in order."""
        return self._loader("test", shuffle=False)

    # -- for metrics
    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) for images, (channels,) for points."""
        if self.image_size is None:
            return (self.channels,)
        return (self.channels, self.image_size, self.image_size)

    def reference_samples(self, n: int, split: str = "test") -> torch.Tensor:
        """The first ``n`` examples of ``split`` (held-out real data, e.g. the FID reference).

        Deterministic for a given seed. Returns fewer than ``n`` rows when the split is smaller:
        callers must report the number actually used (FID depends strongly on it).
        """
        n = check_int("n", n, 1)
        ds = self.dataset(split)
        n = min(n, len(ds))
        if isinstance(ds, TensorPairDataset):
            return to_float_images(ds.x[:n])
        return torch.stack([ds[i][0] for i in range(n)])


class TensorDataModule(SplitDataModule):
    """A :class:`SplitDataModule` whose splits are in-memory tensors.

    Subclasses implement :meth:`load_tensors` returning ``split -> (x, y)``; x may be uint8 (stored
    compactly, scaled to [0, 1] per batch) or float32 in [0, 1].
    """

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) tensors of each split."""
        raise NotImplementedError

    def build_splits(self) -> dict[str, Dataset]:
        """Wrap :meth:`load_tensors` in :class:`TensorPairDataset` s."""
        return {k: TensorPairDataset(x, y) for k, (x, y) in self.load_tensors().items()}

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as float32 ``x`` and int64 ``y``."""
        ds = self.dataset(split)
        assert isinstance(ds, TensorPairDataset)
        return to_float_images(ds.x), ds.y
