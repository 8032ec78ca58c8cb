"""Expert parallelism: whole experts per node (or each expert over D/E nodes when D >= E)."""

from __future__ import annotations

import numpy as np

from ..costs import UnitCosts, activation_probability, roofline_s
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from .common import check_freqs, lpt_pack, shares_over_nodes, split_runs, whole_experts


def _even_sizes(total: int, parts: int) -> np.ndarray:
    base, extra = divmod(total, parts)
    return np.array([base + 1] * extra + [base] * (parts - extra), dtype=np.int64)


def expert_parallel(model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0) -> Placement:
    """Random EP as in the paper (seeded): experts shuffled and dealt round-robin, so every node
    holds floor(E/D) or ceil(E/D) whole experts. When D > E, each expert is split evenly over a
    contiguous (snake-order) group of floor(D/E) or ceil(D/E) nodes, runs shuffled."""
    f = check_freqs(freqs, model)
    E, D = model.num_experts, hw.num_nodes
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(f.shape[0]):
        perm = rng.permutation(E)
        if E >= D:
            node_of = np.empty(E, dtype=np.int64)
            node_of[perm] = np.arange(E) % D
            layers.append(whole_experts(node_of, D))
        else:
            runs = split_runs(hw.mesh.snake_order(), _even_sizes(D, E))
            layers.append(shares_over_nodes(E, D, [runs[j] for j in np.argsort(perm)]))
    return Placement.from_shares(layers, "ep", seed=seed)


def expert_parallel_lpt(model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0,
                        batch: float | None = None) -> Placement:
    """Load-balanced EP: longest-processing-time packing of whole experts with at most ceil(E/D)
    per node. When D > E, each expert is split evenly over a contiguous snake-order run of nodes,
    as many as balance the nodes: with ``batch`` (tokens), the counts minimise the busiest node's
    roofline (an expert's FLOPs and its weight reads, shared by its nodes), so a cold expert whose
    weights dominate at small batches also gets nodes; without it, counts proportional to token
    load (largest remainder, at least 1 each), HD-MoE's starting layout. ``seed`` is unused."""
    f = check_freqs(freqs, model)
    E, D = model.num_experts, hw.num_nodes
    layers = []
    for row in f:
        if E >= D:
            layers.append(whole_experts(lpt_pack(row, D, cap=-(-E // D)), D))
            continue
        if batch is None:
            n = _proportional_counts(row, D)
        else:
            unit = UnitCosts.of(model)
            tokens = row * batch
            n = _minmax_counts(roofline_s(unit.flops_per_token * tokens,
                                          unit.weight_bytes * activation_probability(tokens, batch), hw), D)
        order = np.argsort(-row, kind="stable")
        runs = split_runs(hw.mesh.snake_order(), n[order])
        g = [None] * E
        for j, i in enumerate(order):
            g[i] = runs[j]
        layers.append(shares_over_nodes(E, D, g))
    return Placement.from_shares(layers, "ep-lpt")


def _proportional_counts(row: np.ndarray, D: int) -> np.ndarray:
    """Node counts ``[E]`` summing to ``D``, proportional to ``row`` (largest remainder, at least 1 each)."""
    E = len(row)
    total = row.sum()
    ideal = row / total * D if total > 0 else np.full(E, D / E)
    n = np.maximum(1, np.floor(ideal).astype(np.int64))
    while n.sum() > D:
        # take back from the expert with the most nodes per unit of load
        n[np.argmax(np.where(n > 1, n / np.maximum(ideal, 1e-12), -np.inf))] -= 1
    while n.sum() < D:
        n[np.argmax(ideal - n)] += 1
    return n


def _minmax_counts(time_s: np.ndarray, D: int) -> np.ndarray:
    """Node counts ``[E]`` (at least 1 each, summing to ``D >= E``) minimising ``max time_s[i] / n[i]``:
    each next node goes to the expert whose nodes are currently the busiest (optimal for this
    separable min-max; ties to the lower index)."""
    n = np.ones(len(time_s), dtype=np.int64)
    for _ in range(D - len(time_s)):
        n[np.argmax(time_s / n)] += 1
    return n
