"""HD-MoE (arXiv 2509.09420) re-implemented as a peer, scored by the shared evaluator.

Stage 1, node balance (paper Eqs. 5-12, per layer): continuous shares ``P_ic``, presence ``Z_ic``
(binary), group touch ``Y_gc >= Z_ic`` for i in g (the disaggregated, LP-tighter form of the
paper's OR), ``t_comp >= sum_i P_ic f_i B flops / comp`` per node, ``t_comm >= gamma * bytes*B*h/BW *
(sum_g f_g Y_gc + sum_i f_tail_i Z_ic)`` per node (tracked groups exactly, the rest additively),
the optional per-node cap of Eq. 9, objective ``t_comp + 2 t_comm``. Solved with this package's
backends under the same time limit as our MILP, warm-started from load-balanced EP.
``gamma`` is fitted like the paper's (EP placement, our evaluator instead of its simulator).

Stage 2, link balance: logical clusters are mapped to mesh positions by a seeded first-improvement
pairwise-swap search on the evaluator's communication time. The paper uses Bayesian optimisation
over continuous coordinates with Hungarian legalisation and a stochastic simulator; a swap search
explores the same permutation space directly and deterministically.
"""

from __future__ import annotations

import numpy as np

from ..costs import link_loads, merge_flows
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import LayerPlacement, Placement
from ..solvers import ModelBuilder, SolveParams, get_backend
from .common import check_freqs
from .ep import expert_parallel_lpt

US = 1e6


def _touch(shares_present: np.ndarray, g_ids: np.ndarray, g_f: np.ndarray, f_tail: np.ndarray) -> np.ndarray:
    """Per node, token-weight of messages it receives (tracked groups once, tail per expert)."""
    Z = shares_present.astype(float)
    per = f_tail @ Z
    if len(g_f):
        per = per + g_f @ Z[g_ids].max(axis=1)
    return per


def node_balance(model: MoEModel, hw: Hardware, f: np.ndarray, groups, batch: float, *, backend: str,
                 time_limit_s: float, seed: int, max_groups: int = 64, prune: bool = True) -> tuple[np.ndarray, dict]:
    """Stage 1 for one layer: returns ``shares [E, D]`` and solve info."""
    E, D, k = model.num_experts, hw.num_nodes, model.top_k
    phi = model.expert_flops_per_token()
    vec = batch * model.hidden * model.activation_bytes / hw.min_link_bw
    g_ids = np.zeros((0, k), dtype=np.int64)
    g_f = np.zeros(0)
    if groups is not None and k > 1:
        ids, fg = groups
        top = np.argsort(-np.asarray(fg), kind="stable")[:max_groups]
        g_ids, g_f = np.asarray(ids)[top].astype(np.int64), np.asarray(fg, dtype=float)[top]
    f_tail = np.clip(f - np.bincount(g_ids.ravel(), weights=np.repeat(g_f, k), minlength=E), 0, None)
    # warm start and gamma from load-balanced EP
    ep = expert_parallel_lpt(model, hw, np.tile(f, (model.moe_layers, 1))).layers[0].shares
    gamma = _fit_gamma(model, hw, f, ep, g_ids, g_f, f_tail, vec)

    mb = ModelBuilder()
    P = mb.add_vars("P", E * D, 0.0, 1.0, integer=False).reshape(E, D)
    Z = mb.add_vars("Z", E * D, 0.0, 1.0, integer=True).reshape(E, D)
    Y = mb.add_vars("Y", len(g_f) * D, 0.0, 1.0, integer=False).reshape(len(g_f), D)
    ub_comp = 1.001 * US * f.sum() * batch * phi / hw.compute_flops
    ub_comm = 1.001 * US * gamma * vec * (f.sum() + 1)
    t_comp = mb.add_vars("t_comp", 1, 0.0, ub_comp, integer=False, cost=1.0)[0]
    t_comm = mb.add_vars("t_comm", 1, 0.0, ub_comm, integer=False, cost=2.0)[0]
    for i in range(E):
        mb.add_row(P[i], np.ones(D), 1.0, 1.0)  # (6)
        for c in range(D):
            mb.add_row([P[i, c], Z[i, c]], [1.0, -1.0], -np.inf, 0.0)  # (5)
    for g, members in enumerate(g_ids):
        for i in members:
            for c in range(D):
                mb.add_row([Y[g, c], Z[i, c]], [1.0, -1.0], 0.0, np.inf)
    r_cc = (k * phi / (D * hw.compute_flops)) / (2 * model.hidden * model.activation_bytes / hw.min_link_bw)
    cap = (1.0 / r_cc + 1.0) * f.sum() / D
    prune = prune and bool(np.all(f @ ep <= cap + 1e-12))
    for c in range(D):
        mb.add_row(np.r_[t_comp, P[:, c]], np.r_[-1.0, US * f * batch * phi / hw.compute_flops], -np.inf, 0.0)  # (7)
        mb.add_row(np.r_[t_comm, Y[:, c], Z[:, c]], np.r_[-1.0, US * gamma * vec * g_f, US * gamma * vec * f_tail],
                   -np.inf, 0.0)  # (8)
        if prune:
            mb.add_row(P[:, c], f, -np.inf, cap)  # (9)
    lm = mb.build()
    hint = np.zeros(lm.num_vars)
    hint[P.ravel()] = ep.ravel()
    hint[Z.ravel()] = (ep > 0).ravel()
    if len(g_f):
        hint[Y.ravel()] = (ep > 0)[g_ids].max(axis=1).ravel()
    hint[t_comp] = US * (f @ ep).max() * batch * phi / hw.compute_flops
    hint[t_comm] = US * gamma * vec * _touch(ep > 0, g_ids, g_f, f_tail).max()
    raw = get_backend(backend).solve(lm, SolveParams(time_limit_s=time_limit_s, seed=seed, hint=hint))
    info = {"status": raw.status.value, "gamma": gamma, "binaries": lm.num_binaries}

    def stage1_objective(shares: np.ndarray) -> float:
        comp = (f @ shares).max() * batch * phi / hw.compute_flops
        return comp + 2 * gamma * vec * _touch(shares > 0, g_ids, g_f, f_tail).max()

    if raw.x is not None:
        shares = np.clip(raw.x[P.ravel()].reshape(E, D), 0.0, None)
        shares[shares < 1e-6] = 0.0  # solver noise (CP-SAT works on a grid)
        shares /= shares.sum(axis=1, keepdims=True)
        if stage1_objective(shares) < stage1_objective(ep):
            info["source"] = backend
            return shares, info
    info["source"] = "ep-lpt warm start"
    return ep, info


