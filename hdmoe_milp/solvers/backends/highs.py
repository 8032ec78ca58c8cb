"""HiGHS through SciPy (``scipy.optimize.milp``). Reports its dual bound; takes no MIP start (the
caller still never returns anything worse than its warm start). Thread count is HiGHS's default."""

from __future__ import annotations

import importlib.util

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

        res = milp(
            model.c, integrality=model.integer.astype(int), bounds=Bounds(model.lb, model.ub),
            constraints=LinearConstraint(model.A, model.row_lo, model.row_hi),
            options={"time_limit": params.time_limit_s, "mip_rel_gap": params.gap, "disp": params.verbose},
        )
        bound = getattr(res, "mip_dual_bound", None)
        bound = None if bound is None or not np.isfinite(bound) else float(bound) + model.obj_const
        if res.status == 0:
            return make_outcome(self.name, model, Termination.OPTIMAL, np.asarray(res.x), bound, res.message)
        if res.status == 2:
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, res.message)
        if res.x is not None:
            return make_outcome(self.name, model, Termination.FEASIBLE, np.asarray(res.x), bound, res.message)
        if res.status == 1:
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, bound, res.message)
        return make_outcome(self.name, model, Termination.ERROR, None, None, res.message)
