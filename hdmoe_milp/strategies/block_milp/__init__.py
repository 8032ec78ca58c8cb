"""The offline block MILP as a strategy: formulation (``formulation.py``), candidate blocks and the
baselines' patterns (``blocks.py``), warm starts (``heuristics.py``, and the balanced packings of
``packing.py``) and per-layer / whole-model solves
(``solve.py``). The solvers themselves live in :mod:`hdmoe_milp.solvers`."""

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
from .lns import LnsSettings
from .solve import (
    EXECUTORS,
    MAX_MESH_NODES,
    LayerSolveResult,
    LayerTask,
    ModelSolveResult,
    best_per_layer,
    family_layers,
    family_model,
    layer_baselines,
    layer_tasks,
    model_result,
    not_solved_task,
    schedule_tasks,
    select_layers,
    solve_layer,
    solve_layer_task,
    solve_model,
)

__all__ = [
    "BACKENDS", "EXECUTORS", "MAX_MESH_NODES", "BlockModel", "Blocks", "LayerSolveResult", "LayerTask", "LinearModel",
    "LnsSettings",
    "MilpOptions", "ModelSolveResult", "SolveParams", "Status", "Termination", "available_backends",
    "best_per_layer", "family_layers", "family_model", "get_backend", "layer_baselines", "layer_tasks", "lp_bound",
    "make_blocks",
    "model_result", "not_solved_task", "schedule_tasks", "select_layers", "solve_layer", "solve_layer_task",
    "solve_model",
]
