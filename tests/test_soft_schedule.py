"""Soft Diffusion blur schedules (diffusion_lab.schedules.soft): the shortest path, eps bisection,
the coupled distance, the MSE-matched baseline (eq. 45), saved files and the config group."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_lab.build import instantiate
from diffusion_lab.data.digits import load_digits_arrays
from diffusion_lab.schedules import soft

CONF = Path(__file__).resolve().parents[1] / "conf"


def direct_blur(x, std):
    """A zero-padded 2-D Gaussian blur by one direct conv2d (the test's own reference)."""
    _, c, h, w = x.shape
    taps = torch.arange(-(h - 1), h, dtype=torch.float64)
    g = torch.exp(-0.5 * (taps / std) ** 2)
    k2 = torch.outer(g, g)
    k2 = (k2 / k2.sum()).to(x.dtype)
    out = F.conv2d(x.reshape(-1, 1, h, w), k2[None, None], padding=h - 1)
    return out.reshape(x.shape)


@pytest.fixture(scope="module")
def digits16():
    torch.manual_seed(0)
    return load_digits_arrays(16, "train")[0][:200].double()


@pytest.fixture(scope="module")
def blur_distances(digits16):
    stds = soft.candidate_blurs(0.01, 8.0, 64, "linear")
    return stds, soft.coupled_distances(digits16, direct_blur, stds)


def brute_force(d, eps, objective="sum"):
    k = d.shape[0]
    best = None
    for r in range(k - 1):
        for mid in itertools.combinations(range(1, k - 1), r):
            path = (0, *mid, k - 1)
            steps = [d[i, j] for i, j in zip(path, path[1:])]
            if max(steps) > eps:
                continue
            key = (sum(steps),) if objective == "sum" else (len(path), sum(steps))
            if best is None or key < best[0]:
                best = (key, list(path))
    return best


def random_metric(rng, k=8):
    points = np.cumsum(rng.normal(size=(k, 3)) + [1.0, 0, 0], axis=0)
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def test_reference_blur_matches_a_direct_2d_convolution_and_is_the_identity_at_0_01(digits16):
    x = digits16[:8]
    for std in (0.3, 1.7, 8.0):
        assert torch.allclose(soft.gaussian_blur(x, std), direct_blur(x, std), atol=1e-12)
    assert torch.allclose(soft.gaussian_blur(x, 0.01), x, atol=1e-15)


@pytest.mark.parametrize("objective", ["sum", "fewest_levels"])
def test_the_path_is_the_brute_force_shortest_path_on_random_graphs(objective):
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.uniform(0.1, 3.0, size=(8, 8)) if rng.random() < 0.5 else random_metric(rng)
        d = np.triu(d, 1) + np.triu(d, 1).T
        for eps in np.quantile(d[np.triu_indices(8, 1)], [0.3, 0.6, 1.0]):
            expected = brute_force(d, eps, objective)
            found = soft.shortest_path(d, eps, objective)
            if expected is None:
                assert found is None
                continue
            path, cost = found
            assert cost == pytest.approx(expected[0][-1], rel=1e-12)
            if objective == "fewest_levels":
                assert len(path) == expected[0][0]
            assert path == sorted(path) and path[0] == 0 and path[-1] == 7


def count_sweep(d, objective=None):
    """The path's level count at every distinct distance from the bottleneck up (None: the
    scheduler's default objective)."""
    values = np.unique(d[np.triu_indices(d.shape[0], 1)])
    values = values[values >= soft.bottleneck(d)]
    kwargs = {} if objective is None else {"objective": objective}
    return [len(soft.shortest_path(d, v, **kwargs)[0]) for v in values]


def test_the_default_count_never_grows_with_eps_on_synthetic_and_blur_graphs(blur_distances):
    rng = np.random.default_rng(1)
    graphs = [random_metric(rng, 12) for _ in range(10)] + [blur_distances[1]]
    for d in graphs:
        counts = count_sweep(d)
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        assert counts[-1] == 2


def test_sum_count_never_grows_for_a_concave_distance_on_a_line():
    s = np.arange(20.0)
    d = np.sqrt(np.abs(s[:, None] - s[None]))  # f concave, f(0) = 0: the docstring's proof
    counts = count_sweep(d, "sum")
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] == 20


