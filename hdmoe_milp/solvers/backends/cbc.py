"""CBC through PuLP. PuLP reports no bound and says "Optimal" after a time-out: the status is read
from ``sol_status``, and the caller supplies the bound (LP relaxation). PuLP gives no callback: the
outcome's ``trace`` holds the final point only (wall seconds since ``solve`` began, primal, None)."""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, make_outcome


class CbcBackend(Backend):
    name = "cbc"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pulp") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        import pulp

        t_start = time.perf_counter()
        prob = pulp.LpProblem("layer", pulp.LpMinimize)
        xs = []
        for j, name in enumerate(model.names):
            cat = pulp.LpInteger if model.integer[j] else pulp.LpContinuous
            if model.integer[j] and model.lb[j] >= 0 and model.ub[j] <= 1:
                cat = pulp.LpBinary
            xs.append(pulp.LpVariable(name, lowBound=model.lb[j], upBound=model.ub[j], cat=cat))
        prob += pulp.LpAffineExpression([(xs[j], c) for j, c in enumerate(model.c) if c != 0]) + model.obj_const
        A = model.A
        for r in range(model.num_rows):
            lo, hi = model.row_lo[r], model.row_hi[r]
            sl = slice(A.indptr[r], A.indptr[r + 1])
            expr = pulp.LpAffineExpression(list(zip((xs[j] for j in A.indices[sl]), A.data[sl], strict=True)))
            if lo == hi:
                prob += expr == lo
            else:
                if np.isfinite(lo):
                    prob += expr >= lo
                if np.isfinite(hi):
                    prob += expr <= hi
        warm = params.hint is not None
        if warm:
            hint = np.clip(params.hint, model.lb, model.ub)
            for j, v in enumerate(hint):
                xs[j].setInitialValue(float(round(v)) if model.integer[j] else float(v))
        left = max(params.time_limit_s - (time.perf_counter() - t_start), 0.01)  # wall s, translation included
        solver = pulp.PULP_CBC_CMD(
            msg=params.verbose, timeLimit=left, gapRel=params.gap, threads=params.threads,
            warmStart=warm, options=[f"randomSeed {params.seed + 1}", f"randomCbcSeed {params.seed + 1}"],
        )
        try:
            prob.solve(solver)
        except pulp.PulpSolverError as exc:
            return make_outcome(self.name, model, Termination.ERROR, None, None, str(exc), started=t_start)
        ss = prob.sol_status
        if ss in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            x = np.array([v.value() if v.value() is not None else 0.0 for v in xs])
            st = Termination.OPTIMAL if ss == pulp.LpSolutionOptimal else Termination.FEASIBLE
            msg = f"pulp status {pulp.LpStatus[prob.status]}, sol_status {ss}"
            return make_outcome(self.name, model, st, x, None, msg, started=t_start)
        if ss == pulp.LpSolutionInfeasible:
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, "CBC: infeasible",
                                started=t_start)
        if ss == pulp.LpSolutionNoSolutionFound:
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, None,
                                "CBC: no solution within the limits", started=t_start)
        return make_outcome(self.name, model, Termination.ERROR, None, None, f"CBC: sol_status {ss}", started=t_start)
