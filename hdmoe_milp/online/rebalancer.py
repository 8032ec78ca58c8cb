"""Greedy online rebalancer: per batch and layer, replicate / move / drop expert copies when the
modelled gain beats the cost of moving weights over the mesh (``formulations/online.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, check_choice
from ..evaluator import EvalOptions, non_moe_time_s
from ..hardware import Hardware
from ..models import MoEModel
from ..placement import LayerPlacement, Placement
from .cost import LayerCost, LinkTable


@dataclass(frozen=True)
class RebalancerConfig:
    """Settings of the greedy rebalancer.

    ``estimator``: ``ema`` (weight ``ema_decay`` on the past) or ``window`` (mean of the last
    ``window`` batches). ``horizon``: batches over which a move must pay for itself.
    ``hysteresis``: an action needs a gain of at least this fraction of the layer's latency and must
    beat its cost by this factor. ``extra_slots``: extra expert copies each node may hold per layer
    beyond the offline plan when the hardware sets no capacity. ``candidates``: hottest copies tried
    on the bottleneck node; ``targets``: least-loaded nodes tried for each. ``drop_tokens``: a replica
    expected to serve fewer tokens per batch is dropped. ``max_actions``: per layer and batch.
    """

    estimator: str = "ema"
    ema_decay: float = 0.5
    window: int = 4
    horizon: float = 8.0
    hysteresis: float = 0.02
    extra_slots: float = 1.0
    candidates: int = 2
    targets: int = 4
    drop_tokens: float = 0.5
    max_actions: int = 3

    def __post_init__(self) -> None:
        check_choice("estimator", self.estimator, ("ema", "window"))
        if not 0 <= self.ema_decay < 1:
            raise InputError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.window < 1 or self.horizon <= 0 or self.hysteresis < 0:
            raise InputError("rebalancer", "window >= 1, horizon > 0 and hysteresis >= 0 are required")


@dataclass
class Action:
    """One change: ``kind`` is replicate, move or drop; ``node`` the target (or dropped) node;
    ``gain_s`` modelled latency saved per batch, ``move_s`` weight transfer time, ``cost_s`` its
    part not hidden (charged to the batch)."""

    layer: int
    kind: str
    expert: int
    node: int
    gain_s: float
    cost_s: float
    bytes_moved: float
    move_s: float = 0.0


@dataclass
class _Layer:
    shares: np.ndarray
    expert_of: np.ndarray
    frac: np.ndarray
    links: np.ndarray  # [R, 2 * links] seconds per byte sent to the copy: dispatch links, then combine
    cap: np.ndarray = field(repr=False)


_Q_SPLIT = np.array([1.0, 0.5, 0.0])  # new copy's token share: equal split, half of it ...
_Q_MOVE = np.array([0.0, 0.0, 1.0])  # ... or all of it (a move)


class GreedyRebalancer:
    """Holds the current placement of every layer and adjusts it batch by batch.

    ``observe(counts)`` feeds the observed per-layer expert token counts of a batch; ``step()``
    proposes and applies actions for the next batch and returns them; ``placement()`` is the current
    plan. Deterministic given its inputs.
    """

    def __init__(self, plan: Placement, model: MoEModel, hw: Hardware, batch: float,
                 config: RebalancerConfig | None = None, options: EvalOptions | None = None) -> None:
        self.model, self.hw, self.batch = model, hw, float(batch)
        self.config = config or RebalancerConfig()
        opts = options or EvalOptions()
        self.links = LinkTable(hw, tree=opts.resolved_delivery == "tree")
        self.cost = LayerCost(model, hw, self.links)
        # weight streaming hides behind the layer's own non-MoE work (attention), as HD-MoE's
        # pre-broadcast hides behind the previous layer
        self.hide_s = non_moe_time_s(model, hw, batch, opts) / max(model.total_layers, 1)
        self.layers_: list[_Layer] = []
        for lp in plan.layers:
            cap = self._capacity(lp)
            self.layers_.append(_Layer(lp.shares.copy(), lp.expert_of.copy(), lp.token_fraction.copy(),
                                       self.cost.copy_links(lp.shares), cap))
        self.estimate_: np.ndarray | None = None
        self._history: list[np.ndarray] = []
        self.strategy = plan.strategy

    def _capacity(self, lp: LayerPlacement) -> np.ndarray:
        D = self.hw.num_nodes
        cap = self.hw.dram_capacity_bytes
        if cap is None:
            return np.full(D, lp.weight_copies_per_node().max() + self.config.extra_slots)
        m = self.model
        other = m.non_expert_weight_bytes() / D
        per_layer = (cap - other) / m.moe_layers / m.expert_weight_bytes()
        return np.full(D, max(per_layer, lp.weight_copies_per_node().max()))

    # --- load estimate -------------------------------------------------------------------------
    def observe(self, counts: np.ndarray) -> None:
        """Feed observed token counts ``[layers, E]`` of one batch."""
        c = np.asarray(counts, dtype=float)
        if c.shape != (len(self.layers_), self.model.num_experts):
            raise InputError("counts", f"expected shape {(len(self.layers_), self.model.num_experts)}, got {c.shape}")
        if self.config.estimator == "ema":
            b = self.config.ema_decay
            self.estimate_ = c if self.estimate_ is None else b * self.estimate_ + (1 - b) * c
        else:
            self._history.append(c)
            self._history = self._history[-self.config.window:]
            self.estimate_ = np.mean(self._history, axis=0)

    # --- decisions -----------------------------------------------------------------------------
    def step(self) -> list[Action]:
        """Propose and apply actions for every layer from the current estimate."""
        if self.estimate_ is None:
            return []
        actions = []
        for li in range(len(self.layers_)):
            budget = self.hide_s  # weight streaming this batch can hide behind the layer's other work
            for _ in range(self.config.max_actions):
                a = self.step_layer(li, self.estimate_[li], budget)
                if a is None:
                    break
                budget = max(0.0, budget - (a.move_s - a.cost_s))
                actions.append(a)
        return actions

    def step_layer(self, li: int, n: np.ndarray, budget: float | None = None) -> Action | None:
        """At most one action on layer ``li`` for estimated counts ``n [E]``; ``budget`` (s) of weight
        streaming is hidden (default: the layer's non-MoE time)."""
        budget = self.hide_s if budget is None else budget
        L = self.layers_[li]
        cfg = self.config
        drop = self._maybe_drop(li, n)
        if drop is not None:
            return drop
        tokens = n[L.expert_of] * L.frac
        flops, mem = self.cost.node_terms(L.shares, tokens, self.batch)
        node = np.maximum(flops, mem)
        phi, vec = self.cost.phi_s, self.cost.vec
        link_vec = (tokens * vec) @ L.links
        base = float(node.max() + self.cost.comm_s(link_vec))
        hot = int(np.argmax(node))
        if node[hot] - flops.mean() < cfg.hysteresis * base:
            # actions relieve the bottleneck node; they can at best bring it to the mean FLOP time
            return None
        contrib = tokens * L.shares[:, hot]
        cand = np.argsort(-contrib, kind="stable")[: cfg.candidates]
        cand = cand[contrib[cand] > 0]
        if cand.size == 0:
            return None
        experts = np.array(list(dict.fromkeys(L.expert_of[cand].tolist())))
        C, D = len(experts), self.hw.num_nodes
        mine = L.expert_of[None, :] == experts[:, None]  # [C, R] copies of each candidate expert
        tok_m = mine * tokens[None, :]
        comp_i = phi * (tok_m @ L.shares)  # [C, D] present FLOP time of the expert on each node
        link_i = vec * (tok_m @ L.links)  # [C, 2 * links]
        holders = (mine @ (L.shares > 0)) > 0  # [C, D]
        ni = n[experts]
        nc = mine.sum(axis=1)
        free = L.cap - L.shares.sum(axis=0)
        K = min(D, cfg.targets + int(holders.sum(axis=1).max()))
        tg = np.argsort(node, kind="stable")[:K]  # least-loaded nodes
        # combos (candidate c, token share q, target t); q: equal split, half of it, all of it (a move)
        Q = 3
        ci = np.repeat(np.arange(C), Q * K)
        q = np.repeat((_Q_SPLIT[None, :] / (nc[:, None] + 1) + _Q_MOVE[None, :]).ravel(), K)
        t = np.resize(tg, C * Q * K)
        ok = ~holders[ci, t] & (free[t] >= 1.0 - 1e-9)
        rows = np.arange(len(q))
        qn = q * ni[ci]
        new_flops = flops[None, :] - q[:, None] * comp_i[ci]
        new_flops[rows, t] += qn * phi
        new_mem = np.repeat(mem[None, :], len(q), axis=0)  # reads of existing copies: upper estimate
        new_mem[rows, t] += self.cost.w_s * self.cost.activation(qn, self.batch)
        new_links = link_vec[None, :] - q[:, None] * link_i[ci] + (qn * vec)[:, None] * self.links.node[t]
        gain = base - (np.maximum(new_flops, new_mem).max(axis=1) + self.cost.comm_s(new_links))
        move = self.cost.move_time_s(holders[ci], t)
        cost = np.maximum(0.0, move - budget)
        good = ok & (gain >= cfg.hysteresis * base) & (gain * cfg.horizon >= (1 + cfg.hysteresis) * cost)
        if not good.any():
            return None
        score = np.where(good, gain * cfg.horizon - cost, -np.inf)
        j = int(np.argmax(score))
        best = (float(score[j]), float(gain[j]), (int(experts[ci[j]]), int(t[j]), float(q[j]), float(cost[j]),
                                                 float(move[j])))
        _, gain, (i, t, q, cost, move) = best
        self._replicate(li, i, t, q)
        kind = "replicate"
        if q >= 1.0:  # a move: the old copies serve nothing now and are dropped at once
            L = self.layers_[li]
            keep = ~((L.expert_of == i) & (L.frac <= 0))
            for name in ("shares", "expert_of", "frac", "links"):
                setattr(L, name, getattr(L, name)[keep])
            kind = "move"
        return Action(li, kind, i, t, gain, cost, self.model.expert_weight_bytes(), move)

    def _replicate(self, li: int, i: int, t: int, q: float) -> None:
        L = self.layers_[li]
        mine = L.expert_of == i
        L.frac = np.where(mine, L.frac * (1 - q), L.frac)
        row = np.zeros(self.hw.num_nodes)
        row[t] = 1.0
        L.shares = np.vstack([L.shares, row])
        L.expert_of = np.r_[L.expert_of, i]
        L.frac = np.r_[L.frac, q]
        L.links = np.vstack([L.links, self.links.node[t]])

    def _maybe_drop(self, li: int, n: np.ndarray) -> Action | None:
        """Drop the least-used replica when it serves fewer than ``drop_tokens`` tokens per batch."""
        L = self.layers_[li]
        counts = np.bincount(L.expert_of, minlength=self.model.num_experts)
        rep = counts[L.expert_of] > 1
        if not rep.any():
            return None
        served = np.where(rep, n[L.expert_of] * L.frac, np.inf)
        r = int(np.argmin(served))
        if served[r] >= self.config.drop_tokens:
            return None
        i = int(L.expert_of[r])
        node = int(np.argmax(L.shares[r]))
        keep = np.ones(len(L.frac), dtype=bool)
        keep[r] = False
        mine = (L.expert_of == i) & keep
        rest = L.frac[mine].sum()
        L.frac = np.where(mine, L.frac / rest if rest > 0 else 1.0 / mine.sum(), L.frac)
        for name in ("shares", "expert_of", "frac", "links"):
            setattr(L, name, getattr(L, name)[keep])
        return Action(li, "drop", i, node, 0.0, 0.0, 0.0, 0.0)

    def placement(self) -> Placement:
        layers = tuple(LayerPlacement(L.shares, L.expert_of, L.frac, self.model.num_experts) for L in self.layers_)
        return Placement(layers, f"{self.strategy}+greedy")
