"""Replica dispatch rules: fraction, affinity (quota + touched nodes first) and nearest."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp import InputError
from hdmoe_milp.evaluator import EvalOptions, evaluate
from hdmoe_milp.hardware import Hardware, Mesh
from hdmoe_milp.moe import MoEModel
from hdmoe_milp.placement import LayerPlacement, Placement
from hdmoe_milp.replica_rules import assign_by_distance, assign_copies, split_at_quotas
from hdmoe_milp.workload import LayerRouting, Workload

MESH = Mesh.parse("2x2")  # node ids: 0 1 / 2 3


def hot_zero() -> LayerPlacement:
    """Experts 1, 2, 3 on nodes 1, 3, 2; expert 0 on node 0 and a replica on node 3, half each."""
    sh = np.zeros((5, 4))
    sh[[0, 1, 2, 3, 4], [0, 1, 3, 2, 3]] = 1
    return LayerPlacement(sh, np.array([0, 1, 2, 3, 0]), np.array([0.5, 1, 1, 1, 0.5]), 4)


def test_affinity_sends_tokens_to_the_replica_they_already_touch():
    lp = hot_zero()
    # tokens 1 and 4 touch node 3 (expert 2 lives there); the others touch nodes 1 or 2
    ex = np.array([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3]])
    w = np.ones(6)
    aff = assign_by_distance(lp, ex, w, MESH.distance)
    assert aff[1, 0] == aff[4, 0] == 4  # the replica on node 3 costs them no extra message
    served = np.bincount(aff[:, 0], minlength=5)
    assert served[0] == served[4] == 3  # quotas kept: each copy serves half of expert 0's tokens
    frac = assign_copies(lp, ex, w)
    assert np.bincount(frac[:, 0], minlength=5)[[0, 4]].tolist() == [3, 3]

    m = MoEModel("t", num_experts=4, top_k=2, hidden=1000, expert_intermediate=100, moe_layers=1)
    hw = Hardware(MESH, compute_flops=1e12, link_bw_bytes_per_s=1e9)
    wl = Workload((LayerRouting(ex, w),), 4, 2, 6.0, "observed")
    place = Placement((lp,))
    a = evaluate(place, m, hw, wl, EvalOptions(replica_rule="affinity"))
    f = evaluate(place, m, hw, wl, EvalOptions(replica_rule="fraction"))
    np.testing.assert_allclose(a.node_flops, f.node_flops)  # same compute, less traffic
    assert a.link_bytes_dispatch.sum() < f.link_bytes_dispatch.sum()


def test_nearest_follows_distance_then_least_load():
    lp = hot_zero()
    ex = np.array([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2]])
    out = assign_by_distance(lp, ex, np.ones(5), MESH.distance, "nearest")
    # tokens 1, 4 touch node 3: replica. The others touch node 1 or 2, one hop from both copies:
    # a tie, so least load wins: node 3 already has 2 tokens of expert 2 plus 2 of expert 0
    assert out[:, 0].tolist() == [0, 4, 0, 0, 4]


def test_nearest_with_no_touched_nodes_levels_the_copies():
    sh = np.zeros((3, 4))
    sh[[0, 1, 2], [0, 3, 1]] = 1
    lp = LayerPlacement(sh, np.array([0, 0, 1]), np.array([0.5, 0.5, 1.0]), 2)
    ex = np.zeros((9, 1), dtype=np.int64)  # top-1: a token touches nothing before its expert
    out = assign_by_distance(lp, ex, np.ones(9), MESH.distance, "nearest")
    n = np.bincount(out.ravel(), minlength=3)
    assert n[0] + n[1] == 9 and abs(int(n[0]) - int(n[1])) <= 1


@st.composite
def replicated_layer(draw):
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    E, D, F = 5, 4, int(draw(st.integers(1, 40)))
    rows, eo, fr = [], [], []
    for e in range(E):
        m = int(rng.integers(1, 4))
        q = rng.dirichlet(np.ones(m))
        for j in range(m):
            s = np.zeros(D)
            if j == 0 and rng.random() < 0.5:
                s[rng.choice(D, 2, replace=False)] = 0.5  # a sharded original
            else:
                s[rng.integers(D)] = 1.0
            rows.append(s)
            eo.append(e)
            fr.append(q[j])
    lp = LayerPlacement(np.array(rows), np.array(eo), np.array(fr), E)
    ex = np.array([rng.choice(E, 2, replace=False) for _ in range(F)])
    return lp, ex


@settings(max_examples=40, deadline=None)
@given(replicated_layer(), st.sampled_from(["affinity", "balanced", "nearest"]))
def test_every_token_is_served_by_a_copy_of_its_expert(case, rule):
    lp, ex = case
    w = np.ones(len(ex))
    out = assign_by_distance(lp, ex, w, MESH.distance, rule)
    assert np.all(lp.expert_of[out] == ex)
    again = assign_by_distance(lp, ex, w, MESH.distance, rule)
    np.testing.assert_array_equal(out, again)  # deterministic
    if rule == "affinity":  # every copy serves its quota to within one token
        n_e = np.bincount(ex.ravel(), minlength=lp.num_experts)
        served = np.bincount(out.ravel(), minlength=lp.num_copies)
        assert np.all(np.abs(served - lp.token_fraction * n_e[lp.expert_of]) <= 1.0 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(replicated_layer(), st.integers(0, 10_000))
def test_expected_flows_split_at_the_quotas_give_every_copy_its_exact_fraction(case, seed):
    """Expected workloads carry group flows of many tokens (fractional weights): cut where the copies'
    shares end (`split_at_quotas`), the `fraction` rule gives every copy exactly ``q_r`` of its
    expert's tokens, and the flows still carry every token of every expert set. Without the split a
    flow went to one copy whole (a top-1 expert's only flow: all its tokens on one copy)."""
    lp, ex = case
    w = np.random.default_rng(seed).gamma(0.5, 10.0, len(ex)) + 1e-3
    flows, fw = split_at_quotas(lp, ex, w)
    # the same tokens per expert set, pieces adjacent and in order
    key = [tuple(r) for r in ex]
    got: dict = {}
    for r, x in zip(flows, fw, strict=True):
        got[tuple(r)] = got.get(tuple(r), 0.0) + x
    want: dict = {}
    for r, x in zip(key, w, strict=True):
        want[r] = want.get(r, 0.0) + x
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-9 * want[k] for k in want)
    out = assign_copies(lp, flows, fw)
    assert np.all(lp.expert_of[out] == flows)
    n_e = np.bincount(ex.ravel(), weights=np.repeat(w, ex.shape[1]), minlength=lp.num_experts)
    served = np.bincount(out.ravel(), weights=np.repeat(fw, flows.shape[1]), minlength=lp.num_copies)
    np.testing.assert_allclose(served, lp.token_fraction * n_e[lp.expert_of], rtol=1e-9, atol=1e-9)
    assert len(fw) <= len(w) + lp.num_copies - lp.num_experts


