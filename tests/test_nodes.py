"""The node-order search (:mod:`hdmoe_milp.strategies.block_milp.nodes`): its traffic is the
evaluator's, its swaps keep every node's contents, it stops only where no swap helps, and the
certificate stays valid with the reordered layouts in the family."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from hdmoe_milp.evaluator import EvalOptions, evaluate
from hdmoe_milp.hardware import Mesh, make_hardware
from hdmoe_milp.moe import get_model
from hdmoe_milp.placement import LayerPlacement, Placement
from hdmoe_milp.solvers import SolveParams
from hdmoe_milp.strategies.block_milp import nodes
from hdmoe_milp.strategies.block_milp.solve import (
    FAMILY,
    NODES,
    MilpOptions,
    family_layers,
    family_text,
    layer_baselines,
    reordered_layers,
    solve_layer,
)
from hdmoe_milp.synthetic import synthetic_trace
from hdmoe_milp.workload import LayerRouting, Workload


def _case(mesh: str, model: str = "deepseek-v2-lite", tokens: int = 300, seed: int = 0):
    m = dataclasses.replace(get_model(model), moe_layers=1)
    hw = make_hardware("5/50", Mesh.parse(mesh))
    tr = synthetic_trace(m, tokens, seed=seed)
    ids, fg = tr.coactivation(0)
    return m, hw, ids, fg * 128.0, tr.frequencies()[0]


def _random_layout(E: int, D: int, rng: np.random.Generator) -> LayerPlacement:
    """Each expert on 1-3 random nodes with random shares."""
    shares = np.zeros((E, D))
    for e in range(E):
        where = rng.choice(D, size=min(D, int(rng.integers(1, 4))), replace=False)
        shares[e, where] = rng.random(len(where)) + 0.1
    return LayerPlacement.from_shares(shares / shares.sum(axis=1, keepdims=True))


def _scores(m, hw, ids, tokens, lp):
    wl = Workload((LayerRouting(ids, tokens),), m.num_experts, m.top_k, 128.0, "expected")
    ev = evaluate(Placement((lp,)), m, hw, wl, EvalOptions())
    return float(ev.compute_s[0]), float(ev.comm_s[0]), float(ev.layer_s[0])


@pytest.mark.parametrize("mesh", ["1x4", "2x2", "3x5", "4x4"])
def test_traffic_is_the_evaluators_before_and_after_the_search(mesh):
    m, hw, ids, tokens, _ = _case(mesh)
    rng = np.random.default_rng(len(mesh))
    for _ in range(3):
        lp = _random_layout(m.num_experts, hw.num_nodes, rng)
        order = nodes.NodeOrder(m, hw, lp.shares > 0, ids, tokens)
        comp0, comm0, _ = _scores(m, hw, ids, tokens, lp)
        assert order.traffic() == pytest.approx(comm0, rel=1e-9)
        order.improve()
        assert sorted(order.perm.tolist()) == list(range(hw.num_nodes))
        moved = LayerPlacement.from_shares(lp.shares[:, order.perm])
        comp1, comm1, _ = _scores(m, hw, ids, tokens, moved)
        assert order.traffic() == pytest.approx(comm1, rel=1e-9)  # the incremental loads stayed exact
        assert comm1 <= comm0 * (1 + 1e-12)
        assert comp1 == pytest.approx(comp0, rel=1e-12)  # same contents per node: same compute


@pytest.mark.parametrize("mesh", ["2x3", "3x3", "1x5"])
def test_the_search_stops_only_where_no_swap_lowers_the_traffic(mesh):
    # up to 36 pairs: fewer than MAX_CHECKS, so every promising swap was checked
    m, hw, ids, tokens, _ = _case(mesh, seed=4)
    D = hw.num_nodes
    assert D * (D - 1) // 2 <= nodes.MAX_CHECKS
    rng = np.random.default_rng(7)
    for _ in range(3):
        lp = _random_layout(m.num_experts, D, rng)
        order = nodes.NodeOrder(m, hw, lp.shares > 0, ids, tokens)
        order.improve()
        shares = lp.shares[:, order.perm]
        _, here, _ = _scores(m, hw, ids, tokens, LayerPlacement.from_shares(shares))
        for a, b in itertools.combinations(range(D), 2):
            p = np.arange(D)
            p[[a, b]] = p[[b, a]]
            _, comm, _ = _scores(m, hw, ids, tokens, LayerPlacement.from_shares(shares[:, p]))
            assert comm >= here * (1 - 1e-9), (a, b)


def test_max_swaps_and_a_past_deadline_stop_the_search():
    m, hw, ids, tokens, _ = _case("4x4")
    lp = _random_layout(m.num_experts, hw.num_nodes, np.random.default_rng(1))
    order = nodes.NodeOrder(m, hw, lp.shares > 0, ids, tokens)
    assert order.improve(max_swaps=1) == 1  # a random layout has an improving swap
    assert order.improve(deadline=0.0) == 0
    assert nodes.reorder_nodes(lp, m, hw, ids, tokens, deadline=0.0) is None


def test_random_restarts_keep_the_best_order_and_are_seeded():
    m, hw, ids, tokens, _ = _case("3x4", seed=8)
    lp = _random_layout(m.num_experts, hw.num_nodes, np.random.default_rng(9))
    alone = nodes.reorder_nodes(lp, m, hw, ids, tokens, restarts=0)
    many = nodes.reorder_nodes(lp, m, hw, ids, tokens, restarts=6, seed=3)
    again = nodes.reorder_nodes(lp, m, hw, ids, tokens, restarts=6, seed=3)
    assert alone is not None and many is not None and np.array_equal(many.shares, again.shares)
    comm = {k: _scores(m, hw, ids, tokens, v)[1] for k, v in (("alone", alone), ("many", many))}
    assert comm["many"] <= comm["alone"] * (1 + 1e-12)
    assert nodes.restarts_for(32) == 8 and nodes.restarts_for(64) == 4 and nodes.restarts_for(1024) == 1
    assert nodes.restarts_for(4) == nodes.MAX_RESTARTS


def test_reorder_keeps_each_nodes_contents_and_is_deterministic():
    m, hw, ids, tokens, _ = _case("4x4", seed=2)
    lp = _random_layout(m.num_experts, hw.num_nodes, np.random.default_rng(3))
    a = nodes.reorder_nodes(lp, m, hw, ids, tokens)
    b = nodes.reorder_nodes(lp, m, hw, ids, tokens)
    assert a is not None and np.array_equal(a.shares, b.shares)
    # the columns (node contents) are the old ones, permuted
    old = {tuple(np.round(c, 12)) for c in lp.shares.T}
    assert {tuple(np.round(c, 12)) for c in a.shares.T} == old
    assert _scores(m, hw, ids, tokens, a)[2] < _scores(m, hw, ids, tokens, lp)[2]


def test_replicated_layouts_and_single_nodes_are_left_alone():
    m, hw, ids, tokens, _ = _case("2x2")
    rep = LayerPlacement(expert_of=np.array([0, *range(m.num_experts)]),
                         shares=np.eye(4)[np.arange(m.num_experts + 1) % 4],
                         token_fraction=np.array([0.5, 0.5, *np.ones(m.num_experts - 1)]),
                         num_experts=m.num_experts)
    assert nodes.reorder_nodes(rep, m, hw, ids, tokens) is None
    hw1 = make_hardware("5/50", Mesh.parse("1x1"))
    lp = LayerPlacement.from_shares(np.ones((m.num_experts, 1)))
    assert nodes.reorder_nodes(lp, m, hw1, ids, tokens) is None


def test_reordered_layouts_join_the_family_and_the_text_says_so():
    m, hw, ids, tokens, f = _case("4x4", seed=5)
    groups = (ids, tokens / 128.0)
    base, _ = layer_baselines(m, hw, f, 128.0, backend="cpsat", params=SolveParams(), coactivation=groups)
    fam = family_layers(m, hw, f, 128.0, groups, MilpOptions(), base, seed=0)
    added = [k for k in fam if k.endswith(NODES)]
    assert added and all(k[:-len(NODES)] in fam or k.startswith("packed-") for k in added)
    off = family_layers(m, hw, f, 128.0, groups, MilpOptions(node_order=False), base, seed=0)
    assert not any(k.endswith(NODES) for k in off)
    assert "reordered" in FAMILY and "reordered" in family_text(MilpOptions())
    assert "reordered" not in family_text(MilpOptions(node_order=False))
    # unicast traffic is not what the search counts: nothing is reordered
    assert reordered_layers(m, hw, f, 128.0, groups, MilpOptions(delivery="unicast"), base) == {}
    assert reordered_layers(m, hw, f, 128.0, None, MilpOptions(), base) == {}


def test_solve_layer_with_reordered_layouts_is_no_worse_than_each_of_them():
    m, hw, ids, tokens, f = _case("4x4", seed=6)
    groups = (ids, tokens / 128.0)
    res = solve_layer(m, hw, f, 128.0, params=SolveParams(time_limit_s=20, deterministic=True, work_limit=0.5),
                      coactivation=groups, layer=0)
    base, _ = layer_baselines(m, hw, f, 128.0, backend="cpsat", params=SolveParams(), coactivation=groups)
    fam = family_layers(m, hw, f, 128.0, groups, MilpOptions(), base, seed=0)
    got = _scores(m, hw, ids, tokens, res.placement)[2]
    assert got == pytest.approx(res.objective_s, rel=1e-9)
    for name, lp in fam.items():
        if not lp.is_replicated:
            assert got <= _scores(m, hw, ids, tokens, lp)[2] * (1 + 1e-9), name
    assert res.bound_s <= got * (1 + 1e-12)


def test_pipeline_and_cli_can_turn_the_node_order_search_off(capsys):
    import json

    import hdmoe_milp as hm
    from hdmoe_milp.cli import main

    m = dataclasses.replace(get_model("deepseek-v2-lite"), moe_layers=1)
    p = hm.Problem(m, make_hardware("5/50", Mesh.parse("2x4")), synthetic_trace(m, 300, seed=1))
    kw = dict(time_limit_s=2, deterministic=True, work_limit=0.0, baselines=False, progress=False)
    on, off = (hm.solve(p, node_order=v, **kw) for v in (True, False))
    assert "reordered" in on.solver["family"] and "reordered" not in off.solver["family"]
    assert not any(NODES in r.source for r in off.layers)
    with pytest.raises(hm.InputError, match="node_order"):
        hm.solve(p, node_order="no")
    assert main(["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "10/25", "--layers", "0",
                 "--time-limit", "2", "--no-node-order", "--no-baselines", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "reordered" not in d["family"] and NODES not in d["layers"][0]["source"]


def test_with_unequal_links_the_search_stops_only_where_no_swap_helps():
    # one slow link gives the phases different numbers of distinct features after de-duplication
    m, hw0, ids, tokens, _ = _case("2x3", seed=1)
    stopped_early = cases = 0
    for link in range(8, 14):
        bw = hw0.link_bw.copy()
        bw[link] *= 0.05
        hw = dataclasses.replace(hw0, link_bw_bytes_per_s=bw)
        rng = np.random.default_rng(link)
        for _ in range(4):
            lp = _random_layout(m.num_experts, hw.num_nodes, rng)
            order = nodes.NodeOrder(m, hw, lp.shares > 0, ids, tokens)
            cases += order.nl * 2 != len(order.load)
            order.improve()
            cur = order.traffic()
            stopped_early += any(order.traffic(order.load + order._delta(a, b)[0]) < cur * (1 - 1e-12)
                                 for a, b in itertools.combinations(range(hw.num_nodes), 2))
    assert cases > 0 and stopped_early == 0


def test_bound_below_exhaustive_optimum_below_score_with_a_reordered_layout_in_the_family():
    import hdmoe_milp.strategies.block_milp.solve as S
    from hdmoe_milp.hardware import Hardware
    from hdmoe_milp.moe import MoEModel

    m = MoEModel("tiny", num_experts=4, top_k=2, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse("1x6"), compute_flops=1e9, link_bw_bytes_per_s=2e8)
    tr = synthetic_trace(m, 300, seed=7)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    base, _ = layer_baselines(m, hw, f, 16.0, backend="cpsat", params=SolveParams(), coactivation=groups)
    fam, bm = S.layer_family(m, hw, f, 16.0, groups, MilpOptions(symmetry=False), base, seed=SolveParams().seed)
    assert any(k.endswith(NODES) for k in fam)  # the case this test is for
    plans = np.array(list(itertools.product(*[np.flatnonzero(bm.family[i] & bm.column_fits) for i in range(4)])))
    ids, fg = groups
    best = np.inf
    for lo in range(0, len(plans), 4000):
        chunk = plans[lo:lo + 4000]
        wl = Workload(tuple(LayerRouting(ids, fg * 16.0) for _ in chunk), 4, 2, 16.0, "expected")
        ev = evaluate(Placement(tuple(bm.placement(a) for a in chunk)), dataclasses.replace(m, moe_layers=len(chunk)),
                      hw, wl, EvalOptions())
        best = min(best, float(np.min(ev.layer_s)))
    # the search's step budget scales with the time limit: 100 s lets it finish, as in the family above
    r = solve_layer(m, hw, f, 16.0, params=SolveParams(time_limit_s=100, work_limit=1, deterministic=True, gap=0.0),
                    coactivation=groups, baselines=base, hdmoe_work_limit=None)
    assert r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)


def test_the_search_is_skipped_when_its_share_of_the_limit_cannot_hold_two_family_builds():
    import hdmoe_milp.strategies.block_milp.solve as S

    m, hw, ids, tokens, f = _case("4x4", seed=5)
    groups = (ids, tokens / 128.0)
    base, _ = layer_baselines(m, hw, f, 128.0, backend="cpsat", params=SolveParams(), coactivation=groups)
    short, _ = S.layer_family(m, hw, f, 128.0, groups, MilpOptions(), base, seed=0, nodes_s=1e-9)
    assert not any(k.endswith(NODES) for k in short)
    ample, _ = S.layer_family(m, hw, f, 128.0, groups, MilpOptions(), base, seed=0, nodes_s=60.0)
    assert any(k.endswith(NODES) for k in ample)


def test_a_step_budget_bounds_the_search_and_gives_the_same_answer_each_time():
    m, hw, ids, tokens, _ = _case("4x4", seed=2)
    lp = _random_layout(m.num_experts, hw.num_nodes, np.random.default_rng(3))
    assert nodes.reorder_nodes(lp, m, hw, ids, tokens, steps=0) is None
    one = nodes.reorder_nodes(lp, m, hw, ids, tokens, steps=1)  # one swap
    assert one is not None
    moved = np.flatnonzero(np.any(one.shares != lp.shares, axis=0))
    assert len(moved) == 2  # one swap: two nodes changed places
    a = nodes.reorder_nodes(lp, m, hw, ids, tokens, steps=40)
    b = nodes.reorder_nodes(lp, m, hw, ids, tokens, steps=40)
    assert np.array_equal(a.shares, b.shares)
    assert _scores(m, hw, ids, tokens, a)[1] <= _scores(m, hw, ids, tokens, one)[1] * (1 + 1e-12)
