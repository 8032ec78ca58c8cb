"""Online policies compared under the shared evaluator: static, greedy (ours), HD-MoE's pre-broadcast,
EPLB-style periodic re-planning and an oracle (an offline solve per batch)."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..costs import UnitCosts, expert_room_bytes, fits_capacity, hide_time_s, node_room_bytes
from ..errors import MAX_TIME_LIMIT_S, InputError, check_choice, check_real, expect_instance, expect_int
from ..evaluator import EvalOptions
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import LayerPlacement, Placement
from ..replica_rules import water_fill
from ..solvers import BACKENDS, SolveParams
from ..strategies.block_milp import MilpOptions, solve_layer
from ..strategies.eplb import eplb_placement
from ..workload import check_batch
from .rebalancer import GreedyRebalancer, RebalancerConfig, check_counts, check_parts

POLICIES = ("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic", "oracle")
_SHARE_TOL = 1e-9  # a share of an expert this small is rounding, not weights that move


@dataclass
class Decision:
    """What a policy does before a batch: the placement to use, unhidden weight-move time charged to
    this batch (s), bytes of weights moved, number of actions, decision time per layer (s)."""

    placement: Placement
    migration_s: float = 0.0
    bytes_moved: float = 0.0
    actions: int = 0
    decide_s_per_layer: float = 0.0


class Policy:
    """Base: ``decide(j)`` before batch j, ``observe(counts, batch)`` after it (counts ``[L, E]``)."""

    name = "static"

    def __init__(self, plan: Placement, model: MoEModel, hw: Hardware, batch: float,
                 options: EvalOptions | None = None) -> None:
        check_parts(plan, model, hw, options)
        self.plan, self.model, self.hw, self.batch = plan, model, hw, float(check_batch(batch))
        self.options = options or EvalOptions()

    def decide(self, j: int) -> Decision:
        return Decision(self.plan)

    def counts(self, counts: object) -> np.ndarray:
        """``counts`` checked (:func:`.rebalancer.check_counts`) for this policy's plan and model."""
        return check_counts(counts, self.plan.num_layers, self.model.num_experts)

    def observe(self, counts: np.ndarray, workload=None) -> None:
        self.counts(counts)  # checked even where the policy does not use them


class StaticPolicy(Policy):
    """The offline plan, never changed."""

    name = "static"


class GreedyPolicy(Policy):
    """This package's rebalancer (``GreedyRebalancer``)."""

    name = "greedy"

    def __init__(self, plan, model, hw, batch, options=None, config: RebalancerConfig | None = None) -> None:
        super().__init__(plan, model, hw, batch, options)
        expect_instance("config", config, RebalancerConfig,
                        "give hm.online.RebalancerConfig(...) (its fields are the settings) or leave it out",
                        optional=True)
        self.reb = GreedyRebalancer(plan, model, hw, batch, config, self.options)

    def decide(self, j: int) -> Decision:
        t = time.perf_counter()
        acts = self.reb.step()
        dt = (time.perf_counter() - t) / max(len(self.plan.layers), 1)
        return Decision(self.reb.placement(), sum(a.cost_s for a in acts), sum(a.bytes_moved for a in acts),
                        len(acts), dt)

    def observe(self, counts: np.ndarray, workload=None) -> None:
        self.reb.observe(counts)


def stored_shares(lp: LayerPlacement) -> np.ndarray:
    """``[E, D]`` how much of each expert's weights each node stores (the shares of all its copies)."""
    stored = np.zeros((lp.num_experts, lp.num_nodes))
    np.add.at(stored, lp.expert_of, lp.shares)
    return stored


def _held(lp: LayerPlacement) -> np.ndarray:
    """``[E, D]`` whether each node stores (a share of) each expert."""
    return stored_shares(lp) > 0


