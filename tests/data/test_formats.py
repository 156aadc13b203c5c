"""Real on-disk layouts (torchvision's), written tiny in the exact formats, read back exactly."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.formats import (
    Payload,
    expected_image,
    idx_bytes,
    python2_cifar_pickle,
    write_celeba,
    write_cifar,
    write_imagenet,
    write_jpeg,
    write_mnist,
)

from diffusion_lab.data import formats, real
from diffusion_lab.data.real import (
    CelebADataModule,
    CIFAR10DataModule,
    ImageNetDataModule,
    MNISTDataModule,
)
from diffusion_lab.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- MNIST
def test_read_idx_plain_and_gzipped(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(formats.read_idx(tmp_path / "a"), arr)
    assert np.array_equal(formats.read_idx(tmp_path / "a.gz"), arr)


def test_mnist_reads_back_exactly(tmp_path: Path) -> None:
    data = write_mnist(tmp_path)
    images, labels = formats.read_mnist(tmp_path, train=False)  # gzipped
    assert np.array_equal(images, data["t10k"][0]) and np.array_equal(labels, data["t10k"][1])
    dm = MNISTDataModule(root=str(tmp_path), batch_size=4, seed=0)
    x, y = dm.tensors("train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(data["train"][0]).unsqueeze(1).float() / 255)
    assert torch.equal(y, torch.from_numpy(data["train"][1]).long())
    assert torch.equal(dm.tensors("val")[0], dm.tensors("test")[0])  # n_val=0: val is test
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.int64 and dm.num_classes == 10
    resized = MNISTDataModule(root=str(tmp_path), image_size=32, n_val=2)
    assert resized.tensors("train")[0].shape == (3, 1, 32, 32)
    assert len(resized.dataset("val")) == 2 and resized.reference_samples(10).shape[0] == 3


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b"\x00\x00\x08\x07" + b[4:], "IDX header"),  # wrong ndim: sizes disagree
        (lambda b: b"\x01\x02\x03\x04" + b[4:], "bad magic number"),
        (lambda b: b[:-10], "IDX header"),  # truncated payload
    ],
)
def test_mnist_corrupt_files_raise_data_error(tmp_path: Path, corrupt, match: str) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=match) as err:
        MNISTDataModule(root=str(tmp_path)).setup()
    assert str(path.parent) in str(err.value)


def test_mnist_label_count_mismatch_and_bad_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataError, match="disagree"):
        formats.read_mnist(tmp_path, train=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-images"):
        formats.read_mnist(tmp_path, train=False)


def test_mnist_missing_names_folder_and_offline_alternative(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data=digits") as err:
        MNISTDataModule(root=str(tmp_path), download=False).setup()
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    assert "\n" not in str(err.value)


def _fake_urlopen(payloads: dict[str, bytes]):
    def urlopen(req, timeout=None):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        assert timeout is not None and timeout <= 60
        for suffix, payload in payloads.items():
            if url.endswith(suffix):
                return io.BytesIO(payload)
        raise OSError(f"no route to {url}")

    return urlopen


def test_mnist_download_verifies_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write_mnist(src, gz_test=False)
    payloads, md5s = {}, {}
    for stem in formats.MNIST_FILES:
        gz = gzip.compress((src / "MNIST" / "raw" / stem).read_bytes())
        payloads[stem + ".gz"] = gz
        md5s[stem] = hashlib.md5(gz).hexdigest()
    monkeypatch.setattr(formats, "MNIST_FILES", md5s)
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(payloads))
    dm = MNISTDataModule(root=str(tmp_path / "dl"), download=True)
    dm.prepare_data()
    assert len(dm.dataset("train")) == 5
    # a wrong checksum on every mirror is one DataError line with the folder and the alternative
    monkeypatch.setattr(formats, "MNIST_FILES", {k: "0" * 32 for k in md5s})
    with pytest.raises(DataError, match="checksum mismatch.*data=digits") as err:
        MNISTDataModule(root=str(tmp_path / "dl2"), download=True).prepare_data()
    assert str(tmp_path / "dl2" / "MNIST" / "raw") in str(err.value)
    assert not list((tmp_path / "dl2" / "MNIST" / "raw").glob("*.gz*"))  # nothing half-written


def test_download_without_network_raises_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen({}))
    for cls, folder in ((MNISTDataModule, "MNIST/raw"), (CIFAR10DataModule, "")):
        with pytest.raises(DataError, match="download failed.*data=digits") as err:
            cls(root=str(tmp_path), download=True).setup()
        assert str(tmp_path / folder).rstrip("/") in str(err.value)


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_reads_back_exactly(tmp_path: Path, bytes_keys: bool) -> None:
    data = write_cifar(tmp_path, bytes_keys=bytes_keys)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=3)
    x, y = dm.tensors("train")
    assert x.shape == (10, 3, 32, 32)
    expected = np.concatenate([data[n][0] for n in formats.CIFAR10_TRAIN]).reshape(-1, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(expected).float() / 255)
    assert y.tolist() == sum((data[n][1] for n in formats.CIFAR10_TRAIN), [])
    xt, yt = dm.tensors("test")
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == data["test_batch"][1]
    # channel order: the first 1024 bytes are the red plane
    assert torch.equal(xt[0, 0].flatten(), torch.from_numpy(data["test_batch"][0][0, :1024]) / 255)
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1


def test_cifar10_corrupt_and_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    folder = tmp_path / formats.CIFAR10_DIR
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match="3072"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data=digits") as err:
        CIFAR10DataModule(root=str(tmp_path)).setup()
    assert str(folder) in str(err.value) and "data_batch_3" in str(err.value)


def test_cifar10_download_extracts_verified_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_cifar(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / formats.CIFAR10_DIR, arcname=formats.CIFAR10_DIR)
    archive = buf.getvalue()
    monkeypatch.setattr(formats, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen({".tar.gz": archive}))
    dm = CIFAR10DataModule(root=str(tmp_path / "dl"), download=True)
    with caplog.at_level(logging.INFO, logger="diffusion_lab"):
        dm.prepare_data()
    assert f"downloading {formats.CIFAR10_URL} to {tmp_path / 'dl'}" in caplog.text
    assert "extracting" in caplog.text
    assert formats.cifar10_available(tmp_path / "dl") and len(dm.dataset("train")) == 10
    assert formats.CIFAR10_URL.startswith("https://www.cs.toronto.edu/")


@pytest.mark.parametrize("protocol", [2, 4, 5, "python2"])
def test_cifar10_batches_of_every_pickle_protocol_load(tmp_path: Path, protocol) -> None:
    """The restricted unpickler reads the originals' format (Python 2, numpy.core names) and
    what Python 3 writes (numpy._core, _codecs.encode for bytes, protocol 5's _frombuffer)."""
    data = write_cifar(tmp_path)
    folder = tmp_path / formats.CIFAR10_DIR
    for name, (images, labels) in data.items():
        entry = {"batch_label": f"batch {name}", "labels": labels, "data": images,
                 "filenames": [f"{i}.png" for i in range(len(labels))]}  # fmt: skip
        raw = (python2_cifar_pickle(entry) if protocol == "python2"
               else pickle.dumps(entry, protocol=protocol))  # fmt: skip
        (folder / name).write_bytes(raw)
    x, y = CIFAR10DataModule(root=str(tmp_path)).tensors("test")
    assert torch.equal(x, torch.from_numpy(data["test_batch"][0].reshape(-1, 3, 32, 32)) / 255)
    assert y.tolist() == data["test_batch"][1]


@pytest.mark.parametrize(
    "payload",
    ["os.system", "builtins.exec", "builtins.open", "subprocess.call", "nested in the array"],
)
def test_a_crafted_cifar10_pickle_is_refused_and_its_code_never_runs(tmp_path, payload) -> None:
    import builtins
    import os
    import subprocess

    write_cifar(tmp_path)
    marker = tmp_path / "marker"
    bad = {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "nested in the array": np.array([Payload(os.system, f"touch {marker}")], dtype=object),
    }[payload]
    batch = tmp_path / formats.CIFAR10_DIR / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": bad, b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="not a CIFAR-10 batch") as err:
        CIFAR10DataModule(root=str(tmp_path)).setup()
    assert not marker.exists()
    message = str(err.value)
    assert str(batch) in message and "download again" in message and "\n" not in message


# ----------------------------------------------------------------------------- CelebA
def test_celeba_partition_and_64px_protocol(tmp_path: Path) -> None:
    paths = write_celeba(tmp_path)
    dm = CelebADataModule(root=str(tmp_path), batch_size=2)
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    assert sizes == [2, 1, 2]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 0]
    ref = dm.reference_samples(2)
    assert torch.equal(ref[0], expected_image(paths[3], 64, 140))
    assert torch.equal(ref[1], expected_image(paths[4], 64, 140))
    assert len(CelebADataModule(root=str(tmp_path), max_per_split=1).dataset("train")) == 1


