"""The solver layer: a neutral mixed-integer linear model (``LinearModel``), backends that solve it
(CBC, CP-SAT, HiGHS) and the LP bound, all reporting one ``SolveOutcome``. It knows nothing of
experts or meshes; the strategies above it build the models."""

from .backends import (
    BACKENDS,
    Backend,
    SolveOutcome,
    SolveParams,
    Status,
    Termination,
    available_backends,
    get_backend,
)
from .linear_model import LinearModel, ModelBuilder
from .lp_bound import lp_bound, lp_solution

__all__ = [
    "BACKENDS", "Backend", "LinearModel", "ModelBuilder", "SolveOutcome", "SolveParams", "Status", "Termination",
    "available_backends", "get_backend", "lp_bound", "lp_solution",
]
