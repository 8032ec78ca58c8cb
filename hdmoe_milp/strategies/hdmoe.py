"""HD-MoE (arXiv 2509.09420) re-implemented as a peer, scored by the shared evaluator.

Stage 1, node balance (paper Eqs. 5-12, per layer): continuous shares ``P_ic``, presence ``Z_ic``
(binary), group touch ``Y_gc >= Z_ic`` for i in g (the disaggregated, LP-tighter form of the
paper's OR), ``t_comp >= sum_i P_ic f_i B flops / comp`` per node, ``t_comm >= gamma * bytes*B*h/BW *
(sum_g f_g Y_gc + sum_i f_tail_i Z_ic)`` per node (tracked co-activation sets exactly, the rest additively),
the optional per-node cap of Eq. 9, objective ``t_comp + 2 t_comm``. ``gamma`` is fitted like the
paper's (EP placement, the package's cost kernel instead of its simulator). The incumbent is the
better of load-balanced EP and McNaughton's wrap-around split (perfect compute balance, at most
D - 1 split experts). When it is within ``gap`` of a valid lower bound (perfect balance plus every
message received once) the solver is skipped; otherwise the MILP is solved from that incumbent.

Determinism. Nothing here reads the clock. The solver's budget is a *work* limit, ``work_limit``:
CP-SAT deterministic seconds per layer, one worker, fixed seed (``SolveParams(work_limit=...)``).
CBC and HiGHS have no work limit that the solver layer exposes, so with ``backend="cbc"`` or
``"highs"`` stage 1 runs under the wall-clock ``time_limit_s`` and its answer may vary with the
machine's load when that limit binds (``info["deterministic"]`` is False then); CP-SAT is the default
and the only backend the strategy registry uses.

The linear estimate against the evaluator (mesh mode, expected workload, fraction dispatch):
the compute term is the evaluator's FLOP time of the busiest node exactly, hence exact whenever that
node is compute-bound and an underestimate when its weight reads dominate the roofline; the
communication term ``2 gamma max_c touch_c`` ignores routing (transit traffic, link directions), is
exact for the EP placement it is fitted on (identity mapping, tree delivery, spread homes, zero hop
latency) and elsewhere is only proportional to the busiest node's received bytes: on the split
placements stage 1 prefers it underestimates the evaluator's communication (splits add multicast
branches whose transit load it does not see; stage 2 then works on the evaluator's own term).

Stage 2, link balance: logical clusters are mapped to mesh positions by a seeded first-improvement
pairwise-swap search on the evaluator's communication time (``costs.link_loads`` and
``costs.phase_time_s``, exact). The paper uses Bayesian optimisation over continuous coordinates
with Hungarian legalisation and a stochastic simulator; a swap search explores the same permutation
space directly and deterministically. Only the flows whose destinations differ between the two
swapped clusters are re-evaluated.

Every layer is independent: :func:`hdmoe_layer` is a picklable top-level function (a caller may run
layers in a process pool); :func:`hdmoe_placement` runs them one after the other.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from ..costs import UnitCosts, link_loads, merge_flows, phase_time_s
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import LayerPlacement, Placement
from ..solvers import LinearModel, SolveParams, get_backend
from .common import check_freqs, lpt_pack, whole_experts
from .ep import expert_parallel_lpt

US = 1e6
WORK_LIMIT = 0.0  # stage-1 solver budget: CP-SAT deterministic seconds per layer (0: keep the start)
TIME_LIMIT_S = 120.0  # wall-clock limit for cbc / highs, and CP-SAT's safety cap; not meant to bind
GAP = 0.01  # stage-1 relative gap target
SWAP_EVALS = 24  # stage-2 swap evaluations per layer


@dataclasses.dataclass(frozen=True)
class LayerEstimate:
    """HD-MoE's linear estimate of one layer (µs): ``t_comp + 2 t_comm`` with
    ``t_comp = u_comp max_c (f @ shares)_c`` and ``t_comm = u_comm max_c touch_c``."""

    f: np.ndarray  # [E] expert frequencies (tokens per token)
    g_ids: np.ndarray  # [G, k] tracked co-activation sets
    g_f: np.ndarray  # [G] their frequencies
    f_tail: np.ndarray  # [E] frequency of each expert outside the tracked co-activation sets
    u_comp: float  # µs per unit of frequency computed on one node
    u_comm: float  # µs per unit of token weight received by one node (gamma included)
    nodes: int

    def touch(self, present: np.ndarray) -> np.ndarray:
        """Per node, token weight of the messages it receives (tracked co-activation sets once, tail per expert)."""
        Z = present.astype(float)
        per = self.f_tail @ Z
        if len(self.g_f):
            per = per + self.g_f @ Z[self.g_ids].max(axis=1)
        return per

    def objective(self, shares: np.ndarray) -> float:
        return float(self.u_comp * (self.f @ shares).max() + 2 * self.u_comm * self.touch(shares > 0).max())

    def lower_bound(self) -> float:
        """Valid for the MILP: perfect compute balance, plus every tracked group and tail expert
        received at least once (evenly spread, and the heaviest one somewhere)."""
        spread = (self.g_f.sum() + self.f_tail.sum()) / self.nodes
        heaviest = max(self.g_f.max(initial=0.0), self.f_tail.max(initial=0.0))
        return float(self.u_comp * self.f.sum() / self.nodes + 2 * self.u_comm * max(spread, heaviest))


def wrap_shares(f: np.ndarray, D: int) -> np.ndarray:
    """McNaughton's wrap-around rule: experts fill node after node up to the mean load; an expert
    crossing a node boundary is split there. Perfect compute balance, at most D - 1 splits. The experts
    come hottest, coldest, second hottest, second coldest, ... so that every node also holds about
    E / D experts' weights (the evaluator reads them; the linear estimate does not see this). Experts
    of frequency 0 go whole to the node the cursor is on."""
    E = len(f)
    shares = np.zeros((E, D))
    total = float(f.sum())
    if total <= 0:
        shares[np.arange(E), np.arange(E) % D] = 1.0
        return shares
    cuts = np.arange(1, D) * (total / D)  # node c covers cumulative load [c T, (c + 1) T)
    desc = np.argsort(-f, kind="stable")
    order = np.empty(E, dtype=np.int64)
    order[0::2] = desc[: (E + 1) // 2]
    order[1::2] = desc[::-1][: E // 2]
    hi = np.cumsum(f[order])
    lo = hi - f[order]
    for i, a, b in zip(order, lo, hi, strict=True):
        first = min(int(np.searchsorted(cuts, a, side="right")), D - 1)
        if f[i] <= 0:
            shares[i, first] = 1.0
            continue
        inner = cuts[(cuts > a) & (cuts < b)]
        parts = np.diff(np.r_[a, inner, b]) / f[i]
        shares[i, first:first + len(parts)] = parts
    shares[shares < 1e-9] = 0.0
    return shares / shares.sum(axis=1, keepdims=True)


def _ep_lpt(model: MoEModel, hw: Hardware, f: np.ndarray) -> np.ndarray:
    """Load-balanced EP shares of one layer."""
    E, D = model.num_experts, hw.num_nodes
    if E >= D:
        return whole_experts(lpt_pack(f, D, cap=-(-E // D)), D)
    one = dataclasses.replace(model, moe_layers=1)
    return expert_parallel_lpt(one, hw, f[None, :]).layers[0].shares


def _tracked(f: np.ndarray, coactivation, k: int, max_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    E = len(f)
    g_ids = np.zeros((0, k), dtype=np.int64)
    g_f = np.zeros(0)
    if coactivation is not None and k > 1 and max_groups > 0:
        ids, fg = coactivation
        top = np.argsort(-np.asarray(fg), kind="stable")[:max_groups]
        g_ids, g_f = np.asarray(ids)[top].astype(np.int64), np.asarray(fg, dtype=float)[top]
    f_tail = np.clip(f - np.bincount(g_ids.ravel(), weights=np.repeat(g_f, k), minlength=E), 0, None)
    return g_ids, g_f, f_tail


def _comm_s(hw: Hardware, dest: np.ndarray, weight_bytes: np.ndarray, tree: bool = True) -> float:
    """The evaluator's communication time of flows with spread homes (dispatch + combine)."""
    d, c, hops = link_loads(hw.mesh, dest, weight_bytes, None, tree)
    return float(phase_time_s(d, hw.link_bw, hw.hop_latency_s, hops) + phase_time_s(c, hw.link_bw,
                                                                                     hw.hop_latency_s, hops))


