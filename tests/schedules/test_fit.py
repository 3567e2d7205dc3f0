"""Properties of the adaptive fitter (root_hf/schedules/fit.py): safety, determinism, accuracy, no side effects."""

import math

import pytest
import torch

from root_hf import orthogonalize, schedules
from root_hf.schedules import fit, get_schedule, named, schedule_source
from root_hf.schedules.named import ADAPTIVE_BAND, MUON_COEFFICIENTS, ROOT_PAPER_TABLE, composed_polynomial
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


def _dense_range(schedule):
    x = torch.linspace(0.0, 1.0, 65537, dtype=torch.float64)
    y64 = composed_polynomial(schedule, x)
    y16 = named.simulate_bf16(schedule, x)
    return min(float(y64.min()), float(y16.min())), max(float(y64.max()), float(y16.max()))


@pytest.mark.parametrize("rho", [named.CUSHION, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_minimax_quintic_equioscillates_and_maps_unit_interval_into_one_plus_error(rho):
    (a, b, c), err = named.minimax_quintic(rho)
    x = torch.linspace(rho, 1.0, 100_001, dtype=torch.float64)
    q = x * (a + x * x * (b + c * x * x))
    assert float((q - 1).abs().max()) == pytest.approx(err, rel=1e-6, abs=1e-12)
    assert rho * (a + rho**2 * (b + c * rho**2)) == pytest.approx(1 - err, abs=1e-9)
    assert a + b + c == pytest.approx(1 + err, abs=1e-9)
    low = torch.linspace(0.0, rho, 10_001, dtype=torch.float64)
    assert bool((torch.diff(low * (a + low * low * (b + c * low * low))) > 0).all())  # increasing on [0, rho]


def test_polar_express_derivation_reproduces_the_published_first_step():
    a, b, c = named.polar_express_schedule(1)[0]
    s = named.POLAR_EXPRESS_SAFETY
    unscaled = (a * s, b * s**3, c * s**5)
    for ours, published in zip(unscaled, PUBLISHED_POLAR_EXPRESS_STEP_1, strict=True):
        assert ours == pytest.approx(published, rel=1e-9)


_BAND_CASES = [(shape, 5) for shape in ODD_SHAPES] + [
    pytest.param(shape, k, marks=pytest.mark.slow)
    for shape, k in [(s, 1) for s in ODD_SHAPES]
    + [((576, 1536), 5), ((2048, 2048), 5), ((16, 4096), 1)]
    + [((96, 400), k) for k in (2, 3, 4, 8)]
]


@pytest.mark.parametrize(("shape", "ns_steps"), _BAND_CASES)
def test_fitted_schedule_stays_in_band_in_float64_and_bf16(shape, ns_steps):
    result = fit.fit_schedule(shape, ns_steps)
    assert result.source == "fit"
    lo, hi = _dense_range(result.schedule)
    assert ADAPTIVE_BAND[0] <= lo and hi <= ADAPTIVE_BAND[1]


def test_any_choice_of_fit_intervals_is_safe_by_construction():
    """The band holds for every level vector whose last step is admissible, not only for the fitted ones."""
    _, _, errs = fit._rho_grid()
    gen = torch.Generator().manual_seed(0)
    admissible = [i for i in range(len(errs)) if (1 + float(errs[i])) * (1 + fit.ROUNDING_MARGIN) <= 1.2]
    for _ in range(40):
        steps = int(torch.randint(1, 8, (1,), generator=gen))
        levels = torch.randint(0, len(errs), (steps,), generator=gen).tolist()
        levels[-1] = admissible[int(torch.randint(0, len(admissible), (1,), generator=gen))]
        schedule, _ = fit.schedule_from_levels(levels)
        lo, hi = _dense_range(schedule)
        assert 0.0 <= lo and hi <= ADAPTIVE_BAND[1], levels


def test_check_refuses_an_unsafe_schedule():
    unsafe = (ROOT_PAPER_TABLE[(2048, 2048)],) * 5  # maps x ~ 0.56 to about 3.3 (SPEC section 2)
    check = named.check_schedule(unsafe)
    assert not check.ok and check.max_float64 > 3.0


def test_failed_fit_falls_back_to_a_safe_schedule(monkeypatch):
    def never_ok(schedule, band=ADAPTIVE_BAND):
        return named.ScheduleCheck(0.0, 9.0, 0.0, 9.0, band)

    monkeypatch.setattr(fit, "check_schedule", never_ok)
    result = fit._fallback((64, 64), 5, {})
    assert result.source == "fallback:muon" and result.schedule == (MUON_COEFFICIENTS,) * 5


def test_fit_is_deterministic():
    first = fit.fit_schedule((37, 1001), 5)
    fit._spectrum_families.cache_clear()
    second = fit.fit_schedule((1001, 37), 5)
    assert first.schedule == second.schedule and first.levels == second.levels


def test_fit_handles_zero_steps():
    assert fit.fit_schedule((8, 8), 0).schedule == ()


@pytest.mark.parametrize("shape", [(2048, 2048), (64, 256), (16, 4096), (1, 3), (8192, 28672)])
def test_spectrum_families_are_normalized_singular_values(shape):
    m = min(shape)
    for name, (x, w) in fit.spectrum_families(shape).items():
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12), name
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, name
        assert float(m * (w * x * x).sum()) == pytest.approx(1.0, rel=1e-9), name  # ||X_0||_F = 1


def test_large_low_rank_factors_drawn_directly_follow_the_sampled_distribution(monkeypatch):
    """Bartlett's triangular factors (large shapes) give the spectrum that sampling and QR give (small budget)."""
    m, n, rank = 2048, 8192, 32
    sampled = fit._low_rank_singular_values(m, n, rank)
    monkeypatch.setattr(fit, "_LOW_RANK_BUDGET", 0)
    drawn = fit._low_rank_singular_values(m, n, rank)
    assert len(drawn) == len(sampled) == rank
    assert float((drawn - sampled).abs().mean()) < 0.05  # both have mean square 1; spread about +-0.25
    monkeypatch.setattr(fit, "_LOW_RANK_SOLVE", 16)
    reduced = fit._low_rank_singular_values(m, n, rank)  # 16 values of the same aspect ratios represent 32
    assert len(reduced) == 16
    assert float(reduced.min()) > 0.5 and float(reduced.max()) < 1.5


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
    ours = fit.fit_schedule(shape, 5).schedule
    muon = (MUON_COEFFICIENTS,) * 5
    polar = named.polar_express_schedule(5)
    for G in (gaussian, low_rank):
        err = _polar_error(G, ours)
        assert err < _polar_error(G, muon) and err < _polar_error(G, polar)


def test_predicted_error_matches_orthogonalizing_a_sampled_matrix():
    s_power = 1.0 / torch.arange(1, 97, dtype=torch.float64)
    G = matrix_with_singular_values(96, 400, s_power)
    schedule = fit.fit_schedule((96, 400), 5).schedule
    predicted = fit.schedule_errors(schedule, (96, 400))["power-1"]
    assert _polar_error(G, schedule) == pytest.approx(predicted, abs=1e-9)  # same spectrum: exact up to rounding


def test_simulated_bf16_rounds_every_product_and_stays_near_float64_for_a_converged_schedule():
    schedule = get_schedule("adaptive", (576, 1536), 5)
    x = torch.linspace(0.05, 1.0, 2001, dtype=torch.float64)
    y16 = named.simulate_bf16(schedule, x)
    assert torch.equal(y16, y16.to(torch.bfloat16).to(torch.float64))
    diff = (y16 - composed_polynomial(schedule, x)).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.1  # bf16 has 8 significant bits


# ---------------------------------------------------------------------------------------------------------------------
# No side effects
# ---------------------------------------------------------------------------------------------------------------------


def _files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_get_schedule_writes_no_files_and_keeps_thread_count(tmp_path, monkeypatch):
    """Resolving an off-table shape fits it in memory: no file anywhere, no process-wide setting touched."""
    for var in ("HOME", "XDG_CACHE_HOME", "ROOT_HF_CACHE", "TMPDIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)  # the fixture's 1 would hide a set-to-1-then-restore implementation

    def forbidden(*args, **kwargs):
        raise AssertionError("the fit changed torch's process-wide thread count")

    monkeypatch.setattr(torch, "set_num_threads", forbidden)
    rng_state = torch.get_rng_state()
    before = _files_under(tmp_path)
    shape = (37, 91)
    monkeypatch.setattr(schedules, "_CACHE", {})  # a fresh cache: this call must fit
    assert schedule_source(shape, 5) == "fit"
    schedule = get_schedule("adaptive", shape, 5)
    assert len(schedule) == 5 and schedule_source(shape, 5) == "memory"
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng_state)  # local generators only
    assert _files_under(tmp_path) == before == sorted(["HOME", "XDG_CACHE_HOME", "ROOT_HF_CACHE", "TMPDIR"])


# ---------------------------------------------------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, math.nan, "0.5"])
def test_minimax_quintic_rejects_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match=r"Invalid rho: .*Must be a float in \(0, 1\]"):
        named.minimax_quintic(rho)


@pytest.mark.parametrize("steps", [-1, 2.5, True, "5"])
def test_fit_and_resolution_reject_invalid_step_counts(steps):
    for fn in (fit.fit_schedule, lambda shape, k: get_schedule("adaptive", shape, k)):
        with pytest.raises(ValueError, match=r"Invalid ns_steps: .*Must be an integer >= 0"):
            fn((8, 8), steps)


@pytest.mark.parametrize("shape", [(0, 5), (5,), ()])
def test_fit_rejects_invalid_shapes(shape):
    with pytest.raises(ValueError, match=r"Invalid shape"):
        fit.fit_schedule(shape, 5)


def test_polar_express_rejects_invalid_lower_edge():
    with pytest.raises(ValueError, match=r"Invalid lower: 0.0\. Must be a float in \(0, 1\)"):
        named.polar_express_schedule(5, lower=0.0)
