"""The optional direct backends (SCIP through pyscipopt, HiGHS through highspy) against brute force:
on tiny layers, the block MILP's optimum found by each equals the smallest block-model objective over
every assignment, its bound is at most that, its MIP start is accepted, and its solution is feasible."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

from hdmoe_milp import Hardware, Mesh, MoEModel
from hdmoe_milp.solvers import SolveParams, get_backend
from hdmoe_milp.strategies.block_milp import BlockModel, MilpOptions, solve_layer
from hdmoe_milp.synthetic import synthetic_trace

DIRECT = [pytest.param("scip", marks=pytest.mark.skipif(importlib.util.find_spec("pyscipopt") is None,
                                                        reason="pyscipopt not installed (pip install '.[scip]')")),
          pytest.param("highs", marks=pytest.mark.skipif(importlib.util.find_spec("highspy") is None,
                                                         reason="highspy not installed (pip install '.[highs]')"))]

CASES = [(3, 2, "2x2", 2e8, 0.0), (4, 2, "1x4", 1e8, 1e-7), (4, 1, "2x2", 3e8, 0.0)]


def layer(case: int):
    E, k, mesh, bw, hop = CASES[case]
    m = MoEModel("tiny", num_experts=E, top_k=k, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse(mesh), compute_flops=1e9, link_bw_bytes_per_s=bw, hop_latency_s=hop)
    tr = synthetic_trace(m, 300, seed=case)
    bm = BlockModel(m, hw, tr.frequencies()[0], 16.0, MilpOptions(symmetry=False), coactivation=tr.coactivation(0))
    return m, hw, tr, bm


@pytest.mark.parametrize("backend", DIRECT)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_direct_backend_reaches_brute_force_optimum(backend, case):
    m, hw, tr, bm = layer(case)
    best = min(bm.objective(np.array(a)) for a in itertools.product(range(bm.blocks.num_blocks),
                                                                       repeat=m.num_experts))
    lm = bm.to_linear()
    worst = max(range(bm.blocks.num_blocks), key=lambda b: bm.objective(np.full(m.num_experts, b)))
    hint = bm.full_vector(np.full(m.num_experts, worst), lm)
    out = get_backend(backend).solve(lm, SolveParams(time_limit_s=20, gap=1e-9, hint=hint))
    assert out.termination.value == "optimal", out.message
    assert "rejected" not in out.message
    assert lm.max_violation(out.x) <= 1e-6
    assert out.primal / 1e6 == pytest.approx(best, rel=1e-6)  # the model works in microseconds
    assert out.dual_bound is not None and out.dual_bound <= out.primal * (1 + 1e-9)


@pytest.mark.parametrize("backend", DIRECT)
def test_direct_backend_in_solve_layer(backend):
    """The certificate path: the evaluator's score of the returned plan, bound below it."""
    m, hw, tr, bm = layer(0)
    r = solve_layer(m, hw, tr.frequencies()[0], 16.0, backend=backend, params=SolveParams(time_limit_s=10),
                    coactivation=tr.coactivation(0))
    assert r.status in ("optimal", "feasible") and r.backend == backend
    assert r.bound_s is not None and r.bound_s <= r.objective_s * (1 + 1e-9)


def test_cpsat_says_when_its_wall_cap_stopped_a_work_limited_solve():
    """Under a work limit, CP-SAT's wall-clock cap is a safety net: a solve it stopped before the work
    limit says so (``wall_capped``), since its answer then depends on the machine's load; one that
    ran out of work does not."""
    m = MoEModel("mid", num_experts=32, top_k=2, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = Hardware(Mesh.parse("4x4"), compute_flops=1e9, link_bw_bytes_per_s=2e8)
    tr = synthetic_trace(m, 600, seed=0)
    lm = BlockModel(m, hw, tr.frequencies()[0], 64.0, MilpOptions(), coactivation=tr.coactivation(0)).to_linear()
    cp = get_backend("cpsat")
    cut = cp.solve(lm, SolveParams(time_limit_s=0.2, work_limit=1000.0, deterministic=True, gap=0.0))
    assert cut.wall_capped and cut.termination.value != "optimal"
    spent = cp.solve(lm, SolveParams(time_limit_s=60.0, work_limit=0.05, deterministic=True, gap=0.0))
    assert not spent.wall_capped
    wall = cp.solve(lm, SolveParams(time_limit_s=0.2, gap=0.0))
    assert not wall.wall_capped  # wall mode: the limit is the point
