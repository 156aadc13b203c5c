"""The validation scorer (diffusion_lab.metrics.evaluator): a metric that cannot run on this
machine warns once and is not tried again, and no reference image is decoded for nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lab.metrics.evaluator import SampleEvaluator


class CountingData:
    """A DataModule stand-in whose reference images are counted as they are decoded."""

    def __init__(self) -> None:
        self.decoded = 0

    def reference_samples(self, count: int) -> torch.Tensor:
        self.decoded += count
        return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(count))


def test_fid_without_its_weights_warns_once_and_then_decodes_nothing(tmp_path):
    """Inception FID with no weights on the machine decoded the 10,000 reference images at
    every validation (24 s per rank on ImageNet) and skipped the metric each time."""
    data = CountingData()
    evaluator = SampleEvaluator(["fid"], num_reference=50,
                                inception_weights=str(tmp_path / "missing.pth"))  # fmt: skip
    samples = torch.rand(10, 3, 8, 8)
    with pytest.warns(UserWarning, match="fid skipped for this run"):
        first = evaluator(samples, data)
    assert first == {"num_reference": 50.0} and data.decoded == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluator(samples, data) == {}
    assert data.decoded == 50


def test_the_remaining_metrics_still_get_their_reference(tmp_path):
    data = CountingData()
    evaluator = SampleEvaluator(["fid", "sliced_wasserstein"], num_reference=40,
                                inception_weights=str(tmp_path / "missing.pth"))  # fmt: skip
    samples = torch.rand(10, 3, 8, 8)
    with pytest.warns(UserWarning, match="fid skipped"):
        evaluator(samples, data)
    again = evaluator(samples, data)
    assert set(again) == {"num_reference", "sliced_wasserstein"} and data.decoded == 80
