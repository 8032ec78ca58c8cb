"""CP-SAT through OR-Tools' own API, on an integer-scaled copy of the model.

Scaling: a continuous variable v in [0, ub] becomes an integer V in [0, RES] with v = V * ub / RES.
Each row is scaled so that its smallest coefficient is about RES and rounded: ``relax`` rows so that
the integer model is a relaxation (coefficients of a ``<=`` row rounded down, its right-hand side
up and widened by one grid step per continuous variable; all variables are non-negative), hence
CP-SAT's bound is a valid bound on the real model;
``safe`` rows the other way, so that their solutions stay feasible; ``exact`` rows must already have
integer coefficients. The objective's coefficients are rounded down (the bound stays valid). The
caller recomputes the true objective of the returned assignment.

Progress: a solution callback records every incumbent as ``(wall s since solve() began, the real
model's objective of the incumbent, CP-SAT's best bound in the real model's units)`` in the
outcome's ``trace``; the callback reads only the variables with a non-zero objective coefficient.
"""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Any

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, TracePoint, make_outcome, solver_seed

RES = 10_000_000


def _row_scale(g: np.ndarray, dom: np.ndarray) -> float:
    """Multiplier making the smallest non-zero |coefficient| about RES (rounding error <= 1e-6 of it),
    capped so that every |coefficient| x variable range stays <= 1e13 (no int64 overflow)."""
    nz = g != 0
    mag = np.abs(g[nz])
    if mag.size == 0:
        return 1.0
    return min(1e13 / (mag * dom[nz]).max(), max(RES / mag.max(), RES / mag.min()))


def _recorder(cp_model: Any, V: list[Any], scale: np.ndarray, model: LinearModel, Ro: float,
              t_start: float) -> tuple[Any, list[TracePoint]]:
    """A CP-SAT solution callback and the list it appends ``(time_s, primal, bound)`` to per incumbent:
    wall seconds since ``t_start``, the real model's objective of the incumbent (the callback reads
    only the variables with a non-zero objective coefficient) and CP-SAT's bound in real units."""
    nz = np.flatnonzero(model.c)
    coef = model.c[nz] * scale[nz]
    vars_nz = [V[j] for j in nz]
    points: list[TracePoint] = []

    class Recorder(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self) -> None:
            t = time.perf_counter() - t_start
            vals = np.fromiter((self.Value(v) for v in vars_nz), dtype=float, count=len(vars_nz))
            primal = float(coef @ vals + model.obj_const)
            b = self.BestObjectiveBound() / Ro + model.obj_const
            points.append((t, primal, float(b) if np.isfinite(b) else None))

    return Recorder(), points


