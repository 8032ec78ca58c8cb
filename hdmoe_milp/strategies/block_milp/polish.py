"""Evaluator-driven local search (swap and move) on one layer's block assignment.

The block MILP and LNS's step models charge untracked co-activation groups one message per expert,
while the evaluator merges a token's messages into one message to the union of its experts' nodes.
Where communication weighs (the 10/25 hardware point), plans that are locally optimal for the model
are often not for the evaluator. This search works on the evaluator's number directly:

- :class:`IncrementalScore` keeps the evaluator's layer time (mesh mode, spread homes,
  ``coalesce="node"``, the expected workload of the co-activation sets) of an assignment and
  re-scores a move of one or two experts in time proportional to the groups they belong to,
  instead of re-evaluating the whole layer. Its numbers equal :class:`~.solve.LayerScorer`'s
  (tested to 1e-9 relative on random assignments and moves, tree and unicast delivery).
- :func:`polish`: moves of one expert to its best column and first-improvement swaps of two
  experts' columns, in orders drawn with a seeded RNG, until neither improves (or a swap pass
  runs out of patience), a sweep limit, an evaluation budget or the deadline. Every accepted step
  lowers the score, so the result is never worse than the start; the caller re-scores it with the
  evaluator itself.

Why it is exact. With homes spread over every node and XY routing, one message of unit weight to
a node set ``U`` loads link ``l`` by ``w_l`` times an indicator: for a multicast tree, whether
``U`` meets the region beyond ``l`` (so the load of a union is the largest of its members' loads);
for unicast, once per node of ``U`` beyond ``l`` (so it is the sum over the union's distinct nodes).
Both are tracked by counting, per group, how many of its experts' columns hit each link (tree) or
node (unicast); the per-column and per-node loads come from :func:`hdmoe_milp.costs.link_loads`.
Compute is the same roofline per node as the evaluator's (:func:`hdmoe_milp.costs.roofline_s`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...costs import UnitCosts, activation_probability, link_loads, phase_time_s, roofline_s
from .formulation import BlockModel

TOL = 1e-12
# a swap pass ends after this many swaps in a row without improvement: a 64-expert layer has 2,016
# pairs, so its passes are whole; DeepSeek-V3's 256 experts have 32,640 (16-30 s per pass), where
# the pass rarely finds anything after a long run of failures
SWAP_PATIENCE = 2000
# in a layer solve, another swap pass follows an improving one only if that one gained at least this
# share of the score: the full search made whole 10 s solves of 64-expert models at 10/25 take 126-130 s
# (the target is 120); with this cut they took 92-111 s and kept most of its gain (formulations/)
PASS_GAIN = 3e-3


class IncrementalScore:
    """The evaluator's layer time (seconds) of a block assignment, updated move by move.

    ``ids [G, k]``: the co-activation sets' experts, ``tokens [G]``: their expected tokens per batch
    (frequency × batch), as in :class:`~.solve.LayerScorer`'s workload. ``assign [E]``: the start.
    """

    def __init__(self, bm: BlockModel, ids: np.ndarray, tokens: np.ndarray, assign: np.ndarray) -> None:
        hw, mesh = bm.hw, bm.hw.mesh
        E, D = bm.model.num_experts, hw.num_nodes
        self.bm = bm
        share = bm.blocks.share  # [nb, D]
        holders = share > 0
        tree = bm.opts.delivery == "tree"
        unit = UnitCosts.of(bm.model, "mesh")
        ids = np.asarray(ids, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=float)
        nl = mesh.num_links
        # per column (tree) or per node (unicast): the loads of one unit message from spread homes
        if tree:
            if bm.blocks.tree and np.array_equal(bm.blocks.members > 0, holders):  # the family's own loads
                loads = np.hstack([bm.blocks.disp, bm.blocks.comb])  # [nb, 2L]
            else:
                loads = np.array([np.concatenate(link_loads(mesh, h[None, :], np.ones(1), None, True)[:2])
                                  for h in holders])
            full = np.concatenate(link_loads(mesh, np.ones((1, D), dtype=bool), np.ones(1), None, True)[:2])
            feats = loads > 0
            if not np.allclose(loads, feats * full[None, :], rtol=1e-12, atol=0.0):
                raise ValueError("tree link loads are not of the indicator form this search relies on")
            self.link_w: np.ndarray | None = full  # [F = 2L]: a feature is a link
            self.node_load = None
        else:
            eye = np.eye(D, dtype=bool)
            self.link_w = None
            self.node_load = np.array([np.concatenate(link_loads(mesh, eye[n][None, :], np.ones(1), None, False)[:2])
                                       for n in range(D)])  # [F = D, 2L]: a feature is a node
            feats = holders
        self.feats = feats.astype(np.int16)  # [nb, F]
        self.nl = nl
        self.bw2 = np.concatenate([hw.link_bw, hw.link_bw])
        self.hop_lat = hw.hop_latency_s
        self.ecc = mesh.distance.max(axis=0)  # [D]
        self.ids, self.w = ids, tokens * unit.vector_bytes  # bytes per group message
        # compute: tokens per expert and their activation probability (one copy per expert)
        n_tok = np.bincount(ids.ravel(), weights=np.repeat(tokens, ids.shape[1]), minlength=E)
        self.flops_e = unit.flops_per_token * n_tok  # [E]
        self.read_e = unit.weight_bytes * activation_probability(n_tok, bm.B)  # [E]
        self.active = np.bincount(ids.ravel(), minlength=E) > 0  # experts some message reaches
        self.share, self.holders = share, holders
        self.mem_bytes, self.cap = bm.mem_bytes, bm.cap_limit  # bytes a node may hold, rounding forgiven
        # groups of each expert
        order = np.argsort(ids.ravel(), kind="stable")
        grp = order // ids.shape[1]
        bounds = np.searchsorted(ids.ravel()[order], np.arange(E + 1))
        self.groups_of = [grp[bounds[i]:bounds[i + 1]] for i in range(E)]
        self.reset(assign)

    def reset(self, assign: np.ndarray) -> None:
        """Start over from ``assign [E]``."""
        a = np.asarray(assign, dtype=np.int64).copy()
        self.assign = a
        self.K = self.feats[a][self.ids].sum(axis=1, dtype=np.int16)  # [G, F] members hitting each feature
        self.hitw = self.w @ (self.K > 0)  # [F] bytes of messages hitting each feature
        self.flops = self.flops_e @ self.share[a]  # [D]
        self.read = self.read_e @ self.share[a]
        self.mem = self.mem_bytes[a].sum(axis=0)
        self.used = self.holders[a[self.active]].sum(axis=0)  # [D] active experts holding each node
        self.value = self._total(self.hitw, self.flops, self.read, self.used)

    def _times(self, hitw: np.ndarray, flops: np.ndarray, read: np.ndarray, used: np.ndarray) -> np.ndarray:
        """Layer times ``[...]`` from the message bytes hitting each feature ``hitw [..., F]`` and the
        per-node FLOPs, bytes read and active holders (``[..., D]``), over any leading axes."""
        comp = roofline_s(flops, read, self.bm.hw).max(axis=-1)
        link = hitw * self.link_w if self.link_w is not None else hitw @ self.node_load  # [..., 2L] bytes
        hops = np.where(used > 0, self.ecc, 0).max(axis=-1)
        disp = phase_time_s(link[..., :self.nl], self.bw2[:self.nl], self.hop_lat, hops)
        comb = phase_time_s(link[..., self.nl:], self.bw2[self.nl:], self.hop_lat, hops)
        return comp + disp + comb

    def _total(self, hitw: np.ndarray, flops: np.ndarray, read: np.ndarray, used: np.ndarray) -> float:
        return float(self._times(hitw, flops, read, used))

    def _change(self, moves: list[tuple[int, int]]):
        """Everything a set of moves (expert, new column) changes, without applying it: the groups
        ``g`` and features ``f`` whose counts change, their new counts, and the new totals."""
        gs = [self.groups_of[i] for i, _ in moves]
        deltas = [self.feats[b] - self.feats[self.assign[i]] for i, b in moves]
        f = np.flatnonzero(np.any(deltas, axis=0)) if len(deltas) > 1 else np.flatnonzero(deltas[0])
        g = np.unique(np.concatenate(gs)) if len(gs) > 1 else gs[0]
        K_old = self.K[np.ix_(g, f)]
        K_new = K_old.copy()
        flops, read, mem, used = self.flops.copy(), self.read.copy(), self.mem.copy(), self.used.copy()
        for (i, b), gi, d in zip(moves, gs, deltas, strict=True):
            old = self.assign[i]
            rows = np.searchsorted(g, gi) if len(gs) > 1 else slice(None)
            K_new[rows] += d[f]
            ds = self.share[b] - self.share[old]
            flops += self.flops_e[i] * ds
            read += self.read_e[i] * ds
            mem += self.mem_bytes[b] - self.mem_bytes[old]
            if self.active[i]:
                used += self.holders[b].astype(np.int64) - self.holders[old]
        hitw = self.hitw.copy()
        hitw[f] += self.w[g] @ ((K_new > 0).astype(np.int8) - (K_old > 0))
        return (g, f, K_new), hitw, flops, read, mem, used

    def fits_mem(self, mem: np.ndarray) -> bool:
        return self.cap is None or float(mem.max()) <= self.cap

    def try_moves(self, moves: list[tuple[int, int]]) -> float:
        """The layer time after ``moves`` ((expert, column) pairs, distinct experts); inf if they
        break the layer's capacity share."""
        _, hitw, flops, read, mem, used = self._change(moves)
        if not self.fits_mem(mem):
            return np.inf
        return self._total(hitw, flops, read, used)

    def move_values(self, i: int, allowed: np.ndarray) -> np.ndarray:
        """The layer time after moving expert ``i`` to each column (``[nb]``; inf where ``allowed
        [nb]`` is False or the move breaks the capacity share; the current column gives the
        current value). One vectorised step for all columns: the features are 0/1, so a group
        without ``i`` that misses feature f hits it again exactly when the new column does."""
        old = self.assign[i]
        gi = self.groups_of[i]
        cols = np.flatnonzero(allowed)
        out = np.full(len(allowed), np.inf)
        if len(cols) == 0:
            return out
        K_wo = self.K[gi] - self.feats[old]  # [Gi, F] counts without i
        w = self.w[gi]
        base = self.hitw - w @ (self.K[gi] > 0) + w @ (K_wo > 0)  # [F] without i's messages
        miss = w @ (K_wo == 0)  # [F] weight of i's groups that would hit f only through i
        hitw = base[None, :] + self.feats[cols] * miss[None, :]  # [nc, F]
        ds = self.share[cols] - self.share[old][None, :]  # [nc, D]
        used = self.used[None, :] - (self.holders[old] if self.active[i] else 0)
        used = used + (self.holders[cols] if self.active[i] else 0)
        val = self._times(hitw, self.flops[None, :] + self.flops_e[i] * ds, self.read[None, :] + self.read_e[i] * ds,
                          used)
        if self.cap is not None:
            mem = self.mem[None, :] - self.mem_bytes[old][None, :] + self.mem_bytes[cols]
            val[mem.max(axis=1) > self.cap] = np.inf
        out[cols] = val
        return out

    def apply(self, moves: list[tuple[int, int]]) -> float:
        """Apply ``moves`` and return the new layer time."""
        (g, f, K_new), hitw, flops, read, mem, used = self._change(moves)
        self.K[np.ix_(g, f)] = K_new
        self.hitw, self.flops, self.read, self.mem, self.used = hitw, flops, read, mem, used
        for i, b in moves:
            self.assign[i] = b
        self.value = self._total(hitw, flops, read, used)
        return self.value


