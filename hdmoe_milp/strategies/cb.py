"""Compute-balanced hybrid TP-EP: the mesh is cut into equal rectangular sub-regions, a small ILP
gives each expert to one sub-region so that the most loaded sub-region is as light as possible,
and each expert is split evenly (TP) over its sub-region's nodes."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputError
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from ..solvers import LinearModel, SolveParams, Termination, get_backend
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


def balance_model(loads: np.ndarray, bins: int) -> LinearModel:
    """min t s.t. every item in exactly one bin (binaries ``z[i, s]``, index ``i * bins + s``) and
    every bin's load <= t (the last variable)."""
    n = len(loads)
    nz = n * bins
    t = nz
    z = np.arange(nz).reshape(n, bins)
    one_rows = np.repeat(np.arange(n), bins)
    bin_rows = n + np.r_[np.tile(np.arange(bins), n), np.arange(bins)]
    rows = np.r_[one_rows, bin_rows]
    cols = np.r_[z.ravel(), z.ravel(), np.full(bins, t)]
    vals = np.r_[np.ones(nz), np.repeat(np.asarray(loads, dtype=float), bins), -np.ones(bins)]
    A = sp.csr_matrix((vals, (rows, cols)), shape=(n + bins, nz + 1))
    ub = np.r_[np.ones(nz), max(float(np.sum(loads)), 1e-12)]
    integer = np.r_[np.ones(nz, dtype=bool), False]
    c = np.r_[np.zeros(nz), 1.0]
    lo = np.r_[np.ones(n), np.full(bins, -np.inf)]
    hi = np.r_[np.ones(n), np.zeros(bins)]
    names = [f"z_{i}_{b}" for i in range(n) for b in range(bins)] + ["t"]
    return LinearModel(names, np.zeros(nz + 1), ub, integer, c, A, lo, hi, ["exact"] * n + ["relax"] * bins)


def balance_ilp(loads: np.ndarray, bins: int, time_limit_s: float = 2.0, gap: float = 0.05,
                backend: str = "cbc") -> tuple[np.ndarray, str]:
    """min max_s sum_{i in s} loads_i over assignments of items to ``bins``, solved by ``backend``
    through the solver layer (default CBC), warm-started from LPT, stopped at relative ``gap``.
    Returns the assignment and a status; never worse than LPT.

    When LPT is already within ``gap`` of the bound max(mean bin load, largest item), the solver is
    skipped (status ``lpt-within-gap``).
    """
    loads = np.asarray(loads, dtype=float)
    n = len(loads)
    lpt = lpt_pack(loads, bins)
    lpt_obj = np.bincount(lpt, weights=loads, minlength=bins).max()
    bound = max(float(np.sum(loads)) / bins, float(np.max(loads, initial=0.0)))
    if lpt_obj <= (1.0 + gap) * bound:
        return lpt, "lpt-within-gap"
    lm = balance_model(loads, bins)
    hint = np.r_[np.eye(bins)[lpt].ravel(), lpt_obj]
    # deterministic: CBC counts CPU seconds (CP-SAT its work), so machine load does not change the baseline
    out = get_backend(backend).solve(lm, SolveParams(time_limit_s=time_limit_s, gap=gap, hint=hint, threads=1,
                                                     deterministic=True))
    if out.termination not in (Termination.OPTIMAL, Termination.FEASIBLE) or out.x is None:
        return lpt, f"lpt (solver: {out.termination.value})"
    assign = np.argmax(out.x[: n * bins].reshape(n, bins), axis=1)
    obj = np.bincount(assign, weights=loads, minlength=bins).max()
    if obj > lpt_obj:
        return lpt, "lpt (solver incumbent worse)"
    return assign, out.termination.value


def compute_balanced(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0, regions: tuple[int, int] | None = None,
    time_limit_s: float = 2.0,
) -> Placement:
    """Compute-balanced hybrid TP-EP (the paper's CB baseline: 5 % gap target). ``seed`` is unused."""
    f = check_freqs(freqs, model)
    E, D = model.num_experts, hw.num_nodes
    reg = regions or default_regions(model, hw)
    nodes_of = region_nodes(hw, reg)
    layers, statuses = [], []
    for row in f:
        assign, status = balance_ilp(row, len(nodes_of), time_limit_s)
        statuses.append(status)
        s = np.zeros((E, D))
        for i in range(E):
            s[i, nodes_of[assign[i]]] = 1.0 / len(nodes_of[assign[i]])
        layers.append(s)
    return Placement.from_shares(layers, "cb", regions=list(reg), ilp_status=statuses)
