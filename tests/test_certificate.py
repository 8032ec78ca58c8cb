"""The certificate against the evaluator: on tiny instances, every assignment of experts to their
candidate columns (the whole family: aligned blocks, the baselines' patterns and their mirror images)
is scored by the evaluator (default options: coalesce="node"); for every backend,
bound <= exhaustive evaluator optimum <= returned score, and the returned score is the evaluator's."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp import EvalOptions, Hardware, LayerPlacement, Mesh, MoEModel, Placement
from hdmoe_milp.errors import InputError
from hdmoe_milp.evaluator import evaluate
from hdmoe_milp.solvers import get_backend, lp_bound
from hdmoe_milp.strategies.block_milp import (
    LnsSettings,
    MilpOptions,
    SolveParams,
    available_backends,
    family_layers,
    family_model,
    layer_baselines,
    solve_layer,
)
from hdmoe_milp.strategies.block_milp.formulation import BlockModel
from hdmoe_milp.strategies.block_milp.solve import LayerScorer
from hdmoe_milp.synthetic import synthetic_trace
from hdmoe_milp.workload import LayerRouting, Workload

BACKENDS = [b for b in ("cbc", "cpsat", "highs", "scip") if b in available_backends()]
BOUND_BACKENDS = [b for b in ("cpsat", "highs", "scip") if b in available_backends()]

# (experts, top-k, mesh, link bandwidth, compute, hop latency, delivery, batch)
CASES = [
    (3, 2, "2x2", 2e8, 1e9, 0.0, "tree", 16),
    (3, 2, "1x4", 1e8, 2e9, 1e-7, "tree", 32),
    (4, 2, "2x2", 3e8, 2e9, 0.0, "unicast", 16),
    (3, 3, "2x2", 5e8, 1e9, 1e-7, "tree", 8),
    (4, 1, "1x2", 1e8, 1e9, 0.0, "tree", 64),
]


def instance(case: int):
    E, k, mesh, bw, comp, hop, delivery, batch = CASES[case]
    m = MoEModel("tiny", num_experts=E, top_k=k, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse(mesh), compute_flops=comp, link_bw_bytes_per_s=bw, hop_latency_s=hop)
    tr = synthetic_trace(m, 300, seed=case)
    return m, hw, tr, delivery, float(batch)


def family_scores(m, hw, tr, delivery, batch, options: MilpOptions | None = None):
    """Every assignment of experts to their candidate columns in :func:`solve_layer`'s family (the
    same baselines, hence patterns) and the evaluator's layer time of each (scored in chunks, as the
    layers of one placement): ``(block model, assigns [n, E], scores [n])``."""
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    opts = dataclasses.replace(options or MilpOptions(), delivery=delivery, symmetry=False)
    base, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
    base = family_layers(m, hw, f, batch, groups, opts, base, seed=SolveParams().seed)
    bm = family_model(m, hw, f, batch, opts, groups, base)
    cands = [np.flatnonzero(bm.allowed[i]) for i in range(m.num_experts)]  # the family (no symmetry cut)
    assigns = np.array(list(itertools.product(*cands)))
    ids, fg = groups
    scores = []
    for lo in range(0, len(assigns), 4000):
        chunk = assigns[lo:lo + 4000]
        n = len(chunk)
        wl = Workload(tuple(LayerRouting(ids, fg * batch) for _ in range(n)), m.num_experts, m.top_k, batch,
                      "expected")
        plan = Placement(tuple(bm.placement(a) for a in chunk))
        ev = evaluate(plan, dataclasses.replace(m, moe_layers=n), hw, wl, EvalOptions(delivery=delivery))
        scores.append(np.asarray(ev.layer_s))
    return bm, assigns, np.concatenate(scores)


def exhaustive(m, hw, tr, delivery, batch, options: MilpOptions | None = None) -> float:
    """The evaluator's best layer time over the family (:func:`family_scores`)."""
    return float(family_scores(m, hw, tr, delivery, batch, options)[2].min())


@functools.cache
def case_family_scores(case: int):
    """:func:`family_scores` of one case with the default options (cached: the brute-force tests of
    this file and of ``test_bnb.py`` share it; they must not modify what it returns)."""
    return family_scores(*instance(case))


