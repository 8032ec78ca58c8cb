"""EPLB-style greedy placement (re-implemented from the description of DeepSeek's EPLB).

Three greedy steps per layer: (1) pack expert groups onto nodes by longest-processing-time with a
cardinality cap; (2) inside each node, give redundant slots one by one to the expert with the
largest load per replica; (3) pack the physical replicas onto the node's devices, again by LPT with
a cap. Mapped to the mesh: every mesh node is one "device", ``num_nodes`` device groups (default 1,
the global policy).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import LayerPlacement, Placement
from .common import check_freqs


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """LPT packing of ``weight [L, n]`` into ``num_packs`` packs of exactly n/num_packs items.

    Returns ``(pack [L, n], rank_in_pack [L, n])``.
    """
    L, n = weight.shape
    per_pack = n // num_packs
    pack = np.empty((L, n), dtype=np.int64)
    rank = np.empty((L, n), dtype=np.int64)
    if per_pack == 1:
        pack[:] = np.arange(n)
        rank[:] = 0
        return pack, rank
    for li in range(L):
        loads = np.zeros(num_packs)
        counts = np.zeros(num_packs, dtype=np.int64)
        for i in np.argsort(-weight[li], kind="stable"):
            p = int(np.argmin(np.where(counts < per_pack, loads, np.inf)))
            pack[li, i] = p
            rank[li, i] = counts[p]
            loads[p] += weight[li, i]
            counts[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill ``num_slots >= n`` slots: one per expert, then each extra slot to the expert with the
    largest load per replica. Returns ``(slot2expert [L, S], replica_rank [L, S], count [L, n])``."""
    L, n = weight.shape
    slot2e = np.zeros((L, num_slots), dtype=np.int64)
    rank = np.zeros((L, num_slots), dtype=np.int64)
    slot2e[:, :n] = np.arange(n)
    count = np.ones((L, n), dtype=np.int64)
    rows = np.arange(L)
    for s in range(n, num_slots):
        e = np.argmax(weight / count, axis=1)
        slot2e[:, s] = e
        rank[:, s] = count[rows, e]
        count[rows, e] += 1
    return slot2e, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's interface: ``weight [L, E]`` loads; returns ``(phy2log [L, P], log2phy [L, E, maxcnt],
    logcnt [L, E])``. Hierarchical when ``num_groups % num_nodes == 0``, else global."""
    w = np.asarray(weight, dtype=float)
    L, E = w.shape
    if num_replicas < E or num_replicas % num_gpus or num_gpus % num_nodes:
        raise InputError(
            "eplb", f"need num_replicas >= experts ({E}), a multiple of num_gpus ({num_gpus}), and num_gpus a "
            f"multiple of num_nodes ({num_nodes}); got num_replicas={num_replicas}",
        )
    if num_groups % num_nodes == 0 and E % num_groups == 0:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    maxcnt = int(logcnt.max())
    log2phy = np.full((L, E, maxcnt), -1, dtype=np.int64)
    rows = np.repeat(np.arange(L), num_replicas)
    log2phy[rows, phy2log.ravel(), rank.ravel()] = np.tile(np.arange(num_replicas), L)
    return phy2log, log2phy, logcnt


def _hierarchical(w: np.ndarray, P: int, G: int, N: int, M: int) -> tuple[np.ndarray, ...]:
    L, E = w.shape
    gsize = E // G
    # Step 1: groups -> nodes, then renumber experts node-locally ("mlog" ids).
    gpack, grank = balanced_packing(w.reshape(L, G, gsize).sum(-1), N)
    log2mlog = (((gpack * (G // N) + grank) * gsize)[:, :, None] + np.arange(gsize)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # Step 2: replicate inside each node.
    w_mlog = np.take_along_axis(w, mlog2log, axis=1).reshape(L * N, E // N)
    phy2mlog, phyrank, mlogcnt = replicate_experts(w_mlog, P // N)
    # Step 3: pack physical replicas onto the node's devices.
    per_phy = np.take_along_axis(w_mlog / mlogcnt, phy2mlog, axis=1)
    pack, prank = balanced_packing(per_phy, M // N)
    pphy2phy = _inverse(pack * (P // M) + prank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, N, -1) + (np.arange(N) * (E // N))[None, :, None]).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    rank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return phy2log, rank, logcnt


def eplb_placement(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0, extra_replicas: int = 0,
    num_groups: int = 1, num_device_groups: int = 1,
) -> Placement:
    """EPLB-style plan on the mesh: each node is a device with P/D slots, P = max(E, D) +
    ``extra_replicas`` rounded up to a multiple of D. A replicated expert's tokens are split evenly
    over its copies. ``seed`` is unused (the method is deterministic)."""
    f = check_freqs(freqs, model)
    E, D = model.num_experts, hw.num_nodes
    if extra_replicas < 0:
        raise InputError("extra_replicas", f"must be >= 0, got {extra_replicas}")
    P = max(E, D) + extra_replicas
    P = -(-P // D) * D
    phy2log, _, logcnt = rebalance_experts(f, P, num_groups, num_device_groups, D)
    per_node = P // D
    node_of_slot = np.arange(P) // per_node
    layers = []
    for li in range(f.shape[0]):
        shares = np.zeros((P, D))
        shares[np.arange(P), node_of_slot] = 1.0
        eo = phy2log[li]
        layers.append(LayerPlacement(shares, eo, 1.0 / logcnt[li][eo], E))
    return Placement(tuple(layers), "eplb", {"slots": P, "extra_replicas": P - E})
