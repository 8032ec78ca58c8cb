"""Which copy of a replicated expert serves each token (the replica rule).

Rules, chosen by ``EvalOptions.replica_rule`` (written out in ``formulations/evaluator.md``):

- ``fraction``: each expert's flows are cut by the copies' token fractions (the plan's static split);
- ``affinity``: the same per-copy quotas; a token goes to a copy with room among those nearest to
  the nodes it already touches (distance 0: every holder of the copy already receives the token's
  message, so the copy costs no traffic), ties to the least-filled copy;
- ``balanced`` (the online stage's runtime rule): as ``affinity``, with quotas that level this
  batch's node loads instead of the plan's fractions;
- ``nearest``: the nearest copy without quotas, ties to the least-loaded.

The token's home does not enter the distance: with spread homes it has none, and the tree it is
already sent along is what an extra message would branch from. All return ``[F, k]`` copy ids, one
per (flow, expert) pair, and are deterministic.
"""

from __future__ import annotations

import numpy as np

from .placement import LayerPlacement

REPLICA_RULES = ("fraction", "affinity", "balanced", "nearest")


def _identity(lp: LayerPlacement) -> bool:
    return not lp.is_replicated and np.array_equal(lp.expert_of, np.arange(lp.num_experts))


def assign_copies(lp: LayerPlacement, experts: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Copy serving each (flow, expert) pair, ``[F, k]``.

    Without replication, the expert's only copy. With replication, each expert's flows are laid
    out in order along [0, 1) by cumulative weight and cut by the copies' token fractions, so every
    copy serves its fraction of the expert's tokens (deterministic).
    """
    if _identity(lp):
        return experts
    F, k = experts.shape
    flat = experts.ravel()
    wflat = np.repeat(weight, k)
    order = np.argsort(flat, kind="stable")
    e_sorted = flat[order]
    cw = np.cumsum(wflat[order])
    starts = np.searchsorted(e_sorted, np.arange(lp.num_experts))
    ends = np.searchsorted(e_sorted, np.arange(lp.num_experts), side="right")
    base = np.where(starts > 0, cw[np.maximum(starts - 1, 0)], 0.0)
    tot = np.where(ends > starts, cw[np.maximum(ends - 1, 0)] - base, 1.0)
    u = (cw - wflat[order] / 2 - base[e_sorted]) / tot[e_sorted]
    # Copies sorted by expert; key = expert + cumulative fraction within the expert.
    corder = np.lexsort((np.arange(lp.num_copies), lp.expert_of))
    ce = lp.expert_of[corder]
    cf = lp.token_fraction[corder]
    cum = np.zeros_like(cf)
    for e in np.unique(ce):
        sel = ce == e
        cum[sel] = np.cumsum(cf[sel])
    keys = ce + np.minimum(cum, 1.0 - 1e-12)
    keys[np.r_[ce[1:] != ce[:-1], True]] = ce[np.r_[ce[1:] != ce[:-1], True]] + 1.0  # last copy closes
    pos = np.searchsorted(keys, e_sorted + u, side="right")
    pos = np.minimum(pos, len(keys) - 1)
    out = np.empty_like(flat)
    out[order] = corder[pos]
    return out.reshape(F, k)


def split_at_quotas(lp: LayerPlacement, experts: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flows ``experts [F, k]``, ``weight [F]`` with every flow that straddles a cut of the
    ``fraction`` rule split in two (or more) at that cut, so that :func:`assign_copies` then gives
    every copy exactly its token fraction of the expert's tokens, whatever the flows' sizes.

    Needed for expected workloads, whose flows are whole co-activation groups of ``f_g·B`` tokens: a
    top-1 expert has one flow, which would go to one copy whole. Each cut splits at most one flow,
    so at most ``copies - experts`` rows are added. Observed batches (one token per flow) need none.
    Returns the new ``experts`` and ``weight`` (rows in the same order; a split row's pieces adjacent)."""
    if _identity(lp) or not lp.is_replicated:
        return experts, weight
    src = np.arange(len(weight))
    w = np.asarray(weight, dtype=float).copy()
    ncopy = np.bincount(lp.expert_of, minlength=lp.num_experts)
    for e in np.flatnonzero(ncopy > 1):
        rows = np.flatnonzero((experts[src] == e).any(axis=1))
        if rows.size == 0:
            continue
        cw = np.cumsum(w[rows])
        total = cw[-1]
        if total <= 0:
            continue
        q = lp.token_fraction[np.flatnonzero(lp.expert_of == e)]  # in copy order, as assign_copies cuts
        cuts = np.cumsum(q)[:-1] / q.sum() * total
        lo = cw - w[rows]  # each row's interval [lo, cw) on the expert's line
        tol = 1e-9 * total
        pieces: dict[int, list[float]] = {}
        for c in cuts:
            j = int(np.searchsorted(cw, c, side="left"))
            if j < len(rows) and lo[j] + tol < c < cw[j] - tol:
                pieces.setdefault(int(rows[j]), []).append(float(c - lo[j]))
        if not pieces:
            continue
        counts = np.ones(len(src), dtype=np.int64)  # pieces per row; rows keep their order
        for r, at in pieces.items():
            counts[r] += len(at)
        first = np.cumsum(counts) - counts  # each row's first piece in the new rows
        src, new_w = np.repeat(src, counts), np.repeat(w, counts)
        for r, at in pieces.items():
            new_w[first[r]:first[r] + counts[r]] = np.diff(np.r_[0.0, sorted(at), w[r]])
        w = new_w
    return experts[src], w


def water_fill(level: np.ndarray, amount: float, rate: np.ndarray | None = None) -> np.ndarray:
    """Split ``amount`` over bins: bin j at ``level[j]`` rises by ``rate[j]`` (default 1) per unit;
    returns units per bin (>= 0) so that the filled bins end level and the others stay above."""
    level = np.asarray(level, dtype=float)
    rate = np.ones_like(level) if rate is None else np.asarray(rate, dtype=float)
    order = np.argsort(level, kind="stable")
    lv, inv = level[order], 1.0 / rate[order]
    lam = (amount + np.cumsum(lv * inv)) / np.cumsum(inv)
    nxt = np.r_[lv[1:], np.inf]
    m = int(np.argmax(lam <= nxt))
    return np.clip((lam[m] - level) / rate, 0.0, None)


def _cut(weight: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """Index into ``amounts`` for each flow laid out in order by cumulative weight (midpoints)."""
    mid = np.cumsum(weight) - weight / 2
    bounds = np.cumsum(amounts) * (weight.sum() / max(amounts.sum(), 1e-300))
    return np.minimum(np.searchsorted(bounds, mid, side="right"), len(amounts) - 1)


def assign_by_distance(lp: LayerPlacement, experts: np.ndarray, weight: np.ndarray, distance: np.ndarray,
                       rule: str = "affinity", floor: np.ndarray | None = None) -> np.ndarray:
    """Copy serving each (flow, expert) pair under the ``affinity``, ``balanced`` or ``nearest``
    rule, ``[F, k]``.

    Experts with one copy are assigned first; they define each token's touched nodes and the node
    loads (tokens x shares). Replicated experts follow, busiest first. A token's distance to a copy is the
    largest, over the copy's holders, of the hop distance from the nearest touched node (0: the copy
    adds no traffic); the token may use the copies at its minimal distance. Tokens with the same
    allowed set form a group; groups are served most constrained first, each water-filled over its
    allowed copies, then cut by cumulative weight in flow order.

    ``nearest`` (uncapped): a copy's load is the highest node load among its holders.
    ``affinity`` (capped): copy r may serve at most its quota ``q_r`` of the expert's tokens and its
    load is the filled part of that quota; tokens that do not fit wait for the next pass, where full
    copies are out of reach, so each copy serves its quota (as under ``fraction``) and the rule only
    decides *which* tokens it serves.
    ``balanced``: as ``affinity``, but the quotas come from this batch (``_balance``: starting from
    the plan's split, each expert's tokens are water-filled over its copies on the other experts'
    node loads), so replicas absorb the batch's own imbalance. ``distance [D, D]``: hop counts.
    ``floor [D]`` (tokens): a node's load counts as at least this much (the tokens it could compute
    while reading its weights anyway: weight-read time x compute / FLOPs per token); default 0.
    """
    if _identity(lp):
        return experts
    F, k = experts.shape
    R, D = lp.shares.shape
    holders = lp.shares > 0
    ncopy = np.bincount(lp.expert_of, minlength=lp.num_experts)
    first = np.full(lp.num_experts, -1)
    first[lp.expert_of[::-1]] = np.arange(R)[::-1]
    out = np.where(ncopy[experts] == 1, first[experts], -1)
    fixed = out >= 0
    w = np.asarray(weight, dtype=float)
    touched = np.zeros((F, D), dtype=bool)
    for j in range(k):
        touched[fixed[:, j]] |= holders[out[fixed[:, j], j]]
    load = np.bincount(out[fixed], weights=np.broadcast_to(w[:, None], out.shape)[fixed],
                       minlength=R) @ lp.shares
    base = np.zeros(D) if floor is None else np.asarray(floor, dtype=float)
    # Hop distance from each flow's touched set to every node; no touched node = all equally far.
    dist = np.asarray(distance)
    far = int(dist.max()) + 1
    tf = touched.astype(np.float64)
    near = np.full((F, D), far, dtype=np.int64)
    for d in range(far - 1, -1, -1):
        near[(tf @ (dist <= d)) > 0] = d
    hold_near = np.where(holders[:, :, None], dist[None, :, :], far).min(axis=1)  # [R, D]

    rep = np.flatnonzero(ncopy > 1)
    ntok = np.bincount(experts.ravel(), weights=np.repeat(w, k), minlength=lp.num_experts)
    order = rep[np.argsort(-ntok[rep], kind="stable")]  # busiest expert first
    tokens = lp.token_fraction * ntok[lp.expert_of]  # quota of each copy
    if rule == "balanced":
        tokens = _balance(lp, order, tokens, base, load, bool(np.all(w == np.round(w))))
    for e in order:
        fi, ji = np.nonzero(experts == e)
        if fi.size == 0:
            continue
        cs = np.flatnonzero(lp.expert_of == e)
        m = len(cs)
        gap_all = np.stack([np.where(holders[c], near[fi], -1).max(axis=1) for c in cs], axis=1)  # [n, m]
        quota = tokens[cs]
        served = np.zeros(m)
        pending = np.ones(len(fi), dtype=bool)
        cap_e = rule != "nearest"
        while pending.any():
            room = quota - served > 0.5 * w[fi[pending]].min() if cap_e else np.ones(m, dtype=bool)
            if not room.any():  # rounding leftovers: every copy may take them
                room[:] = True
                cap_e = False
            before = int(pending.sum())
            idx = np.flatnonzero(pending)
            gap = np.where(room[None, :], gap_all[idx], np.iinfo(np.int64).max)
            allowed = gap == gap.min(axis=1, keepdims=True)
            for use, sel in _by_allowed_set(allowed, idx):
                if cap_e:
                    left = np.clip(quota[use] - served[use], 0.0, None)
                    want = min(float(w[fi[sel]].sum()), float(left.sum()))
                    if len(use) == 1:
                        amt = np.array([want])
                    else:
                        q = np.maximum(quota[use], 1e-300)
                        amt = np.minimum(water_fill(served[use] / q, want, 1.0 / q), left)
                    take = _take(w[fi[sel]], amt.sum())
                    if not take.any():
                        continue
                    sel = sel[take]
                else:
                    lv = _level(holders[cs[use]], np.maximum(load, base))
                    amt = water_fill(lv, float(w[fi[sel]].sum()), lp.shares[cs[use]].max(axis=1))
                pick = use[_cut(w[fi[sel]], amt)]
                out[fi[sel], ji[sel]] = cs[pick]
                served += np.bincount(pick, weights=w[fi[sel]], minlength=m)
                load += np.bincount(cs[pick], weights=w[fi[sel]], minlength=R) @ lp.shares
                near[fi[sel]] = np.minimum(near[fi[sel]], hold_near[cs[pick]])
                pending[sel] = False
            if int(pending.sum()) == before:  # no flow fits: the copy with the least room is full
                left = np.where(room, quota - served, np.inf)
                served[int(np.argmin(left))] = quota[int(np.argmin(left))]
    return out


def _balance(lp: LayerPlacement, order: np.ndarray, tokens: np.ndarray, floor: np.ndarray,
             load: np.ndarray, integral: bool, sweeps: int = 3) -> np.ndarray:
    """Token quotas of the copies of the replicated experts in ``order`` that level node loads.

    Starts from ``tokens`` (the plan's split); per sweep, each expert in turn takes its tokens back
    and water-fills them over its copies on the loads of everything else (a copy's level: the highest
    load among its holders). No step raises the highest level, so the result is never worse than the
    plan's split. ``load [D]``: tokens x shares of the single-copy experts; a node's level is at least
    ``floor [D]`` (tokens it computes within its weight-read time).
    """
    tok = tokens.copy()
    node = load + (tok * np.isin(lp.expert_of, order)) @ lp.shares
    holders = lp.shares > 0
    # per expert: its copies, their distinct share rows (copies on the same nodes fill as one)
    plan = []
    for e in order:
        cs = np.flatnonzero(lp.expert_of == e)
        S = lp.shares[cs]
        if np.all(S.max(axis=1) == 1.0):  # whole copies on single nodes: the node is the row
            _, first, grp = np.unique(S.argmax(axis=1), return_index=True, return_inverse=True)
            rows = S[first]
        else:
            rows, grp = np.unique(S, axis=0, return_inverse=True)
        grp = grp.ravel()
        plan.append((cs, S, rows > 0, rows.max(axis=1), np.bincount(grp), grp, holders[cs].any(axis=0)))
    for _ in range(sweeps):
        for cs, S, on, rate, size, grp, span in plan:
            node -= tok[cs] @ S
            lv = _level(on, np.maximum(node, floor))
            new = (water_fill(lv, float(tok[cs].sum()), rate) / size)[grp]
            if (np.maximum(node + new @ S, floor)[span].max()
                    <= np.maximum(node + tok[cs] @ S, floor)[span].max()):
                tok[cs] = new  # kept only if it lowers the expert's busiest node (overlapping shards)
            node += tok[cs] @ S
    if integral:  # whole tokens: round down, then hand the rest out one by one to the lowest copy
        for cs, S, *_ in plan:
            node -= tok[cs] @ S
            total = round(float(tok[cs].sum()))
            t = np.floor(tok[cs] + 1e-9)
            for _ in range(int(total - t.sum())):
                after = np.maximum(node + t @ S + S, floor)  # [m, D]: with one more token on each copy
                t[int(np.argmin(_level(S > 0, after)))] += 1
            tok[cs] = t
            node += t @ S
    return tok


def _level(on: np.ndarray, node: np.ndarray) -> np.ndarray:
    """Per copy (row of ``on [m, D]``), the highest of ``node`` (``[D]`` or ``[m, D]``) over its holders."""
    return np.where(on, node, -np.inf).max(axis=1)


def _by_allowed_set(allowed: np.ndarray, idx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of ``allowed [n, m]`` grouped by pattern, fewest allowed copies first (then by pattern):
    ``(allowed copy positions, idx of the rows)`` per group."""
    m = allowed.shape[1]
    if m <= 62:
        key = allowed.astype(np.int64) @ (np.int64(1) << np.arange(m, dtype=np.int64))
        uk, grp = np.unique(key, return_inverse=True)
        pats = ((uk[:, None] >> np.arange(m)) & 1).astype(bool)
    else:
        pats, grp = np.unique(allowed, axis=0, return_inverse=True)
    grp = grp.ravel()
    return [(np.flatnonzero(pats[g]), idx[grp == g])
            for g in np.lexsort((np.arange(len(pats)), pats.sum(axis=1)))]


def _take(weight: np.ndarray, capacity: float) -> np.ndarray:
    """Flows (in order) whose cumulative-weight midpoint fits within ``capacity``."""
    return np.cumsum(weight) - weight / 2 <= capacity + 1e-9
