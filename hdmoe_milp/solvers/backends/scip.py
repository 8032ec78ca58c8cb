"""SCIP through ``pyscipopt`` (optional: ``pip install '.[scip]'``). Takes the hint as a MIP start and
reports SCIP's dual bound. SCIP runs one thread and counts wall time; it stops at once on Ctrl-C,
which is then raised here as ``KeyboardInterrupt``. The outcome's ``trace`` holds the final point only."""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, make_outcome, solver_seed


class ScipBackend(Backend):
    name = "scip"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pyscipopt") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        import pyscipopt

        t_start = time.perf_counter()
        m = pyscipopt.Model("layer")
        if not params.verbose:
            m.hideOutput()
        xs = []
        for j in range(model.num_vars):
            lb, ub = float(model.lb[j]), float(model.ub[j])
            vt = ("B" if lb >= 0 and ub <= 1 else "I") if model.integer[j] else "C"
            xs.append(m.addVar(f"v{j}", vtype=vt, lb=lb, ub=ub, obj=float(model.c[j])))
        if model.obj_const:
            m.addObjoffset(float(model.obj_const))
        A = model.A.tocsr()
        for r in range(model.num_rows):
            sl = slice(A.indptr[r], A.indptr[r + 1])
            lo, hi = float(model.row_lo[r]), float(model.row_hi[r])
            cons = m.addCons(pyscipopt.quicksum(v * xs[j] for j, v in zip(A.indices[sl], A.data[sl], strict=True))
                             >= (lo if np.isfinite(lo) else -m.infinity()), name=f"r{r}")
            if np.isfinite(hi):
                m.chgRhs(cons, hi)
        started = False
        if params.hint is not None:
            hint = np.clip(np.asarray(params.hint, dtype=float), model.lb, model.ub)
            hint = np.where(model.integer, np.round(hint), hint)
            sol = m.createSol()
            for j, v in enumerate(hint):
                m.setSolVal(sol, xs[j], float(v))
            started = bool(m.addSol(sol, free=True))
        left = max(params.time_limit_s - (time.perf_counter() - t_start), 0.01)  # wall s, translation included
        m.setParam("limits/time", float(left))
        m.setParam("limits/gap", float(params.gap))
        m.setParam("randomization/randomseedshift", solver_seed(params.seed))
        m.optimize()
        st = m.getStatus()
        if st == "userinterrupt":
            raise KeyboardInterrupt
        bound = float(m.getDualbound())
        x = None
        if m.getNSols() > 0:
            best = m.getBestSol()
            x = np.array([m.getSolVal(best, v) for v in xs])
        msg = f"SCIP: {st}" + ("" if started or params.hint is None else "; MIP start rejected")
        if st == "optimal" or st == "gaplimit":
            return make_outcome(self.name, model, Termination.OPTIMAL, x, bound, msg, started=t_start)
        if st == "infeasible":
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, msg, started=t_start)
        if x is not None:
            return make_outcome(self.name, model, Termination.FEASIBLE, x, bound, msg, started=t_start)
        if st in ("timelimit", "nodelimit", "totalnodelimit", "stallnodelimit", "memlimit"):
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, bound, msg, started=t_start)
        return make_outcome(self.name, model, Termination.ERROR, None, None, msg, started=t_start)
