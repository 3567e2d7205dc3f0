"""Named schedules, the safety band and resolution by get_schedule (root_hf/schedules/__init__.py and named.py)."""

import warnings

import pytest
import torch

from root_hf import schedules
from root_hf.schedules import (
    ADAPTIVE_BAND,
    DEFAULT_SCHEDULE,
    MUON_COEFFICIENTS,
    ROOT_PAPER_TABLE,
    SAFE_BAND,
    SCHEDULE_NAMES,
    check_schedule_safe,
    composed_polynomial,
    get_schedule,
    normalize_schedule_spec,
    schedule_band,
    shape_key,
    simulate_bf16,
)

SHAPES = [(2048, 2048), (2048, 3072), (2048, 8192), (16384, 2048), (576, 1536), (16, 4096), (4096, 16), (8, 576)]
# The band each named schedule guarantees. "root-paper" has none: its (2048, 2048) triple is unsafe (SPEC section 2)
# and it is kept only to reproduce the paper.
BANDS = {"adaptive": ADAPTIVE_BAND, "polar-express": ADAPTIVE_BAND, "muon": SAFE_BAND, "root-paper-safe": SAFE_BAND}
# Names root_hf.optim.coefficients exported before the schedules package: they stay importable from it.
FORMER_NAMES = [
    "ADAPTIVE_BAND",
    "DEFAULT_SCHEDULE",
    "MUON_COEFFICIENTS",
    "ROOT_PAPER_TABLE",
    "SAFE_BAND",
    "SCHEDULE_NAMES",
    "Coefficients",
    "Schedule",
    "ScheduleSpec",
    "composed_polynomial",
    "get_schedule",
    "normalize_schedule_spec",
    "schedule_band",
    "shape_key",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one intra-op thread keeps them fast, also on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_schedule_is_the_adaptive_one():
    assert DEFAULT_SCHEDULE == "adaptive"
    assert set(SCHEDULE_NAMES) == {"adaptive", "polar-express", "muon", "root-paper", "root-paper-safe"}


@pytest.mark.parametrize("name", FORMER_NAMES)
def test_former_coefficients_names_are_exported_by_the_package(name):
    assert name in schedules.__all__ and hasattr(schedules, name)


@pytest.mark.parametrize("name", sorted(BANDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shipped_schedule_stays_in_its_band_in_float64_and_bf16(name, shape):
    schedule = get_schedule(name, shape, 5)
    lo, hi = BANDS[name]
    x = torch.linspace(0.0, 1.0, 65537, dtype=torch.float64)
    for y in (composed_polynomial(schedule, x), simulate_bf16(schedule, x)):
        assert lo <= float(y.min()) and float(y.max()) <= hi


def test_root_paper_square_triple_is_unsafe_warned_about_and_replaced_in_the_safe_variant():
    schedules.clear_cache()
    with pytest.warns(UserWarning, match=r"outside the safe band \[0\.0, 1\.21\]"):
        unsafe = get_schedule("root-paper", (2048, 2048), 5)
    assert schedule_band(unsafe)[1] > 3.0
    assert get_schedule("root-paper-safe", (2048, 2048), 5) == (MUON_COEFFICIENTS,) * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_schedule("root-paper", (8192, 2048), 5) == (ROOT_PAPER_TABLE[(2048, 8192)],) * 5


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("ns_steps", [0, 1, 5, 9])
def test_every_named_schedule_has_one_finite_triple_per_step(name, ns_steps):
    schedule = get_schedule(name, (37, 1001), ns_steps)
    assert len(schedule) == ns_steps
    assert all(len(step) == 3 and all(isinstance(v, float) and v == v for v in step) for step in schedule)


def test_adaptive_schedule_depends_on_shape_but_not_orientation():
    wide, tall = get_schedule("adaptive", (16, 4096), 5), get_schedule("adaptive", (4096, 16), 5)
    assert wide == tall
    assert wide != get_schedule("adaptive", (2048, 2048), 5)
    assert get_schedule("adaptive", (64, 4, 4), 5) == get_schedule("adaptive", (16, 64), 5)  # conv kernel (64, 16)


def test_zero_size_matrix_gets_a_safe_schedule_without_a_fit(monkeypatch):
    monkeypatch.setattr(schedules, "fit_schedule", _refuse_fit)
    assert get_schedule("adaptive", (0, 16), 5) == schedules.polar_express_schedule(5)


def _refuse_fit(*args, **kwargs):
    raise AssertionError("fitted again")


def test_resolution_after_the_first_call_is_a_cache_hit(monkeypatch):
    first = get_schedule("adaptive", (41, 999), 5)
    monkeypatch.setattr(schedules, "fit_schedule", _refuse_fit)
    assert get_schedule("adaptive", (999, 41), 5) is first
    assert schedules.schedule_source((41, 999), 5) == "memory"
    schedules.clear_cache()
    assert schedules.schedule_source((41, 999), 5) == "fit"


def test_explicit_schedules_remain_selectable():
    triple = (2.0, -1.5, 0.5)
    assert get_schedule(triple, (8, 8), 3) == (triple,) * 3
    steps = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert get_schedule(steps, (8, 8), 2) == tuple(steps)
    assert get_schedule(MUON_COEFFICIENTS, (8, 8), 5) == (MUON_COEFFICIENTS,) * 5  # Muon peaks at 1.2024 < 1.21
    assert normalize_schedule_spec("polar-express") == "polar-express"


@pytest.mark.parametrize(
    ("spec", "ns_steps", "reached"),
    [
        ((100.0, -200.0, 100.0), 5, "overflows"),  # issue 12: non-finite weights without a word
        ((3.0, -3.2, 1.2), 3, r"maps \[0, 1\] to \[0, 1\.2105\]"),  # peaks at 1.2105, just above the band
        ([ROOT_PAPER_TABLE[(2048, 2048)]] * 5, 5, r"maps \[0, 1\] to \[0, 3\.\d+\]"),
        ((1.0, -3.0, 0.0), 1, r"to \[-2, 0\.\d+\]"),  # negative output: a singular value changes sign
    ],
)
def test_explicit_coefficients_outside_the_safe_band_are_refused_with_the_band(spec, ns_steps, reached):
    band = r"safe band \[0\.0, 1\.21\]"
    with pytest.raises(ValueError, match=rf"Invalid ns_coefficients: .* unsafe: .*{reached}.*{band}"):
        get_schedule(spec, (8, 8), ns_steps)


def test_check_schedule_safe_accepts_muon_and_takes_a_band():
    check_schedule_safe((MUON_COEFFICIENTS,) * 5)
    with pytest.raises(ValueError, match=r"safe band \[0\.0, 1\.2\]"):
        check_schedule_safe((MUON_COEFFICIENTS,) * 5, band=ADAPTIVE_BAND)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("polar", r"Invalid ns_coefficients: 'polar'\. Must be one of \('adaptive', 'polar-express'"),
        ((1.0, 2.0), r"Invalid Newton-Schulz coefficients: \(1\.0, 2\.0\)"),
        ([], r"Invalid ns_coefficients: \[\]"),
        ([(1.0, 0.0, float("inf"))], r"Must be three finite floats"),
        (["abc"], r"Invalid ns_coefficients: \['abc'\]"),
        (3.0, r"Invalid ns_coefficients: 3\.0"),
    ],
)
def test_invalid_specs_are_rejected_with_the_accepted_values(spec, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(spec, (8, 8), 1)


def test_invalid_step_count_and_shape_are_rejected():
    with pytest.raises(ValueError, match=r"Invalid ns_steps: -1\. Must be an integer >= 0"):
        get_schedule("adaptive", (8, 8), -1)
    with pytest.raises(ValueError, match=r"Invalid ns_coefficients: a per-step list of 2 triples"):
        get_schedule([(3.0, -3.2, 1.2)] * 2, (8, 8), 5)
    with pytest.raises(ValueError, match=r"Invalid shape: \(8,\)"):
        shape_key((8,))
