"""Images as float32 pixels in [0, 1]: PIL modes, channels, crops and resizing, one file read.

The one image conversion of the project (:func:`image_tensor`): every reader of photographs and
of the embedded sets goes through it, so a file reads the same whichever DataModule reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from diffusion_lab.errors import ConfigError, DataError

# ITU-R 601 luma, as PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)
# Modes with samples wider than 8 bits -> their full scale. 16-bit unsigned by 65535; "I" (32-bit
# signed) holds 16-bit data in practice (Pillow's convert("I") of I;16, some TIFF writers) and is
# read the same way; "F" (32-bit float) is taken to be in [0, 1]. Other values are refused.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images -> float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    return x.to(torch.float32)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images (..., C, H, W) with C in {1, 3} converted to ``channels`` (luma or repeated gray)."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).clone()
    if c == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=torch.float32).reshape(3, 1, 1)
        gray = (to_float_images(x) * weights).sum(dim=-3, keepdim=True)
        return (
            (gray * 255).round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else gray
        )
    raise ConfigError(f"cannot convert {c}-channel images to {channels} channels (use 1 or 3)")


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, H, W) -> (N, C, size, size): bilinear, antialiased, clamped to [0, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0)


def center_crop_resize(img: Image.Image, size: int, crop: int | None = None) -> Image.Image:
    """Centre crop (``crop`` x ``crop``, or the largest square) then resize to ``size`` (bicubic).

    The one resizing protocol for photographs (PIL bicubic, which antialiases when shrinking).
    """
    w, h = img.size
    side = min(w, h) if crop is None else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def standard_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode as 8-bit "L" / "RGB" (``channels`` 1 / 3), or as "F" in [0, 1] if wider.

    Samples wider than 8 bits (see :data:`WIDE_MODES`) become floats divided by their full scale;
    transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on white, as the
    image shows on a page; palette, bilevel ("1"), CMYK and YCbCr go through PIL's conversion. A
    ValueError says why an image cannot be converted (e.g. "F" samples outside [0, 1]).
    """
    if img.mode in WIDE_MODES:
        full = WIDE_MODES[img.mode]
        arr = np.asarray(img, dtype=np.float32)
        if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= full):
            raise ValueError(
                f"mode {img.mode} samples span [{arr.min():g}, {arr.max():g}], outside [0, {full:g}]; "
                "save the image as 8- or 16-bit"
            )
        return Image.fromarray(arr / full)
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def image_pixels(
    img: Image.Image, channels: int, size: int | None = None, crop: int | None = None
) -> torch.Tensor:
    """Any PIL image -> (channels, H, W) as it is stored: uint8 for 8-bit modes (lossless, a
    quarter of float32's memory), float32 in [0, 1] for wider ones.

    :func:`standard_mode`, then (``size`` given) :func:`center_crop_resize`; gray repeated to 3
    channels where ``channels`` is 3.
    """
    img = standard_mode(img, channels)
    if size is not None:
        img = center_crop_resize(img, size, crop)
    t = torch.from_numpy(np.array(img))
    if t.dtype != torch.uint8:
        t = t.to(torch.float32).clamp_(0.0, 1.0)  # bicubic overshoots F
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return convert_channels(t.contiguous(), channels)


def image_tensor(
    img: Image.Image, channels: int, size: int | None = None, crop: int | None = None
) -> torch.Tensor:
    """Any PIL image -> float32 (channels, H, W) in [0, 1]: the one image conversion
    (:func:`image_pixels`, 8-bit samples divided by 255)."""
    return to_float_images(image_pixels(img, channels, size, crop))


def load_image(path: str | Path, size: int, channels: int, crop: int | None = None) -> torch.Tensor:
    """Read one image file -> float32 (channels, size, size) in [0, 1] by :func:`image_tensor`."""
    return to_float_images(load_pixels(path, size, channels, crop))


def load_pixels(
    path: str | Path, size: int, channels: int, crop: int | None = None
) -> torch.Tensor:
    """Read one image file -> (channels, size, size) as :func:`image_pixels` stores it.

    The EXIF orientation is applied first. An unreadable, truncated or unconvertible file raises a
    one-line DataError naming it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return image_pixels(ImageOps.exif_transpose(img), channels, size, crop)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(
            f"cannot read image {path} ({reason}); replace or delete the file"
        ) from None
