"""Evaluation metrics: image quality (SSIM, PSNR, MSE), FID/KID (Inception or digits features),
per-class coverage of generated digits and sliced Wasserstein distance.

Import the submodules directly (``from diffusion_lab.metrics.fid import compute_fid``); this package
imports nothing heavy on its own.
"""
