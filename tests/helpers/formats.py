"""Writers of the real on-disk data layouts (torchvision's), tiny: MNIST's IDX files, CIFAR-10's
pickled batches (also as Python 2 wrote them, and a crafted pickle), CelebA's and ImageNet's
JPEG folders; and the documented image protocol computed independently."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_lab.data import formats


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian sizes, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 5, n_test: int = 3, gz_test: bool = True) -> dict:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n, gz in (("train", n_train, False), ("t10k", n_test, gz_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = f"{prefix}-{kind}"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
            else:
                (raw / name).write_bytes(idx_bytes(arr))
        data[prefix] = (images, labels)
    return data


def write_cifar(root: Path, per_batch: int = 2, bytes_keys: bool = True) -> dict:
    rng = np.random.default_rng(1)
    folder = root / formats.CIFAR10_DIR
    folder.mkdir(parents=True)
    out = {}
    for name in formats.CIFAR10_TRAIN + formats.CIFAR10_TEST:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
        entry = {key("batch_label"): key(name), key("labels"): labels, key("data"): data}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        out[name] = (data, labels)
    return out


def write_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def expected_image(path: Path, size: int, crop: int | None) -> torch.Tensor:
    """The documented protocol, computed independently: centre crop, bicubic resize, / 255."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h) if crop is None else crop
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def write_celeba(root: Path) -> list[Path]:
    folder = root / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 6)]
    for i, name in enumerate(names):
        write_jpeg(folder / "img_align_celeba" / name, (178, 218), i)
    splits = [0, 0, 1, 2, 2]
    lines = [f"{n} {s}" for n, s in zip(names, splits, strict=True)]
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return [folder / "img_align_celeba" / n for n in names]


def write_imagenet(root: Path) -> None:
    for split, per in (("train", 3), ("val", 1)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            for i in range(per):
                write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", (50 + 10 * i, 40), 10 * c + i)


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR-10: str and bytes as BINSTRING, no _codecs."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        size = len(obj)
        short = size < 256
        head = pickle.SHORT_BINSTRING + bytes([size]) if short else pickle.BINSTRING
        self.write(head if short else head + struct.pack("<i", size))
        self.write(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def python2_cifar_pickle(entry: dict) -> bytes:
    """A batch as the distributed cifar-10-python.tar.gz holds it (numpy 1's module names)."""
    buf = io.BytesIO()
    Python2Pickler(buf, protocol=2).dump(entry)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


class Payload:
    """A pickle whose loading would call ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args