def _flows(present: np.ndarray, g_ids: np.ndarray, g_f: np.ndarray, f_tail: np.ndarray):
    """Destination sets ``[F, D]`` and token weights of the linear estimate's messages."""
    if not len(g_f):
        return present, f_tail
    return np.vstack([present[g_ids].any(axis=1), present]), np.r_[g_f, f_tail]


def fit_gamma(hw: Hardware, unit: UnitCosts, batch: float, ep: np.ndarray, g_ids, g_f, f_tail) -> float:
    """gamma = evaluator communication of EP / (2 x the linear per-node estimate), as the paper fits
    its simulator on EP placements."""
    present = ep > 0
    dest, w = _flows(present, g_ids, g_f, f_tail)
    actual = _comm_s(hw, dest, w * batch * unit.vector_bytes)
    per = f_tail @ present + (g_f @ present[g_ids].max(axis=1) if len(g_f) else 0.0)
    linear = batch * unit.vector_bytes / hw.min_link_bw * float(np.max(per, initial=0.0))
    return actual / (2 * linear) if linear > 0 else 1.0


def stage1_model(est: LayerEstimate, cap: float | None) -> tuple[LinearModel, dict[str, np.ndarray]]:
    """The node-balance MILP (see the module docstring), built with whole-array rows."""
    E, D, G = len(est.f), est.nodes, len(est.g_f)
    k = est.g_ids.shape[1] if G else 0
    nP = E * D
    P = np.arange(nP).reshape(E, D)
    Z = nP + P
    Y = 2 * nP + np.arange(G * D).reshape(G, D)
    t_comp, t_comm = 2 * nP + G * D, 2 * nP + G * D + 1
    n = t_comm + 1
    ub = np.ones(n)
    ub[t_comp] = 1.001 * est.u_comp * est.f.sum()
    ub[t_comm] = 1.001 * est.u_comm * (est.f.sum() + 1)
    integer = np.zeros(n, dtype=bool)
    integer[Z.ravel()] = True
    c = np.zeros(n)
    c[t_comp], c[t_comm] = 1.0, 2.0
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(r_cols: np.ndarray, r_vals: np.ndarray, r_lo: np.ndarray, r_hi: np.ndarray) -> None:
        """Rows ``r_lo <= sum_j r_vals[:, j] x[r_cols[:, j]] <= r_hi``, one per line of ``r_cols``."""
        m = r_cols.shape[0]
        start = sum(len(x) for x in lo)
        rows.append(np.repeat(np.arange(start, start + m), r_cols.shape[1]))
        cols.append(r_cols.ravel())
        vals.append(np.broadcast_to(r_vals, r_cols.shape).ravel())
        lo.append(np.broadcast_to(r_lo, (m,)))
        hi.append(np.broadcast_to(r_hi, (m,)))

    add(P, np.ones(D), 1.0, 1.0)  # (6) every expert fully placed
    add(np.c_[P.ravel(), Z.ravel()], np.array([1.0, -1.0]), -np.inf, 0.0)  # (5) share only where present
    if G:
        gi = np.repeat(np.arange(G), k * D)
        mi = np.repeat(est.g_ids.ravel(), D)
        ci = np.tile(np.arange(D), G * k)
        add(np.c_[Y[gi, ci], Z[mi, ci]], np.array([1.0, -1.0]), 0.0, np.inf)  # Y_gc >= Z_ic, i in g
    add(np.c_[np.full(D, t_comp), P.T], np.r_[-1.0, est.u_comp * est.f], -np.inf, 0.0)  # (7)
    add(np.c_[np.full(D, t_comm), Y.T, Z.T], np.r_[-1.0, est.u_comm * est.g_f, est.u_comm * est.f_tail],
        -np.inf, 0.0)  # (8)
    if cap is not None:
        add(P.T, est.f, -np.inf, cap)  # (9)
    r, cc, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    keep = v != 0
    lo_a, hi_a = np.concatenate(lo).astype(float), np.concatenate(hi).astype(float)
    A = sp.csr_matrix((v[keep], (r[keep], cc[keep])), shape=(len(lo_a), n))
    names = [f"P_{j}" for j in range(nP)] + [f"Z_{j}" for j in range(nP)] + [f"Y_{j}" for j in range(G * D)]
    lm = LinearModel(names + ["t_comp", "t_comm"], np.zeros(n), ub, integer, c, A, lo_a, hi_a,
                     ["relax"] * len(lo_a))
    return lm, {"P": P, "Z": Z, "Y": Y, "t_comp": t_comp, "t_comm": t_comm}