def room_after_bytes(plan: Placement, model: MoEModel, hw: Hardware) -> np.ndarray:
    """``[D]`` bytes of routed-expert weights each node can still store beside ``plan`` (inf when the
    hardware sets no DRAM capacity)."""
    return node_room_bytes(model, hw) - plan.memory_bytes_per_node(model.expert_weight_bytes())


def prebroadcast_count(model: MoEModel, hw: Hardware, batch: float, options: EvalOptions,
                       alpha_s: float = 1e-7) -> int:
    """HD-MoE's k: the most experts whose broadcast fits behind one layer's non-MoE time, from its
    alpha-beta bound t(k) = S*beta*k + 2*alpha*sqrt(D) + 2*sqrt(2*sqrt(D)*beta*k*alpha*S)."""
    expect_instance("model", model, MoEModel, "use hm.get_model(name)")
    expect_instance("hw", hw, Hardware, "use hm.make_hardware(point, mesh)")
    expect_instance("options", options, EvalOptions, "give hm.EvalOptions()")
    alpha_s = check_real("alpha_s", alpha_s, minimum=0.0)
    batch = check_batch(batch)
    S = UnitCosts.of(model, options.mode).weight_bytes
    beta = 1.0 / hw.min_link_bw
    sd = math.sqrt(hw.num_nodes)
    t_inf = hide_time_s(model, hw, batch, options.mode, options.context_len)
    k = 0
    while k < model.num_experts:
        kk = k + 1
        t = S * beta * kk + 2 * alpha_s * sd + 2 * math.sqrt(2 * sd * beta * kk * alpha_s * S)
        if t >= t_inf:
            break
        k = kk
    return k


class HdmoePrebroadcast(Policy):
    """HD-MoE's dynamic stage (§5 of the reconstruction): per layer and batch, the k predicted-hottest
    experts on the most loaded nodes are broadcast to every node for this batch only (k from the
    alpha-beta model, so the broadcast hides behind the layer's non-MoE time and costs no time; its
    bytes count as moved, every batch; an explicit ``k`` beyond it is charged what does not hide), and
    their tokens are spread to level the node loads (one load vector kept across experts: the fix of
    the paper code's bug). Prediction = the previous batch's counts (the traces carry no next-layer
    gate predictions). Its water-filled split is the copies' token fractions; at serving time the
    evaluator's replica rule applies to its copies as to every policy's (the replay's ``balanced``
    re-levels the split on the batch served, which favours this policy over the paper's own). Under a
    DRAM capacity the broadcast copies count as stored, as every copy of a scored plan does, so an
    expert goes only to nodes with room for it."""

    name = "hdmoe-prebroadcast"

    def __init__(self, plan, model, hw, batch, options=None, k: int | None = None) -> None:
        super().__init__(plan, model, hw, batch, options)
        E = model.num_experts
        self.k = prebroadcast_count(model, hw, batch, self.options) if k is None else \
            expect_int("k", k, minimum=0, maximum=E,
                       why=f"experts broadcast per layer and batch; {model.name} has {E}, "
                           "0 never broadcasts, None: from the alpha-beta model")
        self.pred_: np.ndarray | None = None
        self.room_bytes_ = room_after_bytes(plan, model, hw)  # [D] free after the plan (inf: no limit)
        self.hide_s = hide_time_s(model, hw, batch, self.options.mode, self.options.context_len)

    def observe(self, counts: np.ndarray, workload=None) -> None:
        self.pred_ = self.counts(counts)

    def decide(self, j: int) -> Decision:
        if self.pred_ is None or self.k == 0:
            return Decision(self.plan)
        t0 = time.perf_counter()
        phi = UnitCosts.of(self.model, self.options.mode).flops_per_token
        D = self.hw.num_nodes
        W = self.model.expert_weight_bytes()
        room = self.room_bytes_.copy()  # the copies of every layer are stored together in the plan scored
        layers = []
        broadcasts = 0
        for li, lp in enumerate(self.plan.layers):
            n = self.pred_[li]
            es = lp.expert_shares()  # [E, D] token shares
            stored = stored_shares(lp)  # [E, D] expert weights each node stores
            load = (n[:, None] * es).sum(axis=0) * phi
            spread: dict[int, np.ndarray] = {}
            for _ in range(self.k):
                cong = int(np.argmax(load))
                prio = es[:, cong] * n
                prio[list(spread)] = -1
                i = int(np.argmax(prio))
                if prio[i] <= 0:
                    break
                # under a DRAM capacity, only nodes with room for a whole copy (what the expert's own
                # copies store there are freed first) receive it
                fits = room + W * stored[i] >= W
                if not fits.any():
                    break
                load = load - n[i] * es[i] * phi
                x = np.zeros(D)
                x[fits] = water_fill(load[fits], n[i] * phi)  # one load vector across experts
                spread[i] = x
                load = load + x
                if np.isfinite(room).any():
                    room = room + W * stored[i] - W * (x / max(x.sum(), 1e-300) > 1e-12)
            if not spread:
                layers.append(lp)
                continue
            broadcasts += len(spread)
            keep = ~np.isin(lp.expert_of, list(spread))
            shares, eo, fr = [lp.shares[keep]], [lp.expert_of[keep]], [lp.token_fraction[keep]]
            for i, x in spread.items():
                tot = x.sum()
                q = x / tot if tot > 0 else np.full(D, 1.0 / D)
                use = np.flatnonzero(q > 1e-12)
                shares.append(np.eye(D)[use])
                eo.append(np.full(len(use), i))
                fr.append(q[use] / q[use].sum())
            layers.append(LayerPlacement(np.vstack(shares), np.concatenate(eo), np.concatenate(fr),
                                         self.model.num_experts))
        dt = (time.perf_counter() - t0) / len(self.plan.layers)
        new = Placement(tuple(layers), "hdmoe-prebroadcast")
        # the broadcast weights do move, every batch; their time is charged where it does not hide
        # behind the layer's non-MoE time (never with the alpha-beta k, which is chosen to hide)
        mig, moved = 0.0, 0.0
        S = UnitCosts.of(self.model, self.options.mode).weight_bytes  # bytes on the wire per expert copy
        for old, nl in zip(self.plan.layers, new.layers, strict=True):
            per_node = arriving_bytes(old, nl, S)
            moved += per_node.sum()
            mig += unhidden_move_s(per_node, self.hw, self.hide_s)
        return Decision(new, mig, moved, broadcasts, dt)


