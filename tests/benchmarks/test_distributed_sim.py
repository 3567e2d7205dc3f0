"""benchmarks/distributed_sim.py: the model of ROOT's owner split at 64 GPUs is consistent (pure arithmetic, fast)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from benchmarks import distributed_sim as sim

A = sim.Assumptions()


@pytest.fixture(scope="module")
def rows_8b() -> dict[tuple[str, str], dict[str, object]]:
    rows, groups = sim.simulate(sim.LLAMA_8B, A)
    return {(r["layout"], r["design"]): r for r in rows + groups}


@pytest.mark.parametrize("model", [sim.LLAMA_8B, sim.LLAMA_70B], ids=lambda m: m.name)
def test_parameter_count_matches_the_published_size(model):
    assert abs(model.params() / model.published_params - 1) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("model", [sim.LLAMA_8B, sim.LLAMA_70B], ids=lambda m: m.name)
def test_simulated_matrices_are_what_root_hf_routes_to_root_in_the_transformers_model(model):
    transformers = pytest.importorskip("transformers")
    from root_hf.integrations.routing import route_parameters

    config = transformers.LlamaConfig(
        hidden_size=model.hidden, intermediate_size=model.intermediate, num_hidden_layers=model.layers,
        num_attention_heads=model.heads, num_key_value_heads=model.kv_heads, head_dim=model.head_dim,
        vocab_size=model.vocab, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):  # shapes only, no memory
        llama = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in llama.parameters()) == model.params()
    shapes = dict(llama.named_parameters())
    routed = [r.name for r in route_parameters(llama).params if r.branch == "root"]
    plan = config.base_model_tp_plan
    found = [
        (f"layers.{name.split('.')[2]}.{name.split('.')[-2]}", *shapes[name].shape,
         plan[f"layers.*.{'.'.join(name.split('.')[3:-1])}"])
        for name in routed
    ]  # fmt: skip
    assert found == model.matrices()


def test_owner_split_moves_fewer_bytes_and_takes_less_time_than_gather_everywhere(rows_8b):
    for layout in ("HSDP 8 x 8", "FSDP 8 x TP 8"):
        owner, everywhere = rows_8b[(layout, "owner split")], rows_8b[(layout, "gather everywhere")]
        for side in ("sent", "recv"):
            moved = [r[f"nv_{side}_total"] + r[f"net_{side}_total"] for r in (owner, everywhere)]
            assert moved[0] < moved[1] / 4
        for form in ("std", "gram", "auto"):
            assert owner[f"total_{form}_s"] < everywhere[f"total_{form}_s"] / 4
            assert owner[f"flops_{form}_max"] < everywhere[f"flops_{form}_max"] / 32


def test_busiest_rank_does_at_least_the_mean_and_exactly_it_when_every_rank_computes_everything(rows_8b):
    for (_, design), r in rows_8b.items():
        for form in ("std", "gram", "auto"):
            assert r[f"busiest_over_mean_{form}"] >= 1 - 1e-12
            if design == "gather everywhere":
                assert r[f"busiest_over_mean_{form}"] == pytest.approx(1.0)


def test_flop_totals_equal_the_sum_over_matrices_times_the_copies_computed(rows_8b):
    costs = sim.ns_costs(sim.LLAMA_8B.matrices(), A)
    copies = {
        ("HSDP 8 x 8", "owner split"): 1,
        ("HSDP 8 x 8", "owner split within each node (replicas repeat)"): A.nodes,
        ("HSDP 8 x 8", "replica groups of 2"): A.nodes // 2,
        ("HSDP 8 x 8", "gather everywhere"): A.gpus,
        ("FSDP 8 x TP 8", "owner split"): 1,
        ("FSDP 8 x TP 8", "gather everywhere"): A.gpus,
    }
    for key, n in copies.items():
        for form, cost in costs.items():
            assert rows_8b[key][f"flops_{form}_total"] == n * sum(cost)


def test_every_byte_sent_is_received_on_the_same_kind_of_link(rows_8b):
    for r in rows_8b.values():
        assert r["nv_sent_total"] == pytest.approx(r["nv_recv_total"], rel=1e-12)
        assert r["net_sent_total"] == pytest.approx(r["net_recv_total"], rel=1e-12)


def test_gather_moves_to_the_owner_what_it_does_not_hold_and_the_scatter_the_same_back():
    mats = sim.LLAMA_8B.matrices()
    design = sim.fsdp_tp_owner_split(mats, sim.ns_costs(mats, A), A.nodes, A.gpus_per_node)
    elements = sum(m * n for _, m, n, _ in mats)  # every dim here divides by 8: each rank holds 1/64
    for phase, nbytes in (("gather", sim.GATHER_BYTES), ("scatter", sim.SCATTER_BYTES)):
        t = design.phases[phase]
        assert sum(t.nv_recv) + sum(t.net_recv) == pytest.approx(elements * nbytes * 63 / 64, rel=1e-12)
        assert sum(t.nv_recv) == pytest.approx(elements * nbytes * 7 / 64, rel=1e-12)  # the owner's node


@pytest.mark.parametrize("relay", [False, True], ids=["from-the-owner", "relayed"])
def test_hsdp_replicas_receive_the_rows_of_the_results_owned_in_other_nodes(relay):
    mats = sim.LLAMA_8B.matrices()
    design = sim.hsdp_owner_split(mats, sim.ns_costs(mats, A), A.nodes, A.gpus_per_node, A.nodes, relay=relay)
    elements = sum(m * n for _, m, n, _ in mats)
    per_rank = sum(design.per_rank("net_recv")) / A.gpus
    assert per_rank == pytest.approx((A.nodes - 1) / A.nodes * elements / A.gpus_per_node * sim.SCATTER_BYTES)
    assert sum(design.phases["gather"].net_recv) == 0  # the shards come from the owner's node


def test_relaying_the_results_moves_the_same_bytes_as_sending_them_from_the_owner():
    mats = [(f"m{i}", 1000 + 37 * i, 300 + 11 * i, "colwise") for i in range(50)]  # uneven shapes and shards
    costs = sim.ns_costs(mats, A)
    direct, relayed = (sim.hsdp_owner_split(mats, costs, 4, 8, 4, relay=r) for r in (False, True))
    for attr in ("nv_sent", "nv_recv", "net_sent", "net_recv"):
        assert sum(direct.per_rank(attr)) == sum(relayed.per_rank(attr))
    assert direct.per_rank("net_recv") == relayed.per_rank("net_recv")  # every GPU needs the same rows either way
    assert direct.flops == relayed.flops


def test_more_nodes_per_replica_group_trade_flops_for_network_bytes(rows_8b):
    groups = [rows_8b[("HSDP 8 x 8", f"replica groups of {g}")] for g in (1, 2, 4, 8)]
    assert groups[0]["net_recv_max"] == 0
    assert all(a["net_recv_total"] < b["net_recv_total"] for a, b in itertools.pairwise(groups))
    assert all(a["flops_std_max"] > b["flops_std_max"] for a, b in itertools.pairwise(groups))


class _CountingMatmul:
    """`a @ b` that adds its dense FLOPs (2 m k n) to `flops`."""

    def __init__(self) -> None:
        self.flops = 0

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return a @ b


MUON = [(3.4445, -4.7750, 2.0315)] * 5  # Muon's quintic (Jordan et al. 2024), 5 steps


def _standard_ns(x: torch.Tensor, mm: _CountingMatmul) -> torch.Tensor:
    for a, b, c in MUON:
        gram = mm(x, x.T)
        x = a * x + mm(b * gram + c * mm(gram, gram), x)
    return x


def _gram_ns(x: torch.Tensor, mm: _CountingMatmul, restarts: tuple[int, ...]) -> torch.Tensor:
    """The Gram form as the simulation counts it: X_t = Q_t X_0, iterate (Q, R = X_t X_t^T) on k x k matrices."""
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    r, q = mm(x, x.T), None
    for t, (a, b, c) in enumerate(MUON, 1):
        p = a * eye + b * r + c * mm(r, r)
        q = p if q is None else mm(p, q)
        if t == len(MUON):
            break
        if t in restarts:
            x, q = mm(q, x), None
            r = mm(x, x.T)
        else:
            r = mm(p, mm(r, p))
    return mm(q, x)


@pytest.mark.parametrize("restarts", [(), (2,), (1, 3)])
def test_counted_flops_are_those_of_iterations_that_compute_the_same_map(restarts):
    x = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x / x.norm()
    std_mm, gram_mm = _CountingMatmul(), _CountingMatmul()
    expected = _standard_ns(x, std_mm)
    torch.testing.assert_close(_gram_ns(x, gram_mm, restarts), expected, rtol=0, atol=1e-10)
    assert std_mm.flops == sim.ns_flops_standard(12, 40)
    assert gram_mm.flops == sim.ns_flops_gram(12, 40, restarts=restarts)


@pytest.mark.parametrize(("m", "n"), [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 8192), (7, 300)])
def test_ns_flops_follow_the_closed_forms(m, n):
    k, big = min(m, n), max(m, n)
    assert sim.ns_flops_standard(m, n) == 5 * (4 * k * k * big + 2 * k**3)
    assert sim.ns_flops_gram(m, n, restarts=(2,)) == 8 * k * k * big + 28 * k**3
    assert sim.ns_flops_gram(m, n, restarts=()) == 4 * k * k * big + 34 * k**3
    assert sim.ns_flops_gram(m, n) == sim.ns_flops_gram(n, m)
    # with one restart the Gram form is cheaper exactly when K > 1.5 k
    assert (sim.ns_flops_gram(m, n) < sim.ns_flops_standard(m, n)) == (2 * big > 3 * k)


def test_greedy_owners_keep_the_busiest_rank_within_one_matrix_of_the_mean():
    costs = sim.ns_costs(sim.LLAMA_70B.matrices(), A)["std"]
    for ranks in (8, 64, 500):
        owners = sim.lpt_owners(costs, ranks)
        load = [0] * ranks
        for i, r in enumerate(owners):
            load[r] += costs[i]
        assert sum(load) == sum(costs) and max(load) <= sum(costs) / ranks + max(costs)


@pytest.mark.parametrize("model", [sim.LLAMA_8B, sim.LLAMA_70B], ids=lambda m: m.name)
@pytest.mark.parametrize("ranks", [8, 64])
def test_simulated_owners_are_the_ones_root_hf_assigns(model, ranks):
    from root_hf.optim.distributed import assign_owners

    shapes = [(m, n) for _, m, n, _ in model.matrices()]
    assert sim.lpt_owners(sim.ns_costs(model.matrices(), A)["std"], ranks) == assign_owners(shapes, ranks)


@pytest.mark.parametrize(("length", "parts"), [(4096, 8), (101, 2), (1024, 64), (3, 8), (1000, 7)])
def test_shard_sizes_are_torch_chunk_sizes(length, parts):
    expected = [len(c) for c in torch.arange(length).chunk(parts)]
    assert sim.chunks(length, parts) == expected + [0] * (parts - len(expected))


def test_quick_run_prints_every_table(capsys):
    out = sim.main(["--quick"])
    text = capsys.readouterr().out
    assert {r["model"] for r in out["rows"]} == {"Llama-3.1-8B"}
    for heading in ("Assumptions", "Newton-Schulz FLOPs per matrix", "busiest rank", "replica groups", "AdamW's own"):
        assert heading in text
    assert text.count("| Llama-3.1-8B |") == 4 + len(out["rows"]) + len(out["groups"]) + 2


def test_docs_show_the_tables_the_script_prints(capsys):
    sim.main([])
    printed = {line for line in capsys.readouterr().out.splitlines() if line.startswith("| Llama-3.1-")}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    section = docs[docs.index("## At scale: simulated communication") :]
    shown = {line for line in section.splitlines() if line.startswith("| Llama-3.1-")}
    assert len(printed) >= 30 and shown == printed, "rerun benchmarks/distributed_sim.py, update docs/distributed.md"
