"""Greedy online rebalancer: per batch and layer, replicate / move / drop expert copies when the
modelled gain beats the cost of moving weights over the mesh (``formulations/online.md``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..costs import hide_time_s, node_room_bytes, roofline_of
from ..errors import InputError, check_choice, check_real, expect_instance, expect_int
from ..evaluator import EvalOptions
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import LayerPlacement, Placement
from ..workload import check_batch
from .cost import OnlineCost


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
    ``noise_z``: a node's compute counts this many standard deviations of batch noise above its
    mean (Poisson noise of the experts with a single copy; the balanced dispatch absorbs a
    replicated expert's), so replicas that absorb noise are valued. ``estimate_z``: a gain must
    also exceed this many standard deviations of the bottleneck node's *estimated* load (the
    estimate of few batches is noisy), so early noise does not trigger moves. Both that deviation and
    ``horizon`` are scaled by the dispersion the rebalancer measures (``dispersion_``: how much more
    than Poisson noise the counts miss the estimate, at least 1).
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
    noise_z: float = 1.0
    estimate_z: float = 0.5

    def __post_init__(self) -> None:
        """Every setting checked once (counts are whole numbers, numpy integers included), each error
        naming the setting."""
        check_choice("estimator", self.estimator, ("ema", "window"))
        real = {"ema_decay": check_real("ema_decay", self.ema_decay, minimum=0.0),
                "horizon": check_real("horizon", self.horizon, positive=True),
                "hysteresis": check_real("hysteresis", self.hysteresis, minimum=0.0),
                "extra_slots": check_real("extra_slots", self.extra_slots, minimum=0.0),
                "drop_tokens": check_real("drop_tokens", self.drop_tokens, minimum=0.0),
                "noise_z": check_real("noise_z", self.noise_z, minimum=0.0),
                "estimate_z": check_real("estimate_z", self.estimate_z, minimum=0.0)}
        if real["ema_decay"] >= 1:
            raise InputError("ema_decay", f"must be in [0, 1), got {self.ema_decay}",
                             "the weight on the past: 0 uses the last batch only, < 1 always")
        whole = {"window": expect_int("window", self.window, minimum=1, why="batches averaged"),
                 "candidates": expect_int("candidates", self.candidates, minimum=1, why="copies tried per layer"),
                 "targets": expect_int("targets", self.targets, minimum=1, why="nodes tried per copy"),
                 "max_actions": expect_int("max_actions", self.max_actions, minimum=0,
                                             why="per layer and batch; 0 never acts")}
        for name, v in {**real, **whole}.items():
            object.__setattr__(self, name, v)


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


_Q_SPLIT = np.array([1.0, 0.5, 0.25, 0.0])  # new copy's token share: equal split, a half or a quarter of it ...
_Q_MOVE = np.array([0.0, 0.0, 0.0, 1.0])  # ... or all of it (a move)


def check_parts(plan: Placement, model: MoEModel, hw: Hardware, options: EvalOptions | None = None) -> None:
    """One :class:`InputError` unless ``plan``, ``model`` and ``hw`` are the package's types and fit
    each other (the plan's nodes are the mesh's, its layers and experts the model's)."""
    expect_instance("plan", plan, Placement, "use hm.place(problem, name) or hm.load_plan(path, problem)")
    expect_instance("model", model, MoEModel, "use hm.get_model(name)")
    expect_instance("hw", hw, Hardware, "use hm.make_hardware(point, mesh)")
    expect_instance("options", options, EvalOptions, "give hm.EvalOptions(...) or leave it out", optional=True)
    if plan.num_nodes != hw.num_nodes:
        raise InputError("plan", f"is for {plan.num_nodes} nodes, the mesh has {hw.num_nodes}",
                         "make the plan for this mesh")
    if plan.num_experts != model.num_experts or plan.num_layers != model.moe_layers:
        raise InputError("plan", f"has {plan.num_layers} layers of {plan.num_experts} experts, {model.name} "
                         f"{model.moe_layers} of {model.num_experts}", "make the plan for this model")


def check_counts(counts: object, num_layers: int, num_experts: int) -> np.ndarray:
    """One batch's observed token counts as a float array ``[num_layers, num_experts]``, or one
    :class:`InputError` naming ``counts``: numbers, finite, non-negative, and every layer routing
    some tokens (a batch routes each of its tokens through every layer)."""
    try:
        c = np.array(counts, dtype=float)
    except (TypeError, ValueError):
        raise InputError("counts", f"must be numbers, got {type(counts).__name__}",
                         "give the batch's token counts per layer and expert") from None
    if c.shape != (num_layers, num_experts):
        raise InputError("counts", f"expected shape {(num_layers, num_experts)}, got {c.shape}",
                         "give one count per MoE layer and expert")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise InputError("counts", "must be finite and non-negative", "give token counts (0, 1, 2, ...)")
    empty = np.flatnonzero(c.sum(axis=1) == 0)
    if empty.size:
        raise InputError("counts", f"layer {int(empty[0])} routes no tokens",
                         "give the counts of a batch with at least one token")
    return c


class GreedyRebalancer:
    """Holds the current placement of every layer and adjusts it batch by batch.

    ``observe(counts)`` feeds the observed per-layer expert token counts of a batch; ``step()``
    proposes and applies actions for the next batch and returns them; ``placement()`` is the current
    plan. Deterministic given its inputs.

    All layers are decided together. Copies of every layer live in flat arrays sorted by global
    expert id ``g = layer * E + expert`` (each expert's copies are contiguous); their node shares
    are a *pattern* id into a table of distinct share rows ``P`` (ids ``0..D-1``: one whole node),
    so node and link terms of all layers are a few bincounts and small matrix products. Each round
    screens every layer and scores the candidate actions of all still-active layers with one set of
    array operations.
    """

    def __init__(self, plan: Placement, model: MoEModel, hw: Hardware, batch: float,
                 config: RebalancerConfig | None = None, options: EvalOptions | None = None) -> None:
        expect_instance("config", config, RebalancerConfig, "give hm.online.RebalancerConfig(...) or leave it out",
                        optional=True)
        check_parts(plan, model, hw, options)
        batch = check_batch(batch)
        self.model, self.hw, self.batch = model, hw, batch
        self.config = config or RebalancerConfig()
        opts = options or EvalOptions()
        self.cost = OnlineCost(model, hw, batch, tree=opts.resolved_delivery == "tree", noise_z=self.config.noise_z)
        # weight streaming hides behind the layer's own non-MoE work (attention), as HD-MoE's
        # pre-broadcast hides behind the previous layer
        self.hide_s = hide_time_s(model, hw, batch, opts.mode, opts.context_len)
        E = model.num_experts
        self.num_layers = len(plan.layers)
        gs, shares, frac = [], [], []
        for li, lp in enumerate(plan.layers):
            order = np.argsort(lp.expert_of, kind="stable")
            gs.append(li * E + lp.expert_of[order])
            shares.append(lp.shares[order])
            frac.append(lp.token_fraction[order])
        S = np.vstack(shares)
        self.g = np.concatenate(gs)  # [R] global expert id of each copy
        self.q = np.concatenate(frac)  # [R] token fraction
        D = hw.num_nodes
        rows, self.p = np.unique(np.vstack([np.eye(D), np.round(S, 12)]), axis=0, return_inverse=True)
        # pattern table with the single nodes first
        single = self.p[:D]
        order = np.r_[single, np.setdiff1d(np.arange(len(rows)), single)]
        rank = np.empty(len(rows), dtype=np.int64)
        rank[order] = np.arange(len(rows))
        self.P = rows[order]  # [patterns, D] shares of a copy over the nodes
        self.p = rank[self.p[D:]]  # [R] pattern id of each copy
        links = self.cost.links
        ids = [links.index(row > 0) for row in self.P]
        self.PL = links.matrix[ids]  # [patterns, 2 * links]
        self.capacity_ = np.array([self._capacity(lp) for lp in plan.layers])  # [L, D] copies per node
        self.node_room_bytes_ = node_room_bytes(self.model, self.hw)  # [D] expert bytes, all layers
        self.estimate_: np.ndarray | None = None
        self._history: list[np.ndarray] = []
        self.seen_ = 0  # batches observed
        self._miss = [0.0, 0.0]  # squared misses of the estimate, and what Poisson noise would give
        self.strategy = plan.strategy

    def _capacity(self, lp: LayerPlacement) -> np.ndarray:
        """``[D]`` expert copies a node may hold in this layer: without a DRAM capacity, the plan's
        per-node maximum plus ``extra_slots``; with one, any number (the whole node's DRAM limits)."""
        D = self.hw.num_nodes
        if self.hw.dram_capacity_bytes is None:
            return np.full(D, lp.weight_copies_per_node().max() + self.config.extra_slots)
        return np.full(D, np.inf)

    # --- load estimate -------------------------------------------------------------------------
    def observe(self, counts: np.ndarray) -> None:
        """Feed observed token counts ``[layers, E]`` of one batch."""
        c = check_counts(counts, self.num_layers, self.model.num_experts)
        if self.estimate_ is not None:  # how far the counts fall from the estimate, in Poisson units
            e = self.estimate_
            m = e > 0
            self._miss[0] += float(((c - e)[m] ** 2).sum())
            self._miss[1] += float(e[m].sum()) * (1.0 + self._estimate_variance())
        self.seen_ += 1
        if self.config.estimator == "ema":
            b = self.config.ema_decay
            self.estimate_ = c if self.estimate_ is None else b * self.estimate_ + (1 - b) * c
        else:
            self._history.append(c)
            self._history = self._history[-self.config.window:]
            self.estimate_ = np.mean(self._history, axis=0)

    # --- decisions -----------------------------------------------------------------------------
    def step(self) -> list[Action]:
        """Propose and apply up to ``max_actions`` actions per layer from the current estimate."""
        if self.estimate_ is None:
            return []
        n = self.estimate_.ravel()
        budget = np.full(self.num_layers, self.hide_s)  # weight streaming each layer can still hide
        active = np.ones(self.num_layers, dtype=bool)
        actions: list[Action] = []
        for _ in range(self.config.max_actions):
            acts = self._round(n, active, budget)
            if not acts:
                break
            actions.extend(acts)
            active[:] = False
            active[[a.layer for a in acts]] = True
        actions.sort(key=lambda a: a.layer)
        return actions

    def _layer_state(self, n: np.ndarray) -> dict[str, np.ndarray]:
        """Node and link terms of every layer under the current copies and estimate ``n [L*E]``."""
        c, E, L = self.cost, self.model.num_experts, self.num_layers
        NP = len(self.P)
        tok = n[self.g] * self.q
        layer = self.g // E
        cell = layer * NP + self.p  # (layer, pattern) of each copy
        use = np.flatnonzero(np.bincount(self.p, minlength=NP))  # patterns in use
        P, PL = self.P[use], self.PL[use]

        def per_layer(w: np.ndarray | None) -> np.ndarray:
            return np.bincount(cell, w, L * NP).reshape(L, NP)[:, use]

        mass = per_layer(tok)
        flops = c.phi_s * (mass @ P)
        solo = np.bincount(self.g, minlength=L * E)[self.g] == 1
        P2 = P**2
        var = per_layer(n[self.g] * solo) @ P2  # tokens² of batch noise per node
        mem = c.w_s * (per_layer(c.activation(tok)) @ P)
        link = (c.vec * mass) @ PL
        node = roofline_of(flops + c.phi_s * c.noise_z * np.sqrt(var), mem)
        est_var = self._estimate_variance() * self.dispersion_ * (mass @ P2)  # tokens² of estimate noise
        return {"tok": tok, "layer": layer, "flops": flops, "mem": mem, "link": link, "node": node, "var": var,
                "est_var": est_var,
                "base": node.max(axis=1) + c.comm_s(link), "used": per_layer(None) @ P}

    @property
    def dispersion_(self) -> float:
        """How much more the counts miss the estimate than Poisson noise would (at least 1): batches
        cut from a drifting stream (contiguous ones) move more than sampling alone explains."""
        num, den = self._miss
        return max(1.0, num / den) if den > 0 else 1.0

    def _estimate_variance(self) -> float:
        """Variance of the load estimate per unit of expected (Poisson) count: the EMA starts at the
        first batch, so ``1`` after one batch and ``(1 - b) / (1 + b)`` in the long run; a window of
        ``w`` batches: ``1 / w``."""
        s = max(self.seen_, 1)
        if self.config.estimator == "window":
            return 1.0 / min(s, self.config.window)
        b = self.config.ema_decay
        return (1 - b) / (1 + b) * (1 - b ** (2 * s - 2)) + b ** (2 * s - 2)

    def _top_copies(self, key: np.ndarray, eligible: np.ndarray, layer: np.ndarray, k: int) -> np.ndarray:
        """``[L, k]``: per layer, the ``k`` eligible copies with the smallest ``key`` (-1 where fewer)."""
        sel = np.flatnonzero(eligible)
        sel = sel[np.lexsort((key[sel], layer[sel]))]
        lay = layer[sel]
        first = np.searchsorted(lay, lay)  # index of the first copy of the same layer
        rank = np.arange(len(sel)) - first
        out = np.full((self.num_layers, k), -1)
        keep = rank < k
        out[lay[keep], rank[keep]] = sel[keep]
        return out

    def _round(self, n: np.ndarray, active: np.ndarray, budget: np.ndarray) -> list[Action]:
        """At most one action per active layer: a drop where a replica went cold, else the best
        replicate / move that pays for itself."""
        cfg, c = self.config, self.cost
        E, D = self.model.num_experts, self.hw.num_nodes
        st = self._layer_state(n)
        dropped = self._drops(st["tok"], st["layer"], active)
        if dropped:  # copies changed: recompute (rare)
            st = self._layer_state(n)
        tok, layer, base, node = st["tok"], st["layer"], st["base"], st["node"]
        live = active.copy()
        live[[a.layer for a in dropped]] = False
        # actions relieve the bottleneck node; they can at best bring it to the mean FLOP time
        live &= node.max(axis=1) - st["flops"].mean(axis=1) >= cfg.hysteresis * base
        if not live.any():
            return dropped
        hot = node.argmax(axis=1)
        # candidates: per layer, the copies contributing most to its hot node
        contrib = tok * self.P[self.p, hot[layer]]
        C = max(1, min(cfg.candidates, E))
        rc = self._top_copies(-contrib, contrib > 0, layer, C)
        a = np.flatnonzero(live & (rc[:, 0] >= 0))
        if a.size == 0:
            return dropped
        rc = rc[a]
        valid = rc >= 0
        gc = np.where(valid, self.g[rc], -1)
        for j in range(1, C):  # one candidate per expert
            valid[:, j] &= (gc[:, :j] != gc[:, j:j + 1]).all(axis=1)
        gc = np.where(valid, gc, self.g[rc[:, :1]])  # invalid slots repeat the first (masked below)
        # every copy of each candidate expert: slot of each copy in the [A * C] candidate list
        lo, hi = np.searchsorted(self.g, gc), np.searchsorted(self.g, gc, side="right")
        m = hi - lo
        slot = np.full(len(tok), -1)
        for j in range(C):  # later slots never overwrite a valid first slot of the same expert
            v = valid[:, j]
            span = np.concatenate([np.arange(x, y) for x, y in zip(lo[v, j], hi[v, j], strict=True)]) \
                if v.any() else np.zeros(0, dtype=int)
            owner = np.repeat(np.flatnonzero(v) * C + j, m[v, j])
            slot[span] = owner
        AC, NP = len(a) * C, len(self.P)
        c_in = np.flatnonzero(slot >= 0)
        cell = slot[c_in] * NP + self.p[c_in]
        mass_i = np.bincount(cell, tok[c_in], AC * NP).reshape(AC, NP)
        comp_i = c.phi_s * (mass_i @ self.P).reshape(len(a), C, D)
        holders = (np.bincount(cell, minlength=AC * NP).reshape(AC, NP) @ self.P).reshape(len(a), C, D) > 0
        link_i = ((c.vec * mass_i) @ self.PL).reshape(len(a), C, -1)
        # targets: the least-loaded nodes that hold no copy of the expert and have a free slot
        wb = self.model.expert_weight_bytes()
        # bytes a node can still take: a new whole copy needs wb (expert_room_bytes holds the rounding slack)
        room = self.node_room_bytes_ - wb * st["used"].sum(axis=0)  # [D]
        free = np.where(room >= wb, self.capacity_[a] - st["used"][a], 0.0)  # [A, D] copies
        key = np.where(holders | (free[:, None, :] < 1.0 - 1e-9), np.inf, node[a][:, None, :])
        K = min(cfg.targets, D)
        t = np.argsort(key, axis=2, kind="stable")[..., :K]  # [A, C, K]
        ok = np.isfinite(np.take_along_axis(key, t, axis=2)) & valid[..., None]
        q = _Q_SPLIT / (m[..., None] + 1) + _Q_MOVE  # token share of the new copy: [A, C, Q]
        qn = q * n[gc][..., None]
        onehot = np.eye(D)[t][:, :, None]  # [A, C, 1, K, D]
        ax = (slice(None), None, None, None)
        new_flops = (st["flops"][a][ax] - q[..., None, None] * comp_i[:, :, None, None, :]
                     + onehot * (c.phi_s * qn)[..., None, None])
        # the existing copies' weight reads at their new token counts t·(1 - q) (none after a move)
        act_now = np.bincount(cell, c.activation(tok[c_in]), AC * NP).reshape(AC, NP) @ self.P
        left = tok[c_in][:, None] * (1.0 - q.reshape(AC, -1)[slot[c_in]])  # [copies, Q]
        act_left = np.stack([np.bincount(cell, c.activation(left[:, j]), AC * NP).reshape(AC, NP) @ self.P
                             for j in range(q.shape[2])], axis=1)  # [AC, Q, D]
        mem_change = c.w_s * (act_left - act_now[:, None, :]).reshape(len(a), C, -1, 1, D)
        new_mem = st["mem"][a][ax] + mem_change + onehot * (c.w_s * c.activation(qn))[..., None, None]
        if c.noise_z > 0:  # the candidate's noise leaves its nodes; a move brings it to the target
            var_i = ((mass_i @ self.P**2).reshape(len(a), C, D) * (m == 1)[..., None])[:, :, None, None, :]
            new_var = (st["var"][a][ax] - var_i
                       + onehot * (n[gc][..., None] * (q >= 1.0))[..., None, None])
            new_flops = new_flops + c.phi_s * c.noise_z * np.sqrt(np.maximum(new_var, 0.0))
        node_after = roofline_of(new_flops, new_mem).max(axis=-1)  # [A, C, Q, K]
        move = np.where(holders[:, :, None, :], c.move_pair.T[t], np.inf).min(axis=-1)  # [A, C, K]
        cost = np.maximum(0.0, move - budget[a][:, None, None])[:, :, None, :]
        h, H, b4 = cfg.hysteresis, cfg.horizon / self.dispersion_, base[a][:, None, None, None]
        # the hot node's estimated load is itself noisy: a gain must also clear part of its deviation
        doubt = (cfg.estimate_z * c.phi_s * np.sqrt(st["est_var"][a, hot[a]]))[:, None, None, None]
        # links without the new copy's traffic: a lower bound on the links after the action, so
        # only combos whose gain bound passes the tests get their exact link terms
        kept = st["link"][a][:, None, None, :] - q[..., None] * link_i[:, :, None, :]  # [A, C, Q, 2 * links]
        bound = b4 - node_after - c.comm_s(kept)[..., None]
        good = ok[:, :, None, :] & (bound >= h * b4) & (bound * H >= (1 + h) * cost)
        ia, ic, iq, ik = np.nonzero(good)
        exact = kept[ia, ic, iq] + (c.vec * qn[ia, ic, iq])[:, None] * self.PL[t[ia, ic, ik]]
        gain = np.full(good.shape, -np.inf)
        gain[ia, ic, iq, ik] = bound[ia, ic, iq, ik] + c.comm_s(kept[ia, ic, iq]) - c.comm_s(exact)
        good &= (gain >= h * b4 + doubt) & (gain * H >= (1 + h) * cost)
        score = np.where(good, gain * H - cost, -np.inf).reshape(len(a), -1)
        best = score.argmax(axis=1)
        win = np.isfinite(score[np.arange(len(a)), best])
        if not win.any():
            return dropped
        aw = np.flatnonzero(win)
        pick = best[win]
        if np.isfinite(room).any():  # layers act at once: the best first, each at its best node with room
            pick = np.full(len(aw), -1)
            for w in np.argsort(-score[aw, best[aw]], kind="stable"):
                row = score[aw[w]]
                for j in np.argsort(-row, kind="stable"):  # its best first, then the next ones
                    if not np.isfinite(row[j]):
                        break
                    node_t = t[aw[w], j // (q.shape[2] * K), j % K]
                    if room[node_t] >= wb:
                        room[node_t] -= wb
                        pick[w] = j
                        break
            aw, pick = aw[pick >= 0], pick[pick >= 0]
            if not aw.size:
                return dropped
        ci, qi, ki = np.unravel_index(pick, (C, q.shape[2], K))
        acts = []
        W = c.unit.weight_bytes
        for ai, cj, qj, kj in zip(aw, ci, qi, ki, strict=True):
            li = int(a[ai])
            mv, cs = float(move[ai, cj, kj]), float(cost[ai, cj, 0, kj])
            kind = "move" if q[ai, cj, qj] >= 1.0 else "replicate"
            acts.append(Action(li, kind, int(gc[ai, cj] % E), int(t[ai, cj, kj]), float(gain[ai, cj, qj, kj]),
                               cs, W, mv))
            budget[li] = max(0.0, budget[li] - (mv - cs))
        self._add_copies(gc[aw, ci], t[aw, ci, ki], q[aw, ci, qi])
        return dropped + acts

    def _add_copies(self, gs: np.ndarray, nodes: np.ndarray, qs: np.ndarray) -> None:
        """New whole copies of experts ``gs`` on ``nodes`` taking token shares ``qs``; the existing
        copies keep ``1 - q`` of their tokens, and are removed when ``q = 1`` (a move)."""
        lo, hi = np.searchsorted(self.g, gs), np.searchsorted(self.g, gs, side="right")
        scale = np.ones(len(self.g))
        for x, y, qi in zip(lo, hi, qs, strict=True):
            scale[x:y] = 1.0 - qi
        self.g = np.insert(self.g, hi, gs)
        self.q = np.insert(self.q * scale, hi, qs)
        self.p = np.insert(self.p, hi, nodes)  # single-node patterns have ids 0..D-1
        moved = gs[qs >= 1.0]
        if moved.size:
            self._keep(~(np.isin(self.g, moved) & (self.q <= 0)))

    def _keep(self, keep: np.ndarray) -> None:
        """Remove the copies where ``keep`` is False."""
        self.g, self.q, self.p = self.g[keep], self.q[keep], self.p[keep]

    def _drops(self, tok: np.ndarray, layer: np.ndarray, active: np.ndarray) -> list[Action]:
        """Per active layer, drop the least-used replica when it serves fewer than ``drop_tokens``
        tokens per batch; its token fraction goes to the expert's other copies."""
        E = self.model.num_experts
        counts = np.bincount(self.g, minlength=self.num_layers * E)
        cold = (counts[self.g] > 1) & (tok < self.config.drop_tokens)  # replicas serving too little
        r = self._top_copies(tok, cold, layer, 1)[:, 0]
        r = r[active & (r >= 0)]
        if r.size == 0:
            return []
        keep = np.ones(len(self.g), dtype=bool)
        keep[r] = False
        q = self.q.copy()
        acts = []
        for ri in r:
            gi = self.g[ri]
            mine = (self.g == gi) & keep
            rest = q[mine].sum()
            q[mine] = q[mine] / rest if rest > 0 else 1.0 / mine.sum()
            node = int(np.argmax(self.P[self.p[ri]]))
            acts.append(Action(int(gi // E), "drop", int(gi % E), node, 0.0, 0.0, 0.0, 0.0))
        self.q = q
        self._keep(keep)
        return acts

    def placement(self) -> Placement:
        """The current placement of every layer."""
        E = self.model.num_experts
        S = self.P[self.p]
        starts = np.searchsorted(self.g, np.arange(self.num_layers + 1) * E)
        layers = tuple(LayerPlacement(S[s:e], self.g[s:e] - li * E, self.q[s:e], E)
                       for li, (s, e) in enumerate(zip(starts[:-1], starts[1:], strict=True)))
        return Placement(layers, f"{self.strategy}+greedy")
