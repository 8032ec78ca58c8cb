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
(XY routes from one home form a tree whose links are determined by per-row/column extents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .dispatch import DISPATCH, assign_by_distance, assign_copies
from .errors import InputError, check_choice
from .hardware import Hardware, Mesh
from .models import MoEModel
from .placement import LayerPlacement, Placement
from .workload import Workload

MODES = ("mesh", "paper")
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
    ``dispatch``: which copy of a replicated expert serves a token: ``fraction`` (default: the
    plan's token fractions), ``affinity`` (the same quotas, tokens to copies on nodes they already
    touch), ``balanced`` (quotas levelled on this batch's loads, then as affinity: the online stage's
    runtime rule) or ``nearest`` (no quotas), see ``hdmoe_milp/dispatch.py``.
    ``context_len``: KV-cache length in tokens for the attention term. ``seed``: for random homes.
    """

    mode: str = "mesh"
    delivery: str | None = None
    home: str | None = None
    seed: int = 0
    context_len: int = 1024
    coalesce: str = "node"
    dispatch: str = "fraction"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        if self.delivery is not None:
            check_choice("delivery", self.delivery, DELIVERIES)
        if self.home is not None:
            check_choice("home", self.home, HOMES)
        check_choice("coalesce", self.coalesce, COALESCE)
        check_choice("dispatch", self.dispatch, DISPATCH)
        if self.context_len < 0:
            raise InputError("context_len", f"must be >= 0, got {self.context_len}")

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

    def per_layer(self) -> dict[str, list[float]]:
        return {
            "compute_us": (self.compute_s * 1e6).tolist(),
            "dispatch_us": (self.dispatch_s * 1e6).tolist(),
            "combine_us": (self.combine_s * 1e6).tolist(),
        }


# --- routing of flows over the mesh -----------------------------------------------------------


def _spread_counts(mesh: Mesh) -> dict[str, np.ndarray]:
    """Number of home nodes whose XY tree uses each link position, when homes cover every node."""
    R, C = mesh.rows, mesh.cols
    c = np.arange(C - 1)
    r = np.arange(R - 1)
    return {
        "d_east": (c + 1.0), "d_west": (C - 1.0 - c),
        "d_south": (r + 1.0) * C, "d_north": (R - 1.0 - r) * C,
        "c_west": R * (c + 1.0), "c_east": R * (C - 1.0 - c),
        "c_north": (r + 1.0), "c_south": (R - 1.0 - r),
    }


def link_loads(
    mesh: Mesh, dest: np.ndarray, weight: np.ndarray, home: np.ndarray | None, tree: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-directed-link load of dispatch (home -> dests) and combine (dests -> home) under XY routing.

    ``dest [F, D]``: 1 where flow f must reach node d. ``weight [F]``: load units per flow (bytes).
    ``home [F]`` node ids, or None for homes spread evenly over all nodes (each flow's weight split
    1/D per home). ``tree``: a link carries a flow once however many destinations lie beyond it
    (multicast out, reduction back); else once per destination (unicast).
    Returns ``(dispatch [num_links], combine [num_links], max_hops)``.
    """
    R, C = mesh.rows, mesh.cols
    F = dest.shape[0]
    nl = mesh.num_links
    if F == 0:
        return np.zeros(nl), np.zeros(nl), 0
    m = dest.reshape(F, R, C).astype(np.float64)
    w = np.asarray(weight, dtype=np.float64)
    used = (lambda v: (v > 0.5).astype(np.float64)) if tree else (lambda v: v)

    colcnt = m.sum(axis=1)  # [F, C]
    rowcnt = m.sum(axis=2)  # [F, R]
    ccum = np.cumsum(colcnt, axis=1)
    rcum = np.cumsum(m, axis=1)
    hcum = np.cumsum(m, axis=2)
    rowcum = np.cumsum(rowcnt, axis=1)
    # Destinations beyond each link position (X first from home; Y along the destination's column).
    d_east = used(ccum[:, -1:] - ccum[:, :-1])  # [F, C-1] east of column c
    d_west = used(ccum[:, :-1])  # [F, C-1] at or west of column c
    d_south = used(rcum[:, -1:, :] - rcum[:, :-1, :])  # [F, R-1, C] below row r in column c
    d_north = used(rcum[:, :-1, :])
    c_west = used(hcum[:, :, -1:] - hcum[:, :, :-1])  # [F, R, C-1] east of c in row r, heading west
    c_east = used(hcum[:, :, :-1])
    c_north = used(rowcum[:, -1:] - rowcum[:, :-1])  # [F, R-1] rows below r, heading north on home column
    c_south = used(rowcum[:, :-1])

    if home is None:
        k = _spread_counts(mesh)
        wd = w / mesh.num_nodes
        de = np.tile((wd @ d_east) * k["d_east"], (R, 1))
        dw = np.tile((wd @ d_west) * k["d_west"], (R, 1))
        ds = np.einsum("f,frc->rc", wd, d_south) * k["d_south"][:, None]
        dn = np.einsum("f,frc->rc", wd, d_north) * k["d_north"][:, None]
        cw = np.einsum("f,frc->rc", wd, c_west) * k["c_west"][None, :]
        ce = np.einsum("f,frc->rc", wd, c_east) * k["c_east"][None, :]
        cn = np.tile(((wd @ c_north) * k["c_north"])[:, None], (1, C))
        cs = np.tile(((wd @ c_south) * k["c_south"])[:, None], (1, C))
        ecc = mesh.distance.max(axis=0)
        hops = int((dest * ecc[None, :]).max())
    else:
        home = np.asarray(home, dtype=np.int64)
        r0, c0 = np.divmod(home, C)
        ci = np.arange(C - 1)
        ri = np.arange(R - 1)
        one_r = np.zeros((F, R))
        one_r[np.arange(F), r0] = w
        one_c = np.zeros((F, C))
        one_c[np.arange(F), c0] = 1.0
        east_ok = ci[None, :] >= c0[:, None]  # [F, C-1]
        south_ok = ri[None, :] >= r0[:, None]  # [F, R-1]
        de = one_r.T @ (d_east * east_ok)
        dw = one_r.T @ (d_west * ~east_ok)
        ds = np.einsum("f,frc->rc", w, d_south * south_ok[:, :, None])
        dn = np.einsum("f,frc->rc", w, d_north * ~south_ok[:, :, None])
        cw = np.einsum("f,frc->rc", w, c_west * east_ok[:, None, :])
        ce = np.einsum("f,frc->rc", w, c_east * ~east_ok[:, None, :])
        cn = (w[:, None] * c_north * south_ok).T @ one_c
        cs = (w[:, None] * c_south * ~south_ok).T @ one_c
        hops = int((dest * mesh.distance[home]).max())
    dispatch = np.concatenate([de.ravel(), dw.ravel(), ds.ravel(), dn.ravel()])
    combine = np.concatenate([ce.ravel(), cw.ravel(), cs.ravel(), cn.ravel()])
    return dispatch, combine, hops


def _dedupe(dest: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge flows with identical destination sets (exact when homes are spread)."""
    packed = np.packbits(dest, axis=1, bitorder="little")
    if packed.shape[1] <= 8:
        pad = np.zeros((packed.shape[0], 8), dtype=np.uint8)
        pad[:, : packed.shape[1]] = packed
        keys = pad.view(np.uint64).ravel()
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    else:
        uniq, first, inv = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    return dest[first], np.bincount(inv.ravel(), weights=weight, minlength=len(first))


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


def non_moe_time_s(model: MoEModel, hw: Hardware, batch: float, opts: EvalOptions) -> float:
    """Attention, shared experts and dense layers, summed over layers (the same for every strategy)."""
    B, h, L, D = batch, model.hidden, opts.context_len, hw.num_nodes
    if opts.mode == "paper":
        IS = model.paper_intermediate or model.expert_intermediate
        E = model.num_experts
        attn = (4 * B * h * h + 2 * B * L * h) / (D * hw.compute_flops)
        mem = (2 * B * h * L + 4 * h * (B + h) + 2 * E * IS * h + B * (IS + h)) / (D * hw.dram_bw_bytes_per_s)
        return model.moe_layers * (attn + mem)
    wb, ab = model.weight_bytes, model.activation_bytes

    def roof(flops: float, nbytes: float) -> float:
        return max(flops / (D * hw.compute_flops), nbytes / (D * hw.dram_bw_bytes_per_s))

    attn_flops = 2 * (4 * B * h * h + 2 * B * L * h)
    attn_bytes = 4 * h * h * wb + 2 * B * L * h * ab
    sh_flops = 6 * h * model.shared_intermediate * model.shared_experts * B
    sh_bytes = 3 * h * model.shared_intermediate * model.shared_experts * wb
    dn_flops = 6 * h * model.dense_intermediate * B
    dn_bytes = 3 * h * model.dense_intermediate * wb
    return model.moe_layers * roof(attn_flops + sh_flops, attn_bytes + sh_bytes) + model.dense_layers * roof(
        attn_flops + dn_flops, attn_bytes + dn_bytes
    )


def check_capacity(placement: Placement, model: MoEModel, hw: Hardware) -> None:
    """Raise an InputError if any node must store more weights than its DRAM capacity."""
    cap = hw.dram_capacity_bytes
    if cap is None:
        return
    other = model.non_expert_weight_bytes() / hw.num_nodes
    need = placement.memory_bytes_per_node(model.expert_weight_bytes()) + other
    worst = int(np.argmax(need))
    if need[worst] > cap:
        raise InputError(
            "hardware.dram_capacity_bytes",
            f"node {worst} must hold {need[worst] / 1e9:.3f} GB of weights but its capacity is {cap / 1e9:.3f} GB",
            "raise the capacity, use a larger mesh, or a placement with fewer copies",
        )


def check_model_fits(model: MoEModel, hw: Hardware) -> None:
    """Raise an InputError if the whole model cannot fit in the mesh's total DRAM, whatever the placement."""
    cap = hw.dram_capacity_bytes
    if cap is None:
        return
    total = model.moe_layers * model.num_experts * model.expert_weight_bytes() + model.non_expert_weight_bytes()
    if total > cap * hw.num_nodes:
        raise InputError(
            "hardware.dram_capacity_bytes",
            f"{model.name} needs {total / 1e9:.2f} GB of weights; {hw.num_nodes} nodes x {cap / 1e9:.2f} GB "
            f"hold {cap * hw.num_nodes / 1e9:.2f} GB",
            f"give each node at least {total / hw.num_nodes / 1e9:.2f} GB or use a larger mesh",
        )


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
    opts = options or EvalOptions()
    _check_compatible(placement, model, hardware, workload)
    check_capacity(placement, model, hardware)
    mesh = hardware.mesh
    D = hardware.num_nodes
    B = workload.batch_size
    paper = opts.mode == "paper"
    tree = opts.resolved_delivery == "tree"
    home_rule = opts.resolved_home
    rng = np.random.default_rng(opts.seed)
    h = model.hidden
    if paper:
        flops_tok = 2.0 * h * (model.paper_intermediate or model.expert_intermediate)
        vec_bytes = 1.0 * h
    else:
        flops_tok = model.expert_flops_per_token()
        vec_bytes = h * model.activation_bytes
    w_bytes = model.expert_weight_bytes()
    bw = hardware.link_bw
    hop_lat = hardware.hop_latency_s

    nL = placement.num_layers
    compute = np.zeros(nL)
    disp_t = np.zeros(nL)
    comb_t = np.zeros(nL)
    node_time = np.zeros((nL, D))
    node_flops = np.zeros((nL, D))
    ld = np.zeros((nL, mesh.num_links))
    lc = np.zeros((nL, mesh.num_links))
    for li, (lp, lr) in enumerate(zip(placement.layers, workload.layers, strict=True)):
        if opts.dispatch != "fraction":
            floor = None
            if not paper:  # tokens a node computes within its weight-read time (every used copy read)
                used = np.bincount(lr.experts.ravel(), minlength=lp.num_experts)[lp.expert_of] > 0
                read_s = w_bytes / hardware.dram_bw_bytes_per_s * (used @ lp.shares)
                floor = read_s * hardware.compute_flops / flops_tok
            copies = assign_by_distance(lp, lr.experts, lr.weight, mesh.distance, opts.dispatch, floor)
        else:
            copies = assign_copies(lp, lr.experts, lr.weight)
        n_copy = np.bincount(copies.ravel(), weights=np.repeat(lr.weight, copies.shape[1]), minlength=lp.num_copies)
        flops = flops_tok * (n_copy @ lp.shares)
        t_node = flops / hardware.compute_flops
        if not paper:
            if workload.kind == "observed":
                active = (n_copy > 0).astype(float)
            else:
                p = np.clip(n_copy / B, 0.0, 1.0)
                active = 1.0 - (1.0 - p) ** B
            t_node = np.maximum(t_node, w_bytes * (active @ lp.shares) / hardware.dram_bw_bytes_per_s)
        node_flops[li] = flops
        node_time[li] = t_node
        compute[li] = t_node.max()

        holders = lp.shares > 0
        home = _homes(lp, copies, home_rule, rng)
        weight = lr.weight
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
            dest = holders[copies[fi, ji]]
            weight = weight[fi]
            home = None if home is None else home[fi]
        if home is None:
            dest, weight = _dedupe(dest, weight)
        d_load, c_load, hops = link_loads(mesh, dest, weight * vec_bytes, home, tree)
        ld[li], lc[li] = d_load, c_load
        if paper and _is_full_tp(lp):
            # HD-MoE charges TP its ring all-reduce: 4 bytes/element, 4*B*h/BW per phase.
            disp_t[li] = comb_t[li] = 4.0 * B * h / hardware.min_link_bw
        else:
            extra = hop_lat * hops
            disp_t[li] = (d_load / bw).max(initial=0.0) + extra
            comb_t[li] = (c_load / bw).max(initial=0.0) + extra

    return Evaluation(
        compute_s=compute,
        dispatch_s=disp_t,
        combine_s=comb_t,
        node_time_s=node_time,
        node_flops=node_flops,
        link_bytes_dispatch=ld,
        link_bytes_combine=lc,
        non_moe_s=non_moe_time_s(model, hardware, B, opts),
        batch_size=B,
        mode=opts.mode,
        strategy=placement.strategy,
    )