def _fit_gamma(model, hw, f, ep, g_ids, g_f, f_tail, vec) -> float:
    """gamma = evaluator communication of EP / (2 x the linear per-node estimate), as the paper fits
    its simulator on EP placements."""
    flows = ep > 0
    dest = np.vstack([flows[g] .any(axis=0) for g in g_ids] + [flows[i] for i in range(len(f))]) if len(
        g_f) else flows
    w = np.r_[g_f, f_tail] if len(g_f) else f
    d, c, _ = link_loads(hw.mesh, dest, w * vec * hw.min_link_bw, None, True)
    actual = (d / hw.link_bw).max(initial=0.0) + (c / hw.link_bw).max(initial=0.0)
    linear = vec * _touch(flows, g_ids, g_f, f_tail).max()
    return float(actual / (2 * linear)) if linear > 0 else 1.0


def link_balance(hw: Hardware, shares: np.ndarray, dest_groups: np.ndarray, weight: np.ndarray, *,
                 seed: int, evals: int = 300, tree: bool = True) -> np.ndarray:
    """Stage 2: a permutation ``perm`` (logical cluster c -> mesh node perm[c]) found by swaps."""
    D = hw.num_nodes
    holders = shares > 0
    dest_logical = holders[dest_groups].any(axis=1) if dest_groups.ndim == 2 else holders[dest_groups]
    dest_logical, weight = merge_flows(dest_logical, weight)  # permuting columns keeps equal rows equal

    def comm(perm: np.ndarray) -> float:
        dest = np.zeros_like(dest_logical)
        dest[:, perm] = dest_logical
        d, c, _ = link_loads(hw.mesh, dest, weight, None, tree)
        return float((d / hw.link_bw).max(initial=0.0) + (c / hw.link_bw).max(initial=0.0))

    rng = np.random.default_rng(seed)
    perm = np.arange(D)
    best = comm(perm)
    pairs = [(a, b) for a in range(D) for b in range(a + 1, D)]
    used = 0
    improved = True
    while improved and used < evals:
        improved = False
        for j in rng.permutation(len(pairs)):
            if used >= evals:
                break
            a, b = pairs[j]
            trial = perm.copy()
            trial[[a, b]] = trial[[b, a]]
            val = comm(trial)
            used += 1
            if val < best * (1 - 1e-9):
                perm, best, improved = trial, val, True
    return perm


def hdmoe_placement(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0,
    groups: list[tuple[np.ndarray, np.ndarray]] | None = None, batch: float = 128, backend: str = "cpsat",
    time_limit_s: float = 10.0, swap_evals: int = 300,
) -> Placement:
    """HD-MoE's two stages for every layer (see the module docstring)."""
    f_all = check_freqs(freqs, model)
    layers, infos = [], []
    for li, f in enumerate(f_all):
        g = None if groups is None else groups[li]
        shares, info = node_balance(model, hw, f, g, batch, backend=backend, time_limit_s=time_limit_s, seed=seed)
        if g is not None:
            ids, fg = g
            dest_groups, weight = np.asarray(ids), np.asarray(fg) * batch
        else:
            dest_groups, weight = np.arange(model.num_experts), f * batch
        perm = link_balance(hw, shares, dest_groups, weight * model.hidden * model.activation_bytes,
                            seed=seed + li, evals=swap_evals)
        mapped = np.zeros_like(shares)
        mapped[:, perm] = shares
        layers.append(LayerPlacement.from_shares(mapped))
        infos.append(info)
    return Placement(tuple(layers), "hdmoe", {"stage1": infos})
