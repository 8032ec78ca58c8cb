"""Solver backends; ``get_backend(name)`` returns one by name."""

from __future__ import annotations

from ...errors import InputError, check_choice
from .base import Backend, RawResult, SolveParams, Status
from .cbc import CbcBackend
from .cpsat import CpSatBackend
from .highs import HighsBackend

BACKENDS: dict[str, type[Backend]] = {"cbc": CbcBackend, "cpsat": CpSatBackend, "highs": HighsBackend}


def get_backend(name: str) -> Backend:
    check_choice("backend", name, tuple(BACKENDS))
    cls = BACKENDS[name]
    if not cls.available():
        raise InputError("backend", f"{name} is not installed", "pip install the solver's package")
    return cls()


def available_backends() -> list[str]:
    return [n for n, c in BACKENDS.items() if c.available()]


__all__ = ["BACKENDS", "Backend", "RawResult", "SolveParams", "Status", "available_backends", "get_backend"]