def arriving_shares(old: LayerPlacement, new: LayerPlacement) -> np.ndarray:
    """``[E, D]`` the share of each expert's weights each node must receive to go from ``old`` to
    ``new``: what it stores in ``new`` beyond what it stored in ``old`` (a node that held a shard of
    an expert and now holds all of it receives the rest)."""
    return np.clip(stored_shares(new) - stored_shares(old), 0.0, None)


def arriving_bytes(old: LayerPlacement, new: LayerPlacement, expert_bytes: float) -> np.ndarray:
    """``[D]`` bytes of weights each node must receive to go from ``old`` to ``new``
    (:func:`arriving_shares` summed over the experts)."""
    return arriving_shares(old, new).sum(axis=0) * expert_bytes


def unhidden_move_s(per_node_bytes: np.ndarray, hw: Hardware, hide_s: float) -> float:
    """Seconds of one layer's weight moves (``per_node_bytes [D]`` arriving at each node) that do not
    hide behind its non-MoE time ``hide_s``: the busiest receiver at the slowest link, less ``hide_s``."""
    return max(0.0, float(per_node_bytes.max(initial=0.0)) / hw.min_link_bw - hide_s)


def max_extra_replicas(num_experts: int, num_nodes: int) -> int:
    """The most extra copies an EPLB re-plan may add: its ``max(E, D) + extra`` slots then reach
    ``E * D``, every node holding every expert; more would only stack copies of one expert on a node."""
    return max(0, num_experts * num_nodes - max(num_experts, num_nodes))


