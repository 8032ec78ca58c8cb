"""Node-order search: swap the whole contents of two nodes when that lowers the layer's traffic.

A layout's node contents (the experts, or shares of experts, each node holds) fix every node's
compute and memory; where those contents sit on the mesh fixes only the traffic. On nodes that are
all alike, swapping the contents of two nodes therefore leaves the compute term as it is and moves
the messages. No move of the polish does this: it moves one expert at a time, and a node holds
several (DeepSeek-V3 on 8x8: 4 experts and shares of split ones).

The search scores the evaluator's traffic rule directly. With tree delivery from spread homes a
token's message loads link ``l`` by ``w_l`` exactly when the nodes it reaches meet the link's region
``R_l`` (the nodes whose one-node message crosses ``l``), so with ``C[g, l] = |U_g ∩ R_l|`` for
each co-activation set ``g`` reaching node set ``U_g``, link ``l`` carries
``w_l * sum_g t_g [C[g, l] > 0]``. A swap of nodes ``a`` and ``b`` changes ``C`` only for the sets
that reach one of them, and a phase's busiest link can only get lighter if every one of its busiest
links does: the search first finds, for every pair at once, what the swap does to those links
(two sparse ``[D, G] @ [G, D]`` products per link), then checks the promising swaps exactly. The
search starts from the layout's own order and from a few random orders: on DeepSeek-V2-Lite 4x8
2.5/75 the best of 20 random starts carried 6-16 % less traffic than the search from hdmoe's order.
Measured in ``formulations/offline_milp.md`` ("Family", "Reordered layouts").
"""

from __future__ import annotations

import time

import numpy as np
from scipy.sparse import csr_matrix

from ...costs import UnitCosts, link_loads
from ...hardware import Hardware
from ...moe import MoEModel
from ...placement import LayerPlacement

MAX_CHECKS = 64  # exact checks of promising swaps per step; none better: the order is a local optimum
REL_TOL = 1e-12  # a swap must lower the traffic by more than this share of it
RESTART_NODES = 256  # random restarts of reorder_nodes: this many over the mesh's nodes (4x8: 8) ...
MAX_RESTARTS = 8  # ... and at most this many (on small meshes a local optimum is found from most starts)
RESTART_SWAPS = 4  # swaps per node, at most, from a random order (a local optimum took 1-3 per node on 4x8)


