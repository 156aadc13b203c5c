"""Readers for the on-disk layouts that torchvision writes, and checksum-verified downloads.

Layouts (``root`` is the data root, e.g. ``datasets/``):

- MNIST: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (IDX format).
- CIFAR-10: ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (pickles with
  ``data`` uint8 (N, 3072) and ``labels``).
- CelebA: ``root/celeba/img_align_celeba/*.jpg`` and ``root/celeba/list_eval_partition.txt``.
- ImageNet: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (class folders).

Every missing or corrupt file raises one :class:`DataError` line naming the folder and the fix;
a missing set whose download is off or impossible names the offline alternative ``data=digits``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from diffusion_lab.cache import write_atomic
from diffusion_lab.data.cifar_pickle import ForbiddenPickleGlobal, load_cifar_pickle
from diffusion_lab.errors import DataError

log = logging.getLogger(__name__)

OFFLINE_HINT = "offline, try data=digits"
DOWNLOAD_TIMEOUT_S = 20.0

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}  # MD5 of the .gz files, as torchvision has them
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)

# IDX type codes -> numpy big-endian dtypes
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------- downloads
def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``dest`` with a progress bar, verifying its MD5 before it lands.

    Written through a temporary file that any failure removes. Raises OSError (network) or
    DataError (checksum); callers turn both into one DataError line.
    """
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    req = urllib.request.Request(url, headers={"User-Agent": "diffusion_lab"})
    log.info("downloading %s to %s (first use; MD5-checked, then kept)", url, dest)

    def fetch(out: BinaryIO) -> None:
        h = hashlib.md5()
        with (
            urllib.request.urlopen(req, timeout=timeout) as resp,
            tqdm(total=getattr(resp, "length", None), desc=f"downloading {dest.name}",
                 unit="B", unit_scale=True, mininterval=1.0) as bar,
        ):  # fmt: skip
            while block := resp.read(1 << 20):
                out.write(block)
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() != md5:
            raise DataError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}")

    write_atomic(dest, fetch)
    return dest


def _extract_tar(archive: Path, into: Path) -> None:
    log.info("extracting %s into %s", archive, into)
    with tarfile.open(archive, "r:gz") as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python without tarfile filters
            tar.extractall(into)  # noqa: S202 - archive verified by MD5


# ----------------------------------------------------------------------------- MNIST (IDX)
def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic 0x0000TTNN, NN big-endian uint32 sizes, data.

    Checks the magic number and that the payload size matches the header exactly.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path} ({err}); delete it and download again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); "
            "delete it and download again"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated (incomplete IDX header); delete it and download again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes, its IDX header {dims} says {expected}; "
            "delete it and download again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def mnist_folder(root: str | Path) -> Path:
    """``root/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def _mnist_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist_available(root: str | Path) -> bool:
    """Whether all four MNIST files exist (raw or gzipped)."""
    folder = mnist_folder(root)
    return all(_mnist_file(folder, stem) for stem in MNIST_FILES)


def download_mnist(root: str | Path) -> None:
    """Download the four MNIST .gz files into ``root/MNIST/raw`` (first mirror that works)."""
    folder = mnist_folder(root)
    for stem, md5 in MNIST_FILES.items():
        if _mnist_file(folder, stem):
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                download(mirror + stem + ".gz", folder / (stem + ".gz"), md5)
                break
            except (OSError, DataError) as err:
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(
                f"MNIST download failed ({'; '.join(errors)}); put {stem}.gz in {folder} "
                f"by hand, or {OFFLINE_HINT}"
            )


def read_mnist(root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images uint8 (N, 28, 28) and labels int64 (N,) of the train or the test (t10k) set."""
    folder = mnist_folder(root)
    prefix = "train" if train else "t10k"
    paths = [
        _mnist_file(folder, f"{prefix}-{kind}")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    if None in paths:
        raise DataError(
            f"MNIST not found in {folder} (expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]); set data.download=true (needs network), or {OFFLINE_HINT}"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}; "
            "delete them and download again"
        )
    if images.dtype != np.uint8 or labels.max(initial=0) > 9:
        raise DataError(
            f"MNIST files in {folder} hold unexpected values; delete them and download again"
        )
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- CIFAR-10
def cifar10_folder(root: str | Path) -> Path:
    """``root/cifar-10-batches-py``."""
    return Path(root) / CIFAR10_DIR


def cifar10_available(root: str | Path) -> bool:
    """Whether all six CIFAR-10 batch files exist."""
    folder = cifar10_folder(root)
    return all((folder / n).is_file() for n in CIFAR10_TRAIN + CIFAR10_TEST)


