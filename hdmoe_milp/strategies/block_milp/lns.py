"""Large-neighbourhood search (fix-and-optimize) on the block MILP of one layer.

From an incumbent block assignment, each step frees a few experts (those on the bottleneck node, the
node with the largest roofline time; those whose messages cross the most loaded link; plus a few
drawn with a seeded RNG), fixes every other expert's ``x_ib`` at its incumbent value, removes the
fixed variables from a copy of the layer's :class:`LinearModel` (:func:`fix_and_reduce`) and solves the
small MILP (a short work limit, the incumbent as hint). A step's plan is kept only if the evaluator
(:class:`~hdmoe_milp.strategies.block_milp.solve.LayerScorer`, the number the solve reports) scores it
strictly better, so the result is never worse than the start.

Determinism: with a work budget (``lns(..., work_budget=...)``, what :func:`solve_layer` passes under
``params.deterministic``) every decision (neighbourhoods, acceptance, when to stop) depends on the
seed, the inputs, the budget (a fixed charge per step) and CP-SAT's deterministic limit per step
only; the wall-clock deadline is then a safety cap, which makes the run machine-dependent only if it
binds (a machine far slower or more loaded than the charge per step assumes). Without a work
budget, steps run until the wall-clock deadline.

Formulation and measurements: ``formulations/offline_milp.md``, section "LNS".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from ...costs import roofline_s
from ...errors import check_choice
from ...solvers import LinearModel, SolveParams, get_backend
from ...solvers.backends.cpsat import CpSatBackend
from .formulation import BlockModel, link_terms_s

TOL = 1e-9
ACCEPT = ("evaluator", "model")


@dataclass(frozen=True)
class Reduced:
    """A reduced copy of a model: ``model`` over the kept variables ``keep [n_kept]`` (indices into
    the original), the values ``fixed_value [n]`` of the removed ones (NaN where kept)."""

    model: LinearModel
    keep: np.ndarray
    fixed_value: np.ndarray
    feasible: bool = True

    def expand(self, x_reduced: np.ndarray) -> np.ndarray:
        """The original model's vector (``[n]``) of a reduced solution ``[n_kept]``."""
        x = self.fixed_value.copy()
        x[self.keep] = x_reduced
        return x