class NodeOrder:
    """The traffic (seconds: busiest dispatch link plus busiest combine link, no hop terms) of a
    layout's node contents under node permutations.

    ``holders [E, D]``: 1 where the node holds a share of the expert (one copy per expert);
    ``ids [G, k]``, ``tokens [G]``: the co-activation sets and their tokens per batch.
    """

    def __init__(self, model: MoEModel, hw: Hardware, holders: np.ndarray, ids: np.ndarray, tokens: np.ndarray) -> None:
        mesh = hw.mesh
        D, nl = hw.num_nodes, mesh.num_links
        eye = np.eye(D, dtype=bool)
        single = np.array([np.concatenate(link_loads(mesh, eye[n][None, :], np.ones(1), None, True)[:2])
                           for n in range(D)])  # [D, 2L]
        full = np.concatenate(link_loads(mesh, np.ones((1, D), dtype=bool), np.ones(1), None, True)[:2])
        region = single > 0
        if not np.allclose(single, region * full[None, :], rtol=1e-12, atol=0.0):
            raise ValueError("tree link loads are not of the indicator form this search relies on")
        scale = full * UnitCosts.of(model, "mesh").vector_bytes / np.concatenate([hw.link_bw, hw.link_bw])
        # links with the same region and scale carry the same load (the X links at one column
        # boundary, one per row): one feature each; the dispatch links' come first
        keep = [lo + np.unique(np.vstack([region[:, lo:lo + nl], scale[None, lo:lo + nl]]), axis=1,
                               return_index=True)[1] for lo in (0, nl)]
        cols = np.concatenate(keep)
        self.nl = len(keep[0])  # dispatch features
        self.region = region[:, cols]  # [D, F]
        self.region_i = self.region.astype(np.int32)
        self.scale = scale[cols]  # [F] seconds per token
        self.t = np.asarray(tokens, dtype=float)  # [G]
        ids = np.asarray(ids, dtype=np.int64)
        h = np.asarray(holders, dtype=bool)
        reach = np.zeros((len(ids), D), dtype=bool)
        for j in range(ids.shape[1]):
            reach |= h[ids[:, j]]
        self._reach0 = reach  # [G, D]: the nodes each set reaches in the layout's own order
        self.restart(np.arange(D))

    def restart(self, order: np.ndarray) -> None:
        """Start over from the layout's contents in ``order`` (position q holds what node
        ``order[q]`` holds in the layout); :attr:`perm` counts from there. The regions stay."""
        self.reach = self._reach0[:, np.asarray(order)]  # [G, D]: the nodes each set reaches, in the current order
        self.count = self.reach.astype(np.int32) @ self.region_i  # [G, F] (integer: no BLAS)
        self.load = self.scale * (self.t[:, None] * (self.count > 0)).sum(axis=0)  # [F] seconds
        self.perm = np.arange(len(order))  # position q holds the contents that position perm[q] held at the start

    def traffic(self, load: np.ndarray | None = None) -> float:
        ld = self.load if load is None else load
        return float(ld[:self.nl].max() + ld[self.nl:].max())

    def _delta(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The load change ``[F]`` of swapping nodes a and b, with what :meth:`improve` needs to make
        it: the links it can change (those whose region holds one of the two) and the sets' new counts."""
        only_a = np.flatnonzero(self.reach[:, a] & ~self.reach[:, b])
        only_b = np.flatnonzero(self.reach[:, b] & ~self.reach[:, a])
        step = self.region_i[b] - self.region_i[a]
        cols = np.flatnonzero(step)
        step = step[cols]
        old_a, old_b = self.count[np.ix_(only_a, cols)], self.count[np.ix_(only_b, cols)]
        ca, cb = old_a + step, old_b - step
        d = np.zeros(len(self.load))
        d[cols] = ((self.t[only_a, None] * ((ca > 0).astype(float) - (old_a > 0))).sum(axis=0)
                   + (self.t[only_b, None] * ((cb > 0).astype(float) - (old_b > 0))).sum(axis=0)) * self.scale[cols]
        return d, only_a, only_b, cols, ca, cb

    def _promising(self) -> np.ndarray:
        """Pairs ``[n, 2]`` (a < b) whose swap lightens all the busiest links of a phase, the most
        promising first (the largest predicted drop of that phase's busiest load)."""
        D = len(self.perm)
        best = np.full((D, D), np.inf)  # predicted change of a phase's busiest load (s), the lower the better
        notr = (~self.reach).astype(float)
        for lo, hi in ((0, self.nl), (self.nl, len(self.load))):  # the phases' features (counts may differ)
            seg = self.load[lo:hi]
            peak = seg.max()
            top = lo + np.flatnonzero(seg >= peak * (1 - REL_TOL))
            ok = np.ones((D, D), dtype=bool)
            new_max = np.full((D, D), -np.inf)
            for f in top:
                r = self.region[:, f]
                c = self.count[:, f]
                # sparse products: OpenBLAS's threads made these dense ones 100x slower on a busy machine
                g1 = np.flatnonzero(c == 1)  # sets with one node in the region: they leave it if it leaves
                one = np.argmax(self.reach[g1] & r[None, :], axis=1)
                m1 = csr_matrix((self.t[g1], (one, np.arange(len(g1)))), shape=(D, len(g1))) @ notr[g1]  # [a, b]
                g0 = np.flatnonzero(c == 0)  # sets outside the region: they enter it if one of their nodes does
                m2 = csr_matrix(self.reach[g0] * self.t[g0, None]).T @ notr[g0]  # [b, a]
                d = (m2.T - m1) * self.scale[f]  # [a, b], meaningful for a in R, b not in R
                cross = r[:, None] & ~r[None, :]
                d = np.where(cross, d, 0.0)
                d = d + d.T  # a swap is one move whichever side each node is on
                ok &= d < 0
                new_max = np.maximum(new_max, self.load[f] + d)
            best = np.where(ok, np.minimum(best, new_max - peak), best)
        a, b = np.nonzero(np.triu(np.isfinite(best), 1))
        order = np.lexsort((b, a, best[a, b]))
        return np.stack([a[order], b[order]], axis=1)

    def improve(self, *, deadline: float | None = None, max_swaps: int | None = None) -> int:
        """Swap node contents while a swap lowers the traffic (first improving swap among the most
        promising :data:`MAX_CHECKS`), until none does, ``max_swaps`` swaps are made or the
        ``deadline`` (``time.perf_counter()``) passes. Returns the number of swaps made."""
        made = 0
        while max_swaps is None or made < max_swaps:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            cur = self.traffic()
            for a, b in self._promising()[:MAX_CHECKS]:
                d, only_a, only_b, cols, ca, cb = self._delta(int(a), int(b))
                if self.traffic(self.load + d) < cur * (1 - REL_TOL):
                    self.count[np.ix_(only_a, cols)], self.count[np.ix_(only_b, cols)] = ca, cb
                    self.reach[:, [a, b]] = self.reach[:, [b, a]]
                    self.load = self.load + d
                    self.perm[[a, b]] = self.perm[[b, a]]
                    made += 1
                    break
            else:
                break
        return made


def reorder_nodes(lp: LayerPlacement, model: MoEModel, hw: Hardware, ids: np.ndarray, tokens: np.ndarray, *,
                  deadline: float | None = None, restarts: int | None = None, seed: int = 0,
                  steps: int | None = None) -> LayerPlacement | None:
    """``lp`` with its nodes' contents permuted, or None when no order found lowers its traffic (or
    ``lp`` is replicated). :meth:`NodeOrder.improve` from ``lp``'s own order (at most D swaps), then
    from ``restarts`` random orders (default :func:`restarts_for`; at most 4·D swaps each; seeded by
    ``seed``), until ``deadline`` (``time.perf_counter()``) or until ``steps`` search steps (a swap
    made, or a search's last look) are spent: a work budget, the same on every machine. The best
    order wins. Same node contents, so the same compute term and memory per node; the caller scores
    the result with the evaluator before keeping it."""
    D = hw.num_nodes
    if lp.is_replicated or D < 2 or len(ids) == 0 or not np.array_equal(lp.expert_of, np.arange(lp.num_experts)):
        return None  # (rows out of expert order: the co-activation sets' ids would name the wrong rows)
    left = np.inf if steps is None else int(steps)
    if left < 1:
        return None
    shares = np.asarray(lp.shares)
    order = NodeOrder(model, hw, shares > 0, ids, tokens)
    start = order.traffic()
    cap = int(min(D, left))
    made = order.improve(deadline=deadline, max_swaps=cap)
    left -= made + (made < cap)  # the swaps, and the look that found none (if the cap did not stop it)
    best, best_perm = order.traffic(), order.perm.copy()
    rng = np.random.default_rng(seed)
    for _ in range(restarts_for(D) if restarts is None else int(restarts)):
        if deadline is not None and time.perf_counter() >= deadline or left < 1:
            break
        perm = rng.permutation(D)
        order.restart(perm)  # the regions are the mesh's: only the sets' reach is redone
        cap = int(min(RESTART_SWAPS * D, left))
        made = order.improve(deadline=deadline, max_swaps=cap)
        left -= made + (made < cap)
        if order.traffic() < best * (1 - REL_TOL):
            best, best_perm = order.traffic(), perm[order.perm]
    if best >= start * (1 - REL_TOL):
        return None
    return LayerPlacement.from_shares(shares[:, best_perm])


def restarts_for(num_nodes: int) -> int:
    """Random restarts of :func:`reorder_nodes` on a mesh of ``num_nodes`` nodes: more on small
    meshes, where each costs less (4x8: 8, about 0.05 s each; 8x8: 4, 1-2 s each; never more than 8)."""
    return max(1, min(MAX_RESTARTS, RESTART_NODES // max(num_nodes, 1)))
