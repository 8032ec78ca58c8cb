"""The fast whole-model link loads (costs.spread_link_loads) against the general per-layer path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp import EvalOptions, expected_workload, get_model, make_hardware, sample_batch
from hdmoe_milp import evaluator as evaluator_mod
from hdmoe_milp.costs import fast_links_supported, link_loads, pack_dest, spread_link_loads
from hdmoe_milp.evaluator import _evaluate, evaluate
from hdmoe_milp.hardware import Mesh
from hdmoe_milp.placement import LayerPlacement, Placement
from hdmoe_milp.strategies import build

FIELDS = ("compute_s", "dispatch_s", "combine_s", "node_time_s", "node_flops", "link_bytes_dispatch",
          "link_bytes_combine")

layers_on_mesh = st.tuples(st.integers(1, 8), st.integers(1, 8)).flatmap(
    lambda rc: st.tuples(
        st.just(Mesh(*rc)),
        st.lists(  # layers, each a list of flows (destination set, weight); empty layers allowed
            st.lists(
                st.tuples(st.lists(st.booleans(), min_size=rc[0] * rc[1], max_size=rc[0] * rc[1]),
                          st.floats(0.0, 1e6)),
                max_size=8,
            ),
            min_size=1, max_size=4,
        ),
    )
)


@settings(max_examples=150, deadline=None)
@given(layers_on_mesh, st.booleans())
def test_fast_matches_general_link_loads(case, tree):
    mesh, layers = case
    D = mesh.num_nodes
    dest = np.array([f[0] for lay in layers for f in lay], dtype=bool).reshape(-1, D)
    w = np.array([f[1] for lay in layers for f in lay], dtype=float)
    offsets = np.r_[0, np.cumsum([len(lay) for lay in layers])]
    rm, cm = pack_dest(mesh, dest)
    d, c, hops = spread_link_loads(mesh, rm, cm, w, offsets, tree)
    assert d.shape == c.shape == (len(layers), mesh.num_links) and hops.shape == (len(layers),)
    for li in range(len(layers)):
        sl = slice(offsets[li], offsets[li + 1])
        gd, gc, gh = link_loads(mesh, dest[sl], w[sl], None, tree)
        np.testing.assert_allclose(d[li], gd, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(c[li], gc, rtol=1e-12, atol=1e-9)
        assert hops[li] == gh


@pytest.mark.parametrize("mesh", ["1x1", "1x8", "8x1", "3x5", "8x8"])
def test_pack_dest_bit_layout(mesh):
    m = Mesh.parse(mesh)
    rng = np.random.default_rng(0)
    dest = rng.random((50, m.num_nodes)) < 0.3
    rm, cm = pack_dest(m, dest)
    r, c = np.divmod(np.arange(m.num_nodes), m.cols)
    for f in range(len(dest)):
        assert int(rm[f]) == sum(1 << int(8 * r[n] + c[n]) for n in np.flatnonzero(dest[f]))
        assert int(cm[f]) == sum(1 << int(8 * c[n] + r[n]) for n in np.flatnonzero(dest[f]))


def test_supported_meshes():
    assert fast_links_supported(Mesh(8, 8)) and fast_links_supported(Mesh(1, 8))
    assert not fast_links_supported(Mesh(2, 9)) and not fast_links_supported(Mesh(16, 4))


def _extra_replica(p: Placement, D: int) -> Placement:
    """A second copy of expert 0 on the last node in every layer, serving 40% of its tokens."""
    layers = []
    for lp in p.layers:
        tf = np.r_[lp.token_fraction, 0.4]
        tf[np.flatnonzero(lp.expert_of == 0)] *= 0.6
        layers.append(LayerPlacement(np.vstack([lp.shares, np.eye(D)[[D - 1]]]), np.r_[lp.expert_of, 0], tf,
                                     lp.num_experts))
    return Placement(tuple(layers), p.strategy + "+replica")


def _assert_same(a, b, tag):
    for f in FIELDS:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-9, atol=0, err_msg=f"{tag} {f}")
    assert a.tbt_s == pytest.approx(b.tbt_s, rel=1e-12)


@pytest.fixture(scope="module")
def ds_small(ds_trace):
    from hdmoe_milp.workload import Trace

    return Trace(tuple(a[:600] for a in ds_trace.layers), ds_trace.num_experts, ds_trace.top_k, "ds-600")


def test_evaluator_fast_path_equals_general_path(ds_small, monkeypatch):
    from dataclasses import replace

    from hdmoe_milp.workload import Trace

    # four of the real layers: the per-layer code is the same for every layer, and 26 took 11 s
    few = (0, 3, 13, 25)
    ds_small = Trace(tuple(ds_small.layers[i] for i in few), ds_small.num_experts, ds_small.top_k, "ds-600-4")
    m = replace(get_model("deepseek-v2-lite"), moe_layers=len(few))
    hw = make_hardware("5/50", "4x8", hop_latency_s=2e-8)
    f = ds_small.frequencies()
    plans = {s: build(s, m, hw, f) for s in ("tp", "ep", "ep-lpt", "cb", "eplb")}
    plans["ep+replica"] = _extra_replica(plans["ep"], hw.num_nodes)
    workloads = {"expected": expected_workload(ds_small, 128), "observed": sample_batch(ds_small, 128, "random", 3)}
    calls = []
    fast_kernel = evaluator_mod.spread_link_loads
    monkeypatch.setattr(evaluator_mod, "spread_link_loads", lambda *a: calls.append(1) or fast_kernel(*a))
    checked = 0
    for (sn, p), (wn, wl) in itertools.product(plans.items(), workloads.items()):
        replicated = any(lp.is_replicated for lp in p.layers)
        dispatches = ("fraction", "affinity", "balanced", "nearest") if replicated else ("fraction",)
        combos = itertools.product(("mesh", "paper"), ("tree", "unicast"), ("node", "block", "expert"), dispatches)
        for mode, delivery, coalesce, dispatch in combos:
            if replicated and coalesce != "node" and dispatch not in ("fraction", "nearest"):
                continue  # keep the test short: the rules only change the copies, checked with node coalescing
            opts = EvalOptions(mode=mode, delivery=delivery, home="spread", coalesce=coalesce, replica_rule=dispatch)
            n_before = len(calls)
            fast = evaluate(p, m, hw, wl, opts)
            assert len(calls) == n_before + 1  # the fast kernel did the work
            _assert_same(fast, _evaluate(p, m, hw, wl, opts, fast=False), (sn, wn, opts))
            checked += 1
    assert checked > 100


def test_evaluator_general_path_still_used(ds_small):
    """Explicit homes and meshes over 8x8 keep the per-layer path (and agree with fast=False trivially)."""
    m = get_model("deepseek-v2-lite")
    wl = expected_workload(ds_small, 64)
    for mesh, home in (("4x8", "holder"), ("4x8", "random"), ("2x16", "spread")):
        hw = make_hardware("5/50", mesh)
        p = build("ep-lpt", m, hw, ds_small.frequencies())
        opts = EvalOptions(home=home, seed=3)
        _assert_same(evaluate(p, m, hw, wl, opts), _evaluate(p, m, hw, wl, opts, fast=False), (mesh, home))


def test_mixtral_default_options(mixtral_trace):
    m = get_model("mixtral-8x7b")
    hw = make_hardware("10/25", "4x4")
    p = build("cb", m, hw, mixtral_trace.frequencies())
    for wl in (expected_workload(mixtral_trace, 256), sample_batch(mixtral_trace, 64, "contiguous", 1)):
        for opts in (EvalOptions(), EvalOptions(delivery="unicast"), EvalOptions(mode="paper", home="spread")):
            _assert_same(evaluate(p, m, hw, wl, opts), _evaluate(p, m, hw, wl, opts, fast=False), opts)
