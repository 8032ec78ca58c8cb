"""Evaluator behaviour: balance, extremes, replicas, determinism, capacity and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp import (
    EvalOptions,
    Hardware,
    InputError,
    LayerPlacement,
    Mesh,
    MoEModel,
    Placement,
    expected_workload,
    get_model,
    make_hardware,
    sample_batch,
)
from hdmoe_milp.evaluator import evaluate
from hdmoe_milp.replica_rules import assign_copies
from hdmoe_milp.strategies import build
from hdmoe_milp.synthetic import synthetic_trace

TINY = MoEModel("tiny", num_experts=4, top_k=2, hidden=64, expert_intermediate=128, moe_layers=2)


def tiny_hw(mesh="2x2", **kw):
    return Hardware(Mesh.parse(mesh), compute_flops=1e9, link_bw_bytes_per_s=1e8, **kw)


@pytest.fixture(scope="module")
def tiny_trace():
    return synthetic_trace(TINY, 256, seed=1)


def test_tp_balances_compute_exactly(ds_trace):
    m = get_model("deepseek-v2-lite")
    hw = make_hardware("5/50", "4x8")
    p = build("tp", m, hw, ds_trace.frequencies())
    for wl in (expected_workload(ds_trace, 128), sample_batch(ds_trace, 64, "random", 1)):
        ev = evaluate(p, m, hw, wl)
        np.testing.assert_allclose(ev.node_flops, ev.node_flops[:, :1] * np.ones((1, hw.num_nodes)), rtol=1e-12)
        assert ev.node_flops.sum() == pytest.approx(wl.expert_loads().sum() * m.expert_flops_per_token())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["mesh", "paper"]))
def test_all_experts_on_one_node_maximises_compute(seed, mode):
    m, hw = TINY, tiny_hw()
    tr = synthetic_trace(m, 64, seed=seed % 7)
    wl = sample_batch(tr, 32, "random", seed)
    rng = np.random.default_rng(seed)
    shares = [rng.dirichlet(np.ones(hw.num_nodes), size=m.num_experts) for _ in range(m.moe_layers)]
    one = [np.tile(np.eye(hw.num_nodes)[seed % hw.num_nodes], (m.num_experts, 1)) for _ in range(m.moe_layers)]
    opts = EvalOptions(mode=mode)
    ev_rand = evaluate(Placement.from_shares(shares), m, hw, wl, opts)
    ev_one = evaluate(Placement.from_shares(one), m, hw, wl, opts)
    assert np.all(ev_one.compute_s >= ev_rand.compute_s - 1e-15)
    assert ev_one.node_flops.sum() == pytest.approx(ev_rand.node_flops.sum())  # the same FLOPs, moved
    # every token's message goes to that one node, so a multicast tree is a single route: tree and
    # unicast delivery load every link alike
    ev_uni = evaluate(Placement.from_shares(one), m, hw, wl, EvalOptions(mode=mode, delivery="unicast"))
    np.testing.assert_allclose(ev_uni.link_bytes_dispatch, ev_one.link_bytes_dispatch, rtol=1e-12)
    np.testing.assert_allclose(ev_uni.link_bytes_combine, ev_one.link_bytes_combine, rtol=1e-12)


def test_identical_seeds_identical_results(ds_trace):
    m = get_model("deepseek-v2-lite")
    hw = make_hardware("10/25", "4x8")
    f = ds_trace.frequencies()
    runs = []
    for _ in range(2):
        p = build("ep", m, hw, f, seed=5)
        wl = sample_batch(ds_trace, 128, "random", 5)
        ev = evaluate(p, m, hw, wl, EvalOptions(mode="paper", seed=5))
        runs.append((p.to_dict(), ev.tbt_s, ev.link_bytes_dispatch.copy()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    other = evaluate(build("ep", m, hw, f, seed=6), m, hw, sample_batch(ds_trace, 128, "random", 5),
                     EvalOptions(mode="paper", seed=5))
    assert other.tbt_s != runs[0][1]


def test_hand_computed_layer_on_1x2():
    """Two experts on a 1x2 mesh, one each; 3 tokens homed on node 0."""
    m = MoEModel("t", num_experts=2, top_k=1, hidden=10, expert_intermediate=100, moe_layers=1,
                 weight_bytes=1, activation_bytes=2)
    hw = Hardware(Mesh(1, 2), compute_flops=1e6, link_bw_bytes_per_s=1e3, dram_bw_bytes_per_s=1e12)
    from hdmoe_milp.workload import LayerRouting, Workload

    wl = Workload((LayerRouting(np.array([[0], [1], [1]]), np.ones(3)),), 2, 1, 3.0, "observed")
    p = Placement.from_shares([np.eye(2)])
    ev = evaluate(p, m, hw, wl, EvalOptions(home="random", seed=0, context_len=0))
    homes = np.random.default_rng(0).integers(0, 2, size=3)
    # node 1 runs 2 tokens of expert 1: 2 * 6*10*100 FLOPs at 1 MFLOP/s
    np.testing.assert_allclose(ev.node_flops[0], [6000, 12000])
    assert ev.compute_s[0] == pytest.approx(12000 / 1e6)
    to_1 = sum(1 for t, e in enumerate([0, 1, 1]) if e == 1 and homes[t] == 0)
    to_0 = sum(1 for t, e in enumerate([0, 1, 1]) if e == 0 and homes[t] == 1)
    assert ev.dispatch_s[0] == pytest.approx(max(to_1, to_0) * 20 / 1e3)


def test_replicas_split_tokens_and_conserve_them(tiny_trace):
    m, hw = TINY, tiny_hw()
    wl = sample_batch(tiny_trace, 40, "random", 0)
    layers = []
    for _ in range(m.moe_layers):
        shares = np.vstack([np.eye(4), np.eye(4)[[3]]])  # expert 0 gets a second copy on node 3
        layers.append(LayerPlacement(shares, np.array([0, 1, 2, 3, 0]), np.array([0.5, 1, 1, 1, 0.5]), 4))
    p = Placement(tuple(layers), "rep")
    lr = wl.layers[0]
    copies = assign_copies(p.layers[0], lr.experts, lr.weight)
    assert np.all(p.layers[0].expert_of[copies] == lr.experts)  # every token served by a copy of its expert
    n0 = int((lr.experts == 0).sum())
    served = np.bincount(copies.ravel(), minlength=5)
    assert served[0] + served[4] == n0 and abs(served[0] - served[4]) <= 1
    ev = evaluate(p, m, hw, wl)
    assert ev.node_flops[0].sum() == pytest.approx(lr.experts.size * m.expert_flops_per_token())


def test_capacity_exceeded_names_field(tiny_trace):
    m = TINY
    need = m.expert_weight_bytes() * m.num_experts * m.moe_layers
    hw = tiny_hw(dram_capacity_bytes=need / 2)  # enough in total, not enough for one node holding all
    one = [np.tile(np.eye(4)[0], (4, 1))] * m.moe_layers
    with pytest.raises(InputError, match="dram_capacity"):
        evaluate(Placement.from_shares(one), m, hw, expected_workload(tiny_trace, 8))
    from hdmoe_milp.costs import check_model_fits

    with pytest.raises(InputError, match="capacity"):
        check_model_fits(m, tiny_hw(dram_capacity_bytes=need / 100))


@pytest.mark.parametrize(
    "shares,match",
    [
        (np.full((4, 4), 0.2), "sums to"),
        (np.array([[1, 0, 0, 0]] * 3 + [[np.nan, 1, 0, 0]]), "finite"),
        (np.array([[1.5, -0.5, 0, 0]] * 4), "non-negative"),
    ],
)
def test_bad_shares_rejected(shares, match):
    with pytest.raises(InputError, match=match):
        LayerPlacement.from_shares(shares)


def test_mismatched_sizes_rejected(tiny_trace):
    p = Placement.from_shares([np.eye(4)] * 2)
    with pytest.raises(InputError, match="nodes"):
        evaluate(p, TINY, tiny_hw("2x3"), expected_workload(tiny_trace, 8))


def test_placement_json_round_trip(tmp_path, ds_trace):
    m = get_model("deepseek-v2-lite")
    hw = make_hardware("5/50", "4x8")
    p = build("eplb", m, hw, ds_trace.frequencies())
    p.save(tmp_path / "p.json")
    q = Placement.load(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    wl = expected_workload(ds_trace, 32)
    assert evaluate(q, m, hw, wl).tbt_s == evaluate(p, m, hw, wl).tbt_s


def test_tree_never_costs_more_than_unicast(ds_trace):
    m = get_model("deepseek-v2-lite")
    hw = make_hardware("10/25", "4x8")
    wl = sample_batch(ds_trace, 64, "random", 2)
    for name in ("tp", "cb", "ep"):
        p = build(name, m, hw, ds_trace.frequencies())
        t = evaluate(p, m, hw, wl, EvalOptions(delivery="tree", home="random"))
        u = evaluate(p, m, hw, wl, EvalOptions(delivery="unicast", home="random"))
        assert np.all(t.link_bytes_dispatch <= u.link_bytes_dispatch + 1e-6)
        assert t.moe_comm_s <= u.moe_comm_s + 1e-15


def test_hop_latency_adds_per_hop():
    m, hw0 = TINY, tiny_hw()
    hw1 = tiny_hw(hop_latency_s=1e-6)
    wl = expected_workload(synthetic_trace(m, 64, seed=0), 8)
    p = Placement.from_shares([np.eye(4)] * 2)
    a = evaluate(p, m, hw0, wl, EvalOptions(home="random"))
    b = evaluate(p, m, hw1, wl, EvalOptions(home="random"))
    assert b.moe_comm_s - a.moe_comm_s == pytest.approx(2 * 2 * 2 * 1e-6)  # 2 layers x 2 phases x 2 hops


def test_holder_homes_by_hand():
    """``home="holder"`` (the paper's rule): a token starts on the node of one of its experts.
    Top-1 expert parallelism then never leaves the node; two experts on the two nodes of a 1x2
    mesh, every token routed to both: each token's vector crosses the one link once per phase in
    one direction, so the busiest link carries all B vectors, twice what spread homes give (B/2 per
    direction)."""
    from hdmoe_milp import Trace
    from hdmoe_milp.costs import UnitCosts

    hw = Hardware(Mesh(1, 2), compute_flops=1e12, link_bw_bytes_per_s=1e9)
    B = 64.0
    top1 = MoEModel("t1", num_experts=2, top_k=1, hidden=64, expert_intermediate=128, moe_layers=1)
    rng = np.random.default_rng(0)
    tr1 = Trace((rng.integers(0, 2, size=(50, 1)),), 2, 1)
    ep = Placement((LayerPlacement.from_shares(np.eye(2)),))
    wl1 = expected_workload(tr1, B)
    holder = evaluate(ep, top1, hw, wl1, EvalOptions(mode="mesh", home="holder"))
    spread = evaluate(ep, top1, hw, wl1, EvalOptions(mode="mesh", home="spread"))
    assert holder.moe_comm_s == 0.0 and spread.moe_comm_s > 0
    assert holder.moe_compute_s == spread.moe_compute_s

    top2 = MoEModel("t2", num_experts=2, top_k=2, hidden=64, expert_intermediate=128, moe_layers=1)
    tr2 = Trace((np.tile([0, 1], (50, 1)),), 2, 2)
    wl2 = expected_workload(tr2, B)
    v = UnitCosts.of(top2).vector_bytes
    for home, per_phase in (("holder", B * v), ("spread", B * v / 2)):
        e = evaluate(ep, top2, hw, wl2, EvalOptions(mode="mesh", home=home))
        assert e.dispatch_s[0] == pytest.approx(per_phase / 1e9, rel=1e-12)
        assert e.combine_s[0] == pytest.approx(per_phase / 1e9, rel=1e-12)
