"""Baseline strategies. Each is ``fn(model, hardware, freqs [layers, E], *, seed) -> Placement``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import check_choice
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from .cb import compute_balanced
from .ep import expert_parallel, expert_parallel_lpt
from .eplb import eplb_placement, rebalance_experts
from .hdmoe import hdmoe_placement
from .tp import tensor_parallel

Strategy = Callable[..., Placement]

STRATEGIES: dict[str, Strategy] = {
    "tp": tensor_parallel,
    "ep": expert_parallel,
    "ep-lpt": expert_parallel_lpt,
    "cb": compute_balanced,
    "eplb": eplb_placement,
    "hdmoe": hdmoe_placement,
}


def build(name: str, model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0,
          groups: list | None = None, batch: float = 128, time_limit_s: float = 10.0,
          backend: str = "cpsat") -> Placement:
    """Run the strategy called ``name`` (one of ``STRATEGIES``). ``groups`` (per layer
    ``Trace.groups(l)``), ``batch``, ``time_limit_s`` (per layer) and ``backend`` reach the
    strategies that solve a MILP (``hdmoe``)."""
    check_choice("strategy", name, tuple(STRATEGIES))
    if name == "hdmoe":
        return hdmoe_placement(model, hw, freqs, seed=seed, groups=groups, batch=batch,
                               time_limit_s=time_limit_s, backend=backend)
    return STRATEGIES[name](model, hw, freqs, seed=seed)


__all__ = [
    "STRATEGIES", "build", "compute_balanced", "eplb_placement", "expert_parallel", "expert_parallel_lpt",
    "hdmoe_placement",
    "rebalance_experts", "tensor_parallel",
]
