"""The shared latency evaluator: every strategy in the package is scored here.

The model is written out in ``formulations/evaluator.md``. In short, per MoE layer:

- compute: max over nodes of the node's time, ``max(FLOPs / compute, weight bytes read / DRAM bw)``
  (``paper`` mode: FLOPs only, 2·h·IS per token per expert);
- communication: every flow (a token or a group of identical tokens) sends its hidden vector from its
  home node to every node holding a shard of one of its experts (dispatch) and gets the results back
  (combine), over XY routes. Per directed link the bytes are summed; a phase takes
  ``max_link bytes / bw + hop_latency * max hops``;
- non-MoE terms (attention, shared experts, dense layers) are added per layer, the same for every
  strategy.

Everything is vectorised over flows; link loads use prefix sums along mesh rows and columns
(XY routes from one home form a tree whose links are determined by per-row/column extents). With
spread homes on meshes up to 8x8 the loads of all layers come from one
:func:`~hdmoe_milp.costs.spread_link_loads` call; otherwise :func:`~hdmoe_milp.costs.link_loads` runs per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .costs import (
    MODES,
    UnitCosts,
    activation_probability,
    check_capacity,
    fast_links_supported,
    link_loads,
    merge_flows,
    non_moe_time_s,
    pack_dest,
    phase_time_s,
    roofline_s,
    spread_link_loads,
)
from .errors import MAX_CONTEXT_LEN, InputError, check_choice, check_seed, freeze_arrays
from .hardware import Hardware, Mesh
from .moe import MoEModel
from .placement import LayerPlacement, Placement
from .replica_rules import REPLICA_RULES, assign_by_distance, assign_copies, split_at_quotas
from .workload import Workload

DELIVERIES = ("tree", "unicast")
HOMES = ("spread", "holder", "random")
COALESCE = ("node", "block", "expert")


@dataclass(frozen=True)
class EvalOptions:
    """Evaluator settings, applied to every strategy alike.

    ``mode``: ``mesh`` (physically consistent, default) or ``paper`` (HD-MoE's constants).
    ``delivery``: ``tree`` (multicast dispatch, in-network reduction on combine) or ``unicast``;
    None = ``tree`` in mesh mode, ``unicast`` in paper mode.
    ``home``: where a token's vector lives: ``spread`` (evenly over all nodes), ``holder`` (a node
    holding one of its experts, chosen at random: the paper's aggregator) or ``random`` (a uniformly
    random node); None = ``spread`` in mesh mode, ``holder`` in paper mode.
    ``coalesce``: how a token's messages to its experts merge. ``node`` (default): one message per
    token over the union of the nodes holding any of its experts (every node gets it once);
    ``block``: one message per distinct holder set (experts on identical node sets share it);
    ``expert``: one message per (token, expert). Traffic: node <= block <= expert. The offline MILP
    models ``block`` exactly for the co-activation groups it tracks and ``expert`` for the rest.
    ``replica_rule``: which copy of a replicated expert serves a token: ``fraction`` (default: the
    plan's token fractions), ``affinity`` (the same quotas, tokens to copies on nodes they already
    touch), ``balanced`` (quotas levelled on this batch's loads, then as affinity: the online stage's
    runtime rule) or ``nearest`` (no quotas), see ``hdmoe_milp/replica_rules.py``.
    ``context_len``: KV-cache length in tokens for the attention term. ``seed``: for random homes.
    """

    mode: str = "mesh"
    delivery: str | None = None
    home: str | None = None
    seed: int = 0
    context_len: int = 1024
    coalesce: str = "node"
    replica_rule: str = "fraction"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        if self.delivery is not None:
            check_choice("delivery", self.delivery, DELIVERIES)
        if self.home is not None:
            check_choice("home", self.home, HOMES)
        check_choice("coalesce", self.coalesce, COALESCE)
        check_choice("replica_rule", self.replica_rule, REPLICA_RULES)
        if isinstance(self.context_len, bool) or not isinstance(self.context_len, (int, np.integer)) \
                or not 0 <= self.context_len <= MAX_CONTEXT_LEN:
            raise InputError("context_len", f"must be a whole number of tokens in 0 .. {MAX_CONTEXT_LEN:.0e}, "
                             f"got {self.context_len!r}")
        object.__setattr__(self, "seed", check_seed(self.seed))  # as Problem, evaluate and replay take it

    @property
    def resolved_delivery(self) -> str:
        return self.delivery or ("tree" if self.mode == "mesh" else "unicast")

    @property
    def resolved_home(self) -> str:
        return self.home or ("spread" if self.mode == "mesh" else "holder")


@dataclass(frozen=True)
class Evaluation:
    """Latency of one placement on one batch. Times in seconds, bytes in bytes.

    Per-layer arrays: ``compute_s``, ``dispatch_s``, ``combine_s`` ``[L]``; ``node_time_s``,
    ``node_flops`` ``[L, D]``; ``link_bytes_dispatch``, ``link_bytes_combine`` ``[L, num_links]``.
    ``non_moe_s`` is the total of the non-MoE terms over all layers.
    """

    compute_s: np.ndarray
    dispatch_s: np.ndarray
    combine_s: np.ndarray
    node_time_s: np.ndarray
    node_flops: np.ndarray
    link_bytes_dispatch: np.ndarray
    link_bytes_combine: np.ndarray
    non_moe_s: float
    batch_size: float
    mode: str
    strategy: str

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def __repr__(self) -> str:
        return (f"Evaluation({self.strategy!r}: TBT {self.tbt_us:.3f} us, {len(self.compute_s)} layers, "
                f"batch {self.batch_size:g}, mode {self.mode})")

    @property
    def comm_s(self) -> np.ndarray:
        return self.dispatch_s + self.combine_s

    @property
    def layer_s(self) -> np.ndarray:
        return self.compute_s + self.comm_s

    @property
    def moe_compute_s(self) -> float:
        return float(self.compute_s.sum())

    @property
    def moe_comm_s(self) -> float:
        return float(self.comm_s.sum())

    @property
    def tbt_s(self) -> float:
        """Time between tokens: all MoE layers plus the non-MoE terms."""
        return float(self.layer_s.sum() + self.non_moe_s)

    @property
    def tbt_us(self) -> float:
        return self.tbt_s * 1e6

    def summary(self) -> dict[str, Any]:
        """Headline numbers in microseconds (JSON-ready)."""
        return {
            "strategy": self.strategy,
            "mode": self.mode,
            "batch": self.batch_size,
            "tbt_us": self.tbt_us,
            "moe_compute_us": self.moe_compute_s * 1e6,
            "moe_comm_us": self.moe_comm_s * 1e6,
            "non_moe_us": self.non_moe_s * 1e6,
            "max_node_imbalance": float(
                np.max(self.node_time_s.max(axis=1) / np.maximum(self.node_time_s.mean(axis=1), 1e-300))
            ),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per MoE layer, times in us: ``compute_us``, ``dispatch_us``, ``combine_us``,
        ``layer_us`` (their sum), ``node_max_us`` / ``node_mean_us`` (node compute times),
        ``link_max_mb`` (busiest link, dispatch + combine, MB). The non-MoE total is not per layer:
        it is in ``attrs`` with the strategy, mode, batch and TBT."""
        df = pd.DataFrame({
            "layer": np.arange(len(self.compute_s)),
            "compute_us": self.compute_s * 1e6,
            "dispatch_us": self.dispatch_s * 1e6,
            "combine_us": self.combine_s * 1e6,
            "layer_us": self.layer_s * 1e6,
            "node_max_us": self.node_time_s.max(axis=1) * 1e6,
            "node_mean_us": self.node_time_s.mean(axis=1) * 1e6,
            "link_max_mb": (self.link_bytes_dispatch + self.link_bytes_combine).max(axis=1, initial=0.0) / 1e6,
        })
        df.attrs.update(strategy=self.strategy, mode=self.mode, batch=float(self.batch_size),
                        non_moe_us=self.non_moe_s * 1e6, tbt_us=self.tbt_us)
        return df

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`summary` plus ``per_layer`` (:meth:`per_layer`), times in us."""
        return {**self.summary(), "per_layer": self.per_layer()}

    def per_layer(self) -> dict[str, list[float]]:
        """Per MoE layer, in us: ``compute_us``, ``dispatch_us``, ``combine_us`` (lists of length L)."""
        return {
            "compute_us": (self.compute_s * 1e6).tolist(),
            "dispatch_us": (self.dispatch_s * 1e6).tolist(),
            "combine_us": (self.combine_s * 1e6).tolist(),
        }


# --- per-layer pieces -------------------------------------------------------------------------


def _is_full_tp(lp: LayerPlacement) -> bool:
    return not lp.is_replicated and np.allclose(lp.shares, 1.0 / lp.num_nodes)


def _homes(lp: LayerPlacement, copies: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray | None:
    F, k = copies.shape
    if how == "spread":
        return None
    if how == "random":
        return rng.integers(0, lp.num_nodes, size=F)
    first_holder = np.argmax(lp.shares > 0, axis=1)
    pick = copies[np.arange(F), rng.integers(0, k, size=F)]
    return first_holder[pick]


def _check_compatible(placement: Placement, model: MoEModel, hw: Hardware, wl: Workload) -> None:
    if placement.num_nodes != hw.num_nodes:
        raise InputError(
            "placement", f"is for {placement.num_nodes} nodes but the mesh {hw.mesh.name} has {hw.num_nodes}",
            "build the placement for this mesh",
        )
    if placement.num_experts != model.num_experts or wl.num_experts != model.num_experts:
        raise InputError(
            "placement/workload", f"expert counts disagree: model {model.num_experts}, placement "
            f"{placement.num_experts}, workload {wl.num_experts}",
        )
    if wl.top_k != model.top_k:
        raise InputError("workload.top_k", f"is {wl.top_k} but {model.name} routes to top-{model.top_k}")
    if not (placement.num_layers == wl.num_layers == model.moe_layers):
        raise InputError(
            "layers", f"placement has {placement.num_layers}, workload {wl.num_layers}, model {model.name} "
            f"{model.moe_layers} MoE layers", "use a trace and plan built for this model",
        )


def evaluate(
    placement: Placement,
    model: MoEModel,
    hardware: Hardware,
    workload: Workload,
    options: EvalOptions | None = None,
) -> Evaluation:
    """Score ``placement`` on ``workload`` (see the module docstring and formulations/evaluator.md)."""
    return _evaluate(placement, model, hardware, workload, options or EvalOptions(), fast=True)


def _evaluate(
    placement: Placement, model: MoEModel, hardware: Hardware, workload: Workload, opts: EvalOptions, fast: bool
) -> Evaluation:
    """:func:`evaluate`; ``fast``: with spread homes on a mesh of at most 8x8, the link loads of all
    layers come from one :func:`~hdmoe_milp.costs.spread_link_loads` call instead of
    :func:`~hdmoe_milp.costs.link_loads` per layer (the same numbers; False is the reference)."""
    _check_compatible(placement, model, hardware, workload)
    check_capacity(placement, model, hardware)
    mesh = hardware.mesh
    D = hardware.num_nodes
    B = workload.batch_size
    paper = opts.mode == "paper"
    tree = opts.resolved_delivery == "tree"
    home_rule = opts.resolved_home
    fast = fast and home_rule == "spread" and fast_links_supported(mesh)
    rng = np.random.default_rng(opts.seed)
    h = model.hidden
    unit = UnitCosts.of(model, opts.mode)
    flops_tok, vec_bytes, w_bytes = unit.flops_per_token, unit.vector_bytes, unit.weight_bytes
    bw = hardware.link_bw
    hop_lat = hardware.hop_latency_s

    nL = placement.num_layers
    disp_t = np.zeros(nL)
    comb_t = np.zeros(nL)
    node_flops = np.zeros((nL, D))
    ld = np.zeros((nL, mesh.num_links))
    lc = np.zeros((nL, mesh.num_links))
    read_bytes = np.zeros((nL, D))
    full_tp = np.zeros(nL, dtype=bool)
    row_masks: list[np.ndarray] = []  # fast path: per layer [messages] uint64 destination masks, weights
    col_masks: list[np.ndarray] = []
    msg_weight: list[np.ndarray] = []
    for li, (lp, lr) in enumerate(zip(placement.layers, workload.layers, strict=True)):
        flows, flow_w = lr.experts, lr.weight
        if opts.replica_rule != "fraction":
            floor = None
            if not paper:  # tokens a node computes within its weight-read time (every used copy read)
                used = np.bincount(flows.ravel(), minlength=lp.num_experts)[lp.expert_of] > 0
                read_s = w_bytes / hardware.dram_bw_bytes_per_s * (used @ lp.shares)
                floor = read_s * hardware.compute_flops / flops_tok
            copies = assign_by_distance(lp, flows, flow_w, mesh.distance, opts.replica_rule, floor)
        else:
            if workload.kind == "expected":  # group flows of many tokens: cut them where the copies' shares end
                flows, flow_w = split_at_quotas(lp, flows, flow_w)
            copies = assign_copies(lp, flows, flow_w)
        n_copy = np.bincount(copies.ravel(), weights=np.repeat(flow_w, copies.shape[1]), minlength=lp.num_copies)
        node_flops[li] = flops_tok * (n_copy @ lp.shares)
        if not paper:  # HD-MoE counts FLOPs only
            active = (n_copy > 0).astype(float) if workload.kind == "observed" else activation_probability(n_copy, B)
            read_bytes[li] = w_bytes * (active @ lp.shares)
        full_tp[li] = paper and _is_full_tp(lp)

        holders = lp.shares > 0
        weight = flow_w
        if fast and opts.coalesce == "node":  # a token's message reaches every holder of its copies
            _add_messages(mesh, holders, copies, weight * vec_bytes, tree, row_masks, col_masks, msg_weight)
            continue
        home = _homes(lp, copies, home_rule, rng)
        if opts.coalesce == "node":
            dest = holders[copies].any(axis=1)  # [F, D]
        else:  # one message per (token, expert), or per (token, distinct holder set)
            keep = np.ones(copies.shape, dtype=bool)
            if opts.coalesce == "block":
                _, set_id = np.unique(holders, axis=0, return_inverse=True)
                ids = np.sort(set_id.ravel()[copies], axis=1)
                order = np.argsort(set_id.ravel()[copies], axis=1, kind="stable")
                dup = np.zeros(copies.shape, dtype=bool)
                dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
                np.put_along_axis(keep, order, ~dup, axis=1)
            fi, ji = np.nonzero(keep)
            if fast:
                _add_messages(mesh, holders, copies[fi, ji, None], weight[fi] * vec_bytes, tree, row_masks,
                              col_masks, msg_weight)
                continue
            dest = holders[copies[fi, ji]]
            weight = weight[fi]
            home = None if home is None else home[fi]
        if home is None:
            dest, weight = merge_flows(dest, weight)
        d_load, c_load, hops = link_loads(mesh, dest, weight * vec_bytes, home, tree)
        ld[li], lc[li] = d_load, c_load
        disp_t[li] = phase_time_s(d_load, bw, hop_lat, hops)
        comb_t[li] = phase_time_s(c_load, bw, hop_lat, hops)

    node_time = node_flops / hardware.compute_flops if paper else roofline_s(node_flops, read_bytes, hardware)
    compute = node_time.max(axis=1)
    if fast:
        offsets = np.r_[0, np.cumsum([len(w) for w in msg_weight])]
        ld[:], lc[:], hops = spread_link_loads(mesh, np.concatenate(row_masks),
                                               np.concatenate(col_masks) if tree else None,
                                               np.concatenate(msg_weight), offsets, tree)
        disp_t[:] = phase_time_s(ld, bw, hop_lat, hops)
        comb_t[:] = phase_time_s(lc, bw, hop_lat, hops)
    # HD-MoE charges TP its ring all-reduce: 4 bytes/element, 4*B*h/BW per phase.
    disp_t[full_tp] = comb_t[full_tp] = 4.0 * B * h / hardware.min_link_bw

    return Evaluation(
        compute_s=compute,
        dispatch_s=disp_t,
        combine_s=comb_t,
        node_time_s=node_time,
        node_flops=node_flops,
        link_bytes_dispatch=ld,
        link_bytes_combine=lc,
        non_moe_s=non_moe_time_s(model, hardware, B, opts.mode, opts.context_len),
        batch_size=B,
        mode=opts.mode,
        strategy=placement.strategy,
    )


def _add_messages(mesh: Mesh, holders: np.ndarray, copies: np.ndarray, weight: np.ndarray, tree: bool,
                  row_masks: list, col_masks: list, weights: list) -> None:
    """Append one layer's messages for :func:`spread_link_loads`: message i goes to every holder of
    the copies ``copies[i, :]`` (``holders [copies, D]`` bool) with ``weight[i]`` bytes."""
    row_bits, col_bits = pack_dest(mesh, holders)
    row_masks.append(_or_rows(row_bits[copies]))
    if tree:
        col_masks.append(_or_rows(col_bits[copies]))
    weights.append(weight)


def _or_rows(m: np.ndarray) -> np.ndarray:
    """Bitwise OR along the last axis of ``m [F, k]`` (uint64)."""
    if m.shape[1] == 0:
        return np.zeros(m.shape[0], dtype=np.uint64)
    out = m[:, 0].copy()
    for j in range(1, m.shape[1]):
        out |= m[:, j]
    return out
