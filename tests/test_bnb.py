"""Branch and bound over the family (:mod:`hdmoe_milp.strategies.block_milp.bnb`), against brute
force on the tiny certificate cases: every node's bound is below every completion's evaluator score,
a full search returns the exhaustive optimum, and a cut search a valid bound."""

from __future__ import annotations

import numpy as np
import pytest

from hdmoe_milp.strategies.block_milp import (
    LnsSettings,
    MilpOptions,
    SolveParams,
    family_model,
    layer_baselines,
    solve_layer,
)
from hdmoe_milp.strategies.block_milp.bnb import _Search, branch_and_bound
from hdmoe_milp.strategies.block_milp.polish import IncrementalScore

from .test_certificate import CASES, best_over_family, case_family_scores, instance


def scorer(bm, tr, batch):
    ids, fg = tr.coactivation(0)
    return IncrementalScore(bm, ids, fg * batch, np.zeros(bm.model.num_experts, dtype=np.int64))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_node_bound_is_below_every_completion(case):
    m, hw, tr, delivery, batch = instance(case)
    bm, assigns, scores = case_family_scores(case)
    inc = scorer(bm, tr, batch)
    order = np.argsort(-inc.flops_e, kind="stable")
    s = _Search(inc, bm.allowed, order)
    E = m.num_experts
    tight = 0
    for d in range(E):
        prefixes = {tuple(a[order[:d]]) for a in assigns}
        for prefix in prefixes:
            pos, cs, val = s.look_ahead(prefix)
            mask = np.all(assigns[:, order[:d]] == np.array(prefix, dtype=np.int64), axis=1)
            best = scores[mask].min()
            # each expert still to place: its bound on column b is below every completion using b
            for p, b, v in zip(pos, cs, val, strict=True):
                sub = mask & (assigns[:, order[d + p]] == b)
                assert v <= scores[sub].min() * (1 + 1e-9)
                if d + p == E - 1 and d == E - 1:  # the last expert: a complete plan, scored exactly
                    assert v == pytest.approx(scores[sub].min(), rel=1e-9)
            node = max(np.minimum.reduceat(val, np.searchsorted(pos, np.arange(E - d))))
            assert node <= best * (1 + 1e-9)
            tight += node >= best * (1 - 1e-9)
    assert tight > 0  # the bound is attained somewhere (it is not vacuous)


@pytest.mark.parametrize("symmetry", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_full_search_returns_the_exhaustive_optimum(case, symmetry):
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    bm, assigns, scores = case_family_scores(case)
    if symmetry:  # the default model: the hottest expert restricted to the top-left quadrant
        base, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
        bm = family_model(m, hw, f, batch, MilpOptions(delivery=delivery), groups, base)
    inc = scorer(bm, tr, batch)
    worst = assigns[int(np.argmax(scores))]
    r = branch_and_bound(inc, bm.allowed, worst, float(scores.max()) * 1.01)
    assert r.stop == "proven" and r.improved
    assert r.score_s == pytest.approx(best, rel=1e-9)
    assert r.bound_s == pytest.approx(best, rel=1e-9)
    inc.reset(r.assign)  # the plan returned has the score reported
    assert inc.value == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cut_search_gives_a_valid_bound(case):
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    bm, assigns, scores = case_family_scores(case)
    inc = scorer(bm, tr, batch)
    start = assigns[int(np.argmax(scores))]
    bounds = []
    for n in (1, 2, 4, 8):
        r = branch_and_bound(inc, bm.allowed, start, float(scores.max()), max_nodes=n)
        assert r.bound_s <= best * (1 + 1e-9) and best <= r.score_s * (1 + 1e-9)
        assert r.nodes <= n
        bounds.append(r.bound_s)
    assert bounds == sorted(bounds)  # best first: more nodes never lower the bound
    # within a gap target the search may stop early, and its bound meets the target
    r = branch_and_bound(inc, bm.allowed, start, float(scores.max()), gap=0.05)
    assert r.stop == "proven" and r.bound_s >= r.score_s * (1 - 0.05) * (1 - 1e-12)
    assert r.bound_s <= best * (1 + 1e-9)


@pytest.mark.parametrize("case", [0, 2])
def test_capacity_is_respected(case):
    m, hw, tr, delivery, batch = instance(case)
    bm, assigns, scores = case_family_scores(case)
    inc = scorer(bm, tr, batch)
    mem = bm.mem_bytes[assigns].sum(axis=1).max(axis=1)  # [n] busiest node's expert bytes
    cap = float(np.quantile(mem, 0.3))  # about 70 % of the plans break it
    inc.cap = cap
    ok = mem <= cap * (1 + 1e-9)
    best = scores[ok].min()
    allowed = bm.allowed & (bm.mem_bytes.max(axis=1) <= cap)[None, :]
    start = assigns[ok][int(np.argmax(scores[ok]))]
    r = branch_and_bound(inc, allowed, start, float(scores[ok].max()) * 1.01)
    assert r.score_s == pytest.approx(best, rel=1e-9)
    assert bm.mem_bytes[r.assign].sum(axis=0).max() <= cap * (1 + 1e-9)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_layer_solve_with_and_without_branch_and_bound(case):
    """In the layer solve (small layers only): valid either way, and with it the layer proves the
    exhaustive optimum on every tiny case."""
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    kw = dict(backend="cpsat", params=SolveParams(time_limit_s=30, deterministic=True),
              options=MilpOptions(delivery=delivery), coactivation=groups)
    off = solve_layer(m, hw, f, batch, lns_settings=LnsSettings(bnb=False), **kw)
    on = solve_layer(m, hw, f, batch, **kw)
    for r in (off, on):
        assert r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)
    assert "bnb" not in [p[3] for p in off.trace] and "branch and bound" not in off.message
    assert on.status == "optimal" and on.objective_s == pytest.approx(best, rel=1e-9)
    assert on.gap <= 1e-4 + 5e-5
    if "bnb" in [p[3] for p in on.trace]:
        assert "branch and bound" in on.message
    again = solve_layer(m, hw, f, batch, **kw)  # deterministic: a node budget, not the wall clock
    assert np.array_equal(again.assign, on.assign) and again.bound_s == on.bound_s


def test_an_expert_without_columns_leaves_the_incumbent_as_the_bound():
    m, hw, tr, delivery, batch = instance(0)
    bm, assigns, scores = case_family_scores(0)
    inc = scorer(bm, tr, batch)
    allowed = bm.allowed.copy()
    allowed[1] = False  # e.g. every column of expert 1 fixed out by the incumbent
    r = branch_and_bound(inc, allowed, assigns[0], float(scores[0]))
    assert r.bound_s == r.score_s == float(scores[0]) and not r.improved and r.nodes == 0
