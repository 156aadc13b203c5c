"""The evaluators' .npz: arr_0, uint8 (N, H, W, C), round(clip(x * 255)) of x mapped to [0, 1]."""

import numpy as np
import torch

from diffusion_lab.npz import save_npz, to_uint8_hwc


def expected_uint8(samples: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    """The documented mapping in numpy, float64 throughout."""
    unit = (samples.numpy().astype(np.float64) - lo) / (hi - lo)
    return np.rint(np.clip(unit * 255, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)


def test_values_round_to_the_nearest_level_and_clip():
    k = torch.arange(0, 255, 17, dtype=torch.float64)
    x = torch.cat([(k + 0.49) / 255, (k + 0.51) / 255, torch.tensor([-0.2, 0.0, 1.0, 1.3])])
    pixels = to_uint8_hwc(x.float().reshape(1, 1, 1, -1), (0.0, 1.0))
    assert pixels.shape == (1, 1, len(x), 1) and pixels.dtype == np.uint8
    expected = [*k.tolist(), *(k + 1).tolist(), 0, 0, 255, 255]
    assert pixels.ravel().tolist() == expected


def test_channels_go_last_and_other_ranges_map_to_zero_one():
    samples = torch.rand(4, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = to_uint8_hwc(samples, (-1.0, 1.0))
    assert pixels.shape == (4, 5, 6, 3)
    assert np.array_equal(pixels, expected_uint8(samples, -1.0, 1.0))
    assert pixels[2, 3, 1, 0] == round((float(samples[2, 0, 3, 1]) + 1) / 2 * 255)


def test_the_file_opens_with_numpy_as_arr_0(tmp_path):
    samples = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = save_npz(samples, (0.0, 1.0), tmp_path / "out" / "samples.npz")
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        images = data["arr_0"]
    assert images.shape == (7, 8, 8, 1) and images.dtype == np.uint8  # grey keeps C = 1
    assert np.array_equal(images, expected_uint8(samples, 0.0, 1.0))
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]  # no partial file left
