"""The backend interface: a neutral LinearModel in, a status, a solution and maybe a bound out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..model import LinearModel


class Status(StrEnum):
    """Outcome of a solve.

    - ``optimal``: proven optimal within the gap target;
    - ``feasible``: a solution, but a limit (time) stopped the proof;
    - ``infeasible``: proven to have no solution;
    - ``no_solution``: a limit hit before any solution was found;
    - ``error``: the solver failed (the caller falls back to its warm start).
    """

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    NO_SOLUTION = "no_solution"
    ERROR = "error"


@dataclass(frozen=True)
class SolveParams:
    """Settings every backend honours: ``time_limit_s``, ``threads``, ``seed``, ``gap`` (relative
    gap target), ``verbose`` (solver log on stdout). ``deterministic``: CP-SAT counts the limit in its
    deterministic time (same inputs, same answer on any machine load; wall time capped at twice the
    limit); CBC and HiGHS always count wall time, so their time-limited answers can vary."""

    time_limit_s: float = 10.0
    threads: int = 1
    seed: int = 0
    gap: float = 1e-4
    verbose: bool = False
    deterministic: bool = True


@dataclass(frozen=True)
class RawResult:
    """What a backend returns: its status, the variable vector (or None), a valid lower bound on
    the model's objective in the model's units (or None when the solver gives none)."""

    status: Status
    x: np.ndarray | None
    bound: float | None
    message: str = ""


class Backend(ABC):
    """A MILP solver behind one interface."""

    name: str = "?"

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """True if the solver's Python package is installed."""

    @abstractmethod
    def solve(self, model: LinearModel, params: SolveParams) -> RawResult:
        """Solve ``model`` (warm-started from ``model.hint`` when the solver supports it)."""
