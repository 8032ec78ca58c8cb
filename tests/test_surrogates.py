"""Surrogates against the evaluator: where each one is exact, and the direction of its error elsewhere.

Random small instances (E 2..8, top-k 1..3, meshes 1x2..4x4 including 1xN and Nx1, per-link
bandwidths, random co-activation groups and batch). Workloads are the *expected* workload of the
groups (one flow per group, ``f_g * B`` tokens), built directly. Checked:

- block MILP (``BlockModel.objective``, blocks or patterns): == evaluator ``coalesce="block"`` (all
  groups modelled) and ``coalesce="expert"`` (none), spread homes, same delivery, plus ``2 * hop * (diameter - hops)``
  (0 when hop latency is 0 or an expert with traffic touches a corner); its compute part == the
  evaluator's; with some groups dropped it lies between the two; always >= the default evaluator
  (``coalesce="node"``).
- warm-start heuristics: a candidate score == the no-group objective (coalesce="expert") minus the
  hop constant; >= the group-aware objective.
- HD-MoE's stage-1 linear estimate: compute term == the evaluator's busiest-node FLOP time (<= its
  roofline); communication term == the evaluator's on the EP placement gamma is fitted on.
- online cost (``OnlineCost.layer_latency_s``, ``noise_z=0``, one copy per expert, any shares):
  == evaluator ``coalesce="expert"`` minus ``2 * hop * hops`` (it has no hop term); >= the default
  evaluator when the hop latency is 0; ``noise_z > 0`` only adds.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp.costs import UnitCosts
from hdmoe_milp.evaluator import EvalOptions, evaluate
from hdmoe_milp.hardware import Hardware, Mesh
from hdmoe_milp.moe import MoEModel
from hdmoe_milp.online.cost import OnlineCost
from hdmoe_milp.placement import LayerPlacement, Placement
from hdmoe_milp.strategies.block_milp import BlockModel, MilpOptions
from hdmoe_milp.strategies.block_milp.heuristics import _candidate_scores, _state
from hdmoe_milp.strategies.hdmoe import US, LayerEstimate, _ep_lpt, _tracked, fit_gamma, wrap_shares
from hdmoe_milp.workload import LayerRouting, Workload

REL = 1e-9
MESHES = [(r, c) for r in range(1, 5) for c in range(1, 5) if r * c >= 2]


@st.composite
def instances(draw):
    """(model, hardware, group ids [G, k], group frequencies [G] summing to 1, batch)."""
    E = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(3, E)))
    R, C = draw(st.sampled_from(MESHES))
    mesh = Mesh(R, C)
    model = MoEModel("s", num_experts=E, top_k=k, hidden=draw(st.sampled_from([64, 96, 256])),
                     expert_intermediate=draw(st.sampled_from([32, 128, 200])), moe_layers=1,
                     weight_bytes=draw(st.sampled_from([1.0, 2.0])), activation_bytes=draw(st.sampled_from([1.0, 2.0])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bw = rng.uniform(1e8, 1e9, mesh.num_links) if draw(st.booleans()) else 3e8
    hw = Hardware(mesh, compute_flops=float(rng.uniform(1e9, 1e11)), link_bw_bytes_per_s=bw,
                  dram_bw_bytes_per_s=float(rng.uniform(1e9, 1e11)),
                  hop_latency_s=draw(st.sampled_from([0.0, 0.0, 1e-7])))
    all_sets = list(itertools.combinations(range(E), k))
    G = draw(st.integers(1, min(6, len(all_sets))))
    pick = rng.choice(len(all_sets), size=G, replace=False)
    ids = np.array([all_sets[p] for p in pick], dtype=np.int64)
    fg = rng.uniform(0.05, 1.0, G)
    batch = draw(st.sampled_from([1.0, 3.0, 7.5, 16.0, 64.0]))
    return model, hw, ids, fg / fg.sum(), batch, rng


def expected(model: MoEModel, ids: np.ndarray, fg: np.ndarray, batch: float) -> Workload:
    return Workload((LayerRouting(ids, fg * batch),), model.num_experts, model.top_k, batch, "expected")


def freqs(model: MoEModel, ids: np.ndarray, fg: np.ndarray) -> np.ndarray:
    return np.bincount(ids.ravel(), weights=np.repeat(fg, model.top_k), minlength=model.num_experts)


def used_hops(hw: Hardware, shares: np.ndarray, f: np.ndarray) -> int:
    """Longest XY route from a spread home to a node holding an expert with traffic (the evaluator's hops)."""
    ecc = hw.mesh.distance.max(axis=0)
    nodes = (shares[f > 0] > 0).any(axis=0)
    return int(ecc[nodes].max(initial=0))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


DELIVERY = st.sampled_from(["tree", "unicast"])


@settings(max_examples=300, deadline=None)
@given(inst=instances(), delivery=DELIVERY)
def test_block_milp_objective_against_the_evaluator(inst, delivery):
    model, hw, ids, fg, B, rng = inst
    f = freqs(model, ids, fg)
    wl = expected(model, ids, fg, B)
    opts = MilpOptions(delivery=delivery, symmetry=False)
    bm = BlockModel(model, hw, f, B, opts, coactivation=(ids, fg))
    none = BlockModel(model, hw, f, B, opts)
    assert len(bm.g_f) == len(fg) or model.top_k == 1  # every group modelled
    assign = rng.integers(0, bm.blocks.num_blocks, model.num_experts)
    plan = Placement((bm.placement(assign),))
    ev = {c: evaluate(plan, model, hw, wl, EvalOptions(coalesce=c, delivery=delivery))
          for c in ("node", "block", "expert")}
    # the hop constant charges the diameter; the evaluator the longest route actually used
    diam = int(hw.mesh.distance.max())
    slack = 2 * hw.hop_latency_s * (diam - used_hops(hw, plan.layers[0].shares, f))
    assert slack >= 0
    obj, obj_none = bm.objective(assign), none.objective(assign)
    # (a) exact: all groups -> coalesce="block"; none -> coalesce="expert"; compute always
    assert rel(obj, ev["block"].layer_s[0] + slack) <= REL
    assert rel(obj_none, ev["expert"].layer_s[0] + slack) <= REL
    for c in ("node", "block", "expert"):
        assert rel(bm.parts(assign)[0], ev[c].compute_s[0]) <= REL
    # (b) elsewhere an over-estimate: of the default evaluator, and with only some groups modelled
    # it lies between coalesce="block" and coalesce="expert"
    assert obj >= ev["node"].layer_s[0] * (1 - REL)
    assert obj_none >= obj * (1 - REL)
    if len(fg) > 1 and model.top_k > 1:
        nb, k = bm.blocks.num_blocks, model.top_k
        part = BlockModel(model, hw, f, B, MilpOptions(delivery=delivery, symmetry=False, coloc_rows=k * nb),
                          coactivation=(ids, fg))
        assert len(part.g_f) == 1
        p = part.objective(assign)
        assert ev["block"].layer_s[0] + slack <= p * (1 + REL) and p <= (ev["expert"].layer_s[0] + slack) * (1 + REL)


@settings(max_examples=150, deadline=None)
@given(inst=instances(), delivery=DELIVERY)
def test_heuristic_scores_are_the_per_expert_objective(inst, delivery):
    model, hw, ids, fg, B, rng = inst
    f = freqs(model, ids, fg)
    opts = MilpOptions(delivery=delivery, symmetry=False)
    bm = BlockModel(model, hw, f, B, opts, coactivation=(ids, fg))
    none = BlockModel(model, hw, f, B, opts)
    assign = rng.integers(0, bm.blocks.num_blocks, model.num_experts)
    i = int(rng.integers(model.num_experts))
    scores = _candidate_scores(bm, i, _state(bm, assign, skip=i), np.ones(bm.blocks.num_blocks, dtype=bool))
    for b in range(bm.blocks.num_blocks):
        trial = assign.copy()
        trial[i] = b
        # exact: the objective with one message per (token, expert), i.e. coalesce="expert"
        assert rel(scores[b] + bm.hop_const_s, none.objective(trial)) <= REL
        # an over-estimate of the group-aware objective
        assert scores[b] + bm.hop_const_s >= bm.objective(trial) * (1 - REL)
    wl = expected(model, ids, fg, B)
    ev = evaluate(Placement((bm.placement(assign),)), model, hw, wl, EvalOptions(coalesce="expert", delivery=delivery))
    slack = 2 * hw.hop_latency_s * (int(hw.mesh.distance.max()) - used_hops(hw, bm.placement(assign).shares, f))
    assert rel(scores[assign[i]] + bm.hop_const_s, ev.layer_s[0] + slack) <= REL


def random_shares(rng: np.random.Generator, E: int, D: int) -> np.ndarray:
    """One copy per expert on a random node subset (not necessarily a block), random uneven shares."""
    out = np.zeros((E, D))
    for i in range(E):
        nodes = rng.choice(D, size=int(rng.integers(1, D + 1)), replace=False)
        w = rng.uniform(0.2, 1.0, len(nodes)) if rng.random() < 0.5 else np.ones(len(nodes))
        out[i, nodes] = w / w.sum()
    return out


@settings(max_examples=100, deadline=None)
@given(inst=instances(), delivery=DELIVERY)
def test_block_milp_with_patterns_against_the_evaluator(inst, delivery):
    """Patterns (random node sets with random shares, some on the same nodes as a block or as each
    other) as extra columns: the same exactness as blocks; experts whose columns share their nodes
    share one message (coalesce="block")."""
    model, hw, ids, fg, B, rng = inst
    E, D = model.num_experts, hw.num_nodes
    f = freqs(model, ids, fg)
    pats = random_shares(rng, E, D)
    pats = np.vstack([pats, np.where(pats > 0, 1.0, 0.0) / (pats > 0).sum(axis=1, keepdims=True)])  # even copies
    owner = np.r_[np.arange(E), rng.permutation(E)]
    opts = MilpOptions(delivery=delivery, symmetry=False, pattern_flips=bool(rng.integers(2)))
    bm = BlockModel(model, hw, f, B, opts, coactivation=(ids, fg), patterns=(pats, owner))
    assign = np.array([rng.choice(np.flatnonzero(bm.family[i])) for i in range(E)])
    lp = bm.placement(assign)
    assert np.array_equal(bm.assign_from_shares(lp.shares), assign)
    for p, i in zip(pats, owner, strict=True):  # every pattern is a candidate of its expert, shares kept
        col = bm.blocks.match(p[None])[0]
        assert col >= 0 and bm.family[i, col] and np.array_equal(bm.blocks.share[col], p)
    plan = Placement((lp,))
    ev = {c: evaluate(plan, model, hw, expected(model, ids, fg, B), EvalOptions(coalesce=c, delivery=delivery))
          for c in ("node", "block")}
    slack = 2 * hw.hop_latency_s * (int(hw.mesh.distance.max()) - used_hops(hw, lp.shares, f))
    assert rel(bm.objective(assign), ev["block"].layer_s[0] + slack) <= REL
    assert rel(bm.parts(assign)[0], ev["node"].compute_s[0]) <= REL
    assert bm.objective(assign) >= ev["node"].layer_s[0] * (1 - REL)


@settings(max_examples=300, deadline=None)
@given(inst=instances(), delivery=DELIVERY, z=st.sampled_from([0.5, 1.0, 2.0]))
def test_online_cost_against_the_evaluator(inst, delivery, z):
    model, hw, ids, fg, B, rng = inst
    E, D = model.num_experts, hw.num_nodes
    shares = random_shares(rng, E, D)
    lp = LayerPlacement.from_shares(shares)
    wl = expected(model, ids, fg, B)
    n = wl.expert_loads()[0]
    tree = delivery == "tree"
    lat = OnlineCost(model, hw, B, tree=tree).layer_latency_s(shares, lp.expert_of, lp.token_fraction, n)
    plan = Placement((lp,))
    expert = evaluate(plan, model, hw, wl, EvalOptions(coalesce="expert", delivery=delivery)).layer_s[0]
    node = evaluate(plan, model, hw, wl, EvalOptions(delivery=delivery)).layer_s[0]
    hops = used_hops(hw, shares, n)
    # (a) exact up to the hop term it leaves out: an under-estimate of 2 * hop * hops when hop > 0
    assert rel(lat + 2 * hw.hop_latency_s * hops, expert) <= REL
    # (b) with hop latency 0 an over-estimate of the default evaluator; the noise term only adds
    if hw.hop_latency_s == 0:
        assert lat >= node * (1 - REL)
    noisy = OnlineCost(model, hw, B, tree=tree, noise_z=z).layer_latency_s(shares, lp.expert_of, lp.token_fraction, n)
    assert noisy >= lat * (1 - REL)


@pytest.mark.parametrize("weights", [(10.0, 1.0), (1.0, 10.0), (11.0, 0.0)])
def test_online_cost_with_replicas_agrees_with_the_evaluator_on_expected_flows(weights):
    """With two copies of an expert, the evaluator cuts the expert's expected flows exactly at the
    copies' token fractions (a flow that straddles the cut is split, `split_at_quotas`), as the cost
    model splits the expected tokens: both give node 1 5.5 + 6 = 11.5 tokens. (Before 0.8.4 a whole
    flow went to one copy: 10 or 16 tokens on the busiest node, depending on the flows' order.)
    Expert 0 has copies on nodes 0 and 1 (half each), expert 1 sits on node 1 with 6 tokens."""
    model = MoEModel("t", num_experts=2, top_k=1, hidden=64, expert_intermediate=128, moe_layers=1)
    hw = Hardware(Mesh(1, 2), compute_flops=1e9, link_bw_bytes_per_s=1e15, dram_bw_bytes_per_s=1e18)
    lp = LayerPlacement(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.array([0, 0, 1]),
                        np.array([0.5, 0.5, 1.0]), 2)
    wl = Workload((LayerRouting(np.array([[0], [0], [1]]), np.array([*weights, 6.0])),), 2, 1, 17.0, "expected")
    n = wl.expert_loads()[0]
    lat = OnlineCost(model, hw, 17.0).layer_latency_s(lp.shares, lp.expert_of, lp.token_fraction, n)
    ev = evaluate(Placement((lp,)), model, hw, wl, EvalOptions(coalesce="expert"))
    phi = model.expert_flops_per_token() / hw.compute_flops
    assert lat == pytest.approx(11.5 * phi, rel=1e-6)
    assert ev.layer_s[0] == pytest.approx(11.5 * phi, rel=1e-6)
    assert ev.node_flops[0] == pytest.approx(np.array([5.5, 11.5]) * model.expert_flops_per_token())


@settings(max_examples=150, deadline=None)
@given(inst=instances())
def test_hdmoe_linear_estimate_against_the_evaluator(inst):
    """HD-MoE's stage-1 estimate: its compute term is the evaluator's FLOP time of the busiest node
    (exact when that node is compute-bound, below the roofline otherwise); its communication term
    ``2 u_comm max touch`` equals the evaluator's communication on the EP placement gamma is fitted
    on (all co-activation sets tracked, tree delivery, spread homes, hop latency 0)."""
    model, hw, ids, fg, B, rng = inst
    hw = replace(hw, hop_latency_s=0.0)
    f = freqs(model, ids, fg)
    unit = UnitCosts.of(model)
    g_ids, g_f, f_tail = _tracked(f, (ids, fg), model.top_k, 64)
    ep = _ep_lpt(model, hw, f)
    gamma = fit_gamma(hw, unit, B, ep, g_ids, g_f, f_tail)
    est = LayerEstimate(f, g_ids, g_f, f_tail, US * B * unit.flops_per_token / hw.compute_flops,
                        US * gamma * B * unit.vector_bytes / hw.min_link_bw, hw.num_nodes)
    wl = expected(model, ids, fg, B)
    for shares in (ep, wrap_shares(f, hw.num_nodes), rng.dirichlet(np.ones(hw.num_nodes), model.num_experts)):
        ev = evaluate(Placement.from_shares([shares]), model, hw, wl, EvalOptions(delivery="tree"))
        comp_est = est.u_comp * (f @ shares).max() / US
        assert rel(comp_est, ev.node_flops[0].max() / hw.compute_flops) < REL
        assert comp_est <= ev.compute_s[0] * (1 + REL)
    ev = evaluate(Placement.from_shares([ep]), model, hw, wl, EvalOptions(delivery="tree"))
    assert rel(2 * est.u_comm * est.touch(ep > 0).max() / US, ev.comm_s[0]) < 1e-9 or ev.comm_s[0] == 0