def download_cifar10(root: str | Path) -> None:
    """Download and extract ``cifar-10-python.tar.gz`` into ``root`` (MD5-verified)."""
    root = Path(root)
    try:
        archive = download(CIFAR10_URL, root / "cifar-10-python.tar.gz", CIFAR10_MD5)
        _extract_tar(archive, root)
    except (OSError, DataError, tarfile.TarError) as err:
        raise DataError(
            f"CIFAR-10 download failed ({err}); extract cifar-10-python.tar.gz into {root} by hand "
            f"(giving {cifar10_folder(root)}), or {OFFLINE_HINT}"
        ) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = load_cifar_pickle(path)
    except ForbiddenPickleGlobal as err:
        raise DataError(
            f"{path} is not a CIFAR-10 batch: its pickle references {err} (possibly code, not "
            "run); delete it and download again from a source you trust"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, MemoryError, RecursionError) as err:  # fmt: skip
        raise DataError(f"cannot unpickle {path} ({err}); delete it and download again") from None
    if not isinstance(entry, dict):
        raise DataError(
            f"{path} is not a CIFAR batch (no dict inside); delete it and download again"
        )
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DataError(f"{path} lacks 'data' or 'labels'; delete it and download again")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(data) != len(labels)
    ):
        raise DataError(
            f"{path} holds data {data.dtype} {data.shape} and {len(labels)} labels, expected uint8 "
            "(N, 3072) and N labels; delete it and download again"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images uint8 (N, 3, 32, 32) and labels int64 (N,) of the train or the test set."""
    folder = cifar10_folder(root)
    names = CIFAR10_TRAIN if train else CIFAR10_TEST
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}; expected data_batch_1..5, "
            f"test_batch); set data.download=true (needs network), or {OFFLINE_HINT}"
        )
    parts = [_read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ----------------------------------------------------------------------------- CelebA
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}


def celeba_folder(root: str | Path) -> Path:
    """``root/celeba``."""
    return Path(root) / "celeba"


def read_celeba_partition(root: str | Path) -> dict[str, list[Path]]:
    """Image paths of each CelebA split from ``list_eval_partition.txt`` (0 train, 1 val, 2 test)."""
    folder = celeba_folder(root)
    images = folder / "img_align_celeba"
    partition = folder / "list_eval_partition.txt"
    if not images.is_dir() or not partition.is_file():
        raise DataError(
            f"CelebA not found in {folder} (expected img_align_celeba/*.jpg and list_eval_partition.txt); "
            "it cannot be downloaded automatically: get img_align_celeba.zip and list_eval_partition.txt "
            f"from the CelebA Google Drive and put them there, or {OFFLINE_HINT}"
        )
    out: dict[str, list[Path]] = {s: [] for s in CELEBA_SPLITS}
    code_to_split = {v: k for k, v in CELEBA_SPLITS.items()}
    for lineno, line in enumerate(partition.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(
                f"{partition} line {lineno} is {line!r}, expected '<file>.jpg <0|1|2>'; "
                "restore the original file"
            )
        out[code_to_split[int(fields[1])]].append(images / fields[0])
    missing = [p for paths in out.values() for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} CelebA images listed in {partition} are missing from {images} "
            f"(first: {missing[0].name}); unpack img_align_celeba.zip completely"
        )
    return out


# ----------------------------------------------------------------------------- ImageNet
IMAGENET_SUFFIXES = (".jpeg", ".jpg", ".png")


def read_image_class_folders(
    folder: str | Path, classes: list[str] | None = None, max_per_class: int | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of a ``folder/<class>/*.JPEG`` layout (sorted); labels index ``classes``.

    ``classes`` defaults to the sorted sub-folder names; a class of ``classes`` absent from the
    folder simply has no files there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"ImageNet folder {folder} not found (expected {folder}/<wnid>/*.JPEG); it cannot be "
            "downloaded automatically: get ILSVRC2012 from image-net.org, arrange train/ and val/ "
            f"into class folders (as torchvision's ImageNet does) under data.root, or {OFFLINE_HINT}"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = found if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(
            f"{folder} has class folders not in the training classes (first: {unknown[0]}); "
            "val/ must use the same wnid folders as train/"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        files = sorted(
            p
            for p in (folder / c).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGENET_SUFFIXES
        )
        files = files[:max_per_class] if max_per_class is not None else files
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise DataError(
            f"no images in the class folders of {folder}; expected {folder}/<wnid>/*.JPEG"
        )
    return paths, labels, classes
