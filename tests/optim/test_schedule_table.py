"""Properties of the shipped adaptive schedules (root_hf/optim/schedule_table.py)."""

import pytest
import torch

from root_hf.coefficients import LORA_RANKS, MODEL_DIMS, layer_shapes, table_shapes
from root_hf.optim import adaptive
from root_hf.optim.coefficients import ADAPTIVE_BAND, composed_polynomial, shape_key
from root_hf.optim.schedule_table import TABLE_FITTER_VERSION, TABLE_LEVELS, TABLE_NS_STEPS


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one intra-op thread keeps them fast, also on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_table_was_generated_by_the_current_fitter_for_five_steps():
    assert TABLE_FITTER_VERSION == adaptive.FITTER_VERSION
    assert TABLE_NS_STEPS == 5


def test_table_covers_model_layers_fused_projections_and_lora_factors():
    assert set(TABLE_LEVELS) == set(table_shapes())
    hidden, intermediate, heads, kv_heads, head_dim = MODEL_DIMS["SmolLM2-135M"]
    for name, shape in layer_shapes(hidden, intermediate, heads, kv_heads, head_dim).items():
        assert shape_key(shape) in TABLE_LEVELS, name
        for r in LORA_RANKS:
            assert shape_key((r, shape[1])) in TABLE_LEVELS and shape_key((shape[0], r)) in TABLE_LEVELS
    for key in [(576, 1536), (2048, 8192), (4096, 11008), (4096, 14336), (896, 1152), (16, 4096), (64, 3584)]:
        assert key in TABLE_LEVELS, key


def test_every_shipped_schedule_stays_in_band_in_float64_and_bf16():
    x = torch.linspace(0.0, 1.0, 65537, dtype=torch.float64)
    for key in TABLE_LEVELS:
        schedule = adaptive.table_schedule(key, 5)
        assert schedule is not None and len(schedule) == 5
        for y in (composed_polynomial(schedule, x), adaptive.simulate_bf16(schedule, x)):
            assert ADAPTIVE_BAND[0] <= float(y.min()) and float(y.max()) <= ADAPTIVE_BAND[1], key


@pytest.mark.parametrize("key", [(576, 1536), (16, 4096), (2048, 8192), (4, 14336)])
def test_shipped_entry_equals_a_fresh_fit(key):
    assert adaptive.fit_schedule(key, 5).levels == TABLE_LEVELS[key]


def test_table_shapes_resolve_without_fitting(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fitted a shape that ships in the table")

    monkeypatch.setattr(adaptive, "fit_schedule", refuse)
    adaptive.clear_memory_cache()
    assert adaptive.adaptive_schedule((1536, 576), 5) == adaptive.table_schedule((576, 1536), 5)
    assert adaptive.schedule_source((576, 1536), 5) == "table"
    assert adaptive.table_schedule((576, 1536), 3) is None  # the table is for 5 steps only
