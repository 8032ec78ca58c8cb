"""hdmoe_milp: expert placement for MoE models on 2D-mesh near-memory accelerators.

The public pipeline::

    import hdmoe_milp as hm
    problem = hm.load_instance("instances/deepseek-v2-lite_5-50_4x8.toml")
    result = hm.solve(problem, backend="cpsat", time_limit_s=5, jobs=2)
    print(result.table())

The names below are imported on first use (PEP 562), so that ``import hdmoe_milp`` is cheap and the
``hdmoe-milp`` command can answer Ctrl-C cleanly while numpy, pandas and OR-Tools load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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

# public name -> the module that defines it
_HOME = {
    "InputError": "errors",
    "EvalOptions": "evaluator", "Evaluation": "evaluator",
    "Hardware": "hardware", "Mesh": "hardware", "make_hardware": "hardware",
    "MODEL_PRESETS": "moe", "MoEModel": "moe", "get_model": "moe",
    "ReplayResult": "online",
    **{n: "pipeline" for n in ("BASELINES", "STRATEGIES", "Comparison", "LayerReport", "PlanResult", "check_plan",
                               "compare", "evaluate", "load_instance", "load_plan", "place", "replay", "solve")},
    "LayerPlacement": "placement", "Placement": "placement",
    "Budget": "problem", "Problem": "problem",
    **{n: "workload" for n in ("Trace", "TraceShapeError", "Workload", "expected_workload", "load_trace",
                               "sample_batch")},
}
_SUBMODULES = frozenset({
    "cli", "cli_report", "costs", "errors", "evaluator", "grid", "hardware", "instance", "moe", "online", "pipeline",
    "placement", "problem", "replica_rules", "report", "solvers", "strategies", "synthetic", "workload",
})

__all__ = [
    "BASELINES", "Budget", "Comparison", "EvalOptions", "Evaluation", "Hardware", "InputError", "LayerPlacement",
    "LayerReport", "MODEL_PRESETS", "Mesh", "MoEModel", "Placement", "PlanResult", "Problem", "ReplayResult",
    "STRATEGIES", "Trace", "TraceShapeError", "Workload", "__version__", "check_plan", "compare", "evaluate",
    "expected_workload", "get_model", "load_instance", "load_plan", "load_trace", "make_hardware", "place", "replay",
    "sample_batch", "solve",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
