"""The backend interface and the one solve vocabulary every backend fills in the same way."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ...errors import MAX_TIME_LIMIT_S, MAX_WORK_LIMIT, check_choice, check_real
from ..linear_model import LinearModel


class Termination(StrEnum):
    """Why a solve stopped.

    - ``optimal``: proven optimal within the gap target;
    - ``feasible``: a solution, but a limit (time or work) stopped the proof;
    - ``infeasible``: proven to have no solution;
    - ``no_solution``: a limit hit before any solution was found;
    - ``error``: the solver failed (callers fall back to their own incumbent).
    """

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    NO_SOLUTION = "no_solution"
    ERROR = "error"


Status = Termination  # the name used before the solver layer was split out


EMPHASES = ("balanced", "bound")


def solver_seed(seed: int) -> int:
    """``seed`` (any whole number >= 0) as the 31-bit seed CP-SAT, HiGHS, SCIP and CBC accept (int32); seeds
    below 2**31 - 1 pass unchanged."""
    return int(seed) % (2**31 - 1)


@dataclass(frozen=True)
class SolveParams:
    """Settings every backend honours.

    ``time_limit_s``: wall-clock limit (s), finite and > 0 (else an InputError). ``threads``, ``seed``,
    ``gap`` (relative gap target), ``verbose`` (solver log on stdout). ``deterministic`` (default
    False: wall seconds): CP-SAT counts the limit in its deterministic time (same inputs, same answer
    on any machine load; wall time capped at twice the limit); CBC counts its own CPU seconds (load
    does not change its answer; wall time capped at twice the limit); HiGHS and SCIP always count
    wall time, so their time-limited answers can vary.
    ``work_limit``: a deterministic work budget (CP-SAT deterministic seconds); when set, CP-SAT
    stops on it and ``time_limit_s`` is only a wall-clock safety cap, so the answer does not depend
    on machine load unless that cap binds. CBC and HiGHS ignore it.
    ``hint``: a starting point (one value per variable of the model): a MIP start for CBC, a hint
    for CP-SAT, ignored by HiGHS.
    ``emphasis``: ``"balanced"`` (default) or ``"bound"``, for solves that are run for their dual
    bound: CP-SAT then uses its full linearization (``linearization_level = 2``); the other backends
    ignore it.
    """

    time_limit_s: float = 10.0
    threads: int = 1
    seed: int = 0
    gap: float = 1e-4
    verbose: bool = False
    deterministic: bool = False
    work_limit: float | None = None
    hint: np.ndarray | None = None
    emphasis: str = "balanced"

    def __post_init__(self) -> None:
        check_real("time_limit_s", self.time_limit_s, positive=True, maximum=MAX_TIME_LIMIT_S)
        if self.work_limit is not None:
            check_real("work_limit", self.work_limit, minimum=0.0, maximum=MAX_WORK_LIMIT)
        check_choice("emphasis", self.emphasis, EMPHASES)


@dataclass(frozen=True)
class SolveOutcome:
    """One solve, in the model's units: ``termination``, the solution ``x`` (or None), its
    ``primal`` objective, a valid lower ``dual_bound`` (or None when the solver gives none) and
    ``gap = (primal - dual_bound) / |primal|`` (None when either is missing).

    ``trace``: the solve's progress, a tuple of ``(time_s, primal, dual_bound)`` points with
    ``time_s`` the wall seconds since the backend's ``solve`` was entered (model translation
    included) and ``primal``/``dual_bound`` in the model's units (either None when unknown at that
    time). Non-decreasing in time; its last point is ``(end, primal, dual_bound)`` of this outcome.
    CP-SAT records every incumbent through a solution callback; CBC (through PuLP) and HiGHS have
    no callback here, so their trace holds the final point only (empty when the solver failed
    before returning)."""

    termination: Termination
    x: np.ndarray | None
    primal: float | None
    dual_bound: float | None
    gap: float | None
    message: str = ""
    backend: str = "?"
    trace: tuple[tuple[float, float | None, float | None], ...] = ()
    # a solve under a work limit that its wall-clock cap stopped first: its answer depends on the load
    wall_capped: bool = False

    @property
    def status(self) -> Termination:
        return self.termination

    @property
    def bound(self) -> float | None:
        return self.dual_bound


TracePoint = tuple[float, float | None, float | None]  # (time_s, primal, dual_bound), model units


def make_outcome(backend: str, model: LinearModel | None, termination: Termination, x: np.ndarray | None,
                 bound: float | None, message: str = "", *, started: float | None = None,
                 trace: tuple[TracePoint, ...] | list[TracePoint] = (), wall_capped: bool = False) -> SolveOutcome:
    """Fill the outcome the same way for every backend: primal from ``x``, bound finite or None,
    gap from both (``model`` may be None when ``x`` is). ``started``: ``time.perf_counter()`` when
    the solve began; with it, the final point ``(now - started, primal, bound)`` is appended to
    ``trace`` (the points recorded during the search, if any), so every backend's trace ends at
    its outcome."""
    primal = None if x is None or model is None else model.objective(x)
    if bound is not None:
        bound = float(bound) if np.isfinite(bound) else None
    gap = None
    if primal is not None and bound is not None:
        gap = max(0.0, (primal - bound) / max(abs(primal), 1e-300))
    points = list(trace)
    if started is not None:
        t_end = max(time.perf_counter() - started, points[-1][0] if points else 0.0)
        points.append((t_end, primal, bound))
    return SolveOutcome(termination, x, primal, bound, gap, message, backend, tuple(points), wall_capped)


class Backend(ABC):
    """A MILP solver behind one interface."""

    name: str = "?"

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """True if the solver's Python package is installed."""

    @abstractmethod
    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        """Solve ``model``, warm-started from ``params.hint`` when the solver supports it."""
