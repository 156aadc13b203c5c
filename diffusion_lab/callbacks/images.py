"""Sample grids: PNG files in the run folder and images in the loggers that take them."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one uint8 array (rows x cols), gray or RGB."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k, image in enumerate(images.clamp(0, 1).cpu().float()):
        r, col = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return array[..., 0] if c == 1 else array


def save_image_grid(images: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a grid of images as PNG, upscaled by an integer ``scale`` (nearest) for tiny images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image_grid(images))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path


def save_point_cloud(
    points: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None
) -> Path:
    """Scatter plot of 2-D samples (and reference data in grey) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(*reference[:, :2].T.cpu(), s=2, c="0.7", label="data")
    ax.scatter(*points[:, :2].T.cpu(), s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_samples_picture(samples: torch.Tensor, path: str | Path) -> Path:
    """A PNG of samples: an image grid for images, a scatter plot for 2-D points."""
    if samples.ndim == 4:
        return save_image_grid(samples, path, scale=max(1, 128 // samples.shape[-1]))
    return save_point_cloud(samples, path)


class SampleGrid(L.Callback):
    """After each validation that drew samples, save ``samples/step_{N}.png`` and log the picture."""

    def __init__(self, dirpath: str | Path, max_images: int = 64) -> None:
        self.dirpath = Path(dirpath)
        self.max_images = max_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = getattr(pl_module, "last_samples", None)
        if samples is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        path = save_samples_picture(
            samples[: self.max_images], self.dirpath / f"step_{trainer.global_step:07d}.png"
        )
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)  # W&B takes images; CSV does not
            if callable(log_image):
                log_image(key="samples", images=[str(path)], step=trainer.global_step)
