"""Image files in every mode Pillow opens read as [0, 1] floats against known pixel values.

Each test writes a tiny real file with Pillow and reads it through ``load_image`` (the reader of
``image_folder``, CelebA and ImageNet) at its own size, so no resampling blurs the values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.images import ImageFolderDataModule
from diffusion_lab.data.pixels import load_image
from diffusion_lab.errors import DataError

SIZE = 4
WHITE = (1.0, 1.0, 1.0)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _pixel(path: Path, channels: int = 3, xy: tuple[int, int] = (0, 0)) -> list[float]:
    """The pixel at (x, y) of ``path`` read by ``load_image``, one float per channel."""
    x = load_image(path, SIZE, channels)
    assert x.dtype == torch.float32 and x.shape == (channels, SIZE, SIZE)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    return x[:, xy[1], xy[0]].tolist()


def _gray16(value: int, mode: str) -> Image.Image:
    arr = np.full((SIZE, SIZE), value, dtype=">u2" if mode == "I;16B" else "<u2")
    return Image.frombytes(mode, (SIZE, SIZE), arr.tobytes())


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_by_65535(tmp_path: Path, channels: int) -> None:
    path = _save(_gray16(32768, "I;16"), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    assert _pixel(path, channels) == pytest.approx([32768 / 65535] * channels, abs=1e-6)
    full = _save(_gray16(65535, "I;16"), tmp_path / "white.png")
    assert _pixel(full, channels) == pytest.approx([1.0] * channels)


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = _save(_gray16(16384, "I;16B"), tmp_path / "g16b.tif")
    assert Image.open(path).mode == "I;16B"
    assert _pixel(path, 1) == pytest.approx([16384 / 65535], abs=1e-6)


def test_32bit_integer_holds_16bit_data(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.full((SIZE, SIZE), 49152, np.int32)), tmp_path / "i.tif")
    assert Image.open(path).mode == "I"
    assert _pixel(path) == pytest.approx([49152 / 65535] * 3, abs=1e-6)
    wide = _save(Image.fromarray(np.full((SIZE, SIZE), 70000, np.int32)), tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide\.tif.*outside \[0, 65535\].*8- or 16-bit"):
        load_image(wide, SIZE, 3)


def test_float_images_are_taken_in_0_1(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.full((SIZE, SIZE), 0.25, np.float32)), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    assert _pixel(path, 1) == pytest.approx([0.25])
    bad = _save(Image.fromarray(np.full((SIZE, SIZE), 2.0, np.float32)), tmp_path / "f2.tif")
    with pytest.raises(DataError, match=r"f2\.tif.*outside \[0, 1\]"):
        load_image(bad, SIZE, 1)


def test_float_images_resized_stay_in_range(tmp_path: Path) -> None:
    arr = np.zeros((16, 16), np.float32)
    arr[::2] = 1.0  # bicubic overshoots on stripes
    path = _save(Image.fromarray(arr), tmp_path / "stripes.tif")
    x = load_image(path, 5, 1)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_8bit_gray_and_bilevel(tmp_path: Path) -> None:
    gray = _save(Image.new("L", (SIZE, SIZE), 77), tmp_path / "l.png")
    assert _pixel(gray, 1) == pytest.approx([77 / 255])
    assert _pixel(gray, 3) == pytest.approx([77 / 255] * 3)
    bilevel = Image.new("1", (SIZE, SIZE), 0)
    bilevel.putpixel((1, 0), 1)
    path = _save(bilevel, tmp_path / "bw.png")
    assert Image.open(path).mode == "1"
    assert _pixel(path, 1, (0, 0)) == [0.0] and _pixel(path, 1, (1, 0)) == [1.0]


def _palette(transparency: int | bytes | None) -> Image.Image:
    img = Image.new("P", (SIZE, SIZE), 0)
    img.putpalette([10, 20, 30, 200, 100, 50])
    img.putpixel((1, 0), 1)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def test_palette_index_maps_to_its_colour(tmp_path: Path) -> None:
    path = _save(_palette(None), tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    assert _pixel(path, 3, (1, 0)) == pytest.approx([200 / 255, 100 / 255, 50 / 255])
    assert _pixel(path, 3, (0, 0)) == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601, as convert("L")
    assert _pixel(path, 1, (1, 0)) == pytest.approx([luma / 255])


def test_palette_transparency_is_composited_on_white(tmp_path: Path) -> None:
    keyed = _save(_palette(1), tmp_path / "key.png")  # index 1 fully transparent
    assert _pixel(keyed, 3, (1, 0)) == pytest.approx(WHITE)
    assert _pixel(keyed, 3, (0, 0)) == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    alpha = _save(_palette(b"\xff\x80"), tmp_path / "alpha.png")  # index 1 at alpha 128
    a = 128 / 255
    expected = [(c * a + 255 * (1 - a)) / 255 for c in (200, 100, 50)]
    assert _pixel(alpha, 3, (1, 0)) == pytest.approx(expected, abs=1 / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path: Path, mode: str) -> None:
    colour = (10, 20, 30) if mode == "RGBA" else (100,)
    img = Image.new(mode, (SIZE, SIZE), colour + (255,))
    img.putpixel((1, 0), colour + (0,))
    img.putpixel((2, 0), colour + (128,))
    path = _save(img, tmp_path / f"{mode}.png")
    assert Image.open(path).mode == mode
    channels = 3 if mode == "RGBA" else 1
    assert _pixel(path, channels, (0, 0)) == pytest.approx([c / 255 for c in colour])
    assert _pixel(path, channels, (1, 0)) == pytest.approx([1.0] * channels)
    a = 128 / 255
    half = [(c * a + 255 * (1 - a)) / 255 for c in colour]
    assert _pixel(path, channels, (2, 0)) == pytest.approx(half, abs=1 / 255)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_reads_as_rgb(tmp_path: Path, suffix: str) -> None:
    path = _save(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)), tmp_path / f"c{suffix}")
    assert Image.open(path).mode == "CMYK"
    assert _pixel(path) == pytest.approx([1.0, 0.0, 0.0], abs=2 / 255)  # pure red


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    """Orientation 6: stored row 0 is the displayed right column, column 0 the displayed top."""
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)  # stored top-left: red
    arr[:8, 8:] = (0, 255, 0)  # stored top-right: green
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(arr), tmp_path / "o6.jpg", exif=exif, quality=95, subsampling=0)
    x = load_image(path, 16, 3)
    red, green = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(x[:, 0:8, 8:16].mean((1, 2)), red, atol=0.02, rtol=0)  # top right
    torch.testing.assert_close(x[:, 8:16, 8:16].mean((1, 2)), green, atol=0.02, rtol=0)  # bottom
    assert float(x[:, :, :8].max()) < 0.05  # the left half is black


def test_image_folder_reads_16bit_gray_not_white(tmp_path: Path) -> None:
    _save(_gray16(32768, "I;16"), tmp_path / "g16.png")
    x, _ = ImageFolderDataModule(str(tmp_path), image_size=SIZE).tensors("train")
    assert x.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(x, torch.full_like(x, 32768 / 65535), atol=1e-6, rtol=0)


def test_an_image_folder_holds_8bit_files_as_uint8_and_wider_ones_as_float(tmp_path: Path) -> None:
    """8-bit files are stored as their bytes (a quarter of float32's memory) and read back as
    exactly the floats a file-by-file decode gives; one 16-bit file makes the folder float32."""
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = rng.integers(0, 256, (SIZE + 6, SIZE + 2, 3), dtype=np.uint8)
        _save(Image.fromarray(arr), tmp_path / f"rgb_{i}.png")
    data = ImageFolderDataModule(str(tmp_path), image_size=SIZE)
    stored = data.dataset("train").x
    assert stored.dtype == torch.uint8 and stored.shape == (3, 3, SIZE, SIZE)
    expected = torch.stack([load_image(f, SIZE, 3) for f in sorted(tmp_path.glob("*.png"))])
    assert torch.equal(data.tensors("train")[0], expected)
    batch = next(iter(data.train_dataloader()))[0]
    assert batch.dtype == torch.float32 and float(batch.max()) <= 1.0
    _save(_gray16(32768, "I;16"), tmp_path / "wide.png")
    wide = ImageFolderDataModule(str(tmp_path), image_size=SIZE)
    assert wide.dataset("train").x.dtype == torch.float32
    assert torch.equal(wide.tensors("train")[0][:3], expected)
    torch.testing.assert_close(wide.tensors("train")[0][3], torch.full((3, SIZE, SIZE), 32768 / 65535),
                               atol=1e-6, rtol=0)  # fmt: skip