def test_sum_count_is_not_monotone_for_every_metric_the_docstring_example():
    names = ["0", "a", "1", "b", "3"]
    pairs = {("0", "a"): 2, ("b", "3"): 2, ("a", "1"): 3.1, ("1", "b"): 3.1, ("0", "1"): 5,
             ("1", "3"): 5, ("a", "b"): 5.5, ("0", "b"): 5.6, ("a", "3"): 5.6, ("0", "3"): 7.5}  # fmt: skip
    d = np.zeros((5, 5))
    for (p, q), v in pairs.items():
        d[names.index(p), names.index(q)] = d[names.index(q), names.index(p)] = v
    for i, j, k in itertools.permutations(range(5), 3):
        assert d[i, k] <= d[i, j] + d[j, k] + 1e-12  # a metric
    assert soft.shortest_path(d, 5.0, "sum")[0] == [0, 2, 4]
    assert soft.shortest_path(d, 5.5, "sum")[0] == [0, 1, 3, 4]
    assert soft.shortest_path(d, 5.5)[0] == [0, 2, 4]  # the default: fewest levels


def test_sum_count_on_the_blur_example_falls_overall_with_small_rises(blur_distances):
    counts = count_sweep(blur_distances[1], "sum")
    assert counts[-1] == 2 and counts[0] > 20
    running_min = np.minimum.accumulate(counts)
    assert max(np.asarray(counts) - running_min) <= 3  # measured: rises of 1 or 2 levels


def test_coupled_distance_is_a_metric_and_equals_a_direct_computation(digits16):
    stds = [0.01, 0.5, 1.0, 2.5, 6.0]
    d = soft.coupled_distances(digits16, direct_blur, stds, chunk_images=37)
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0)
    for i, j, k in itertools.permutations(range(5), 3):
        assert d[i, k] <= d[i, j] + d[j, k] + 1e-12
    for i, j in itertools.combinations(range(5), 2):
        diff = direct_blur(digits16, stds[i]) - direct_blur(digits16, stds[j])
        direct = diff.pow(2).flatten(1).sum(1).mean().sqrt().item()
        assert d[i, j] == pytest.approx(direct, rel=1e-10)


def test_coupled_distance_against_exact_ot_shared_and_independent_samples(digits16):
    g = torch.Generator().manual_seed(0)
    x = digits16[:100]
    s_i, s_j = 1.0, 1.0 + 8.0 / 255  # neighbouring candidates of 256 up to 8
    coupled = soft.coupled_distances(x, direct_blur, [s_i, s_j])[0, 1]
    shared = soft.sampled_level_distance(x, direct_blur, s_i, s_j, 0.1, g, shared=True)
    assert shared <= coupled + 1e-9 and shared == pytest.approx(coupled, rel=0.05)
    self_independent = soft.sampled_level_distance(digits16, direct_blur, s_i, s_i, 0.1, g, False)
    assert self_independent > 10 * coupled  # sampling noise swamps the level's own distance


def test_bisection_hits_32_levels_on_digits(digits16):
    x, blur = digits16[:100], soft.gaussian_blur  # separable: equal to direct_blur (test above)
    levels, info = soft.wasserstein_path_levels(x, blur, 32, 0.01, 8.0, 128)
    assert len(levels) == 32 and info["exact"] and levels[0] == 0.01 and levels[-1] == 8.0
    assert levels == sorted(levels)
    levels, info = soft.wasserstein_path_levels(x, blur, 32, 0.01, 8.0, 128, objective="sum")
    assert len(levels) == 32 and info["exact"]


def test_bisection_that_cannot_hit_the_count_returns_the_closest():
    d = np.abs(np.arange(6.0)[:, None] - np.arange(6.0)[None]) ** 0.5
    found = soft.find_eps(d, 5)  # counts over eps: 6, 3, 3, 2, 2 (no 4 or 5)
    assert not found.exact and len(found.path) == 6


