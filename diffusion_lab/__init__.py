"""diffusion_lab: score-based diffusion models on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
