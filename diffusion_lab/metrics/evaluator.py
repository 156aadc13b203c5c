"""Score generated samples against held-out real data: the metrics a run reports.

Metric names (chosen per data set by ``data.metrics``):
``fid_digits`` / ``kid_digits`` (features of the project's digits classifier, never called FID),
``fid`` / ``kid`` (Inception; skipped with a warning when its weights cannot be had),
``class_coverage`` (confident fraction, classes present, balance), ``sliced_wasserstein``,
and the paired ``ssim`` / ``global_ssim`` (the FP paper's, eq. 26-29) / ``psnr`` / ``mse``, each
sample against the reference image nearest to it in MSE (single- and few-image data: a denoised
or generated image against the training image it reproduces).
The number of samples and of reference images is always reported with the scores. Samples with
a NaN or an infinite value are never scored (:func:`check_samples_finite`): FID's eigenvalue solver
crashes the process on them (torch 2.13, CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from diffusion_lab.errors import ConfigError, DiffusionLabError, TrainingDivergedError
from diffusion_lab.metrics import coverage, fid, image_quality
from diffusion_lab.metrics.sliced_wasserstein import sliced_wasserstein

METRICS = (
    "fid_digits", "kid_digits", "fid", "kid", "class_coverage", "sliced_wasserstein",
    "ssim", "global_ssim", "psnr", "mse",
)  # fmt: skip
PAIRED = ("ssim", "global_ssim", "psnr", "mse")
#: Metrics of the samples alone (no reference images decoded for them).
UNREFERENCED = ("class_coverage",)


class NonFiniteSamplesError(TrainingDivergedError):
    """Samples with NaN or infinite values: no metric can score them (diverged weights, or an
    unstable sampler)."""


def check_samples_finite(samples: torch.Tensor, what: str, advice: str) -> None:
    """Stop with :class:`NonFiniteSamplesError` when any of ``samples`` holds a NaN or an
    infinite value; the message counts them, names ``what`` they are and gives ``advice``."""
    finite = torch.isfinite(samples.detach().reshape(len(samples), -1)).all(dim=1)
    bad = int((~finite).sum())
    if bad:
        raise NonFiniteSamplesError(
            f"{bad} of {len(finite)} {what} are NaN or infinite, so no metric was computed: "
            f"{advice}"
        )


class SampleEvaluator:
    """Callable ``(samples, datamodule) -> {name: float}`` for the named metrics."""

    def __init__(
        self,
        metrics: Sequence[str],
        num_reference: int = 10000,
        seed: int = 0,
        inception_weights: str | None = None,
    ) -> None:
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ConfigError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
        self.metrics = list(metrics)
        self.num_reference = num_reference
        self.seed = seed
        self.inception_weights = inception_weights
        self.unavailable: set[str] = set()  # metrics that could not run (e.g. no Inception)
        self.prepare(self.metrics)

    @staticmethod
    def prepare(metrics: Sequence[str]) -> None:
        """Load (or train and cache) what the metrics need, now rather than mid-training."""
        if any(m.endswith("_digits") or m == "class_coverage" for m in metrics):
            from diffusion_lab.metrics.digits_classifier import get_digits_classifier

            get_digits_classifier()

    def __call__(self, samples: torch.Tensor, datamodule) -> dict[str, float]:
        samples = samples.detach().float().cpu()
        check_samples_finite(
            samples, "samples", "draw them again (python -m diffusion_lab.sample RUN_DIR)"
        )
        metrics = [m for m in self.metrics if m not in self.unavailable]
        results: dict[str, float] = {}
        reference = None
        if any(m not in UNREFERENCED for m in metrics):
            paired = any(m in metrics for m in PAIRED)
            count = len(samples) if paired else self.num_reference
            reference = datamodule.reference_samples(count).float().cpu()
            if paired:
                reference = nearest_images(samples, reference)
            results["num_reference"] = float(len(reference))
        for name in metrics:
            results.update(self.score(name, samples, reference))
        return results

    def score(self, name: str, samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        """One metric's values (a metric may give several numbers)."""
        if name in ("fid_digits", "fid"):
            return self._frechet(fid.compute_fid, name, samples, reference)
        if name in ("kid_digits", "kid"):
            return self._frechet(fid.compute_kid, name, samples, reference, subset_size=100)
        if name == "class_coverage":
            result = coverage.class_coverage(samples)
            keys = ("confident_fraction", "classes_present", "balance")
            return {f"coverage_{k}": float(result[k]) for k in keys}
        if name == "sliced_wasserstein":
            generator = torch.Generator().manual_seed(self.seed)
            return {name: sliced_wasserstein(samples, reference, generator=generator)}
        return {name: getattr(image_quality, name)(samples, reference)}

    def _frechet(self, compute, name: str, samples, reference, **kwargs) -> dict[str, float]:
        feature = "digits" if name.endswith("_digits") else "inception"
        weights = None if feature == "digits" else self.inception_weights
        try:
            result = compute(samples, reference, feature=feature, weights_path=weights, **kwargs)
        except DiffusionLabError as exc:
            self.unavailable.add(name)  # not tried again: no reference loaded for it again
            warnings.warn(f"{name} skipped for this run: {exc}", stacklevel=2)
            return {}
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def nearest_images(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each sample the reference image nearest to it in MSE (B, C, H, W)."""
    distance = torch.cdist(samples.flatten(1).double(), reference.flatten(1).double())
    return reference[distance.argmin(dim=1)]
