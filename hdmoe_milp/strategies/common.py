"""Helpers shared by the baseline strategies."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..moe import MoEModel


def check_freqs(freqs: np.ndarray, model: MoEModel) -> np.ndarray:
    """Validate per-layer expert frequencies ``[layers, E]`` (each row sums to top_k)."""
    f = np.asarray(freqs, dtype=float)
    if f.ndim != 2 or f.shape[1] != model.num_experts:
        raise InputError(
            "frequencies", f"expected shape [layers, {model.num_experts}], got {f.shape}",
            f"one row of {model.num_experts} expert frequencies per MoE layer",
        )
    if not np.all(np.isfinite(f)):
        raise InputError("frequencies", "contain NaN or infinity", "frequencies are finite token fractions")
    if np.any(f < 0):
        raise InputError("frequencies", "contain negative values", "frequencies are token fractions >= 0")
    if f.shape[0] != model.moe_layers:
        raise InputError(
            "frequencies", f"have {f.shape[0]} layers but {model.name} has {model.moe_layers} MoE layers",
        )
    return f


def lpt_pack(loads: np.ndarray, bins: int, cap: int | None = None) -> np.ndarray:
    """Longest-processing-time packing: heaviest item first into the lightest bin that still has
    room (fewer than ``cap`` items). Ties go to the lowest bin index. Returns ``[items]`` bin ids."""
    n = len(loads)
    cap = cap if cap is not None else n
    if cap * bins < n:
        raise InputError("packing", f"{n} items do not fit in {bins} bins of {cap}")
    order = np.argsort(-np.asarray(loads, dtype=float), kind="stable")
    bin_load = np.zeros(bins)
    bin_cnt = np.zeros(bins, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in order:
        cand = np.where(bin_cnt < cap, bin_load, np.inf)
        b = int(np.argmin(cand))
        out[i] = b
        bin_load[b] += loads[i]
        bin_cnt[b] += 1
    return out


def split_runs(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut a node order into consecutive runs of the given sizes."""
    ends = np.cumsum(sizes)
    return [order[e - s : e] for s, e in zip(sizes, ends, strict=True)]


def shares_over_nodes(E: int, D: int, nodes: list[np.ndarray]) -> np.ndarray:
    """``[E, D]`` shares where expert i is split evenly over the nodes ``nodes[i]``."""
    s = np.zeros((E, D))
    for i, g in enumerate(nodes):
        s[i, g] = 1.0 / len(g)
    return s


def whole_experts(node_of: np.ndarray, D: int) -> np.ndarray:
    """``[E, D]`` shares for whole experts: expert i entirely on node ``node_of[i]``."""
    E = len(node_of)
    s = np.zeros((E, D))
    s[np.arange(E), node_of] = 1.0
    return s

