"""The LP relaxation of a LinearModel: its optimum (a valid lower bound on the MILP) and an optimal
point (for example the cheapest completion of a partly fixed model, as a hint)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .linear_model import LinearModel


def _solve_lp(lm: LinearModel, lb: np.ndarray, ub: np.ndarray, time_limit_s: float | None) -> Any:
    A = lm.A
    eq = lm.row_lo == lm.row_hi
    ub_rows = np.isfinite(lm.row_hi) & ~eq
    lb_rows = np.isfinite(lm.row_lo) & ~eq
    A_ub = sp.vstack([A[ub_rows], -A[lb_rows]]).tocsr()
    b_ub = np.r_[lm.row_hi[ub_rows], -lm.row_lo[lb_rows]]
    return linprog(lm.c, A_ub=A_ub, b_ub=b_ub, A_eq=A[eq], b_eq=lm.row_lo[eq], bounds=np.c_[lb, ub], method="highs",
                   options={} if time_limit_s is None else {"time_limit": max(float(time_limit_s), 1e-3)})


def lp_bound(lm: LinearModel, time_limit_s: float | None = None) -> float | None:
    """Optimum of the LP relaxation of ``lm`` (HiGHS via SciPy), or None if it does not solve (within
    ``time_limit_s`` wall seconds, when given)."""
    res = _solve_lp(lm, lm.lb, lm.ub, time_limit_s)
    if res.status != 0:
        return None
    return float(res.fun) + lm.obj_const


def lp_solution(lm: LinearModel, lb: np.ndarray | None = None, ub: np.ndarray | None = None,
                time_limit_s: float | None = None) -> np.ndarray | None:
    """An optimal point ``[num_vars]`` of the LP relaxation of ``lm`` with the variable bounds ``lb``,
    ``ub`` (default the model's), or None if it does not solve."""
    res = _solve_lp(lm, lm.lb if lb is None else lb, lm.ub if ub is None else ub, time_limit_s)
    return np.asarray(res.x, dtype=float) if res.status == 0 else None