def test_an_expected_batch_uses_the_replicas_of_a_top1_expert():
    """Two copies of expert 0, half each on nodes 0 and 1; expert 1 on node 1. The expected batch has
    one flow per expert (top-1): expert 0's 10 tokens are split 5/5, not all sent to one copy."""
    model = MoEModel("t", num_experts=2, top_k=1, hidden=64, expert_intermediate=128, moe_layers=1)
    hw = Hardware(Mesh(1, 2), compute_flops=1e9, link_bw_bytes_per_s=1e15, dram_bw_bytes_per_s=1e18)
    lp = LayerPlacement(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.array([0, 0, 1]),
                        np.array([0.5, 0.5, 1.0]), 2)
    wl = Workload((LayerRouting(np.array([[0], [1]]), np.array([10.0, 2.0])),), 2, 1, 12.0, "expected")
    ev = evaluate(Placement((lp,)), model, hw, wl, EvalOptions())
    np.testing.assert_allclose(ev.node_flops[0] / model.expert_flops_per_token(), [5.0, 7.0])


def test_unknown_dispatch_rule_names_the_field():
    with pytest.raises(InputError, match="replica_rule"):
        EvalOptions(replica_rule="closest")


def test_balanced_levels_the_batch_and_fills_stacked_copies_as_one():
    # expert 1 lives on node 0; expert 0 has copies on nodes 0 and 1; six tokens use both experts
    sh = np.zeros((3, 4))
    sh[[0, 1, 2], [0, 1, 0]] = 1
    lp = LayerPlacement(sh, np.array([0, 0, 1]), np.array([0.5, 0.5, 1.0]), 2)
    ex = np.tile([0, 1], (6, 1))
    bal = assign_by_distance(lp, ex, np.ones(6), MESH.distance, "balanced")
    frac = assign_copies(lp, ex, np.ones(6))
    assert np.bincount(bal.ravel(), minlength=3).tolist() == [0, 6, 6]  # node 0 already has expert 1's six
    assert (np.bincount(bal.ravel(), minlength=3) @ sh).max() == 6
    assert (np.bincount(frac.ravel(), minlength=3) @ sh).max() == 9  # the plan's half/half split

    # two copies of expert 0 stacked on node 0, one on node 1: node 0 must not count twice as fast
    sh = np.zeros((4, 4))
    sh[[0, 1, 2, 3], [0, 0, 1, 2]] = 1
    lp = LayerPlacement(sh, np.array([0, 0, 0, 1]), np.array([1 / 3, 1 / 3, 1 / 3, 1.0]), 2)
    bal = assign_by_distance(lp, ex, np.ones(6), MESH.distance, "balanced")
    assert (np.bincount(bal.ravel(), minlength=4) @ sh)[:2].tolist() == [3, 3]


@settings(max_examples=40, deadline=None)
@given(replicated_layer())
def test_balanced_never_loads_a_node_more_than_the_plans_split(case):
    lp, ex = case
    w = np.ones(len(ex))
    n_e = np.bincount(ex.ravel(), minlength=lp.num_experts)
    plan_max = ((lp.token_fraction * n_e[lp.expert_of]) @ lp.shares).max()
    out = assign_by_distance(lp, ex, w, MESH.distance, "balanced")
    assert np.all(lp.expert_of[out] == ex)
    served = np.bincount(out.ravel(), minlength=lp.num_copies)
    assert (served @ lp.shares).max() <= plan_max + 1.0 + 1e-9  # whole tokens: at most one over
