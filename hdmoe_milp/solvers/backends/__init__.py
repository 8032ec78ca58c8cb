"""Solver backends; ``get_backend(name)`` returns one by name."""

from __future__ import annotations

from ...errors import InputError, check_choice
from .base import Backend, SolveOutcome, SolveParams, Status, Termination, make_outcome
from .cbc import CbcBackend
from .cpsat import CpSatBackend
from .highs import HighsBackend
from .scip import ScipBackend

BACKENDS: dict[str, type[Backend]] = {"cbc": CbcBackend, "cpsat": CpSatBackend, "highs": HighsBackend,
                                 "scip": ScipBackend}


def get_backend(name: str) -> Backend:
    """An instance of the backend called ``name`` (``cbc``, ``cpsat``, ``highs`` or ``scip``)."""
    check_choice("backend", name, tuple(BACKENDS))
    cls = BACKENDS[name]
    if not cls.available():
        raise InputError("backend", f"{name} is not installed", f"pip install 'hdmoe_milp[{name}]'")
    return cls()


def available_backends() -> list[str]:
    """Names of the backends whose Python package is installed."""
    return [n for n, c in BACKENDS.items() if c.available()]


__all__ = ["BACKENDS", "Backend", "SolveOutcome", "SolveParams", "Status", "Termination", "available_backends",
           "get_backend", "make_outcome"]
