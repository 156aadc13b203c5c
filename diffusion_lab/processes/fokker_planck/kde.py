"""The initial log-density m^0 (Na, Gao, Wan 2024, sec. 3.3, last paragraph): a kernel density
estimate per channel of the image's own pixel values.

scikit-learn's ``KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree")`` fitted to
the channel's H*W pixel values (1-D samples) and evaluated at every pixel's value
(``kde="sklearn"``). The same estimate in closed form, (1/(n b)) sum_k (1 - |u - u_k|/b)_+ with
b = n^(-1/5), is computed exactly by sorting and prefix sums in O(n log n) (``kde="exact"``, the
default: the tree's exact evaluation is O(n^2) here, since the bandwidth covers a large share of
[0, 1]); the two agree to rounding. Images are float64 (C, H, W) in the FIXED range [0, 1]: Scott's
bandwidth n^(-1/5) does not depend on the spread of the data, so the range changes m^0.
"""

from __future__ import annotations

import numpy as np

KDES = ("exact", "sklearn")


def _kde_exact(values: np.ndarray) -> np.ndarray:
    """log of (1/(n b)) sum_k (1 - |u - u_k|/b)_+ at every sample u, b = n^(-1/5), in O(n log n).

    For sorted samples, the window [u - b, u + b] is found by ``searchsorted``; the sum of
    1 - |u - u_k|/b over it splits into the left part (u_k <= u) and right part, each a count and
    a sum taken from prefix sums.
    """
    n = values.size
    b = n ** (-1.0 / 5.0)
    s = np.sort(values)
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    lo = np.searchsorted(s, values - b, side="right")  # first k with u_k > u - b
    mid = np.searchsorted(s, values, side="right")  # first k with u_k > u
    hi = np.searchsorted(s, values + b, side="left")  # first k with u_k >= u + b
    n_left, n_right = mid - lo, hi - mid
    sum_left, sum_right = prefix[mid] - prefix[lo], prefix[hi] - prefix[mid]
    # left: sum (1 - (u - u_k)/b); right: sum (1 - (u_k - u)/b)
    total = (
        (n_left + n_right) - (values * n_left - sum_left) / b - (sum_right - values * n_right) / b
    )
    return np.log(total / (n * b))


def _kde_sklearn(values: np.ndarray) -> np.ndarray:
    """scikit-learn's KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree")."""
    from sklearn.neighbors import KernelDensity

    samples = values[:, None]
    kde = KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree").fit(samples)
    return kde.score_samples(samples)


def initial_log_density(image: np.ndarray, method: str = "exact") -> np.ndarray:
    """m^0 (sec. 3.3): per channel, the linear-kernel Scott KDE of the channel's own pixel values,
    evaluated at every pixel's value. ``image`` is (C, H, W) in [0, 1]; returns (C, H, W)."""
    if method not in KDES:
        raise ValueError(f"kde must be one of {KDES}, got {method!r}")
    image = np.asarray(image, dtype=np.float64)
    _check_image(image)
    fit = _kde_exact if method == "exact" else _kde_sklearn
    return np.stack([fit(channel.ravel()).reshape(channel.shape) for channel in image])


def _check_image(image: np.ndarray) -> None:
    """Refuse anything but a (C, H, W) image in [0, 1]."""
    if image.ndim != 3:
        raise ValueError(f"an image is (C, H, W), got shape {image.shape}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("images must lie in [0, 1]: map the data range to [0, 1] first")