@functools.cache
def best_over_family(case: int, flips: bool = True) -> float:
    """:func:`exhaustive` of one case (cached: several tests and backends share it)."""
    if flips == MilpOptions().pattern_flips:
        return float(case_family_scores(case)[2].min())
    return exhaustive(*instance(case), MilpOptions(pattern_flips=flips))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bound_below_exhaustive_optimum_below_score(backend, case):
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    r = solve_layer(m, hw, f, batch, backend=backend, params=SolveParams(time_limit_s=5),
                    options=MilpOptions(delivery=delivery), coactivation=groups)
    assert r.bound_s is not None and r.gap is not None
    assert r.bound_s <= best * (1 + 1e-9)
    assert best <= r.objective_s * (1 + 1e-9)
    # the reported objective is the evaluator's score of the returned plan
    wl = Workload((LayerRouting(groups[0], groups[1] * batch),), m.num_experts, m.top_k, batch, "expected")
    ev = evaluate(Placement((r.placement,)), m, hw, wl, EvalOptions(delivery=delivery))
    assert r.objective_s == pytest.approx(float(ev.layer_s[0]), rel=1e-12)
    assert r.model_objective_s >= r.objective_s * (1 - 1e-9)  # the block model over-estimates
    assert "power-of-two" in r.family


@pytest.mark.parametrize("case", [0, 2, 3])
def test_tracked_groups_bound_is_valid_and_no_weaker(case):
    """lower_rows > 0: tracked groups bounded by their longest single-expert route per link."""
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    for backend in BACKENDS:
        r0 = solve_layer(m, hw, f, batch, backend=backend, params=SolveParams(time_limit_s=5),
                         options=MilpOptions(delivery=delivery), coactivation=groups)
        r = solve_layer(m, hw, f, batch, backend=backend, params=SolveParams(time_limit_s=5),
                        options=MilpOptions(delivery=delivery, lower_rows=10_000), coactivation=groups)
        assert r0.bound_s <= r.bound_s * (1 + 1e-9) and r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)


def test_bound_without_coactivation_is_valid_for_the_expected_workload():
    m, hw, tr, delivery, batch = instance(0)
    best = best_over_family(0)
    r = solve_layer(m, hw, tr.frequencies()[0], batch, backend=BACKENDS[0], params=SolveParams(time_limit_s=5))
    assert r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)


@pytest.mark.parametrize("case", [0, 2, 3])
def test_family_without_mirror_images(case):
    """pattern_flips=False: the patterns as the baselines give them, symmetry breaking off; the bound
    is valid over that (smaller) family and the plan is in it."""
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case, flips=False)
    assert best >= best_over_family(case) * (1 - 1e-12)  # a subset of the family with mirror images
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    r = solve_layer(m, hw, f, batch, backend=BACKENDS[-1], params=SolveParams(time_limit_s=5),
                    options=MilpOptions(delivery=delivery, pattern_flips=False), coactivation=groups)
    assert r.bound_s <= best * (1 + 1e-9) and best <= r.objective_s * (1 + 1e-9)
    assert "mirror" not in r.family


