"""HiGHS through SciPy (``scipy.optimize.milp``). Reports its dual bound; takes no MIP start (the
caller still never returns anything worse than its warm start). Thread count is HiGHS's default.
SciPy gives no progress callback: the outcome's ``trace`` holds the final point only (wall seconds
since ``solve`` began, primal, dual bound)."""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, make_outcome


class HighsBackend(Backend):
    name = "highs"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("scipy") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        from scipy.optimize import Bounds, LinearConstraint, milp

        t_start = time.perf_counter()
        res = milp(
            model.c, integrality=model.integer.astype(int), bounds=Bounds(model.lb, model.ub),
            constraints=LinearConstraint(model.A, model.row_lo, model.row_hi),
            options={"time_limit": params.time_limit_s, "mip_rel_gap": params.gap, "disp": params.verbose},
        )
        bound = getattr(res, "mip_dual_bound", None)
        bound = None if bound is None or not np.isfinite(bound) else float(bound) + model.obj_const
        x = None if res.x is None else np.asarray(res.x)
        if res.status == 0:
            term = Termination.OPTIMAL
        elif res.status == 2:
            term, x, bound = Termination.INFEASIBLE, None, None
        elif x is not None:
            term = Termination.FEASIBLE
        elif res.status == 1:
            term = Termination.NO_SOLUTION
        else:
            term, bound = Termination.ERROR, None
        return make_outcome(self.name, model, term, x, bound, res.message, started=t_start)
