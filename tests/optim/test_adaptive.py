"""Properties of the shape-adaptive schedules (root_hf/optim/adaptive.py): safety, determinism, accuracy, caches."""

import json
import math
import threading

import pytest
import torch

from root_hf import orthogonalize
from root_hf.optim import adaptive
from root_hf.optim.coefficients import ADAPTIVE_BAND, MUON_COEFFICIENTS, ROOT_PAPER_TABLE, composed_polynomial
from tests.utils import matrix_with_singular_values

# Polar Express's first published step, before the safety factor (Amsel et al. 2025, arXiv 2505.16932, the
# coefficient list released with the paper): our derivation of their method must reproduce it.
PUBLISHED_POLAR_EXPRESS_STEP_1 = (8.28721201814563, -23.595886519098837, 17.300387312530933)

# Shapes off the shipped table: odd sizes, vectors, tiny and very rectangular matrices.
ODD_SHAPES = [(1, 1), (1, 5000), (3, 3), (7, 13), (64, 64), (37, 1001), (300, 301), (4096, 9)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one intra-op thread keeps them fast, also on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty on-disk cache and an empty memory cache, for the duration of a test."""
    monkeypatch.setenv("ROOT_HF_CACHE", str(tmp_path))
    adaptive.clear_memory_cache()
    yield tmp_path / "ns_schedules"
    adaptive.clear_memory_cache()


def _dense_range(schedule):
    x = torch.linspace(0.0, 1.0, 65537, dtype=torch.float64)
    y64 = composed_polynomial(schedule, x)
    y16 = adaptive.simulate_bf16(schedule, x)
    return min(float(y64.min()), float(y16.min())), max(float(y64.max()), float(y16.max()))


@pytest.mark.parametrize("rho", [adaptive.CUSHION, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_minimax_quintic_equioscillates_and_maps_unit_interval_into_one_plus_error(rho):
    (a, b, c), err = adaptive.minimax_quintic(rho)
    x = torch.linspace(rho, 1.0, 100_001, dtype=torch.float64)
    q = x * (a + x * x * (b + c * x * x))
    assert float((q - 1).abs().max()) == pytest.approx(err, rel=1e-6, abs=1e-12)
    assert rho * (a + rho**2 * (b + c * rho**2)) == pytest.approx(1 - err, abs=1e-9)
    assert a + b + c == pytest.approx(1 + err, abs=1e-9)
    low = torch.linspace(0.0, rho, 10_001, dtype=torch.float64)
    assert bool((torch.diff(low * (a + low * low * (b + c * low * low))) > 0).all())  # increasing on [0, rho]


def test_polar_express_derivation_reproduces_the_published_first_step():
    a, b, c = adaptive.polar_express_schedule(1)[0]
    s = adaptive.POLAR_EXPRESS_SAFETY
    unscaled = (a * s, b * s**3, c * s**5)
    for ours, published in zip(unscaled, PUBLISHED_POLAR_EXPRESS_STEP_1, strict=True):
        assert ours == pytest.approx(published, rel=1e-9)


@pytest.mark.parametrize(
    ("shape", "ns_steps"),
    [(shape, k) for shape in [*ODD_SHAPES, (576, 1536), (2048, 2048), (16, 4096)] for k in (1, 5)]
    + [((96, 400), k) for k in (2, 3, 4, 8)],
)
def test_fitted_schedule_stays_in_band_in_float64_and_bf16(shape, ns_steps):
    result = adaptive.fit_schedule(shape, ns_steps)
    assert result.source == "fit"
    lo, hi = _dense_range(result.schedule)
    assert ADAPTIVE_BAND[0] <= lo and hi <= ADAPTIVE_BAND[1]


def test_any_choice_of_fit_intervals_is_safe_by_construction():
    """The band holds for every level vector whose last step is admissible, not only for the fitted ones."""
    _, _, errs = adaptive._rho_grid()
    gen = torch.Generator().manual_seed(0)
    admissible = [i for i in range(len(errs)) if (1 + float(errs[i])) * (1 + adaptive.ROUNDING_MARGIN) <= 1.2]
    for _ in range(40):
        steps = int(torch.randint(1, 8, (1,), generator=gen))
        levels = torch.randint(0, len(errs), (steps,), generator=gen).tolist()
        levels[-1] = admissible[int(torch.randint(0, len(admissible), (1,), generator=gen))]
        schedule, _ = adaptive._schedule_from_levels(levels)
        lo, hi = _dense_range(schedule)
        assert 0.0 <= lo and hi <= ADAPTIVE_BAND[1], levels


def test_check_refuses_an_unsafe_schedule():
    unsafe = (ROOT_PAPER_TABLE[(2048, 2048)],) * 5  # maps x ~ 0.56 to about 3.3 (SPEC section 2)
    check = adaptive.check_schedule(unsafe)
    assert not check.ok and check.max_float64 > 3.0


def test_failed_fit_falls_back_to_a_safe_schedule(monkeypatch):
    def never_ok(schedule, band=ADAPTIVE_BAND):
        return adaptive.ScheduleCheck(0.0, 9.0, 0.0, 9.0, band)

    monkeypatch.setattr(adaptive, "check_schedule", never_ok)
    result = adaptive._fallback((64, 64), 5, {})
    assert result.source == "fallback:muon" and result.schedule == (MUON_COEFFICIENTS,) * 5


def test_fit_is_deterministic():
    first = adaptive.fit_schedule((37, 1001), 5)
    adaptive._spectrum_families.cache_clear()
    second = adaptive.fit_schedule((1001, 37), 5)
    assert first.schedule == second.schedule and first.levels == second.levels


def test_fit_handles_zero_steps():
    assert adaptive.fit_schedule((8, 8), 0).schedule == ()


@pytest.mark.parametrize("shape", [(2048, 2048), (64, 256), (16, 4096), (1, 3)])
def test_spectrum_families_are_normalized_singular_values(shape):
    m = min(shape)
    for name, (x, w) in adaptive.spectrum_families(shape).items():
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12), name
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, name
        assert float(m * (w * x * x).sum()) == pytest.approx(1.0, rel=1e-9), name  # ||X_0||_F = 1


def _polar_error(G, schedule):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = orthogonalize(G, ns_coefficients=schedule, ns_steps=len(schedule), ns_dtype="float64")
    return float((X - U @ Vh).norm() / (U @ Vh).norm())


@pytest.mark.parametrize("shape", [(64, 256), (16, 1024), (256, 48), (8, 64)])
def test_adaptive_beats_muon_and_polar_express_on_sampled_gaussian_and_low_rank_matrices(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(7)
    gaussian = torch.randn(m, n, generator=gen, dtype=torch.float64)
    factors = [torch.randn(size, 2, generator=gen, dtype=torch.float64) for size in (m, n)]
    low_rank = factors[0] @ factors[1].T
    low_rank = 3 * low_rank / low_rank.norm() + gaussian / gaussian.norm()
    ours = adaptive.fit_schedule(shape, 5).schedule
    muon = (MUON_COEFFICIENTS,) * 5
    polar = adaptive.polar_express_schedule(5)
    for G in (gaussian, low_rank):
        err = _polar_error(G, ours)
        assert err < _polar_error(G, muon) and err < _polar_error(G, polar)


def test_predicted_error_matches_orthogonalizing_a_sampled_matrix():
    s_power = 1.0 / torch.arange(1, 97, dtype=torch.float64)
    G = matrix_with_singular_values(96, 400, s_power)
    schedule = adaptive.fit_schedule((96, 400), 5).schedule
    predicted = adaptive.schedule_errors(schedule, (96, 400))["power-1"]
    assert _polar_error(G, schedule) == pytest.approx(predicted, abs=1e-9)  # same spectrum: exact up to rounding


def test_simulated_bf16_rounds_every_product_and_stays_near_float64_for_a_converged_schedule():
    schedule = adaptive.fit_schedule((576, 1536), 5).schedule
    x = torch.linspace(0.05, 1.0, 2001, dtype=torch.float64)
    y16 = adaptive.simulate_bf16(schedule, x)
    assert torch.equal(y16, y16.to(torch.bfloat16).to(torch.float64))
    diff = (y16 - composed_polynomial(schedule, x)).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.1  # bf16 has 8 significant bits


# ---------------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------------


def _refuse_fit(*args, **kwargs):
    raise AssertionError("fit_schedule was called")


def test_first_resolution_fits_and_writes_disk_cache_then_memory_cache_hits(cache, monkeypatch):
    assert adaptive.schedule_source((37, 1001), 5) == "fit"
    schedule = adaptive.adaptive_schedule((37, 1001), 5)
    files = list(cache.glob("*.json"))
    assert [f.name for f in files] == [f"adaptive-v{adaptive.FITTER_VERSION}-37x1001-k5.json"]
    assert not list(cache.glob(".tmp-*"))  # the atomic write left no temporary file
    monkeypatch.setattr(adaptive, "fit_schedule", _refuse_fit)
    assert adaptive.adaptive_schedule((1001, 37), 5) is schedule  # memory cache, either orientation


def test_disk_cache_hit_skips_the_fit(cache, monkeypatch):
    schedule = adaptive.adaptive_schedule((37, 1001), 5)
    adaptive.clear_memory_cache()
    monkeypatch.setattr(adaptive, "fit_schedule", _refuse_fit)
    assert adaptive.schedule_source((37, 1001), 5) == "disk cache"
    assert adaptive.adaptive_schedule((37, 1001), 5) == schedule


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"version": 1, "shape": [37, 1001], "ns_steps": 5, "schedule": [[3.4916, -4.8224, 2.1095]] * 5}),
        json.dumps({"version": 1, "shape": [37, 1001], "ns_steps": 5, "schedule": [[1.0, 0.0, 0.0]] * 4}),
        json.dumps({"version": 1, "shape": [37, 1001], "ns_steps": 5, "schedule": [["nan", 0, 0]] * 5}),
    ],
    ids=["corrupt", "unsafe", "wrong-length", "nan"],
)
def test_corrupt_or_unsafe_cache_file_is_ignored_and_replaced(cache, content):
    cache.mkdir(parents=True)
    path = cache / f"adaptive-v{adaptive.FITTER_VERSION}-37x1001-k5.json"
    path.write_text(content)
    schedule = adaptive.adaptive_schedule((37, 1001), 5)
    assert adaptive.check_schedule(schedule).ok
    assert json.loads(path.read_text())["schedule"] == [list(step) for step in schedule]


def test_cache_can_be_turned_off_and_is_never_required(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOT_HF_CACHE", "")
    adaptive.clear_memory_cache()
    assert adaptive.cache_dir() is None
    assert len(adaptive.adaptive_schedule((37, 1001), 5)) == 5
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ROOT_HF_CACHE", str(blocker))  # ns_schedules cannot be created under a file
    adaptive.clear_memory_cache()
    assert len(adaptive.adaptive_schedule((37, 1001), 5)) == 5
    adaptive.clear_memory_cache()


def test_cache_dir_follows_root_hf_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOT_HF_CACHE", str(tmp_path / "mine"))
    assert adaptive.cache_dir() == tmp_path / "mine" / "ns_schedules"
    monkeypatch.delenv("ROOT_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert adaptive.cache_dir() == tmp_path / "xdg" / "root_hf" / "ns_schedules"


def test_concurrent_writers_leave_one_complete_file(cache):
    result = adaptive.fit_schedule((37, 1001), 5)
    threads = [threading.Thread(target=adaptive._write_cache, args=(result,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in cache.iterdir()] == [f"adaptive-v{adaptive.FITTER_VERSION}-37x1001-k5.json"]
    assert adaptive._read_cache((37, 1001), 5) == result.schedule


# ---------------------------------------------------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, math.nan, "0.5"])
def test_minimax_quintic_rejects_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match=r"Invalid rho: .*Must be a float in \(0, 1\]"):
        adaptive.minimax_quintic(rho)


@pytest.mark.parametrize("steps", [-1, 2.5, True, "5"])
def test_fit_and_resolution_reject_invalid_step_counts(steps):
    for fn in (adaptive.fit_schedule, adaptive.adaptive_schedule):
        with pytest.raises(ValueError, match=r"Invalid ns_steps: .*Must be an integer >= 0"):
            fn((8, 8), steps)


@pytest.mark.parametrize("shape", [(0, 5), (5,), ()])
def test_fit_rejects_invalid_shapes(shape):
    with pytest.raises(ValueError, match=r"Invalid shape"):
        adaptive.fit_schedule(shape, 5)


def test_polar_express_rejects_invalid_lower_edge():
    with pytest.raises(ValueError, match=r"Invalid lower: 0.0\. Must be a float in \(0, 1\)"):
        adaptive.polar_express_schedule(5, lower=0.0)
