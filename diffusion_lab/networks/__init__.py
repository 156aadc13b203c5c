"""Noise-conditional networks: ``forward(x, noise_label) -> tensor shaped like x``.

``mlp`` for 2-D toy data, ``unet`` (DDPM), and shared building blocks in ``layers``.
"""

from diffusion_lab.networks.mlp import MLP
from diffusion_lab.networks.unet import UNet

__all__ = ["MLP", "UNet"]
