"""Evaluation metrics: image quality (SSIM, PSNR, MSE), FID/KID (Inception or digits features),
per-class coverage of generated digits, sliced Wasserstein distance, and bits/dim by the
probability-flow ODE (``likelihood``); ``evaluator.SampleEvaluator`` scores a run's samples with
the metrics its data set names.

Import the submodules directly (``from diffusion_lab.metrics.fid import compute_fid``); this package
imports nothing heavy on its own.
"""