def node_balance(model: MoEModel, hw: Hardware, f: np.ndarray, coactivation, batch: float, *, backend: str = "cpsat",
                 work_limit: float = WORK_LIMIT, time_limit_s: float = TIME_LIMIT_S, seed: int = 0,
                 gap: float = GAP, max_groups: int = 64, prune: bool = True,
                 wall_cap_s: float | None = None) -> tuple[np.ndarray, dict]:
    """Stage 1 for one layer: returns ``shares [E, D]`` and solve info. ``work_limit``: CP-SAT
    deterministic seconds; ``time_limit_s``: wall-clock seconds for cbc / highs (CP-SAT: safety cap).
    ``wall_cap_s``: a hard wall-clock cap on the solve (a layer of ``solve`` in wall mode, whose
    limit counts this too); a CP-SAT solve it stops short of its work limit is marked
    ``deterministic: False`` and ``wall_capped`` in the info."""
    E, D, k = model.num_experts, hw.num_nodes, model.top_k
    f = np.asarray(f, dtype=float)
    unit = UnitCosts.of(model)
    g_ids, g_f, f_tail = _tracked(f, coactivation, k, max_groups)
    ep = _ep_lpt(model, hw, f)
    gamma = fit_gamma(hw, unit, batch, ep, g_ids, g_f, f_tail)
    est = LayerEstimate(f, g_ids, g_f, f_tail, US * batch * unit.flops_per_token / hw.compute_flops,
                        US * gamma * batch * unit.vector_bytes / hw.min_link_bw, D)
    # Eq. 9's cap from the compute-to-communication ratio of one token
    r_cc = (k * unit.flops_per_token / (D * hw.compute_flops)) / (2 * unit.vector_bytes / hw.min_link_bw)
    cap = (1.0 / r_cc + 1.0) * f.sum() / D
    starts = {"ep-lpt": ep, "wrap": wrap_shares(f, D)}
    if not (prune and all(np.all(f @ s <= cap + 1e-12) for s in starts.values())):
        cap = None
    name, best = min(((n, s) for n, s in starts.items()), key=lambda ns: est.objective(ns[1]))
    best_obj, bound = est.objective(best), est.lower_bound()
    info = {"gamma": gamma, "source": name, "objective_us": best_obj, "bound_us": bound,
            "deterministic": True}
    if best_obj <= (1 + gap) * bound:
        info["status"] = "start-within-gap"
        return best, info
    if work_limit <= 0:
        info["status"] = "start (no solver budget)"
        return best, info
    lm, var = stage1_model(est, cap)
    P, Z, Y = var["P"], var["Z"], var["Y"]
    hint = np.zeros(lm.num_vars)
    hint[P.ravel()] = best.ravel()
    hint[Z.ravel()] = (best > 0).ravel()
    if len(g_f):
        hint[Y.ravel()] = (best > 0)[g_ids].max(axis=1).ravel()
    hint[var["t_comp"]] = est.u_comp * (f @ best).max()
    hint[var["t_comm"]] = est.u_comm * est.touch(best > 0).max()
    cap = np.inf if wall_cap_s is None else max(float(wall_cap_s), 1e-3)
    if backend == "cpsat":
        params = SolveParams(time_limit_s=min(max(time_limit_s, 60.0 * work_limit), cap), work_limit=work_limit,
                             seed=seed, gap=gap, hint=hint, threads=1)
    else:
        params = SolveParams(time_limit_s=min(time_limit_s, cap), seed=seed, gap=gap, hint=hint, threads=1)
        info["deterministic"] = False
    raw = get_backend(backend).solve(lm, params)
    info.update(status=raw.status.value, binaries=lm.num_binaries)
    if raw.wall_capped:  # the wall cap, not the work limit, ended it: the answer depends on the machine
        info.update(deterministic=False, wall_capped=True)
    if raw.x is not None:
        shares = np.clip(raw.x[P.ravel()].reshape(E, D), 0.0, None)
        shares[shares < 1e-6] = 0.0  # solver noise (CP-SAT works on a grid)
        shares /= shares.sum(axis=1, keepdims=True)
        obj = est.objective(shares)
        if obj < best_obj:
            info.update(source=backend, objective_us=obj)
            return shares, info
    return best, info


