"""LightningDataModules yielding ``(x, y)``: images float32 in [0, 1] (B, C, H, W) or 2-D points.

Modules: ``base`` (shared splits, seeded loaders, ``reference_samples``), ``digits``, ``toy2d``
(Gaussian mixtures with exact noised scores), ``images`` (scikit-image photographs, image folders),
``formats`` (torchvision's on-disk layouts, downloads) and ``real`` (MNIST, CIFAR-10, CelebA,
ImageNet). Import the module you need; this package imports nothing heavy by itself.
"""