class CpSatBackend(Backend):
    name = "cpsat"

    def __init__(self, presolve: bool = True) -> None:
        self.presolve = presolve

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("ortools") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        from ortools.sat.python import cp_model

        t_start = time.perf_counter()
        if np.any(model.lb < 0):
            return make_outcome(self.name, model, Termination.ERROR, None, None,
                                "CP-SAT backend needs non-negative variables")
        m = cp_model.CpModel()
        scale = np.where(model.integer, 1.0, np.maximum(model.ub, 1e-300) / RES)  # real = int * scale
        dom = np.where(model.integer, np.maximum(np.abs(model.ub), 1.0), float(RES))
        V = []
        for j in range(model.num_vars):
            if model.integer[j]:
                V.append(m.NewIntVar(int(math.ceil(model.lb[j] - 1e-9)), int(math.floor(model.ub[j] + 1e-9)), ""))
            else:
                V.append(m.NewIntVar(0, RES, ""))
        A = model.A
        for r in range(model.num_rows):
            sl = slice(A.indptr[r], A.indptr[r + 1])
            cols, vals = A.indices[sl], A.data[sl] * scale[A.indices[sl]]
            kind = model.row_kind[r]
            for sign, rhs in ((1.0, model.row_hi[r]), (-1.0, -model.row_lo[r])):
                if not np.isfinite(rhs):
                    continue
                g = sign * vals
                if kind == "exact":
                    coef = np.rint(g).astype(np.int64)
                    expr = sum(int(c) * V[j] for c, j in zip(coef, cols, strict=True) if c)
                    m.Add(expr <= int(math.floor(rhs + 1e-9)))
                    continue
                R = _row_scale(g, dom[cols])
                if kind == "safe":
                    coef, rr = np.ceil(g * R - 1e-9), math.floor(rhs * R + 1e-9)
                else:
                    coef, rr = np.floor(g * R + 1e-9), math.ceil(rhs * R - 1e-9)
                    # continuous values live on a grid: allow one grid step per continuous variable, so
                    # that every real solution has a nearby integer point satisfying the row
                    rr += int(np.abs(coef[~model.integer[cols]]).sum())
                m.Add(sum(int(c) * V[j] for c, j in zip(coef, cols, strict=True) if c) <= int(rr))
        cs = model.c * scale
        Ro = _row_scale(cs, dom)
        ocoef = np.floor(cs * Ro + 1e-9).astype(np.int64)
        m.Minimize(sum(int(c) * V[j] for j, c in enumerate(ocoef) if c))
        if params.hint is not None:
            for j, v in enumerate(params.hint):
                if model.integer[j]:
                    m.AddHint(V[j], int(round(v)))
                else:
                    m.AddHint(V[j], int(min(RES, math.ceil(v / scale[j] - 1e-9))))
        solver = cp_model.CpSolver()
        p = solver.parameters
        if params.work_limit is not None:  # a work budget; the wall limit is only a safety cap
            p.max_deterministic_time = float(params.work_limit)
            p.max_time_in_seconds = float(params.time_limit_s)
        elif params.deterministic:
            p.max_deterministic_time = float(params.time_limit_s)
            p.max_time_in_seconds = 2.0 * float(params.time_limit_s)
        else:  # wall seconds, the translation above included
            p.max_time_in_seconds = max(float(params.time_limit_s) - (time.perf_counter() - t_start), 1e-3)
        p.num_workers = max(1, int(params.threads))
        p.random_seed = solver_seed(params.seed)
        p.relative_gap_limit = float(params.gap)
        p.log_search_progress = bool(params.verbose)
        p.cp_model_presolve = self.presolve
        if params.emphasis == "bound":
            p.linearization_level = 2
        # CP-SAT's own SIGINT handler would end the search and swallow Ctrl-C; leave the signal to
        # Python, which raises KeyboardInterrupt when Solve returns (at the latest at its limit)
        p.catch_sigint_signal = False
        recorder, points = _recorder(cp_model, V, scale, model, Ro, t_start)
        st = solver.Solve(m, recorder)
        # under a work limit, a search that ends short of it (not proven, not infeasible) met its wall cap
        capped = (params.work_limit is not None or params.deterministic) and st in (
            cp_model.FEASIBLE, cp_model.UNKNOWN) and solver.deterministic_time < 0.99 * p.max_deterministic_time
        bound = solver.BestObjectiveBound() / Ro + model.obj_const if st in (
            cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN) else None
        if bound is not None and not np.isfinite(bound):
            bound = None
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            x = np.array([solver.Value(v) for v in V], dtype=float) * scale
            term = Termination.OPTIMAL if st == cp_model.OPTIMAL else Termination.FEASIBLE
            return make_outcome(self.name, model, term, x, bound, solver.StatusName(st),
                                started=t_start, trace=points, wall_capped=capped)
        if st == cp_model.INFEASIBLE:
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, "CP-SAT: infeasible",
                                started=t_start, trace=points)
        if st == cp_model.UNKNOWN:
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, bound,
                                "CP-SAT: no solution within the limits",
                                started=t_start, trace=points, wall_capped=capped)
        return make_outcome(self.name, model, Termination.ERROR, None, None, f"CP-SAT: {solver.StatusName(st)}",
                            started=t_start, trace=points)
