"""A few images of a larger data set, repeated: the FP score embedding's training sets.

Each example is (image, index): the label is the image's index among the picked ones (0..K-1,
in the source's order), which the FP score embedding reads to find an example's table and time
interval (Na, Gao, Wan 2024, sec. 4.4), not the source's class label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from diffusion_lab.data.base import SplitDataModule, TensorDataModule, TensorPairDataset, check_int
from diffusion_lab.data.pixels import to_float_images
from diffusion_lab.errors import ConfigError, DataError


class RepeatedPairDataset(TensorPairDataset):
    """``(x[i mod K], y[i mod K])`` for i < K * copies: K images repeated, the copies never
    stored (at 1000x1000, 1000 copies of three images would be 36 GB). ``x`` and ``y`` give the
    whole repeated split, built on request, as :meth:`TensorDataModule.tensors` reads them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, copies: int) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} inputs but {len(labels)} labels")
        self.images, self.labels, self.copies = images, labels.to(torch.int64), copies

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        return self.images[self._order()]

    @property
    def y(self) -> torch.Tensor:  # type: ignore[override]
        return self.labels[self._order()]

    def _order(self) -> torch.Tensor:
        return torch.arange(len(self.images)).repeat(self.copies)

    def __len__(self) -> int:
        return len(self.images) * self.copies

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        k = i % len(self.images)
        return to_float_images(self.images[k]), self.labels[k]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch (one gather instead of B small ones)."""
        k = torch.as_tensor(idx, dtype=torch.int64) % len(self.images)
        return list(zip(to_float_images(self.images[k]), self.labels[k], strict=True))


class FewImagesDataModule(TensorDataModule):
    """The first ``count`` training images of ``source`` (of class ``label`` if given), each
    repeated ``n_copies`` times for training; val and test are the images themselves. Every
    split labels image k (the k-th picked) with k.

    The FP paper's CIFAR-10 runs took dog images (class 5) of its training set: ``source`` a
    CIFAR-10 DataModule, ``label: 5``, ``count: 1`` or ``3``. Image size, channels and range are
    the source's (``image_size``, ``channels`` and ``value_range``, which networks and methods read from the data config,
    must agree with it).
    """

    def __init__(
        self,
        source: SplitDataModule,
        count: int = 1,
        label: int | None = None,
        n_copies: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int | None = None,
        channels: int | None = None,
        value_range: Sequence[float] | None = None,
    ) -> None:
        given_range = None if value_range is None else tuple(float(v) for v in value_range)
        for name, given in (("image_size", image_size), ("channels", channels),
                            ("value_range", given_range)):  # fmt: skip
            if given is not None and given != getattr(source, name):
                raise ConfigError(
                    f"data.{name}={given} differs from the source's {getattr(source, name)}: "
                    f"set data.source.{name}"
                )
        super().__init__(
            batch_size, num_workers, seed, source.image_size, source.channels, source.value_range
        )
        self.source = source
        self.count = check_int("count", count, 1)
        self.label = label
        self.n_copies = check_int("n_copies", n_copies, 1)

    def build_splits(self) -> dict[str, Dataset]:
        """val and test: the picked images; train: them repeated ``n_copies`` times, by index
        (:class:`RepeatedPairDataset`), not as copies in memory."""
        splits = super().build_splits()
        picked = splits["val"]
        assert isinstance(picked, TensorPairDataset)
        splits["train"] = RepeatedPairDataset(picked.x, picked.y, self.n_copies)
        return splits

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The picked images and their indices in every split (``build_splits`` repeats the
        train one)."""
        dataset = self.source.dataset("train")
        picked = []
        for i in range(len(dataset)):
            x, y = dataset[i]
            if self.label is None or int(y) == self.label:
                picked.append(x)
            if len(picked) == self.count:
                break
        if len(picked) < self.count:
            raise DataError(
                f"data.count={self.count} but the source's training set has only {len(picked)} "
                f"images{'' if self.label is None else f' of class {self.label}'}"
            )
        x = torch.stack(picked)
        y = torch.arange(self.count, dtype=torch.int64)
        return {"train": (x, y), "val": (x, y), "test": (x, y)}
