"""The offline block MILP as a strategy: formulation (``formulation.py``), candidate blocks
(``blocks.py``), warm starts (``heuristics.py``) and per-layer / whole-model solves (``solve.py``).
The solvers themselves live in :mod:`hdmoe_milp.solvers`."""

from ...solvers import (
    BACKENDS,
    LinearModel,
    SolveParams,
    Status,
    Termination,
    available_backends,
    get_backend,
    lp_bound,
)
from .blocks import Blocks, make_blocks
from .formulation import BlockModel, MilpOptions
from .solve import EXECUTORS, LayerSolveResult, ModelSolveResult, best_per_layer, solve_layer, solve_model

__all__ = [
    "BACKENDS", "EXECUTORS", "BlockModel", "Blocks", "LayerSolveResult", "LinearModel", "MilpOptions",
    "ModelSolveResult", "SolveParams", "Status", "Termination", "available_backends", "best_per_layer",
    "get_backend", "lp_bound", "make_blocks", "solve_layer", "solve_model",
]