@pytest.mark.parametrize("backend", BOUND_BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bound_stage_lifts_the_lp_bound_and_stays_below_the_optimum(backend, case):
    """The relaxation solved as a MILP (the bound stage): at least the LP bound (which, with the
    single-route rows, is often the stage's bound already), at most the exhaustive optimum; on the
    top-1 case it proves the optimum and the layer ends as optimal."""
    m, hw, tr, delivery, batch = instance(case)
    best = best_over_family(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    # deterministic: the stage runs on its work share whatever the wall clock did before it (a stalled
    # baseline solve on a loaded machine once spent a 5 s wall limit before the stage could start)
    # (without the branch and bound, which replaces the stage on small layers)
    kw = dict(backend=backend, params=SolveParams(time_limit_s=30, deterministic=True),
              options=MilpOptions(delivery=delivery), coactivation=groups, lns_settings=LnsSettings(bnb=False))
    lp_only = solve_layer(m, hw, f, batch, bound_share=0.0, **kw)
    r = solve_layer(m, hw, f, batch, **kw)
    assert lp_only.bound_s <= r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)
    assert f"bound:{backend}" not in [p[3] for p in lp_only.trace]
    if lp_only.status != "optimal":  # the LP bound alone did not prove the gap target: the stage ran
        assert f"bound:{backend}" in [p[3] for p in r.trace]
    if m.top_k == 1:
        assert r.status == "optimal" and r.gap <= 1e-4 + 5e-5


@pytest.mark.parametrize("emphasis", ["balanced", "bound"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpsat_bound_emphasis_solves_the_relaxation_to_a_valid_bound(case, emphasis):
    """CP-SAT on the certificate's relaxation (the bound stage's model) with either emphasis (the
    stage uses ``bound``: full linearization): solved to optimality on the tiny cases, its bound is
    at most the evaluator's exhaustive optimum, and both emphases agree (up to CP-SAT's scaling)."""
    m, hw, tr, delivery, batch = instance(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    base, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
    bm = family_model(m, hw, f, batch, MilpOptions(delivery=delivery), groups, base)
    lower = bm.to_linear_lower()
    params = SolveParams(time_limit_s=20, deterministic=True, gap=0.0, emphasis=emphasis)
    out = get_backend("cpsat").solve(lower, params)
    ref = get_backend("cpsat").solve(lower, SolveParams(time_limit_s=20, deterministic=True, gap=0.0))
    assert out.termination.value == "optimal"
    us = 1e6  # the model is in microseconds
    assert out.dual_bound / us <= best_over_family(case) * (1 + 1e-9)
    assert out.dual_bound == pytest.approx(ref.dual_bound, rel=1e-5)
    assert out.primal == pytest.approx(ref.primal, rel=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_column_floor_is_below_every_plan_using_the_column(case):
    """``column_floor_s[i, b]`` (what fixes ``x_ib`` at 0 against an incumbent) is at most the
    evaluator's time of every plan of the family that puts expert i on column b; with the best plan
    as the incumbent, the fixed relaxation's LP stays below the exhaustive optimum."""
    bm, assigns, scores = case_family_scores(case)
    floor = bm.column_floor_s[np.arange(bm.model.num_experts)[None, :], assigns]  # [n, E]
    assert np.all(floor.max(axis=1) <= scores * (1 + 1e-9))
    best = float(scores.min())
    assert lp_bound(bm.to_linear_lower(incumbent_s=best)) / 1e6 <= best * (1 + 1e-9)
    # and not vacuous: on these cases some plan attains it (within 1 %)
    assert np.min(scores / floor.max(axis=1)) <= 1.01


@pytest.mark.parametrize("case", range(len(CASES)))
def test_family_floor_is_below_the_exhaustive_optimum(case):
    """``family_floor_s`` (the bound before any LP: every expert on its cheapest column's floor) is
    at most the best plan of the family under the evaluator, and at least area plus the cut floor."""
    bm, assigns, scores = case_family_scores(case)
    assert bm.area_lower_s + sum(bm.cut_floors_s) <= bm.family_floor_s * (1 + 1e-12)
    assert bm.family_floor_s <= scores.min() * (1 + 1e-9)


def test_unknown_emphasis_is_an_input_error():
    with pytest.raises(InputError, match="emphasis"):
        SolveParams(emphasis="fast")


def test_single_route_rows_lift_the_lp_bound_and_stay_valid():
    """(U3) T >= f_i * busiest link of i's column: the LP bound with these rows is at least the one
    without, never above the exhaustive optimum, and higher on some case."""
    lifted = 0
    for case in range(len(CASES)):
        m, hw, tr, delivery, batch = instance(case)
        best = best_over_family(case)
        f, groups = tr.frequencies()[0], tr.coactivation(0)
        bl, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
        b = {}
        for on in (False, True):
            bm = family_model(m, hw, f, batch, MilpOptions(delivery=delivery, single_route=on), groups, bl)
            b[on] = lp_bound(bm.to_linear_lower()) / 1e6
        assert b[False] * (1 - 1e-9) <= b[True] <= best * (1 + 1e-9), case
        lifted += b[True] > b[False] * (1 + 1e-6)
    assert lifted >= 1


@pytest.mark.parametrize("case", [0, 2])
def test_lower_model_tracking_every_group_is_exact_at_integer_points(case):
    """With every co-activation group tracked (U1), tree delivery and no hop latency, the relaxation's
    value at a plan is the evaluator's score of that plan, so its MILP optimum is the family's
    optimum; with unicast it stays below the evaluator."""
    m, hw, tr, delivery, batch = instance(case)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    bl, _ = layer_baselines(m, hw, f, batch, backend="cpsat", params=SolveParams(), coactivation=groups)
    bm = family_model(m, hw, f, batch, MilpOptions(delivery=delivery, symmetry=False), groups, bl)
    lm = bm.to_linear_lower(lower_rows=bm.all_groups_rows)
    score = LayerScorer(bm)
    rng = np.random.default_rng(case)
    for _ in range(25):
        a = np.array([rng.choice(np.flatnonzero(bm.allowed[i])) for i in range(m.num_experts)])
        value = lm.objective(bm.lower_vector(a, lm)) / 1e6
        if delivery == "tree":
            assert value == pytest.approx(score(a), rel=1e-7)
        else:
            assert value <= score(a) * (1 + 1e-9)
    if delivery == "tree":  # symmetry breaking on, as in solve_layer: a flip of an optimum stays
        bm = family_model(m, hw, f, batch, MilpOptions(delivery=delivery), groups, bl)
        out = get_backend(BOUND_BACKENDS[0]).solve(bm.to_linear_lower(lower_rows=bm.all_groups_rows),
                                                   SolveParams(time_limit_s=30, gap=1e-9))
        # CP-SAT solves an integer-scaled copy whose rows are rounded as a relaxation: close, not equal
        assert out.primal / 1e6 == pytest.approx(best_over_family(case), rel=1e-5)
        assert LayerScorer(bm)(bm.decode(out.x)) == pytest.approx(best_over_family(case), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 5), E=st.integers(2, 6), k=st.integers(1, 3),
       delivery=st.sampled_from(["tree", "unicast"]), per_link=st.booleans(), seed=st.integers(0, 10_000))
def test_cut_floor_is_below_every_placements_phases(rows, cols, E, k, delivery, per_link, seed):
    """``cut_floors_s`` (the bound's floor when no LP finishes) are at most the dispatch and the
    combine phase's busiest-link time of any placement (any shares, one copy per expert) under the
    evaluator with spread homes, with one bandwidth or one per link, and positive on every mesh
    with links."""
    k = min(k, E)
    rng = np.random.default_rng(seed)
    m = MoEModel("t", num_experts=E, top_k=k, hidden=64, expert_intermediate=128, moe_layers=1)
    mesh = Mesh(rows, cols)
    bw = rng.uniform(0.5e8, 4e8, mesh.num_links) if per_link and mesh.num_links else 2e8
    hw = Hardware(mesh, compute_flops=1e9, link_bw_bytes_per_s=bw)
    tr = synthetic_trace(m, 64, seed=seed % 97)
    f, (ids, fg) = tr.frequencies()[0], tr.coactivation(0)
    B = 32.0
    disp, comb = BlockModel(m, hw, f, B, MilpOptions(delivery=delivery), coactivation=(ids, fg)).cut_floors_s
    assert (disp > 0) == (comb > 0) == (rows * cols > 1)
    D = rows * cols
    shares = rng.random((E, D)) * (rng.random((E, D)) < rng.uniform(0.2, 1.0))
    shares[np.arange(E), rng.integers(0, D, E)] += 0.1  # every expert somewhere
    shares /= shares.sum(axis=1, keepdims=True)
    lp = LayerPlacement(shares, np.arange(E), np.ones(E), E)
    wl = Workload((LayerRouting(ids, fg * B),), E, k, B, "expected")
    ev = evaluate(Placement((lp,)), m, hw, wl, EvalOptions(delivery=delivery))
    assert ev.dispatch_s[0] >= disp * (1 - 1e-9) and ev.combine_s[0] >= comb * (1 - 1e-9)


def test_cut_floor_is_attained_where_half_the_tokens_stay_on_each_side():
    """Top-1 on 1x2, two equally hot experts, one per node: each link carries the tokens homed on
    its side whose expert is across, a quarter of the batch: exactly the floor."""
    m = MoEModel("t", num_experts=2, top_k=1, hidden=64, expert_intermediate=128, moe_layers=1)
    hw = Hardware(Mesh(1, 2), compute_flops=1e9, link_bw_bytes_per_s=2e8)
    ids, fg, B = np.array([[0], [1]]), np.array([0.5, 0.5]), 32.0
    disp, comb = BlockModel(m, hw, fg, B, MilpOptions(), coactivation=(ids, fg)).cut_floors_s
    assert disp == comb == pytest.approx(B / 4 * 64 * m.activation_bytes / 2e8)
    lp = LayerPlacement(np.eye(2), np.arange(2), np.ones(2), 2)
    ev = evaluate(Placement((lp,)), m, hw, Workload((LayerRouting(ids, fg * B),), 2, 1, B, "expected"), EvalOptions())
    assert ev.dispatch_s[0] == pytest.approx(disp) and ev.combine_s[0] == pytest.approx(comb)


def test_cut_floor_with_unequal_links_is_attained_and_above_the_fastest_links_floor():
    """1x2 with the east link twice as fast as the west one: each phase's floor is
    ``(B/2)·v / (BW_e + BW_w)``, attained by the split that loads both links equally in that phase:
    in dispatch the expert on the right takes ``BW_e / (BW_e + BW_w)`` of the tokens, in combine
    (results flow back) the expert on the left does. Dividing by the fastest link (the floor
    before version 0.7.5) gives 3/4 of it."""
    m = MoEModel("t", num_experts=2, top_k=1, hidden=64, expert_intermediate=128, moe_layers=1)
    bw_e, bw_w = 2e8, 1e8
    hw = Hardware(Mesh(1, 2), compute_flops=1e9, link_bw_bytes_per_s=np.array([bw_e, bw_w]))
    assert hw.mesh.link_id(0, 1) == 0  # the east link comes first in the link order
    p = bw_e / (bw_e + bw_w)
    ids, fg, B = np.array([[0], [1]]), np.array([1 - p, p]), 32.0
    vec = 64 * m.activation_bytes
    disp, comb = BlockModel(m, hw, fg, B, MilpOptions(), coactivation=(ids, fg)).cut_floors_s
    assert disp == comb == pytest.approx(B / 2 * vec / (bw_e + bw_w))
    assert B / 4 * vec / bw_e == pytest.approx(0.75 * disp)
    lp = LayerPlacement(np.eye(2), np.arange(2), np.ones(2), 2)
    for split, phase, floor in ((fg, "dispatch_s", disp), (fg[::-1], "combine_s", comb)):
        ev = evaluate(Placement((lp,)), m, hw, Workload((LayerRouting(ids, split * B),), 2, 1, B, "expected"),
                      EvalOptions())
        assert getattr(ev, phase)[0] == pytest.approx(floor)
        assert ev.dispatch_s[0] >= disp * (1 - 1e-12) and ev.combine_s[0] >= comb * (1 - 1e-12)


@pytest.mark.parametrize("layers", [49, 1])
def test_bound_is_valid_when_a_nodes_capacity_share_is_exactly_one_expert(layers):
    # a capacity share one expert wide, rounded 1 ulp below it (49 layers) or 1e-10 below it: the
    # one-node columns fit within the capacity checks' tolerance and must stay in the bound's family
    from hdmoe_milp.costs import CAPACITY_RTOL, layer_capacity_bytes, other_weight_bytes_per_node
    from hdmoe_milp.workload import Trace

    m = MoEModel("tiny", num_experts=2, top_k=1, hidden=256, expert_intermediate=512, moe_layers=layers)
    w = m.expert_weight_bytes()
    hw0 = Hardware(Mesh(1, 4), compute_flops=1e12, link_bw_bytes_per_s=1e7)
    per_layer = w if layers > 1 else w * (1 - 1e-10)
    hw = dataclasses.replace(hw0, dram_capacity_bytes=other_weight_bytes_per_node(m, hw0) + layers * per_layer)
    assert abs(layer_capacity_bytes(m, hw) / w - 1) < CAPACITY_RTOL
    tr = Trace((np.array([[0]] * 80 + [[1]] * 20),) * layers, 2, 1)
    f, groups = tr.frequencies()[0], tr.coactivation(0)
    r = solve_layer(m, hw, f, 16.0, backend="cpsat", params=SolveParams(time_limit_s=5, deterministic=True),
                    coactivation=groups)
    bm = family_model(m, hw, f, 16.0, MilpOptions(), groups,
                      layer_baselines(m, hw, f, 16.0, backend="cpsat", params=SolveParams(), coactivation=groups)[0])
    m1 = dataclasses.replace(m, moe_layers=1)
    wl = Workload((LayerRouting(groups[0], groups[1] * 16.0),), 2, 1, 16.0, "expected")
    best = min(float(evaluate(Placement((bm.placement(np.array(a)),)), m1, hw0, wl, EvalOptions()).layer_s[0])
               for a in itertools.product(*[np.flatnonzero(bm.family[i]) for i in range(2)])
               if bm.in_family(np.array(a)))
    assert r.bound_s <= best * (1 + 1e-9) <= r.objective_s * (1 + 1e-9)
    assert r.objective_s == pytest.approx(best, rel=1e-9)  # each expert alone on its own node