def _keep_in_place(old: LayerPlacement, new: LayerPlacement) -> LayerPlacement:
    """``new`` with its nodes relabelled (a permutation) so that the experts it stores where ``old``
    already stores them are as many as possible: an assignment problem over the nodes."""
    overlap = _held(new).T.astype(float) @ _held(old).astype(float)  # [new node, old node]
    rows, cols = linear_sum_assignment(-overlap)
    perm = np.empty(new.num_nodes, dtype=np.int64)
    perm[rows] = cols  # new node p goes to old node perm[p]
    shares = np.zeros_like(new.shares)
    shares[:, perm] = new.shares
    return LayerPlacement(shares, new.expert_of, new.token_fraction, new.num_experts)


class EplbPeriodic(Policy):
    """EPLB-style: every ``period`` batches, re-plan from a sliding window of counts with a replica
    budget, charging the weights that move (bytes into each node at the slowest link, minus what
    hides behind each layer's non-MoE time). Under a DRAM capacity the replica budget is cut to what
    fits every node (an explicit ``extra_replicas`` that cannot fit is refused), and when not even one
    copy per expert fits EPLB's equal slots it keeps the plan."""

    name = "eplb-periodic"

    def __init__(self, plan, model, hw, batch, options=None, period: int = 20, window: int = 20,
                 extra_replicas: int | None = None) -> None:
        super().__init__(plan, model, hw, batch, options)
        self.period = expect_int("period", period, minimum=1, why="batches between re-plans")
        self.window = expect_int("window", window, minimum=1, why="past batches whose counts are averaged")
        E, D = model.num_experts, hw.num_nodes
        most = max_extra_replicas(E, D)
        # under a DRAM capacity, a re-plan stores (max(E, D) + extra) / D copies per node in every layer
        room = expert_room_bytes(model, hw)
        per_node = None if room is None else math.floor(room / (plan.num_layers * model.expert_weight_bytes()))
        fit = None if per_node is None else per_node * D - max(E, D)  # most extra copies that fit (< 0: none)
        self.replans = fit is None or fit >= 0
        if extra_replicas is None:
            self.extra = min(D, most) if fit is None else max(0, min(D, most, fit))
        else:
            self.extra = expect_int(
                "extra_replicas", extra_replicas, minimum=0, maximum=most,
                why=f"copies beyond one per expert; {most} fill every one of the {D} nodes with all {E} experts")
            if fit is not None and self.extra > max(fit, 0):
                raise InputError("extra_replicas", f"{self.extra} copies do not fit the nodes' DRAM",
                                 f"give at most {max(fit, 0)}, or raise the capacity")
        self.history: list[np.ndarray] = []
        self.current = plan
        self.hide_s = hide_time_s(model, hw, batch, self.options.mode, self.options.context_len)

    def observe(self, counts: np.ndarray, workload=None) -> None:
        self.history.append(self.counts(counts))
        self.history = self.history[-self.window:]

    def decide(self, j: int) -> Decision:
        if j == 0 or j % self.period or not self.history or not self.replans:
            return Decision(self.current)
        t0 = time.perf_counter()
        f = np.mean(self.history, axis=0) / self.batch
        new = eplb_placement(self.model, self.hw, f, extra_replicas=self.extra)
        # EPLB's devices are interchangeable: put each new pack on the node whose current experts it
        # shares most, so that only experts that really change place move
        new = Placement(tuple(_keep_in_place(old, nl) for old, nl in zip(self.current.layers, new.layers,
                                                                            strict=True)), new.strategy, new.meta)
        if not fits_capacity(new, self.model, self.hw):  # only by rounding at an exactly full node
            return Decision(self.current)
        dt = (time.perf_counter() - t0) / len(self.plan.layers)
        W = UnitCosts.of(self.model, self.options.mode).weight_bytes
        mig, moved, acts = 0.0, 0.0, 0
        for old, nl in zip(self.current.layers, new.layers, strict=True):
            arrive = arriving_shares(old, nl)
            per_node = arrive.sum(axis=0) * W
            moved += per_node.sum()
            acts += int((arrive > _SHARE_TOL).sum())  # (expert, node) pairs that receive weights
            mig += unhidden_move_s(per_node, self.hw, self.hide_s)
        self.current = new
        return Decision(new, mig, moved, acts, dt)


