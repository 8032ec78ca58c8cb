"""HiGHS. With ``highspy`` installed (``pip install '.[highs]'``) the model goes to HiGHS directly: it
takes the hint as a MIP start, a thread count and a seed. Without it, SciPy's bundled HiGHS
(``scipy.optimize.milp``) solves the model with no MIP start (the caller still never returns anything
worse than its warm start). Either way the dual bound is reported and the limit is wall time; there
is no progress callback, so the outcome's ``trace`` holds the final point only."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, make_outcome, solver_seed


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1: HiGHS prints a banner from C++ when its first instance is made,
    which would corrupt ``--json`` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class HighsBackend(Backend):
    name = "highs"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("scipy") is not None

    @staticmethod
    def direct() -> bool:
        """True if ``highspy`` is installed (MIP starts, threads and seed are then honoured)."""
        return importlib.util.find_spec("highspy") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        if self.direct():
            return self._solve_highspy(model, params)
        return self._solve_scipy(model, params)

    def _solve_highspy(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        import highspy

        t_start = time.perf_counter()
        with _quiet_stdout():
            h = highspy.Highs()
        h.setOptionValue("output_flag", bool(params.verbose))
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = model.num_vars, model.num_rows
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = model.c, model.lb, model.ub
        lp.row_lower_, lp.row_upper_ = model.row_lo, model.row_hi
        A = model.A.tocsr()
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = model.num_vars, model.num_rows
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in model.integer]
        h.passModel(lp)
        left = max(params.time_limit_s - (time.perf_counter() - t_start), 0.01)  # wall s, translation included
        h.setOptionValue("time_limit", float(left))
        h.setOptionValue("mip_rel_gap", float(params.gap))
        h.setOptionValue("threads", int(params.threads))
        h.setOptionValue("random_seed", solver_seed(params.seed))
        started = params.hint is not None
        if started:
            hint = np.clip(np.asarray(params.hint, dtype=float), model.lb, model.ub)
            hint = np.where(model.integer, np.round(hint), hint)
            sol = highspy.HighsSolution()
            sol.col_value = hint.tolist()
            started = h.setSolution(sol) == highspy.HighsStatus.kOk
        h.run()
        ms = h.getModelStatus()
        info = h.getInfo()
        bound = float(info.mip_dual_bound) + model.obj_const if np.isfinite(info.mip_dual_bound) else None
        has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
        x = np.asarray(h.getSolution().col_value, dtype=float) if has_x else None
        msg = f"highspy: {h.modelStatusToString(ms)}" + ("" if started or params.hint is None else
                                                         "; MIP start rejected")
        S = highspy.HighsModelStatus
        if ms == S.kOptimal:
            return make_outcome(self.name, model, Termination.OPTIMAL, x, bound, msg, started=t_start)
        if ms == S.kInfeasible:
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, msg, started=t_start)
        if x is not None:
            return make_outcome(self.name, model, Termination.FEASIBLE, x, bound, msg, started=t_start)
        if ms in (S.kTimeLimit, S.kIterationLimit, S.kSolutionLimit, S.kInterrupt):
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, bound, msg, started=t_start)
        return make_outcome(self.name, model, Termination.ERROR, None, None, msg, started=t_start)

    def _solve_scipy(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
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
