"""Which copy of a replicated expert serves each token (the dispatch rule).

Two rules, chosen by ``EvalOptions.dispatch`` (written out in ``formulations/evaluator.md``):

- ``fraction``: each expert's flows are cut by the copies' token fractions (the plan's static split);
- ``nearest``: the runtime rule of the online stage. A token goes to the copy nearest to the nodes it
  already touches (distance 0: every holder of the copy is already on the token's dispatch tree, so
  the copy costs no extra traffic); ties go to the least-loaded copy. The token's home does not
  enter: with spread homes it has none, and the tree is what the extra message would branch from.

Both return ``[F, k]`` copy ids, one per (flow, expert) pair, and are deterministic.
"""

from __future__ import annotations

import numpy as np

from .placement import LayerPlacement

DISPATCH = ("fraction", "affinity", "nearest")


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


def _fill(level: np.ndarray, rate: np.ndarray, amount: float) -> np.ndarray:
    """Water-fill ``amount`` tokens over copies: copy j at ``level[j]`` rises by ``rate[j]`` per token;
    returns tokens per copy so that the filled copies end level and the others stay above."""
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
                       capped: bool = True) -> np.ndarray:
    """Copy serving each (flow, expert) pair under the ``affinity`` (``capped``) or ``nearest`` rule,
    ``[F, k]``.

    Experts with one copy are assigned first; they define each token's touched nodes and the node
    loads (tokens x shares). Replicated experts follow in id order. A token's distance to a copy is the
    largest, over the copy's holders, of the hop distance from the nearest touched node (0: the copy
    adds no traffic); the token may use the copies at its minimal distance. Tokens with the same
    allowed set form a group; groups are served most constrained first, each water-filled over its
    allowed copies, then cut by cumulative weight in flow order.

    ``nearest`` (uncapped): a copy's load is the highest node load among its holders.
    ``affinity`` (capped): copy r may serve at most its quota ``q_r`` of the expert's tokens and its
    load is the filled part of that quota; tokens that do not fit wait for the next pass, where full
    copies are out of reach, so each copy serves its quota (as under ``fraction``) and the rule only
    decides *which* tokens it serves. ``distance [D, D]``: hop counts.
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
    # Hop distance from each flow's touched set to every node; no touched node = all equally far.
    dist = np.asarray(distance)
    far = int(dist.max()) + 1
    tf = touched.astype(np.float64)
    near = np.full((F, D), far, dtype=np.int64)
    for d in range(far - 1, -1, -1):
        near[(tf @ (dist <= d)) > 0] = d
    hold_near = np.where(holders[:, :, None], dist[None, :, :], far).min(axis=1)  # [R, D]

    for e in np.flatnonzero(ncopy > 1):
        fi, ji = np.nonzero(experts == e)
        if fi.size == 0:
            continue
        cs = np.flatnonzero(lp.expert_of == e)
        m = len(cs)
        gap_all = np.stack([np.where(holders[c], near[fi], -1).max(axis=1) for c in cs], axis=1)  # [n, m]
        quota = lp.token_fraction[cs] * w[fi].sum()
        served = np.zeros(m)
        pending = np.ones(len(fi), dtype=bool)
        cap_e = capped
        while pending.any():
            room = quota - served > 0.5 * w[fi[pending]].min() if cap_e else np.ones(m, dtype=bool)
            if not room.any():  # rounding leftovers: every copy may take them
                room[:] = True
                cap_e = False
            before = int(pending.sum())
            idx = np.flatnonzero(pending)
            gap = np.where(room[None, :], gap_all[idx], np.iinfo(np.int64).max)
            allowed = gap == gap.min(axis=1, keepdims=True)
            pats, grp = np.unique(allowed, axis=0, return_inverse=True)
            grp = grp.ravel()
            for g in np.lexsort((np.arange(len(pats)), pats.sum(axis=1))):
                sel = idx[grp == g]
                use = np.flatnonzero(pats[g])
                if cap_e:
                    left = np.clip(quota[use] - served[use], 0.0, None)
                    amt = _fill(served[use] / np.maximum(quota[use], 1e-300), 1.0 / np.maximum(quota[use], 1e-300),
                                min(float(w[fi[sel]].sum()), float(left.sum())))
                    amt = np.minimum(amt, left)
                    take = _take(w[fi[sel]], amt.sum())
                    if not take.any():
                        continue
                    sel = sel[take]
                    pick = use[_cut(w[fi[sel]], amt)]
                else:
                    lv = np.where(holders[cs[use]], load[None, :], -np.inf).max(axis=1)
                    pick = use[_cut(w[fi[sel]], _fill(lv, lp.shares[cs[use]].max(axis=1), float(w[fi[sel]].sum())))]
                out[fi[sel], ji[sel]] = cs[pick]
                served += np.bincount(pick, weights=w[fi[sel]], minlength=m)
                load += np.bincount(cs[pick], weights=w[fi[sel]], minlength=R) @ lp.shares
                near[fi[sel]] = np.minimum(near[fi[sel]], hold_near[cs[pick]])
                pending[sel] = False
            if int(pending.sum()) == before:  # no flow fits: the copy with the least room is full
                left = np.where(room, quota - served, np.inf)
                served[int(np.argmin(left))] = quota[int(np.argmin(left))]
    return out


def _take(weight: np.ndarray, capacity: float) -> np.ndarray:
    """Flows (in order) whose cumulative-weight midpoint fits within ``capacity``."""
    return np.cumsum(weight) - weight / 2 <= capacity + 1e-9
