"""Compute-balanced hybrid TP-EP: the mesh is cut into equal rectangular sub-regions, a small ILP
gives each expert to one sub-region so that the most loaded sub-region is as light as possible,
and each expert is split evenly (TP) over its sub-region's nodes."""

from __future__ import annotations

import numpy as np
import pulp

from ..errors import InputError
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from .common import check_freqs, lpt_pack


def default_regions(model: MoEModel, hw: Hardware) -> tuple[int, int]:
    """The paper's split: 2x4 sub-regions for many-expert models, 1x2 for Mixtral-like (E < 16),
    reduced where the mesh is too small."""
    rs, cs = (2, 4) if model.num_experts >= 16 else (1, 2)
    R, C = hw.mesh.rows, hw.mesh.cols
    while R % rs:
        rs -= 1
    while C % cs:
        cs -= 1
    return rs, cs


def region_nodes(hw: Hardware, regions: tuple[int, int]) -> list[np.ndarray]:
    """Node ids of each rectangular sub-region, row-major over the ``regions`` grid."""
    rs, cs = regions
    R, C = hw.mesh.rows, hw.mesh.cols
    if rs < 1 or cs < 1 or R % rs or C % cs:
        raise InputError(
            "regions", f"{rs}x{cs} sub-regions do not tile the {R}x{C} mesh",
            "rows and cols of the mesh must be multiples of the region grid",
        )
    bh, bw = R // rs, C // cs
    out = []
    for i in range(rs):
        for j in range(cs):
            rr, cc = np.meshgrid(np.arange(i * bh, (i + 1) * bh), np.arange(j * bw, (j + 1) * bw), indexing="ij")
            out.append((rr * C + cc).ravel())
    return out


def balance_ilp(loads: np.ndarray, bins: int, time_limit_s: float = 2.0, gap: float = 0.05) -> tuple[np.ndarray, str]:
    """min max_s sum_{i in s} loads_i over assignments of items to ``bins`` (CBC via PuLP), warm-started
    from LPT, stopped at relative ``gap``. Returns the assignment and a status; never worse than LPT.

    When LPT is already within ``gap`` of the bound max(mean bin load, largest item), the solver is
    skipped (status ``lpt-within-gap``).
    """
    n = len(loads)
    lpt = lpt_pack(loads, bins)
    lpt_obj = np.bincount(lpt, weights=loads, minlength=bins).max()
    bound = max(float(np.sum(loads)) / bins, float(np.max(loads, initial=0.0)))
    if lpt_obj <= (1.0 + gap) * bound:
        return lpt, "lpt-within-gap"
    prob = pulp.LpProblem("cb_balance", pulp.LpMinimize)
    z = [[pulp.LpVariable(f"z_{i}_{s}", cat="Binary") for s in range(bins)] for i in range(n)]
    t = pulp.LpVariable("t", lowBound=0)
    prob += t
    for i in range(n):
        prob += pulp.lpSum(z[i]) == 1
    bin_load = [pulp.lpSum(float(loads[i]) * z[i][s] for i in range(n)) for s in range(bins)]
    for s in range(bins):
        prob += bin_load[s] <= t
    for i in range(n):
        for s in range(bins):
            z[i][s].setInitialValue(1 if lpt[i] == s else 0)
    t.setInitialValue(float(lpt_obj))
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap, warmStart=True, threads=1)
    prob.solve(solver)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return lpt, "lpt (solver: " + pulp.LpSolution[prob.sol_status] + ")"
    assign = np.array([int(np.argmax([v.value() or 0 for v in z[i]])) for i in range(n)])
    obj = np.bincount(assign, weights=loads, minlength=bins).max()
    if obj > lpt_obj:
        return lpt, "lpt (solver incumbent worse)"
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"
    return assign, status


def compute_balanced(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0, regions: tuple[int, int] | None = None,
    time_limit_s: float = 2.0,
) -> Placement:
    """Compute-balanced hybrid TP-EP (the paper's CB baseline: 5 % gap target). ``seed`` is unused."""
    f = check_freqs(freqs, model)
    E, D = model.num_experts, hw.num_nodes
    reg = regions or default_regions(model, hw)
    groups = region_nodes(hw, reg)
    layers, statuses = [], []
    for row in f:
        assign, status = balance_ilp(row, len(groups), time_limit_s)
        statuses.append(status)
        s = np.zeros((E, D))
        for i in range(E):
            s[i, groups[assign[i]]] = 1.0 / len(groups[assign[i]])
        layers.append(s)
    return Placement.from_shares(layers, "cb", regions=list(reg), ilp_status=statuses)