def test_celeba_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be downloaded automatically.*data=digits") as err:
        CelebADataModule(root=str(tmp_path), download=True).prepare_data()
    assert str(tmp_path / "celeba") in str(err.value)
    paths = write_celeba(tmp_path)
    paths[2].unlink()
    with pytest.raises(DataError, match="000003.jpg"):
        CelebADataModule(root=str(tmp_path)).setup()
    partition = tmp_path / "celeba" / "list_eval_partition.txt"
    partition.write_text("000001.jpg 7\n")
    with pytest.raises(DataError, match="line 1"):
        CelebADataModule(root=str(tmp_path)).setup()


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the setup check of a file-backed set decodes."""
    reads: list[Path] = []

    def counting(path, *args):
        reads.append(Path(path))
        return real_load_image(path, *args)

    real_load_image = real.load_image
    monkeypatch.setattr(real, "load_image", counting)
    return reads


def test_celeba_corrupt_jpeg_stops_at_setup(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "cache"))
    paths = write_celeba(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:3000])  # a truncated JPEG of the train split
    reads = _count_reads(monkeypatch)
    with pytest.raises(DataError, match=r"000002\.jpg .*truncated.*data\.on_bad_file=skip"):
        CelebADataModule(root=str(tmp_path)).setup()
    assert sorted(reads) == sorted(paths)  # every file decoded once, at setup
    reads.clear()
    with pytest.raises(DataError, match=r"000002\.jpg"):  # the cached verdict, nothing decoded
        CelebADataModule(root=str(tmp_path)).setup()
    skip = CelebADataModule(root=str(tmp_path), on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        skip.setup()
    assert reads == [] and "left out 1 unreadable image file(s) of 5" in caplog.text
    assert [len(skip.dataset(s)) for s in ("train", "val", "test")] == [1, 1, 2]
    assert str(skip.dataset("train").paths[0]).endswith("000001.jpg")
    write_jpeg(paths[1], (178, 218), 1)  # replaced: checked again, alone
    CelebADataModule(root=str(tmp_path)).setup()
    assert reads == [paths[1]]
    with pytest.raises(ConfigError, match="on_bad_file='ignore'.*error, skip"):
        CelebADataModule(root=str(tmp_path), on_bad_file="ignore")


# ----------------------------------------------------------------------------- ImageNet
def test_imagenet_class_folders(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=4)
    assert dm.classes == ["n01440764", "n01443537"] and dm.num_classes == 2
    train = dm.dataset("train")
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    ref = dm.reference_samples(5)  # val set, doubles as test
    assert ref.shape == (2, 3, 16, 16)
    first_val = tmp_path / "val" / "n01440764" / "n01440764_0.JPEG"
    assert torch.equal(ref[0], expected_image(first_val, 16, None))
    small = ImageNetDataModule(root=str(tmp_path), image_size=8, max_per_class=1)
    assert len(small.dataset("train")) == 2


def test_imagenet_missing_and_mismatched_classes(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="cannot be\\s+downloaded automatically.*data=digits"
    ) as err:
        ImageNetDataModule(root=str(tmp_path)).prepare_data()
    assert str(tmp_path / "train") in str(err.value)
    write_imagenet(tmp_path)
    write_jpeg(tmp_path / "val" / "n99999999" / "x.JPEG", (20, 20), 0)
    with pytest.raises(DataError, match="n99999999"):
        ImageNetDataModule(root=str(tmp_path)).prepare_data()


def test_imagenet_unreadable_file_stops_at_setup_or_is_skipped(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    bad = tmp_path / "val" / "n01443537" / "n01443537_0.JPEG"
    bad.write_bytes(b"\xff\xd8 not a JPEG")
    with pytest.raises(DataError, match="n01443537_0.JPEG"):
        ImageNetDataModule(root=str(tmp_path)).setup()
    dm = ImageNetDataModule(root=str(tmp_path), on_bad_file="skip")
    assert len(dm.dataset("train")) == 6 and dm.dataset("val").labels.tolist() == [0]
