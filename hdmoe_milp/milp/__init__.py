"""Offline block MILP: formulation (``formulation.py``) apart from the solver backends (``backends/``)."""

from .backends import BACKENDS, SolveParams, Status, available_backends, get_backend
from .blocks import Blocks, make_blocks
from .formulation import BlockModel, MilpOptions
from .model import LinearModel
from .solve import LayerSolveResult, ModelSolveResult, lp_bound, solve_layer, solve_model

__all__ = [
    "BACKENDS", "BlockModel", "Blocks", "LayerSolveResult", "LinearModel", "MilpOptions", "ModelSolveResult",
    "SolveParams", "Status", "available_backends", "get_backend", "lp_bound", "make_blocks", "solve_layer",
    "solve_model",
]
