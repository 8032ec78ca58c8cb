"""Best-first branch and bound over the family on small layers, on the evaluator's own score.

The certificate's LP and its MILP (``BlockModel.to_linear_lower``) under-estimate the union of a
token's messages (see ``formulations/offline_milp.md``). On a layer with few experts (Mixtral's 8)
the family can instead be searched directly, with bounds that are the evaluator's score of a
*partial* plan:

- Experts are placed one at a time, hottest first (the expert that symmetry breaking restricts).
- Every term of the evaluator's layer time only grows when an expert is added: a node's FLOPs and
  weight reads, its capacity use, the messages of a co-activation set (tree: the union of its
  placed experts' columns meets more regions; unicast: more nodes), and the longest route. So the
  score of the placed experts alone is a lower bound on every completion.
- The compute term is at least the mean node's roofline (the area bound): every expert's FLOPs and
  weight reads land on some node, so the busiest node's FLOPs (reads) are at least the mean. The
  water level of the experts still to place over the least-loaded nodes (versions 0.7.0-0.7.2) is
  never more than that mean.
- Look-ahead: each expert still to place must take one of its columns, so a node's bound is also
  the largest, over those experts, of the smallest bound over that expert's columns.

Nodes are expanded in order of their bound, so the smallest open bound is always a lower bound on
the family's optimum, wherever the search stops (deadline or node budget). A completed plan is
scored exactly; it becomes the incumbent when it is better.

:class:`~.polish.IncrementalScore` supplies the evaluator's arrays (its numbers equal
:class:`~.solve.LayerScorer`'s), so the bound is about the same score the layer reports.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np

from ...costs import phase_time_s, roofline_of
from .polish import IncrementalScore

# layers with at most this many experts are searched (Mixtral: 8; a 64-expert layer's tree is far
# too wide for the look-ahead bound to close in seconds)
MAX_EXPERTS = 16
# open nodes at most (0.2-0.7 kB each): the search stops there, its bound still valid
MAX_OPEN = 1_000_000


@dataclass(frozen=True)
class BnbResult:
    """What :func:`branch_and_bound` found. ``assign [E]``: the best plan (the incumbent given when
    the search found none better), ``score_s`` its score, ``bound_s`` a lower bound (s) on the best
    score over the columns searched (at most ``score_s``), ``nodes`` expanded, ``stop``:
    ``proven`` (the gap target is met), ``deadline``, ``nodes`` (node budget) or ``memory``
    (:data:`MAX_OPEN` open nodes); ``improved``: whether it found a plan better than the incumbent."""

    assign: np.ndarray
    score_s: float
    bound_s: float
    nodes: int
    stop: str
    improved: bool


class _Search:
    def __init__(self, inc: IncrementalScore, allowed: np.ndarray, order: np.ndarray) -> None:
        self.inc = inc
        self.order = [int(i) for i in order]
        self.cols = [np.flatnonzero(allowed[i]) for i in range(len(self.order))]
        hw = inc.bm.hw
        self.compute, self.dram = hw.compute_flops, hw.dram_bw_bytes_per_s
        self._rows: dict[int, tuple] = {}
        self.order_arr = np.asarray(self.order, dtype=np.int64)
        self.member = np.zeros((len(self.order), len(inc.ids)))  # [E, G]: expert i is in group g
        self.member[inc.ids, np.arange(len(inc.ids))[:, None]] = 1.0
        self.feats_pad = np.vstack([inc.feats, np.zeros((1, inc.feats.shape[1]), dtype=inc.feats.dtype)])
        # seconds per byte of a feature: a link's weight over its bandwidth (tree), or a node's routes' loads
        # over the links' bandwidths (unicast)
        self.link_s = inc.link_w / inc.bw2 if inc.link_w is not None else None
        self.node_load_s = inc.node_load / inc.bw2[None, :] if inc.link_w is None else None
        # the mean node's roofline: every expert's FLOPs and weight reads land somewhere
        D = inc.share.shape[1]
        self.area_s = float(roofline_of(inc.flops_e.sum() / (D * self.compute), inc.read_e.sum() / (D * self.dram)))

    def state(self, prefix: tuple[int, ...]):
        """Counts and per-node loads of the experts ``order[:len(prefix)]`` on columns ``prefix``."""
        inc = self.inc
        d = len(prefix)
        placed, cols = self.order_arr[:d], np.asarray(prefix, dtype=np.int64)
        col_of = np.full(len(self.order), -1, dtype=np.int64)  # -1: not placed yet
        col_of[placed] = cols
        K = self.feats_pad[col_of[inc.ids]].sum(axis=1, dtype=np.int16)  # [G, F]; -1 picks the zero row
        share = inc.share[cols]
        act = inc.active[placed]
        return (K, inc.flops_e[placed] @ share, inc.read_e[placed] @ share, inc.mem_bytes[cols].sum(axis=0),
                inc.holders[cols[act]].sum(axis=0, dtype=np.int64))

    def rows(self, d: int) -> tuple:
        """The (expert, column) rows of depth ``d`` (experts ``order[d:]``) and what each adds,
        computed once per depth: the order is fixed. Compute shares come in seconds (over the node's
        FLOP/s and DRAM bandwidth) and link features in seconds per byte, so that the look-ahead
        only adds and takes maxima."""
        if d not in self._rows:
            inc = self.inc
            rem = self.order[d:]
            pos = np.repeat(np.arange(len(rem)), [len(self.cols[j]) for j in rem])
            js = np.asarray(rem, dtype=np.int64)[pos]
            cs = np.concatenate([self.cols[j] for j in rem])
            feats = inc.feats[cs].astype(float)
            self._rows[d] = (rem, pos, cs, feats * self.link_s if self.link_s is not None else feats,
                             inc.flops_e[js][:, None] * inc.share[cs] / self.compute,
                             inc.read_e[js][:, None] * inc.share[cs] / self.dram,
                             np.where(inc.active[js][:, None], inc.holders[cs], 0), inc.mem_bytes[cs],
                             self.member[rem])
        return self._rows[d]

    def look_ahead(self, prefix: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bounds of placing each expert still to place on each of its columns: ``(expert position
        among them [n], column [n], bound_s [n])``, grouped by expert in placing order (inf where
        capacity breaks). The same terms as :class:`~.polish.IncrementalScore`'s score: roofline of
        the busiest node (at least the mean node's), busiest link per phase, hop terms."""
        inc = self.inc
        K, flops, read, mem, used = self.state(prefix)
        rem, pos, cs, feats, comp_s, read_s, holders, mem_rows, member = self.rows(len(prefix))
        hit = K > 0
        # per expert still to place: the bytes of its groups' messages that miss each feature so far
        miss = member @ (inc.w[:, None] * ~hit)  # [n_rem, F]
        link = np.take(miss, pos, axis=0)  # [n, F], then in place: the bytes (tree: seconds) it adds
        link *= feats
        if self.link_s is not None:  # tree: a feature is a link; seconds on each link
            link += (inc.w @ hit) * self.link_s
        else:  # unicast: a feature is a node; its bytes load the links of its routes
            link += inc.w @ hit
            link = link @ self.node_load_s
        # the links' loads are already seconds (their bandwidths were folded in per depth)
        hops = np.where(used[None, :] + holders > 0, inc.ecc, 0).max(axis=-1)[:, None] if inc.hop_lat else 0
        comm = phase_time_s(link.reshape(len(pos), 2, inc.nl), None, inc.hop_lat, hops).sum(axis=1)  # disp + comb
        comp = roofline_of(comp_s + flops / self.compute, read_s + read / self.dram).max(axis=1)
        val = np.maximum(comp, self.area_s) + comm
        if inc.cap is not None:
            val[(mem[None, :] + mem_rows).max(axis=1) > inc.cap] = np.inf
        return pos, cs, val