@dataclass(frozen=True)
class PolishResult:
    """What :func:`polish` did: the final ``assign [E]`` and its layer time ``score_s`` under the
    incremental score, the start's, the number of evaluations and accepted moves, sweeps, and why it
    stopped (``local-optimum``, ``swap-patience``, ``pass-gain``, ``sweeps``, ``evaluations``, ``deadline``)."""

    assign: np.ndarray
    score_s: float
    start_s: float
    evaluations: int
    accepted: int
    sweeps: int
    stop: str


def polish(inc: IncrementalScore, family: np.ndarray, *, seed: int = 0, deadline: float | None = None,
           max_sweeps: int = 50, max_evals: int | None = None, swap_patience: int | None = SWAP_PATIENCE,
           min_pass_gain: float = 0.0) -> PolishResult:
    """Local search from ``inc``'s current assignment: moves of one expert to another column that
    ``family [E, nb]`` allows, and swaps of two experts' columns (both allowed).

    A sweep visits the experts in an order drawn from ``seed`` and moves each to its best column if
    that improves the score (all columns of one expert are scored at once), then tries every swap
    once in a drawn order (first improvement). It stops at a sweep with no improvement (a local
    optimum), after ``max_sweeps``, after ``max_evals`` evaluations (scoring every column of one
    expert counts as one, as does one swap: they cost about the same, 0.3-0.5 ms on a 4x8 layer),
    or at ``deadline`` (``time.perf_counter()`` seconds). A swap pass also ends after
    ``swap_patience`` swaps in a row without improvement (None: never), and the search then ends
    as at a local optimum (``stop`` says ``swap-patience``). With ``min_pass_gain > 0`` the search
    also ends after a swap pass that improved the score by less than that share (``pass-gain``);
    with 0 it goes on until a whole pass finds nothing. Without a deadline the result depends on
    the seed and the inputs only.
    """
    rng = np.random.default_rng(seed)
    fam = np.asarray(family, dtype=bool)
    E = len(inc.assign)
    start = inc.value
    pairs = np.array([(i, j) for i in range(E) for j in range(i + 1, E)], dtype=np.int64).reshape(-1, 2)
    n_eval = n_acc = sweeps = 0

    def stop_reason() -> str:
        return "evaluations" if max_evals is not None and n_eval >= max_evals else "deadline"

    def result(stop: str) -> PolishResult:
        return PolishResult(inc.assign.copy(), inc.value, start, n_eval, n_acc, sweeps, stop)

    def late() -> bool:
        if max_evals is not None and n_eval >= max_evals:
            return True
        return deadline is not None and time.perf_counter() >= deadline

    while sweeps < max_sweeps:
        sweeps += 1
        moved = False
        for i in rng.permutation(E):
            if late():
                return result(stop_reason())
            vals = inc.move_values(int(i), fam[i])
            n_eval += 1
            b = int(np.argmin(vals))
            if vals[b] < inc.value * (1 - TOL) and b != inc.assign[i]:
                inc.apply([(int(i), b)])
                n_acc += 1
                moved = True
        if moved:  # moves are cheap: repeat them until none improves, then try swaps
            continue
        # a swap pass; after one that improved, the swaps it tried before its last improvement may
        # improve now, so the search goes on (moves, then another pass) until a pass finds nothing
        swapped = False
        stale = 0
        pass_start = inc.value
        for t in rng.permutation(len(pairs)):
            if swap_patience is not None and stale >= swap_patience:
                break
            p, q = (int(v) for v in pairs[t])
            a = inc.assign
            if a[p] == a[q] or not (fam[p, a[q]] and fam[q, a[p]]):
                continue
            if late():
                return result(stop_reason())
            n_eval += 1
            moves = [(p, int(a[q])), (q, int(a[p]))]
            if inc.try_moves(moves) < inc.value * (1 - TOL):
                inc.apply(moves)
                n_acc += 1
                swapped = True
                stale = 0
            else:
                stale += 1
        cut = swap_patience is not None and stale >= swap_patience
        if not swapped:
            return result("swap-patience" if cut else "local-optimum")
        if min_pass_gain > 0 and inc.value > pass_start * (1 - min_pass_gain):
            return result("pass-gain")
    return result("sweeps")

