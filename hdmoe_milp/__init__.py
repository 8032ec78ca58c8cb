"""hdmoe_milp: expert placement for MoE models on 2D-mesh near-memory accelerators."""

from .errors import InputError
from .evaluator import EvalOptions, Evaluation, evaluate
from .hardware import Hardware, Mesh, make_hardware
from .moe import MODEL_PRESETS, MoEModel, get_model
from .placement import LayerPlacement, Placement
from .workload import Trace, Workload, expected_workload, load_trace, sample_batch

__all__ = [
    "EvalOptions", "Evaluation", "Hardware", "InputError", "LayerPlacement", "MODEL_PRESETS", "Mesh", "MoEModel",
    "Placement", "Trace", "Workload", "evaluate", "expected_workload", "get_model", "load_trace", "make_hardware",
    "sample_batch",
]
__version__ = "0.1.0"