def link_balance(hw: Hardware, shares: np.ndarray, dest_groups: np.ndarray, weight: np.ndarray, *,
                 seed: int, evals: int = SWAP_EVALS, tree: bool = True) -> np.ndarray:
    """Stage 2: a permutation ``perm`` (logical cluster c -> mesh node perm[c]) found by swaps.

    The communication of a swap is the current one with the flows whose destinations differ between
    the two swapped clusters taken out and put back in their new place (link loads add over flows)."""
    D = hw.num_nodes
    holders = shares > 0
    dest_logical = holders[dest_groups].any(axis=1) if dest_groups.ndim == 2 else holders[dest_groups]
    dest_logical, weight = merge_flows(dest_logical, weight)  # permuting columns keeps equal rows equal

    def loads(dest_l: np.ndarray, w: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        dest = np.zeros_like(dest_l)
        dest[:, perm] = dest_l
        return link_loads(hw.mesh, dest, w, None, tree)

    def time_of(d: np.ndarray, c: np.ndarray, hops: int) -> float:
        return float(phase_time_s(d, hw.link_bw, hw.hop_latency_s, hops)
                     + phase_time_s(c, hw.link_bw, hw.hop_latency_s, hops))

    rng = np.random.default_rng(seed)
    perm = np.arange(D)
    d_cur, c_cur, _ = loads(dest_logical, weight, perm)
    hops_of = hw.mesh.distance.max(axis=0)
    best = time_of(d_cur, c_cur, int((dest_logical * hops_of[perm][None, :]).max(initial=0)))
    pairs = np.array([(a, b) for a in range(D) for b in range(a + 1, D)])
    used = 0
    improved = True
    while improved and used < evals:
        improved = False
        for j in rng.permutation(len(pairs)):
            if used >= evals:
                break
            a, b = pairs[j]
            moved = dest_logical[:, a] != dest_logical[:, b]
            trial = perm.copy()
            trial[[a, b]] = trial[[b, a]]
            used += 1
            if not moved.any():
                continue
            d_old, c_old, _ = loads(dest_logical[moved], weight[moved], perm)
            d_new, c_new, _ = loads(dest_logical[moved], weight[moved], trial)
            d_try, c_try = d_cur - d_old + d_new, c_cur - c_old + c_new
            hops = int((dest_logical * hops_of[trial][None, :]).max(initial=0)) if hw.hop_latency_s else 0
            val = time_of(d_try, c_try, hops)
            if val < best * (1 - 1e-9):
                perm, best, improved, d_cur, c_cur = trial, val, True, d_try, c_try
    return perm


def hdmoe_layer(model: MoEModel, hw: Hardware, f: np.ndarray, coactivation, batch: float, *, seed: int = 0,
                layer: int = 0, work_limit: float = WORK_LIMIT, backend: str = "cpsat",
                time_limit_s: float = TIME_LIMIT_S, swap_evals: int = SWAP_EVALS, gap: float = GAP,
                max_groups: int = 64, wall_cap_s: float | None = None) -> tuple[LayerPlacement, dict]:
    """HD-MoE's two stages for one layer (``f [E]`` frequencies, ``coactivation`` the layer's
    ``Trace.coactivation`` or None). Top-level and picklable: layers may run in a process pool. The result
    depends only on the arguments (``seed + layer`` seeds stage 2). On a single node (a 1x1 mesh: no
    links) every expert sits whole on that node; nothing is left to balance."""
    if hw.num_nodes == 1:
        return LayerPlacement.from_shares(np.ones((model.num_experts, 1))), {
            "source": "single-node", "objective_us": None, "bound_us": None, "deterministic": True}
    shares, info = node_balance(model, hw, f, coactivation, batch, backend=backend, work_limit=work_limit,
                                time_limit_s=time_limit_s, seed=seed, gap=gap, max_groups=max_groups,
                                wall_cap_s=wall_cap_s)
    unit = UnitCosts.of(model)
    if coactivation is not None:
        ids, fg = coactivation
        dest_groups, weight = np.asarray(ids), np.asarray(fg, dtype=float) * batch
    else:
        dest_groups, weight = np.arange(model.num_experts), np.asarray(f, dtype=float) * batch
    perm = link_balance(hw, shares, dest_groups, weight * unit.vector_bytes, seed=seed + layer, evals=swap_evals)
    mapped = np.zeros_like(shares)
    mapped[:, perm] = shares
    return LayerPlacement.from_shares(mapped), info


def hdmoe_placement(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0,
    coactivation: list[tuple[np.ndarray, np.ndarray]] | None = None, batch: float = 128, backend: str = "cpsat",
    work_limit: float = WORK_LIMIT, time_limit_s: float = TIME_LIMIT_S, swap_evals: int = SWAP_EVALS,
    gap: float = GAP,
) -> Placement:
    """HD-MoE's two stages for every layer (see the module docstring), one :func:`hdmoe_layer` after
    the other. ``work_limit``: stage-1 CP-SAT deterministic seconds per layer; ``time_limit_s``:
    wall-clock seconds per layer, binding only for cbc / highs."""
    f_all = check_freqs(freqs, model)
    layers, infos = [], []
    for li, f in enumerate(f_all):
        co = None if coactivation is None else coactivation[li]
        lp, info = hdmoe_layer(model, hw, f, co, batch, seed=seed, layer=li,
                               work_limit=work_limit, backend=backend, time_limit_s=time_limit_s,
                               swap_evals=swap_evals, gap=gap)
        layers.append(lp)
        infos.append(info)
    return Placement(tuple(layers), "hdmoe", {"stage1": infos, "work_limit": work_limit})
