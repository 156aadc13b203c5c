"""Blur levels for Soft Diffusion's blur stage (Daras et al. sec. 3.3, App. C, App. F.1.2).

In the blur stage the noise is constant (sigma = 0.1) and the blur std grows from ``blur_min``
(0.01: the identity) to ``blur_max`` (23 for CelebA-64, 18 for CIFAR-10; App. D). The soft blur
process places its levels at equal t across the blur stage and interpolates linearly in between
(App. C). It chooses them by its ``blur_schedule`` settings (:class:`BlurScheduleSettings`):
data-free ones when it is built, the others in its ``fit`` from the training images
(:func:`fit_schedule`, which caches them by the images' hash), into a buffer that checkpoints
carry. The schedulers (``method``; the options of ``conf/process/blur_schedule/``):

- ``soft_wasserstein`` (:func:`wasserstein_path_levels`): sec. 3.3's shortest path over
  candidate levels under the coupled distance (``distances``), searched exactly on rounded
  distances (``quantise``, ``paths``), eps found by bisection.
- ``soft_mse_matched`` (:func:`mse_matched_levels`): App. F.1.2's baseline, eq. 45.
- ``soft_linear``: evenly spaced stds, no data needed; ``geometric`` (no option file:
  ``process.blur_schedule.method=geometric``) spaces them geometrically, for comparison.

Modules: ``blur`` (the blur and the candidates), ``distances``, ``quantise``, ``paths``,
``wasserstein``, ``mse_matched``, ``store`` (files, cache paths, data hash) and ``settings``
(the settings block and the entry points).
"""

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.blur import BlurFn, candidate_blurs, gaussian_blur
from diffusion_lab.schedules.soft.distances import coupled_distances
from diffusion_lab.schedules.soft.mse_matched import blur_mse, mse_matched_levels, ve_mse_ratio
from diffusion_lab.schedules.soft.paths import OBJECTIVES, find_eps
from diffusion_lab.schedules.soft.quantise import DISTANCE_RTOL, quantise_distances
from diffusion_lab.schedules.soft.settings import (
    BlurScheduleSettings,
    compute_schedule,
    fit_schedule,
)
from diffusion_lab.schedules.soft.store import (
    BlurSchedule,
    data_hash,
    load_schedule,
    save_schedule,
)
from diffusion_lab.schedules.soft.wasserstein import wasserstein_path_levels

__all__ = [
    "DISTANCE_RTOL",
    "OBJECTIVES",
    "BlurFn",
    "BlurSchedule",
    "BlurScheduleSettings",
    "ConfigError",
    "blur_mse",
    "candidate_blurs",
    "compute_schedule",
    "coupled_distances",
    "data_hash",
    "find_eps",
    "fit_schedule",
    "gaussian_blur",
    "load_schedule",
    "mse_matched_levels",
    "quantise_distances",
    "save_schedule",
    "ve_mse_ratio",
    "wasserstein_path_levels",
]
