"""The family contains every non-replicated baseline: each baseline layer round-trips through
``assign_from_shares`` -> ``placement`` (same shares), and ``solve_layer``'s plan scores no worse
under the evaluator (``LayerScorer``) than any of them; symmetry breaking only with a flip-closed family."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hdmoe_milp import Hardware, Mesh, MoEModel
from hdmoe_milp.strategies.block_milp import (
    MilpOptions,
    SolveParams,
    family_model,
    layer_baselines,
    solve_layer,
)
from hdmoe_milp.strategies.block_milp.blocks import flip_copies
from hdmoe_milp.strategies.block_milp.solve import LayerScorer, baseline_layers
from hdmoe_milp.strategies.hdmoe import hdmoe_layer
from hdmoe_milp.synthetic import synthetic_trace

# (experts, top-k, mesh, link bandwidth): E < D gives EP's non-aligned snake runs, E >= D whole experts
CASES = [(3, 2, "2x4", 2e8), (6, 2, "2x4", 4e8), (8, 2, "4x4", 3e8), (12, 3, "2x4", 1e9)]


def case(c: int):
    E, k, mesh, bw = CASES[c]
    m = MoEModel("tiny", num_experts=E, top_k=k, hidden=256, expert_intermediate=512, moe_layers=2)
    hw = Hardware(Mesh.parse(mesh), compute_flops=2e9, link_bw_bytes_per_s=bw)
    tr = synthetic_trace(m, 400, seed=c)
    return m, hw, tr


@pytest.mark.parametrize("c", range(len(CASES)))
def test_solve_layer_never_worse_than_any_baseline(c):
    m, hw, tr = case(c)
    f, batch, li = tr.frequencies(), 32.0, 1
    groups = tr.coactivation(li)
    params = SolveParams(time_limit_s=5, deterministic=True, work_limit=0.2)
    r = solve_layer(m, hw, f[li], batch, params=params, layer=li, freqs_all=f, coactivation=groups)
    base, hd = layer_baselines(m, hw, f[li], batch, backend="cpsat", params=params, layer=li, freqs_all=f,
                               coactivation=groups)
    assert set(base) == {"tp", "ep", "ep-lpt", "cb", "hdmoe"}
    # the hdmoe layer computed inside the layer is the strategy's layer, and comes back in the result
    alone, _ = hdmoe_layer(m, hw, f[li], groups, batch, seed=params.seed, layer=li)
    assert r.hdmoe is not None and np.array_equal(r.hdmoe[0].shares, alone.shares)
    assert np.array_equal(hd[0].shares, alone.shares)
    bm = family_model(m, hw, f[li], batch, None, groups, base)
    score = LayerScorer(bm)
    assert bm.blocks.num_patterns > 0
    for name, lp in base.items():
        a = bm.assign_from_shares(lp.shares)
        assert a is not None, name
        assert np.array_equal(bm.placement(a).shares, lp.shares), name  # exactly the baseline's shares
        assert bm.in_family(a) and bm.feasible(bm.canonical(a))
        assert r.objective_s <= score(a) * (1 + 1e-12), name
    assert r.bound_s <= r.objective_s


def test_patterns_off_is_the_block_family():
    m, hw, tr = case(0)
    f = tr.frequencies()
    base = baseline_layers(m, hw, f, 0, 32.0)[0]
    bm = family_model(m, hw, f[0], 32.0, MilpOptions(patterns=False), tr.coactivation(0), base)
    assert bm.blocks.num_patterns == 0 and bm.family.all()
    assert bm.assign_from_shares(base["ep"].shares) is None  # EP's snake runs on 2x4 are no aligned blocks
    r = solve_layer(m, hw, f[0], 32.0, params=SolveParams(time_limit_s=2), options=MilpOptions(patterns=False),
                    coactivation=tr.coactivation(0), hdmoe_work_limit=None)
    assert r.hdmoe is None and "power-of-two" in r.family and "hdmoe" not in r.family


def test_symmetry_needs_a_flip_closed_family():
    m, hw, tr = case(1)
    f = tr.frequencies()
    base, _ = layer_baselines(m, hw, f[0], 32.0, backend="cpsat", params=SolveParams(), coactivation=tr.coactivation(0))
    flips = family_model(m, hw, f[0], 32.0, MilpOptions(), tr.coactivation(0), base)
    plain = family_model(m, hw, f[0], 32.0, MilpOptions(pattern_flips=False), tr.coactivation(0), base)
    assert flips.symmetric and not plain.symmetric
    # every candidate set is closed under the flips: a flipped column of expert i is a column of i
    for i in range(m.num_experts):
        cols = np.flatnonzero(flips.family[i])
        for g in flip_copies(flips.blocks.share[cols], hw.mesh):
            assert set(flips.blocks.match(g).tolist()) <= set(cols.tolist())
    # the hottest expert keeps a candidate in the top-left quadrant; the others keep all theirs
    hot = int(np.argmax(flips.f))
    assert flips.allowed[hot].any() and flips.allowed[hot].sum() < flips.family[hot].sum()
    others = np.arange(m.num_experts) != hot
    assert np.array_equal(flips.allowed[others], flips.family[others])
    assert np.array_equal(plain.allowed, plain.family)


def test_unequal_bandwidths_switch_symmetry_off():
    m, hw, tr = case(1)
    hw = dataclasses.replace(hw, link_bw_bytes_per_s=np.linspace(1e8, 2e8, hw.mesh.num_links))
    bm = family_model(m, hw, tr.frequencies()[0], 32.0, MilpOptions(), tr.coactivation(0), {})
    assert not bm.symmetric


def test_match_finds_the_first_equal_column_by_brute_force():
    """``Blocks.match`` against the definition: the first column on the same nodes whose shares are
    within SHARE_TOL, among the allowed ones; near misses and other node sets give -1."""
    from hdmoe_milp.strategies.block_milp.blocks import SHARE_TOL, make_blocks

    rng = np.random.default_rng(3)
    base = make_blocks(Mesh.parse("2x4"))
    uneven = rng.dirichlet(np.ones(8), size=5) * (rng.random((5, 8)) < 0.6)
    uneven = uneven[uneven.sum(axis=1) > 0]
    uneven /= uneven.sum(axis=1, keepdims=True)
    blocks, _ = base.with_patterns(np.vstack([uneven, base.share[:3]]))
    rows = np.vstack([blocks.share, blocks.share[:4] + 1e-9 * (blocks.share[:4] > 0), rng.dirichlet(np.ones(8), 3)])
    rows = np.vstack([rows, rows[:2] + 0.5 * SHARE_TOL])  # within the tolerance: still a match
    among = rng.random((len(rows), blocks.num_blocks)) < 0.7
    for mask in (None, among):
        got = blocks.match(rows, among=mask)
        for r, row in enumerate(rows):
            ok = [j for j in range(blocks.num_blocks)
                  if np.array_equal(row > 0, blocks.share[j] > 0)
                  and np.abs(row - blocks.share[j]).max() <= SHARE_TOL and (mask is None or mask[r, j])]
            assert got[r] == (ok[0] if ok else -1)
    assert (blocks.match(rows[: blocks.num_blocks]) == np.arange(blocks.num_blocks)).all()
