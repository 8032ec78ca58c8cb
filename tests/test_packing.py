"""Balanced packings with neighbour splits (:mod:`hdmoe_milp.strategies.block_milp.packing`): what
they promise (balanced rooflines, shares only on a home node and its neighbours, the capacity), and
that the certificate stays valid with their patterns in the family."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp.evaluator import EvalOptions, evaluate
from hdmoe_milp.hardware import Hardware, Mesh, make_hardware
from hdmoe_milp.moe import MoEModel, get_model
from hdmoe_milp.placement import Placement
from hdmoe_milp.solvers import SolveParams
from hdmoe_milp.strategies.block_milp import packing as pk
from hdmoe_milp.strategies.block_milp.solve import (
    MilpOptions,
    family_layers,
    family_model,
    layer_baselines,
    packing_layers,
    solve_layer,
)
from hdmoe_milp.synthetic import synthetic_trace
from hdmoe_milp.workload import LayerRouting, Workload


@pytest.mark.parametrize("shape", ["1x2", "2x2", "3x5", "4x4", "8x8", "4x8"])
def test_every_path_visits_each_node_once_through_neighbours(shape):
    mesh = Mesh.parse(shape)
    d = mesh.distance
    for name, path in pk.paths(mesh).items():
        assert sorted(path.tolist()) == list(range(mesh.num_nodes)), name
        assert all(d[a, b] == 1 for a, b in zip(path[:-1], path[1:], strict=True)), name
    assert ("hilbert" in pk.paths(mesh)) == (shape in ("2x2", "4x4", "8x8"))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 24), st.integers(2, 9), st.integers(1, 6), st.integers(0, 10_000))
def test_pack_keeps_the_count_limit_and_places_every_expert(num_experts, num_nodes, max_count, seed):
    rng = np.random.default_rng(seed)
    fl, rd = rng.random(num_experts), rng.random(num_experts)
    bins = pk.pack(fl, rd, num_nodes, max_count, np.random.default_rng(seed), steps=500)
    if num_experts > num_nodes * max_count:
        assert bins is None
        return
    assert bins is not None and bins.shape == (num_experts,)
    assert bins.min() >= 0 and bins.max() < num_nodes
    assert np.bincount(bins, minlength=num_nodes).max() <= max_count


def _deepseek_v3_layer(mesh: str = "4x4", seed: int = 3):
    model = get_model("deepseek-v3")
    hw = make_hardware("5/50", Mesh.parse(mesh))
    f = synthetic_trace(model, 1000, seed=seed).frequencies()[0]
    return model, hw, f


@pytest.mark.parametrize("penalty", pk.SPLIT_PENALTIES)
def test_split_lp_balances_whole_experts_with_neighbour_splits_only(penalty):
    model, hw, f = _deepseek_v3_layer()
    fl, rd = pk.expert_times_s(model, hw, f, 128.0)
    D = hw.num_nodes
    bins = pk.pack(fl, rd, D, model.num_experts, np.random.default_rng(0))
    node_of = pk.lay_out(bins, fl, pk.paths(hw.mesh)["rows"])
    whole = np.zeros((len(f), D))
    whole[np.arange(len(f)), node_of] = 1.0
    shares = pk.split_lp(node_of, fl, rd, f, hw.mesh, penalty)
    assert shares is not None and np.allclose(shares.sum(axis=1), 1.0) and shares.min() >= 0.0
    d = hw.mesh.distance
    for i in range(len(f)):  # an expert keeps its home node's share, the rest goes to neighbours
        held = np.flatnonzero(shares[i] > 0)
        assert all(d[node_of[i], n] <= 1 for n in held)
    rooflines = np.maximum(fl @ shares, rd @ shares)
    mean = max(fl.sum(), rd.sum()) / D
    assert rooflines.max() <= np.maximum(fl @ whole, rd @ whole).max() * (1 + 1e-9)
    if penalty == 0.0:  # moving shares is free: the busiest node comes down to the mean
        assert rooflines.max() == pytest.approx(mean, rel=1e-6)


def test_split_lp_keeps_the_weight_capacity():
    model, hw, f = _deepseek_v3_layer()
    fl, rd = pk.expert_times_s(model, hw, f, 128.0)
    per_node = model.num_experts // hw.num_nodes
    bins = pk.pack(fl, rd, hw.num_nodes, per_node, np.random.default_rng(0))
    node_of = pk.lay_out(bins, fl, pk.paths(hw.mesh)["cols"])
    cap = per_node + 0.25
    shares = pk.split_lp(node_of, fl, rd, f, hw.mesh, 0.0, max_weight_shares=cap)
    assert shares is not None and shares.sum(axis=0).max() <= cap * (1 + 1e-9)


def test_packings_fit_an_exactly_full_capacity():
    """Every node's capacity holds exactly its share of whole experts: a split must be paid for by
    a move out, and the LP's tolerance must not tip a node over (the block model checks the
    capacity to 1e-9)."""
    model, hw, f = _deepseek_v3_layer("8x8")
    per_node = model.num_experts // hw.num_nodes
    cap = per_node * model.expert_weight_bytes()
    found = pk.packings(model, hw, f, 128.0, seed=0, capacity_bytes=cap)
    assert len(found) == len(pk.packings(model, hw, f, 128.0, seed=0))  # none is lost to the capacity
    for shares in found.values():
        assert shares.sum(axis=0).max() * model.expert_weight_bytes() <= cap * (1 + 1e-9)
        assert np.allclose(shares.sum(axis=1), 1.0) and (shares == 0).sum() > 0
    assert any(((s > 0).sum(axis=1) > 1).any() for s in found.values())  # some expert is split


def test_packings_need_several_experts_per_node():
    model, hw, f = _deepseek_v3_layer("8x8")
    assert len(pk.packings(model, hw, f, 128.0, seed=0)) >= 3  # 256 experts on 64 nodes
    assert pk.packings(model, make_hardware("5/50", Mesh.parse("8x16")), f, 128.0, seed=0) == {}  # 2 per node


def test_packings_are_deterministic_for_a_seed():
    model, hw, f = _deepseek_v3_layer()
    a = pk.packings(model, hw, f, 128.0, seed=5)
    b = pk.packings(model, hw, f, 128.0, seed=5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_packings_join_the_family_and_the_certificate_holds():
    """8 experts on 1x2: every plan of the family (packings' patterns included) scored by the
    evaluator; the bound is below the best and the returned score above it."""
    m = MoEModel("tiny8", num_experts=8, top_k=2, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse("1x2"), compute_flops=1e9, link_bw_bytes_per_s=1e8)
    tr = synthetic_trace(m, 300, seed=4)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    batch, opts = 32.0, MilpOptions(delivery="tree")
    base, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
    packed = packing_layers(m, hw, f, batch, groups, opts, seed=0)
    assert 1 <= len(packed) <= opts.packings
    layers = family_layers(m, hw, f, batch, groups, opts, base, seed=0)
    assert layers.keys() == {*base, *packed}
    bm = family_model(m, hw, f, batch, dataclasses.replace(opts, symmetry=False), groups, layers)
    bm_without = family_model(m, hw, f, batch, dataclasses.replace(opts, symmetry=False), groups, base)
    assert bm.blocks.num_blocks > bm_without.blocks.num_blocks  # the packings add columns
    assigns = np.array(list(itertools.product(*[np.flatnonzero(bm.allowed[i]) for i in range(8)])))
    ids, fg = groups
    best = np.inf
    for lo in range(0, len(assigns), 4000):
        chunk = assigns[lo:lo + 4000]
        wl = Workload(tuple(LayerRouting(ids, fg * batch) for _ in chunk), 8, 2, batch, "expected")
        ev = evaluate(Placement(tuple(bm.placement(a) for a in chunk)), dataclasses.replace(m, moe_layers=len(chunk)),
                      hw, wl, EvalOptions(delivery="tree"))
        best = min(best, float(np.min(ev.layer_s)))
    r = solve_layer(m, hw, f, batch, backend="cpsat", params=SolveParams(time_limit_s=2), options=opts,
                    coactivation=groups)
    assert r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9) ** 2
    assert "balanced packings" in r.family


def test_polishing_the_other_group_too_keeps_a_valid_certified_plan():
    """16 experts on 2x2 (4 per node), deterministic, with and without the second polish (of the
    best start of the other group, packings or the rest): each returns a plan no worse than its
    best warm start, scored by the evaluator itself, above its bound; the second polish is
    deterministic too."""
    from hdmoe_milp.strategies.block_milp import LnsSettings
    m = MoEModel("tiny16", num_experts=16, top_k=2, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse("2x2"), compute_flops=1e9, link_bw_bytes_per_s=2e8)
    tr = synthetic_trace(m, 400, seed=2)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    params = SolveParams(time_limit_s=1, deterministic=True)
    runs = [solve_layer(m, hw, f, 32.0, backend="cpsat", params=params, coactivation=groups,
                        lns_settings=LnsSettings(polish_packed=on, bnb=False)) for on in (False, True)]
    again = solve_layer(m, hw, f, 32.0, backend="cpsat", params=params, coactivation=groups,
                        lns_settings=LnsSettings(polish_packed=True, bnb=False))
    assert np.array_equal(again.assign, runs[1].assign) and again.objective_s == runs[1].objective_s
    wl = Workload((LayerRouting(groups[0], groups[1] * 32.0),), 16, 2, 32.0, "expected")
    for r in runs:
        ev = evaluate(Placement((r.placement,)), m, hw, wl, EvalOptions())
        assert r.objective_s == pytest.approx(float(ev.layer_s[0]), rel=1e-12)
        assert r.bound_s <= r.objective_s <= r.warm_start_objective_s
    assert any(k.startswith(pk.PACKED) for k in packing_layers(m, hw, f, 32.0, groups, MilpOptions(), seed=0))