def fix_and_reduce(lm: LinearModel, lb: np.ndarray, ub: np.ndarray, max_rounds: int = 10) -> Reduced:
    """Tighten ``lm``'s bounds to ``lb``/``ub`` (``[n]``) and remove every variable they fix.

    Repeatedly: fixed variables (``lb == ub``) are substituted into the rows (their right-hand sides
    shift, the objective constant absorbs their cost); rows with no variable left are checked and
    dropped; a row with one variable left becomes a bound on it when that bound fixes it (binary
    links such as ``Y_gb >= x_ib`` with ``x_ib`` fixed) or is implied by its bounds, and otherwise
    stays a row (only the tightest per variable and direction), because the CP-SAT backend reads
    lower bounds of continuous variables as 0. Integer variables' bounds are rounded inwards.
    ``feasible`` is False if a row or bound is found violated (the reduced model is then unusable).
    """
    lb = np.maximum(np.asarray(lb, dtype=float), lm.lb)
    ub = np.minimum(np.asarray(ub, dtype=float), lm.ub)
    A = lm.A.tocsr()
    lo, hi = lm.row_lo.copy(), lm.row_hi.copy()
    kind = np.asarray(lm.row_kind)
    live = np.ones(A.shape[0], dtype=bool)
    feasible = True
    for _ in range(max_rounds):
        lb = np.where(lm.integer, np.ceil(lb - TOL), lb) + 0.0  # (+ 0.0: no -0.0)
        ub = np.where(lm.integer, np.floor(ub + TOL), ub) + 0.0
        if np.any(lb > ub + 1e-7 * np.maximum(1.0, np.abs(ub))):
            feasible = False
        ub = np.maximum(ub, lb)
        fixed = ub - lb <= 1e-12 * np.maximum(1.0, np.abs(ub))
        free_cols = (~fixed).astype(float)
        nfree = (A @ sp.diags(free_cols) != 0).sum(axis=1).A.ravel()
        single = live & (nfree == 1)
        changed = False
        if np.any(single):
            # a row with one free variable: a bound on it (after moving the fixed part to the bounds)
            Af = A[single]
            const = Af @ np.where(fixed, lb, 0.0)
            Ar = (Af @ sp.diags(free_cols)).tocoo()
            rows_idx = np.flatnonzero(single)
            for r, j, a in zip(Ar.row, Ar.col, Ar.data, strict=True):
                if a == 0:
                    continue
                rlo, rhi = (lo[rows_idx[r]] - const[r]) / a, (hi[rows_idx[r]] - const[r]) / a
                if a < 0:
                    rlo, rhi = rhi, rlo
                nlb, nub = max(lb[j], rlo), min(ub[j], rhi)
                if lm.integer[j]:
                    nlb, nub = np.ceil(nlb - TOL), np.floor(nub + TOL)
                implied = nlb <= lb[j] + TOL and nub >= ub[j] - TOL
                fixes = nub - nlb <= 1e-12 * max(1.0, abs(nub)) or (lm.integer[j] and nub <= nlb)
                if implied or fixes:
                    lb[j], ub[j] = nlb, nub
                    live[rows_idx[r]] = False
                    changed = changed or fixes
        if not changed:
            break
    fixed = ub - lb <= 1e-12 * np.maximum(1.0, np.abs(ub))
    keep = np.flatnonzero(~fixed)
    val = np.where(fixed, lb, np.nan)
    shift = A @ np.where(fixed, lb, 0.0)
    Ak = A[:, keep].tocsr()
    nnz = np.diff(Ak.indptr)
    lo, hi = lo - shift, hi - shift
    empty = live & (nnz == 0)
    if np.any(empty & ((lo > 1e-7 * np.maximum(1, np.abs(lo))) | (hi < -1e-7 * np.maximum(1, np.abs(hi))))):
        feasible = False
    rows = np.flatnonzero(live & (nnz > 0))
    rows = _tightest_singletons(Ak, rows, lo, hi)
    reduced = LinearModel(
        names=[lm.names[j] for j in keep], lb=lb[keep], ub=ub[keep], integer=lm.integer[keep], c=lm.c[keep],
        A=Ak[rows], row_lo=lo[rows], row_hi=hi[rows], row_kind=[str(k) for k in kind[rows]],
        obj_const=lm.obj_const + float(lm.c[fixed] @ lb[fixed]),
    )
    return Reduced(reduced, keep, val, feasible)