def test_mse_matched_levels_satisfy_eq_45_where_it_can_be_met(digits16):
    levels, info = soft.mse_matched_levels(digits16, direct_blur, 0.1, 32, 0.01, 8.0, 0.01, 50.0)
    assert len(levels) == 32 and levels == sorted(levels) and levels[-1] == 8.0
    m_max = soft.blur_mse(digits16, direct_blur, 8.0, 0.1)
    u = np.linspace(0, 1, 32)
    ratio = soft.ve_mse_ratio(u, 0.01, 50.0)
    floor = soft.blur_mse(digits16, direct_blur, 0.01, 0.1)
    assert floor == pytest.approx(256 * 0.01, rel=1e-9)  # the noise alone: C_0.01 = I
    met = 0
    for k, b in enumerate(levels):
        if ratio[k] * m_max <= floor:
            assert b == 0.01
        else:
            met += 1
            lhs = soft.blur_mse(digits16, direct_blur, b, 0.1) / m_max
            assert lhs == pytest.approx(ratio[k], rel=1e-6)
    assert info["clamped"] == 32 - met and met >= 3


def test_saved_schedule_round_trips(tmp_path, digits16):
    schedule = soft.compute_schedule("mse_matched", digits16, direct_blur, num_levels=8,
                                     blur_max=8.0)  # fmt: skip
    path = soft.save_schedule(tmp_path / "s.json", schedule)
    loaded = soft.load_schedule(path)
    assert loaded == schedule and loaded.data_hash == soft.data_hash(digits16)
    assert json.loads(path.read_text())["settings"]["method"] == "mse_matched"
    with pytest.raises(soft.ConfigError, match="does not exist"):
        soft.load_schedule(tmp_path / "missing.json")


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_each_blur_schedule_config_instantiates_to_a_list_of_floats_and_is_cached():
    common = ["process=soft_blur", "data=digits", "data.image_size=16", "process.blur_max=8.0",
              "process.num_blur_levels=12"]  # fmt: skip
    data_driven = ["blur_schedule.num_images=100"]
    extra = {"soft_wasserstein": [*data_driven, "blur_schedule.num_candidates=64"],
             "soft_mse_matched": data_driven, "soft_linear": []}  # fmt: skip
    for name in ("soft_wasserstein", "soft_mse_matched", "soft_linear"):
        cfg = _compose([f"blur_schedule={name}", *common, *extra[name]])
        levels = instantiate(cfg.process).levels.tolist()  # the process reads the schedule
        assert isinstance(levels, list) and all(isinstance(v, float) for v in levels)
        assert len(levels) == 12 and levels[0] == 0.01 and levels[-1] == 8.0
        schedule, path = soft.resolve_schedule(
            **{k: v for k, v in OmegaConf.to_container(cfg.blur_schedule, resolve=True).items()
               if not k.startswith("_")}
        )  # fmt: skip
        assert schedule.levels == levels
        assert (path is None) == (name == "soft_linear") and (path is None or path.is_file())


def test_the_cli_writes_a_file_that_the_config_reads(tmp_path, capsys):
    from diffusion_lab.soft_schedule import main

    out = tmp_path / "levels.json"
    overrides = ["data=digits", "data.image_size=16", "process.blur_max=8.0",
                 "blur_schedule.num_images=100", "blur_schedule.num_candidates=64",
                 "process.num_blur_levels=10"]  # fmt: skip
    schedule = main(["--no-progress", "--out", str(out), *overrides])
    assert f"blur_schedule.file={out}" in capsys.readouterr().out
    cfg = _compose(
        ["process=soft_blur", *overrides, f"blur_schedule.file={out}", "data.image_size=8"]
    )
    assert instantiate(cfg.blur_schedule) == schedule.levels  # the file, not the data
    cfg = _compose(
        ["process=soft_blur", *overrides, f"blur_schedule.file={out}", "process.blur_max=9.0"]
    )
    with pytest.raises(soft.ConfigError, match="blur_max"):
        instantiate(cfg.blur_schedule)
