"""hdmoe_milp: expert placement for MoE models on 2D-mesh near-memory accelerators.

The public pipeline::

    import hdmoe_milp as hm
    problem = hm.load_instance("instances/deepseek-v2-lite_5-50_4x8.toml")
    result = hm.solve(problem, backend="cpsat", time_limit_s=5, jobs=2)
    print(result.table())
"""

from ._version import __version__
from .errors import InputError
from .evaluator import EvalOptions, Evaluation
from .hardware import Hardware, Mesh, make_hardware
from .moe import MODEL_PRESETS, MoEModel, get_model
from .online import ReplayResult
from .pipeline import (
    BASELINES,
    STRATEGIES,
    Comparison,
    LayerReport,
    PlanResult,
    check_plan,
    compare,
    evaluate,
    load_instance,
    load_plan,
    place,
    replay,
    solve,
)
from .placement import LayerPlacement, Placement
from .problem import Budget, Problem
from .workload import Trace, TraceShapeError, Workload, expected_workload, load_trace, sample_batch

__all__ = [
    "BASELINES", "Budget", "Comparison", "EvalOptions", "Evaluation", "Hardware", "InputError", "LayerPlacement",
    "LayerReport", "MODEL_PRESETS", "Mesh", "MoEModel", "Placement", "PlanResult", "Problem", "ReplayResult",
    "STRATEGIES", "Trace", "TraceShapeError", "Workload", "__version__", "check_plan", "compare", "evaluate",
    "expected_workload", "get_model", "load_instance", "load_plan", "load_trace", "make_hardware", "place", "replay",
    "sample_batch", "solve",
]
