"""The LP relaxation's optimum: a valid lower bound on any MILP written as a LinearModel."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .linear_model import LinearModel


def lp_bound(lm: LinearModel, time_limit_s: float | None = None) -> float | None:
    """Optimum of the LP relaxation of ``lm`` (HiGHS via SciPy), or None if it does not solve (within
    ``time_limit_s`` wall seconds, when given)."""
    A = lm.A
    eq = lm.row_lo == lm.row_hi
    ub_rows = np.isfinite(lm.row_hi) & ~eq
    lb_rows = np.isfinite(lm.row_lo) & ~eq
    A_ub = sp.vstack([A[ub_rows], -A[lb_rows]]).tocsr()
    b_ub = np.r_[lm.row_hi[ub_rows], -lm.row_lo[lb_rows]]
    res = linprog(lm.c, A_ub=A_ub, b_ub=b_ub, A_eq=A[eq], b_eq=lm.row_lo[eq],
                  bounds=np.c_[lm.lb, lm.ub], method="highs",
                  options={} if time_limit_s is None else {"time_limit": max(float(time_limit_s), 1e-3)})
    if res.status != 0:
        return None
    return float(res.fun) + lm.obj_const
