"""Tensor parallelism: every expert split evenly over all nodes."""

from __future__ import annotations

import numpy as np

from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from .common import check_freqs


def tensor_parallel(model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0) -> Placement:
    """Every expert of every layer split evenly over all D nodes (share 1/D each)."""
    f = check_freqs(freqs, model)
    D = hw.num_nodes
    share = np.full((model.num_experts, D), 1.0 / D)
    return Placement.from_shares([share] * f.shape[0], "tp")
