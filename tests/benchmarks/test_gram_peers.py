"""benchmarks/step_time.py --sections gram-peers: the shape sets follow the model configs, the ROOT variants follow the
hyperparameter table, and each optimizer's probe returns its orthogonalized update (checked against the kernels).

Fast: matrices of a few dozen rows; the optional peers (DeepSpeed, dion) are probed when installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import root_hf.optim.hyperparams as hyperparams
from benchmarks import step_time
from root_hf import get_schedule
from root_hf.optim.newton_schulz import newton_schulz
from root_hf.schedules import DEFAULT_SCHEDULE


def test_shape_sets_hold_the_published_layer_shapes():
    llama = step_time.gram_set_tensors("llama-3.1-8b", 1)
    assert llama["matrices"] == [
        (4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)
    ]  # fmt: skip
    qwen = step_time.gram_set_tensors("qwen3-30b-a3b", 1)
    assert qwen["matrices"] == [(4096, 2048), (512, 2048), (512, 2048), (2048, 4096)]
    assert qwen["experts"] == [(128, 768, 2048), (128, 768, 2048), (128, 2048, 768)]
    assert qwen["router"] == [(128, 2048)]
    sample = step_time.gram_set_tensors("qwen3-30b-a3b", 2, experts=8, distinct=True)
    assert sample["experts"] == [(8, 768, 2048), (8, 2048, 768)] and len(sample["matrices"]) == 3


def test_root_variants_are_the_ns_methods_the_hyperparameter_table_accepts(monkeypatch):
    table = dict(hyperparams.HYPERPARAMS)
    table.pop("ns_method", None)
    monkeypatch.setattr(hyperparams, "HYPERPARAMS", table)
    assert step_time.root_variants() == {"": {}}

    def check(value):
        if value not in ("standard", "gram"):
            raise ValueError(value)
        return value

    fake = dataclasses.replace(table["ns_dtype"], name="ns_method", default="standard", check=check)
    monkeypatch.setattr(hyperparams, "HYPERPARAMS", {**table, "ns_method": fake})
    assert step_time.root_variants() == {
        "ns_method=standard": {"ns_method": "standard"},
        "ns_method=gram": {"ns_method": "gram"},
    }


@pytest.fixture(scope="module")
def candidates():
    """ROOT and torch.optim.Muon only (the optional peers' imports take seconds: the slow test probes them)."""
    peers, _ = step_time.load_gram_peers((step_time.TORCH_MUON,))
    return step_time._gram_candidates(peers, ("bf16", "fp32"))


@pytest.fixture(scope="module")
def all_candidates():
    peers, _ = step_time.load_gram_peers()
    return step_time._gram_candidates(peers, ("bf16", "fp32"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 24, 40)])
def test_every_probe_returns_an_orthogonalized_update_and_counts_its_flops(all_candidates, shape):
    candidates = all_candidates
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    probed = [name for name, spec in candidates.items() if spec.get("probe") is not None]
    assert "torch.optim.Muon" in probed and any(n.startswith("ROOT") for n in probed)
    for name in probed:
        out, flops = step_time.orthogonalization_probe(candidates[name], shape, g, "cpu")
        err = (out - polar).flatten(-2).norm(dim=-1) / polar.flatten(-2).norm(dim=-1)
        # Muon-style quintic iterations leave singular values in about [0.7, 1.2]: errors of 0.1-0.3, never ~1
        assert out.shape == shape and bool((err < 0.35).all()), (name, err)
        assert flops > 0, name


def test_root_probe_is_roots_newton_schulz_of_the_normalized_gradient(candidates):
    # 16 x 128: a shape of the shipped schedule table (an off-table shape would fit its schedule first: seconds)
    g = torch.randn(16, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # ROOT as it is, or its standard form once ROOT has the ns_method option
    name = next(n for n in candidates if n.startswith("ROOT") and "fp32" in n and "gram" not in n and "auto" not in n)
    out, _ = step_time.orthogonalization_probe(candidates[name], (16, 128), g, "cpu")
    x = (g / g.norm()).float()
    expected = newton_schulz(x, get_schedule(DEFAULT_SCHEDULE, (16, 128), 5)).double()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_torch_muon_probe_is_its_own_newton_schulz(candidates):
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, _ = step_time.orthogonalization_probe(candidates["torch.optim.Muon"], (40, 24), g, "cpu")
    expected = _zeropower_via_newtonschulz(g.float(), (3.4445, -4.7750, 2.0315), 5, 1e-7).double()
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)