class OraclePolicy(Policy):
    """The ceiling of the offline model: a block-MILP solve on each batch's true counts, no move cost
    (small instances only: one solve per layer per batch). The MILP reads weights with the expected
    batch's probability, the observed batch in full, so at small batches it can lose to static."""

    name = "oracle"

    def __init__(self, plan, model, hw, batch, options=None, time_limit_s: float = 0.5,
                 backend: str = "cpsat") -> None:
        super().__init__(plan, model, hw, batch, options)
        self.time_limit_s = check_real("time_limit_s", time_limit_s, positive=True, maximum=MAX_TIME_LIMIT_S)
        self.backend = check_choice("backend", backend, tuple(BACKENDS))
        if not BACKENDS[backend].available():
            raise InputError("backend", f"{backend} is not installed", f"pip install 'hdmoe_milp[{backend}]'")
        self.next_workload = None

    def peek(self, workload) -> None:
        """The replay shows the oracle the batch it is about to serve."""
        self.next_workload = workload

    def decide(self, j: int) -> Decision:

        wl = self.next_workload
        if wl is None:
            return Decision(self.plan)
        t0 = time.perf_counter()
        layers = []
        counts = wl.expert_loads()
        for li, lr in enumerate(wl.layers):
            uniq, inv = np.unique(np.sort(lr.experts, axis=1), axis=0, return_inverse=True)
            fg = np.bincount(inv.ravel(), weights=lr.weight, minlength=len(uniq)) / lr.weight.sum()
            r = solve_layer(self.model, self.hw, counts[li] / self.batch, self.batch, backend=self.backend,
                            params=SolveParams(time_limit_s=self.time_limit_s),
                            options=MilpOptions(delivery=self.options.resolved_delivery), layer=li,
                            coactivation=(uniq, fg))
            best = r.placement
            layers.append(best)
        dt = (time.perf_counter() - t0) / len(layers)
        return Decision(Placement(tuple(layers), "oracle"), 0.0, 0.0, 0, dt)


_BUILT = ("self", "plan", "model", "hw", "batch", "options")  # what make_policy itself passes


def make_policy(name: str, plan: Placement, model: MoEModel, hw: Hardware, batch: float, /,
                options: EvalOptions | None = None, **kw) -> Policy:
    """The policy ``name`` (one of :data:`POLICIES`) with its settings ``kw``, every one checked here,
    before any batch: greedy ``config`` (a RebalancerConfig); hdmoe-prebroadcast ``k`` (0..experts);
    eplb-periodic ``period`` and ``window`` (>= 1 batch), ``extra_replicas`` (0..E*D - max(E, D));
    oracle ``time_limit_s``, ``backend``. A keyword the policy does not have is refused by name."""
    if not isinstance(name, str):
        raise InputError("policy", f"must be a policy name, got {name!r:.60}", "allowed: " + ", ".join(POLICIES))
    check_choice("policy", name, POLICIES)
    cls = {"static": StaticPolicy, "greedy": GreedyPolicy, "hdmoe-prebroadcast": HdmoePrebroadcast,
           "eplb-periodic": EplbPeriodic, "oracle": OraclePolicy}[name]
    check_parts(plan, model, hw, options)
    check_batch(batch)
    settings = [p for p in inspect.signature(cls.__init__).parameters if p not in _BUILT]
    for key in sorted(kw):
        if key not in settings:
            raise InputError(key, f"is not a setting of policy {name}",
                             f"{name} takes " + (", ".join(settings) if settings else "no settings"))
    return cls(plan, model, hw, batch, options, **kw)