def branch_and_bound(inc: IncrementalScore, allowed: np.ndarray, incumbent: np.ndarray, incumbent_s: float, *,
                     gap: float = 0.0, deadline: float | None = None, max_nodes: int | None = None) -> BnbResult:
    """Search the plans that put every expert on a column ``allowed [E, nb]`` permits (the family,
    after symmetry breaking, capacity and incumbent fixing), best bound first, for one whose score
    (``inc``'s evaluator score, seconds) beats ``incumbent_s`` (the score of ``incumbent [E]``).

    Stops when the smallest open bound is within ``gap`` (relative) of the incumbent, at
    ``deadline`` (``time.perf_counter()`` seconds), after ``max_nodes`` expansions, or at
    :data:`MAX_OPEN` open nodes. ``bound_s`` is then the smallest bound left open (or pruned
    within ``gap``), capped at the incumbent: a lower bound on every plan ``allowed`` permits.
    Without a deadline the result depends on the inputs only.
    """
    allowed = np.asarray(allowed, dtype=bool)
    E = allowed.shape[0]
    order = np.argsort(-inc.flops_e, kind="stable")
    s = _Search(inc, allowed, order)
    best_s, best = float(incumbent_s), np.asarray(incumbent).copy()
    if any(len(c) == 0 for c in s.cols):  # some expert has no column left: no plan here beats the incumbent
        return BnbResult(best, best_s, best_s, 0, "proven", False)
    improved = False
    heap: list[tuple[float, int, tuple[int, ...], tuple[np.ndarray, np.ndarray] | None]] = [(0.0, 0, (), None)]
    count, nodes = 1, 0
    pruned = np.inf  # smallest bound of a node dropped within the gap target
    stop = "proven"
    while heap:
        if heap[0][0] >= best_s * (1 - gap):
            break
        if deadline is not None and time.perf_counter() >= deadline:
            stop = "deadline"
            break
        if max_nodes is not None and nodes >= max_nodes:
            stop = "nodes"
            break
        if len(heap) >= MAX_OPEN:
            stop = "memory"
            break
        lb, _, prefix, kids = heapq.heappop(heap)
        d = len(prefix)
        if kids is None:
            nodes += 1
            pos, cs, val = s.look_ahead(prefix)
            mins = np.minimum.reduceat(val, np.searchsorted(pos, np.arange(E - d)))
            node_lb = max(lb, float(mins.max()))
            kids = (cs[pos == 0].astype(np.int32), val[pos == 0])
            if node_lb >= best_s * (1 - gap):
                pruned = min(pruned, node_lb)
                continue
            if node_lb > lb * (1 + 1e-9) and d + 1 < E:  # its bound rose: back in line, children kept
                heapq.heappush(heap, (node_lb, count, prefix, kids))
                count += 1
                continue
        else:
            node_lb = lb
        for b, v in zip(*kids, strict=True):
            if d + 1 == E:  # a complete plan: its bound is its score
                if v < best_s:
                    best_s, improved = float(v), True
                    best = np.empty(E, dtype=np.int64)
                    best[order] = prefix + (int(b),)
                continue
            key = max(float(v), node_lb)
            if key >= best_s * (1 - gap):
                pruned = min(pruned, key)
                continue
            heapq.heappush(heap, (key, count, prefix + (int(b),), None))
            count += 1
    open_lb = heap[0][0] if heap else np.inf
    return BnbResult(best, best_s, min(best_s, open_lb, pruned), nodes, stop, improved)