def _tightest_singletons(A: sp.csr_matrix, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``rows`` without the one-variable rows that another one-variable row on the same variable and
    with the same sign dominates (e.g. the per-expert cuts ``T_comp >= c`` of fixed experts)."""
    nnz = np.diff(A.indptr)[rows]
    multi = rows[nnz > 1]
    best: dict[tuple[int, str], tuple[float, int]] = {}
    for r in rows[nnz == 1]:
        j, a = int(A.indices[A.indptr[r]]), float(A.data[A.indptr[r]])
        for side, val in (("lo", lo[r] / a if a > 0 else hi[r] / a), ("hi", hi[r] / a if a > 0 else lo[r] / a)):
            if not np.isfinite(val):
                continue
            key = (j, side)
            if key not in best or (val > best[key][0] if side == "lo" else val < best[key][0]):
                best[key] = (val, int(r))
    single = sorted({r for _, r in best.values()})
    return np.r_[multi, np.array(single, dtype=np.int64)].astype(np.int64)


@dataclass(frozen=True)
class LnsSettings:
    """Neighbourhood sizes and limits.

    ``free``: experts freed per step; ``random_share``: fraction of them drawn at random (the rest:
    the bottleneck node's and the hottest link's experts); ``step_work``: CP-SAT deterministic
    seconds per step (in wall mode a step also stops at the deadline); ``step_cost``: what a step
    takes from a deterministic budget (:func:`lns`'s ``work_budget``, in seconds): a step's CPU time
    is mostly what CP-SAT's deterministic time does not count (the model's translation, probing,
    LP setup), measured 0.5-1.0 CPU s (mean ~0.75) at 8 freed experts, 0.5 deterministic s and no
    presolve on DeepSeek-V2-Lite 4x8, so that a budget of ``T`` runs about ``T`` seconds on an idle
    core; ``presolve``: CP-SAT's presolve on the step's model (off: ~35 % less CPU per step, same
    gains measured); ``accept``: ``evaluator`` (the next steps start from the best plan under the
    evaluator) or ``model`` (also move to a step's plan that improves the block model's objective
    without improving the evaluator's; the best plan under the evaluator is still what comes back;
    measured over 9 DeepSeek-V2-Lite and Qwen2 layers, 10 steps: mean gain 0.70 % against 0.61 %,
    3 layers better, 2 worse, within noise, so not the default); ``max_steps``: at most this
    many steps; ``patience``: stop after this many steps in a row without improvement (0: never;
    default 2 since 0.7.9, 3 since 0.7.1, 8 before: since the polish runs first, LNS accepts few
    steps on 64-expert layers (0 of 78 shipped DeepSeek-V2-Lite layers at 3), so 2 keeps the
    plans (TBT +0.01 % on Qwen2 10/25) in 11-21 % less wall time; ``formulations/offline_milp.md``);
    ``share``: fraction of a layer's solver budget given to LNS instead of the monolithic solve
    when the model has more experts than ``free`` (:func:`lns_share`); ``polish``: the
    evaluator-driven local search (:mod:`.polish`) of the best plan before the model solve and LNS
    (at most ``polish_share`` of the wall time then left) and again after them; under a deterministic
    limit each of the two gets ``polish_share`` of the work budget, charged ``polish_eval_cost``
    seconds per evaluation (measured 0.3-0.5 ms for one swap or all of one expert's moves on a 4x8
    layer), so that its result does not depend on the machine's speed. ``polish_packed``: on a
    layer with balanced packings among its warm starts (:mod:`.packing`), the best start of the
    other group (packings, or the rest) is polished too, in what is left of the first polish's
    window (deterministic: with half of a ``polish_share`` of the work budget more), and the better of
    the two is kept. ``bnb``: on layers with at
    most :data:`.bnb.MAX_EXPERTS` experts and co-activation sets, a best-first branch and bound over
    the family on the evaluator's score (:mod:`.bnb`) takes ``bnb_share`` of the wall time left
    after the polish (deterministic: of the work budget, at ``bnb_nodes_per_s`` nodes per second,
    about this machine's rate) in place of the bound stage; the monolithic solve gets the rest. The
    default 1.0 leaves the monolithic solve nothing unless the search ends early: measured on
    Mixtral 4x8 10/25 (32 layers, 10 s, 2 jobs), 32 layers within 1 % (max 0.03 %) against 31
    (max 1.34 %) with 0.8; in the 0.8 run the model solve improved no layer's plan.
    """

    free: int = 8
    random_share: float = 0.25
    step_work: float = 0.5
    step_cost: float = 0.75
    presolve: bool = False
    accept: str = "evaluator"
    max_steps: int = 10_000
    patience: int = 2
    share: float = 1.0
    polish: bool = True
    polish_share: float = 0.5
    polish_packed: bool = True
    polish_eval_cost: float = 4e-4
    bnb: bool = True
    bnb_share: float = 1.0
    bnb_nodes_per_s: float = 4000.0


def lns_share(bm: BlockModel, settings: LnsSettings, backend: str) -> float:
    """Fraction of the layer's solver budget (wall seconds after the bound, or deterministic time)
    that :func:`lns` gets, the monolithic solve the rest: ``settings.share`` when the layer has more
    experts than one neighbourhood frees and the backend is CP-SAT (work limits and hints), else 0
    (a neighbourhood holding every expert is the monolithic solve again)."""
    if backend != "cpsat" or bm.model.num_experts <= settings.free:
        return 0.0
    return float(min(max(settings.share, 0.0), 1.0))


@dataclass
class LnsResult:
    """Outcome of :func:`lns`: the best ``assign [E]`` (block per expert) and its evaluator score
    ``score_s`` (s), the start's score ``start_s`` (s), steps run and accepted, wall seconds spent,
    the budget charged (``step_cost`` per step), ``history``
    (step, score in s) of the accepted steps with their wall times ``times`` (s since the start),
    and why it stopped (``stop``: ``target``, ``work``, ``deadline``, ``patience`` or ``max_steps``)."""

    assign: np.ndarray
    score_s: float
    start_s: float
    steps: int = 0
    accepted: int = 0
    wall_s: float = 0.0
    work: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # wall s since the start, per entry of history
    stop: str = "max_steps"
    steps_since_best: int = 0

    @property
    def gain(self) -> float:
        """Relative improvement of the score over the start (0 when none)."""
        return 0.0 if self.start_s <= 0 else max(0.0, 1.0 - self.score_s / self.start_s)


def _bottleneck_experts(bm: BlockModel, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Experts with a shard on the node of the largest roofline time and experts whose messages
    cross the most loaded link (dispatch or combine), each heaviest first (by ``f``)."""
    a = np.asarray(assign)
    node_t = roofline_s(bm.f @ bm.node_flops[a], bm.a @ bm.mem_bytes[a], bm.hw)  # [D]
    c = int(np.argmax(node_t))
    on_node = np.flatnonzero(bm.blocks.members[a, c] > 0)
    u = bm.traffic(a)
    on_link = np.zeros(0, dtype=np.int64)
    if bm.hw.mesh.num_links and u.sum() > 0:
        load = np.maximum(link_terms_s(u @ bm.set_disp_bytes, bm.hw.link_bw),
                          link_terms_s(u @ bm.set_comb_bytes, bm.hw.link_bw))  # [nl] seconds (u: per node set)
        ln = int(np.argmax(load))
        on_link = np.flatnonzero((bm.disp_bytes[a, ln] + bm.comb_bytes[a, ln]) > 0)
    order = np.argsort(-bm.f, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return on_node[np.argsort(rank[on_node])], on_link[np.argsort(rank[on_link])]


def neighbourhood(bm: BlockModel, assign: np.ndarray, size: int, rng: np.random.Generator,
                  random_share: float = 0.25, step: int = 0) -> np.ndarray:
    """Experts to free (sorted indices, at most ``size``): alternately the bottleneck node's and the
    hottest link's experts (even steps node first, odd steps link first), a random subset of them
    when there are more than the structured share, then random others to fill ``size``."""
    E = bm.model.num_experts
    size = min(size, E)
    node, link = _bottleneck_experts(bm, assign)
    first, second = (node, link) if step % 2 == 0 else (link, node)
    n_struct = size - int(round(random_share * size))
    pool = list(dict.fromkeys([int(i) for i in first] + [int(i) for i in second]))
    if len(pool) > n_struct:  # keep the heaviest half of the structured share, draw the rest
        head = pool[: n_struct // 2]
        rest = pool[n_struct // 2:]
        pick = rng.choice(len(rest), size=n_struct - len(head), replace=False)
        pool = head + [rest[k] for k in sorted(pick)]
    chosen = set(pool[:n_struct])
    others = np.array([i for i in range(E) if i not in chosen], dtype=np.int64)
    need = size - len(chosen)
    if need > 0 and others.size:
        chosen |= {int(i) for i in rng.choice(others, size=min(need, others.size), replace=False)}
    return np.array(sorted(chosen), dtype=np.int64)


def lns(bm: BlockModel, start: np.ndarray, score: Callable[[np.ndarray], float], params: SolveParams,
        deadline: float, *, settings: LnsSettings | None = None, work_budget: float | None = None,
        backend: str = "cpsat", lm: LinearModel | None = None, stop_below: float | None = None) -> LnsResult:
    """Improve ``start [E]`` (block per expert) by fix-and-optimize; returns the best assignment the
    evaluator ``score`` (s) has seen, never worse than ``start``.

    ``deadline``: ``time.perf_counter()`` value at which to stop (always a hard cap; with
    ``params.deterministic`` only a safety cap, which a deterministic run must not reach).
    ``work_budget``: a deterministic budget, ``settings.step_cost`` per step (None: none; then
    ``settings.max_steps`` or the deadline ends the search). ``lm``: ``bm.to_linear()`` if already
    built. ``stop_below``: stop once the score is at most this (s), e.g. the gap target is met.
    """
    t0 = time.perf_counter()
    s = settings or LnsSettings()
    check_choice("accept", s.accept, ACCEPT)
    lm = lm if lm is not None else bm.to_linear()
    E = bm.model.num_experts
    solver = CpSatBackend(presolve=s.presolve) if backend == "cpsat" else get_backend(backend)
    rng = np.random.default_rng(params.seed)
    cur = bm.canonical(np.asarray(start)).copy()  # the flipped copy symmetry breaking allows (same cost)
    cur_s = float(score(cur))
    res = LnsResult(cur.copy(), cur_s, cur_s)
    best, best_s = cur, cur_s
    x_idx = bm.var_ids["x"]  # [E, nb] variable ids of x_ib (-1: not a candidate of expert i)
    y_idx = bm.var_ids["Y"] if len(bm.g_f) else None  # [G, sets] ids of Y_gs (-1: not modelled)
    for step in range(s.max_steps):
        if stop_below is not None and best_s <= stop_below:
            res.stop = "target"
            break
        if work_budget is not None and res.work + s.step_cost > work_budget * (1 + 1e-9):
            res.stop = "work"
            break
        if deadline - time.perf_counter() <= 0.05:
            res.stop = "deadline"
            break
        wl = s.step_work
        free = neighbourhood(bm, cur, s.free, rng, s.random_share, step)
        lb, ub = lm.lb.copy(), lm.ub.copy()
        fix = np.ones(E, dtype=bool)
        fix[free] = False
        full = bm.full_vector(cur, lm)
        xf = x_idx[fix]
        xf = xf[xf >= 0]
        lb[xf] = ub[xf] = full[xf]
        if y_idx is not None:  # groups with no freed member: their Y_gs are the incumbent's
            still = ~np.isin(bm.g_ids, free).any(axis=1)
            yf = y_idx[still]
            yf = yf[yf >= 0]
            lb[yf] = ub[yf] = full[yf]
        red = fix_and_reduce(lm, lb, ub)
        res.steps += 1
        if not red.feasible:  # cannot happen from a feasible incumbent; the step's work counts all the same
            res.work += s.step_cost
            continue
        hint = full[red.keep]
        # a step ends on its work limit; the deadline caps its wall time (a safety cap when deterministic)
        sp_ = replace(params, hint=hint, work_limit=wl, time_limit_s=max(deadline - time.perf_counter(), 1e-3))
        out = solver.solve(red.model, sp_)
        res.work += s.step_cost
        improved = False
        if out.x is not None:
            cand = bm.decode(red.expand(out.x))
            if not np.array_equal(cand, cur) and bm.feasible(cand):
                cs = float(score(cand))
                if cs < best_s * (1 - 1e-12):
                    best, best_s, improved = cand, cs, True
                    res.accepted += 1
                    res.history.append((step, cs))
                    res.times.append(time.perf_counter() - t0)
                if improved or (s.accept == "model" and bm.objective(cand) < bm.objective(cur) * (1 - 1e-12)):
                    cur = cand
        res.steps_since_best = 0 if improved else res.steps_since_best + 1
        if s.patience and res.steps_since_best >= s.patience:
            res.stop = "patience"
            break
    res.assign, res.score_s, res.wall_s = best, best_s, time.perf_counter() - t0
    return res
