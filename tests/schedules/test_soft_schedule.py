"""Soft Diffusion blur schedules (diffusion_lab.schedules.soft): the shortest path, eps bisection,
the coupled distance, the MSE-matched baseline (eq. 45), saved files and the config group; the
path search's independence of float noise (the distances' last bits, the summation order)."""

import itertools
import json
import re
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONF
from helpers.soft_schedules import (
    bottleneck,
    eps_candidates,
    linear_levels,
    sampled_level_distance,
    shortest_path,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from omegaconf import open_dict

from diffusion_lab.build import compose_config, instantiate
from diffusion_lab.data.digits import load_digits_arrays
from diffusion_lab.schedules import soft


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


class StackBlur:
    """``direct_blur`` of all ``images`` at each std, computed once; a chunk of the images (a
    view, as ``coupled_distances`` takes them) gets its slice. The distances can then be
    recomputed in other summation orders (``chunk_images``) for the price of the Gram matrix."""

    def __init__(self, images, stds):
        self.images = images
        self.blurred = {float(s): direct_blur(images, float(s)) for s in stds}

    def __call__(self, x, std):
        size = self.images[0].numel() * self.images.element_size()
        start = (x.data_ptr() - self.images.data_ptr()) // size
        assert torch.equal(x, self.images[start : start + len(x)])
        return self.blurred[float(std)][start : start + len(x)]


@pytest.fixture(scope="module")
def blur_stack(digits16):
    stds = soft.candidate_blurs(0.01, 8.0, 64, "linear")
    return stds, StackBlur(digits16, stds)


@pytest.fixture(scope="module")
def blur_distances(digits16, blur_stack):
    stds, blur = blur_stack
    return stds, soft.coupled_distances(digits16, blur, stds)  # one chunk of all 200 images


def brute_force(d, eps, objective="sum"):
    """The best increasing path 0 -> K-1 with edges <= eps over all of them, on the distances
    at the search's resolution, paths ordered by (sum, levels, index sequence) for ``sum`` and
    (levels, sum, index sequence) for ``fewest_levels``: ((key), path) or None."""
    units, quantum = soft.quantise_distances(d)
    limit = np.inf if quantum == 0 or eps == np.inf else np.rint(eps / quantum)
    k = d.shape[0]
    best = None
    for r in range(k - 1):
        for mid in itertools.combinations(range(1, k - 1), r):
            path = (0, *mid, k - 1)
            steps = [int(units[i, j]) for i, j in zip(path, path[1:])]
            if max(steps) > limit:
                continue
            key = (sum(steps), len(path)) if objective == "sum" else (len(path), sum(steps))
            if best is None or (key, path) < (best[0], tuple(best[1])):
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
            found = shortest_path(d, eps, objective)
            if expected is None:
                assert found is None
                continue
            path, cost = found
            assert path == expected[1]  # ties at the resolution broken the same way
            assert cost == pytest.approx(sum(d[i, j] for i, j in zip(path, path[1:])), rel=1e-15)
            assert path == sorted(path) and path[0] == 0 and path[-1] == 7


def count_sweep(d, objective=None):
    """The path's level count at every distinct distance (at the search's resolution, as
    find_eps sees them) from the bottleneck up (None: the scheduler's default objective)."""
    kwargs = {} if objective is None else {"objective": objective}
    return [len(shortest_path(d, v, **kwargs)[0]) for v in eps_candidates(d)]


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
    assert shortest_path(d, 5.0, "sum")[0] == [0, 2, 4]
    assert shortest_path(d, 5.5, "sum")[0] == [0, 1, 3, 4]
    assert shortest_path(d, 5.5)[0] == [0, 2, 4]  # the default: fewest levels


def test_sum_count_on_the_blur_example_falls_overall_with_small_rises(blur_distances):
    d = blur_distances[1]
    counts = count_sweep(d, "sum")
    # At the largest eps every edge is allowed and, M being a metric, the direct path 0 -> K-1
    # is a shortest one (sec. 3.3: "If eps = inf, then for any metric M, the shortest path is to
    # go directly"); with the fewest levels among equal sums it is THE path. The float search
    # returned [0, 1, 63] on some machines (3 levels, the old failure): M(0.01, 0.137) is 1e-11
    # (both nearly the identity; 0 before the Gram rows were centred) and M(1, 63) lies 7e-12
    # below M(0, 63), so the hop is dearer by 4e-12 only, below the distances' float noise. The
    # expected 2 was right; which path won was noise. Now the tie is exact: equal integers.
    assert d[0, 1] < 1e-10 and 0 < d[0, 63] - d[1, 63] < 1e-10  # the near-tie, in the data
    units = soft.quantise_distances(d)[0]
    assert units[0, 1] == 0 and units[1, 63] == units[0, 63]
    assert counts[-1] == 2 and counts[0] > 20
    steps = np.diff(counts)
    running_min = np.minimum.accumulate(counts)
    assert steps.max() <= 2 and max(counts - running_min) <= 3  # measured: rises of 1 or 2
    assert (steps > 0).sum() > 50  # and many of them (111 measured): the count is not monotone


# --------------------------------------------------------------------------- float noise and ties


def perturbed(d, seed, rel=1e-12):
    """d with every distance scaled by 1 + rel * u, u ~ U(-1, 1), symmetric (float noise)."""
    u = np.random.default_rng(seed).uniform(-1.0, 1.0, d.shape)
    u = np.triu(u, 1) + np.triu(u, 1).T
    return d * (1.0 + rel * u)


def decisions(d, eps_list, num_levels_list):
    """Everything the scheduler decides from d: paths at given eps, and find_eps's results."""
    out = []
    for objective in soft.OBJECTIVES:
        out += [shortest_path(d, eps, objective)[0] for eps in eps_list]
        for n in num_levels_list:
            found = soft.find_eps(d, n, objective=objective)
            out.append((objective, n, found.path, found.eps_units, found.exact))
    return out


def test_the_blur_schedule_is_the_same_under_float_noise_and_other_summation_orders(
    digits16, blur_stack, blur_distances
):
    stds, d = blur_distances
    candidates = eps_candidates(d)
    eps_list = [bottleneck(d), *np.quantile(candidates, [0.1, 0.3, 0.6]), d.max(), np.inf]
    expected = decisions(d, eps_list, [8, 12, 20, 32])
    assert shortest_path(d, np.inf, "sum")[0] == [0, 63]  # the free hop over level 1 lost
    reference = soft.find_eps(d, 12, objective="sum")
    for seed in range(4):  # the last bits of every distance
        noisy = perturbed(d, seed)
        assert decisions(noisy, eps_list, [8, 12, 20, 32]) == expected
        found = soft.find_eps(noisy, 12, objective="sum")
        assert found.eps == pytest.approx(reference.eps, rel=1e-11)
        (eps, counts), (ref_eps, ref_counts) = zip(*found.evaluations), zip(*reference.evaluations)
        assert counts == ref_counts and eps == pytest.approx(ref_eps, rel=1e-11)
    for chunk in (1, 7, 37):  # the Gram matrix summed in other orders (another BLAS kernel)
        other = soft.coupled_distances(digits16, blur_stack[1], stds, chunk_images=chunk)
        assert not np.array_equal(other, d)
        assert decisions(other, eps_list, [8, 12, 20, 32]) == expected


def test_the_eps_candidates_are_the_distinct_distances_at_the_resolution(blur_distances):
    d = blur_distances[1]
    units, quantum = soft.quantise_distances(d)
    assert quantum == soft.DISTANCE_RTOL * d.max() and units.max() == round(1 / soft.DISTANCE_RTOL)
    values = eps_candidates(d)
    raw = np.unique(d[np.triu_indices(64, 1)])
    assert len(values) < len(raw[raw >= bottleneck(d) - quantum])  # noise-split merged
    distinct = np.unique(units[np.triu_indices(64, 1)])
    assert np.array_equal(values, distinct[-len(values) :] * quantum)
    for seed in range(3):
        assert np.allclose(eps_candidates(perturbed(d, seed)), values, rtol=1e-11, atol=0)


def test_quantise_distances_edge_cases():
    units, quantum = soft.quantise_distances(np.zeros((3, 3)))
    assert quantum == 0 and not units.any()
    assert shortest_path(np.zeros((3, 3)), 0.0, "sum") == ([0, 2], 0.0)
    assert soft.find_eps(np.zeros((4, 4)), 2).path == [0, 3]
    with pytest.raises(ValueError, match="nonnegative"):
        soft.quantise_distances(np.array([[0.0, -1.0], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="finite"):
        soft.quantise_distances(np.array([[0.0, np.nan], [np.nan, 0.0]]))


@st.composite
def distance_matrices(draw, max_k=7):
    """Symmetric nonnegative (K, K) matrices, K <= max_k, rich in ties: values drawn from a
    small pool (duplicates, zeros) or free, or distances between points on a line (every
    triangle inequality an equality in exact arithmetic, not in floats), or along a curve."""
    k = draw(st.integers(2, max_k))
    n = k * (k - 1) // 2
    value = st.floats(0.0, 10.0, allow_subnormal=False)
    kind = draw(st.sampled_from(["pool", "line", "curve"]))
    if kind == "pool":
        pool = draw(st.lists(value, min_size=1, max_size=3))
        upper = draw(st.lists(st.one_of(st.sampled_from(pool), value), min_size=n, max_size=n))
        d = np.zeros((k, k))
        d[np.triu_indices(k, 1)] = upper
        return d + d.T
    gap = st.one_of(st.just(0.0), st.floats(1e-3, 3.0))
    x = np.concatenate([[0.0], np.cumsum(draw(st.lists(gap, min_size=k - 1, max_size=k - 1)))])
    points = np.stack([x, 0.05 * x**2 if kind == "curve" else 0 * x], axis=1)
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def on_a_rounding_boundary(d):
    """Whether a distance sits within 1e-4 units of a half unit: there 1e-12 of noise (up to
    2e-5 units on distances of up to 1 / DISTANCE_RTOL units) may round it either way, the one
    case the resolution cannot decide (module docstring, "Ties")."""
    units = d[np.triu_indices(len(d), 1)] / max(soft.DISTANCE_RTOL * d.max(), 1e-300)
    return bool(np.any(np.abs(np.abs(units - np.floor(units)) - 0.5) < 1e-4))


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(distance_matrices(), st.integers(0, 2**32 - 1), st.sampled_from(soft.OBJECTIVES))
def test_the_path_is_the_lexicographic_optimum_and_ignores_float_noise(d, seed, objective):
    assume(not on_a_rounding_boundary(d))
    noisy = perturbed(d, seed)
    for eps in [*eps_candidates(d), np.inf]:
        expected = brute_force(d, eps, objective)
        found = shortest_path(d, eps, objective)
        assert expected is not None and found is not None  # eps >= the bottleneck
        assert found[0] == expected[1]
        assert shortest_path(noisy, eps, objective)[0] == found[0]
    for n in range(2, len(d) + 1):
        a, b = (
            soft.find_eps(d, n, objective=objective),
            soft.find_eps(noisy, n, objective=objective),
        )
        assert (a.path, a.eps_units, a.exact) == (b.path, b.eps_units, b.exact)


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(distance_matrices(), st.sampled_from(soft.OBJECTIVES))
def test_below_the_bottleneck_there_is_no_path_and_at_it_there_is(d, objective):
    assume(not on_a_rounding_boundary(d))
    units, quantum = soft.quantise_distances(d)
    b = bottleneck(d)
    assert shortest_path(d, b, objective) is not None
    assert b == eps_candidates(d)[0]
    if b > 0:
        assert shortest_path(d, b - quantum, objective) is None


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
    shared = sampled_level_distance(x, direct_blur, s_i, s_j, 0.1, g, shared=True)
    assert shared <= coupled + 1e-9 and shared == pytest.approx(coupled, rel=0.05)
    self_independent = sampled_level_distance(digits16, direct_blur, s_i, s_i, 0.1, g, False)
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
    cfg = compose_config(str(CONF), overrides)
    with open_dict(cfg):
        cfg.run_dir = ""
    return cfg


COMMON = ["method=soft", "loss=soft_score_matching", "sampler=soft_momentum", "data=digits",
          "data.image_size=16", "process.blur_max=8.0", "process.blur_schedule.num_levels=12",
          "process.blur_schedule.num_images=100"]  # fmt: skip


def _digits_in_model_range(cfg):
    """The training digits a run fits its process to."""
    from diffusion_lab.build import build_datamodule, build_method

    datamodule, _ = build_datamodule(cfg)
    return build_method(cfg, []).fit_examples(datamodule)


@pytest.mark.parametrize("option", ["soft_wasserstein", "soft_mse_matched", "soft_linear"])
def test_each_blur_schedule_option_gives_levels_when_built_or_fitted_and_caches_by_data_hash(
    option, tmp_path, monkeypatch
):
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path))
    extra = ["process.blur_schedule.num_candidates=64"] if option == "soft_wasserstein" else []
    cfg = _compose(["process=soft_blur", f"process/blur_schedule={option}", *COMMON, *extra])
    process = instantiate(cfg.process)
    data = _digits_in_model_range(cfg)
    if option == "soft_linear":  # data-free: set when built, nothing cached
        assert process.levels.tolist() == linear_levels(12, 0.01, 8.0)
    else:
        assert process.levels.numel() == 0
        with pytest.raises(soft.ConfigError, match="no process.blur_levels yet"):
            process.blur_std(torch.ones(1))
    process.fit(data)
    levels = process.levels.tolist()
    assert len(levels) == 12 and levels[0] == 0.01 and levels[-1] == 8.0
    assert levels == sorted(levels)
    files = list((tmp_path / "blur_schedules").glob("*.json"))
    if option == "soft_linear":
        assert not files
        return
    (file,) = files
    saved = soft.load_schedule(file)
    assert saved.levels == levels and saved.data_hash == soft.data_hash(data[:100].double())
    method = option.removeprefix("soft_")
    direct = soft.compute_schedule(method, data[:100].double(), partial(soft.gaussian_blur,
                                   half_size=80), num_levels=12, blur_max=8.0,
                                   num_candidates=64)  # fmt: skip
    assert direct.levels == levels  # the cache holds what the scheduler computes
    # The key is the images' hash: the same digits reuse the file, other images do not.
    edited = soft.load_schedule(file)
    edited.levels[0] = 0.005
    soft.save_schedule(file, edited)
    again = instantiate(cfg.process)
    again.fit(data)
    assert float(again.levels[0]) == 0.005  # read from the (edited) cache file
    other = instantiate(cfg.process)
    other.fit(data.flip(0))
    assert float(other.levels[0]) == 0.01
    assert len(list((tmp_path / "blur_schedules").glob("*.json"))) == 2


def test_the_cli_fits_the_images_a_run_fits_and_writes_a_file_that_the_config_reads(
    tmp_path, capsys, monkeypatch
):
    from diffusion_lab.soft_schedule import main, soft_run_overrides

    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "levels.json"
    overrides = ["data=digits", "data.image_size=16", "process.blur_max=8.0",
                 "process.blur_schedule.num_images=100", "process.blur_schedule.num_candidates=64",
                 "process.blur_schedule.num_levels=10"]  # fmt: skip
    schedule = main(["--no-progress", "--out", str(out), *overrides])
    assert f"process.blur_schedule.file={out}" in capsys.readouterr().out
    cfg = _compose(soft_run_overrides(overrides))
    assert schedule.data_hash == soft.data_hash(_digits_in_model_range(cfg)[:100].double())
    # A run's fit with the same images and settings finds the CLI's cache file.
    (cached,) = (tmp_path / "cache" / "blur_schedules").glob("*.json")
    assert soft.load_schedule(cached).levels == schedule.levels
    cached.write_text(cached.read_text().replace(json.dumps(schedule.levels[0]), "0.005", 1))
    process = instantiate(cfg.process)
    process.fit(_digits_in_model_range(cfg))
    assert process.levels.tolist() == [0.005, *schedule.levels[1:]]  # read, not recomputed
    cfg = _compose(soft_run_overrides([*overrides, f"process.blur_schedule.file={out}",
                                       "process.blur_schedule.num_images=50"]))  # fmt: skip
    process = instantiate(cfg.process)
    process.fit(_digits_in_model_range(cfg))
    assert process.levels.tolist() == schedule.levels  # the file, not the (other) images
    cfg = _compose(
        soft_run_overrides(
            [*overrides, f"process.blur_schedule.file={out}", "process.blur_max=9.0"]
        )
    )
    with pytest.raises(soft.ConfigError, match="blur_max"):
        instantiate(cfg.process).fit(_digits_in_model_range(cfg))


def test_the_cli_refuses_a_process_without_blur_levels(capsys):
    from diffusion_lab.soft_schedule import main

    with pytest.raises(SystemExit) as stop:
        main(["--no-progress", "process=vp"])
    assert stop.value.code == 2 and "process=soft_blur" in capsys.readouterr().err


def test_bad_blur_schedule_settings_stop_with_one_line_naming_the_key():
    for overrides, message in [
        (["process.blur_schedule.method=cosine"], "process.blur_schedule.method must be one of"),
        (["process.blur_schedule.num_levels=1"], "process.blur_schedule.num_levels must be"),
        (["+process.blur_schedule.num_levls=3"], "did you mean process.blur_schedule.num_levels"),
        (["process.blur_schedule.num_candidates=8"], "num_candidates (8) must be at least"),
    ]:
        with pytest.raises(soft.ConfigError, match=re.escape(message)):
            instantiate(_compose(["process=soft_blur", *overrides]).process)
