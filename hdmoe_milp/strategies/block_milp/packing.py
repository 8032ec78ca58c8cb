"""Balanced packing with neighbour splits: warm starts, and patterns of the family, for layers with
at least :data:`MIN_PER_NODE` experts per node.

Whole experts keep a token's message on few nodes, but whole experts rarely balance the nodes'
rooflines (FLOPs and weight reads at once). Aligned blocks balance them by spreading every expert,
and then each token reaches many nodes. This start takes the middle way:

1. whole experts are packed onto the nodes so that every node's roofline time is near the mean
   node's (LPT on the roofline, then random swaps and moves, within the layer's capacity; this is
   done :data:`RESTARTS` times with different random moves);
2. the packed nodes are laid out along a path through the mesh (a snake by rows, by columns, or a
   Hilbert curve) so that nodes above the mean sit next to nodes below it;
3. one LP moves shares of experts from each node to its mesh neighbours so that every node's FLOP
   time and weight-read time are at most ``τ``, and minimises ``τ`` plus ``λ`` times the moved
   token mass (normalised to the mean node's time), so that few and cold experts are split.

Measured in ``formulations/offline_milp.md`` ("Balanced packings" and "Version 0.8.0"). Each
variant is scored by the evaluator, and the best ones become warm starts and patterns.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from ...costs import UnitCosts, activation_probability, roofline_s
from ...hardware import Hardware, Mesh
from ...moe import MoEModel

SPLIT_PENALTIES = (0.0, 0.01, 0.1)  # λ of the split LP (per unit of token mass moved, in mean-node times)
RESTARTS = 4  # packings from this many random swap sequences (V3 8x8: 1.6 s in all; measured against 1 and 8)
SWAP_STEPS = 20_000  # random swaps and moves after LPT (0.1-0.3 s on 256 experts)
MIN_SHARE = 1e-9  # shares below this are dropped after the LP
CAP_MARGIN = 1e-6  # experts' weights kept free per node in the split LP's capacity rows
MIN_PER_NODE = 4  # experts per node, at least, for packings (measured: at 2 LPT cannot balance whole experts)
PACKED = "packed-"  # the names of the packings start with this


def expert_times_s(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, whole on one node: its FLOP time and its activation-weighted weight-read time,
    both ``[E]`` seconds (the two sides of :func:`costs.roofline_s`, as the block model counts them)."""
    unit = UnitCosts.of(model, "mesh")
    f = np.asarray(freqs, dtype=float)
    flop_s = roofline_s(f * unit.flops_per_token * batch, 0.0, hw)
    read_s = roofline_s(0.0, activation_probability(f * batch, batch) * unit.weight_bytes, hw)
    return np.asarray(flop_s, dtype=float), np.asarray(read_s, dtype=float)


def paths(mesh: Mesh) -> dict[str, np.ndarray]:
    """Node orders in which consecutive nodes are mesh neighbours: snakes by rows and by columns,
    and a Hilbert curve on square power-of-two meshes."""
    R, C = mesh.rows, mesh.cols
    out = {"rows": mesh.snake_order(),
           "cols": np.array([mesh.node(r if c % 2 == 0 else R - 1 - r, c) for c in range(C) for r in range(R)],
                            dtype=np.int64)}
    if R == C and R >= 2 and R & (R - 1) == 0:
        out["hilbert"] = np.array([mesh.node(*_hilbert_rc(R, d)) for d in range(R * R)], dtype=np.int64)
    return out


def _hilbert_rc(n: int, d: int) -> tuple[int, int]:
    """(row, col) of step ``d`` of the Hilbert curve on an n×n grid (n a power of two)."""
    x = y = 0
    s, t = 1, d
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y = x + s * rx, y + s * ry
        t //= 4
        s *= 2
    return y, x


def pack(flop_s: np.ndarray, read_s: np.ndarray, num_nodes: int, max_count: int, rng: np.random.Generator,
         steps: int = SWAP_STEPS, deadline: float | None = None) -> np.ndarray | None:
    """Whole experts onto ``num_nodes`` bins, at most ``max_count`` per bin: ``bin [E]`` or None if
    they do not fit. LPT on the roofline (largest FLOP time first, onto the bin whose roofline stays
    lowest), then ``steps`` random swaps and moves that lower the squared excess over the mean bin
    (with a small term for the FLOP deviation, which the split LP has to move)."""
    E = len(flop_s)
    if E > num_nodes * max_count:
        return None
    target = max(flop_s.sum(), read_s.sum()) / num_nodes
    F, Rd = np.zeros(num_nodes), np.zeros(num_nodes)
    cnt = np.zeros(num_nodes, dtype=np.int64)
    of = np.empty(E, dtype=np.int64)
    for i in np.argsort(-flop_s, kind="stable"):
        t = np.maximum(F + flop_s[i], Rd + read_s[i])
        t[cnt >= max_count] = np.inf
        n = int(np.argmin(t))
        of[i] = n
        F[n] += flop_s[i]
        Rd[n] += read_s[i]
        cnt[n] += 1

    def cost(fl: float, rd: float) -> float:
        over = max(fl, rd) - target
        return (over if over > 0 else 0.0) ** 2 + 1e-3 * (fl - target) ** 2

    pairs = rng.integers(E, size=(steps, 2))
    swap = rng.random(steps) < 0.5
    for s in range(steps):
        if deadline is not None and s % 1000 == 0 and time.perf_counter() > deadline:
            break
        i, j = int(pairs[s, 0]), int(pairs[s, 1])
        ni, nj = int(of[i]), int(of[j])
        if ni == nj:
            continue
        if swap[s]:
            dF, dR = flop_s[i] - flop_s[j], read_s[i] - read_s[j]
        elif cnt[nj] < max_count:
            dF, dR = flop_s[i], read_s[i]
        else:
            continue
        old = cost(F[ni], Rd[ni]) + cost(F[nj], Rd[nj])
        new = cost(F[ni] - dF, Rd[ni] - dR) + cost(F[nj] + dF, Rd[nj] + dR)
        if new < old - 1e-30:
            F[ni] -= dF
            F[nj] += dF
            Rd[ni] -= dR
            Rd[nj] += dR
            of[i] = nj
            if swap[s]:
                of[j] = ni
            else:
                cnt[ni] -= 1
                cnt[nj] += 1
    return of


def lay_out(bins: np.ndarray, flop_s: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Node of every expert when the bins are placed along ``path``: each next node gets the bin
    that keeps the running FLOP excess over the mean closest to zero, so that a node above the mean
    sits next to one below it (the split LP moves shares between neighbours)."""
    D = len(path)
    load = np.bincount(bins, weights=flop_s, minlength=D)
    mean = load.sum() / D
    left = list(range(D))
    label = np.empty(D, dtype=np.int64)
    run = 0.0
    for node in path:
        k = min(range(len(left)), key=lambda j: abs(run + load[left[j]] - mean))
        b = left.pop(k)
        label[b] = node
        run += load[b] - mean
    return label[bins]


def split_lp(node_of: np.ndarray, flop_s: np.ndarray, read_s: np.ndarray, freqs: np.ndarray, mesh: Mesh,
             penalty: float, max_weight_shares: float | None = None) -> np.ndarray | None:
    """Shares ``[E, D]``: every expert on ``node_of [E]`` with fractions moved to its mesh neighbours,
    minimising the largest node FLOP or read time ``τ`` plus ``penalty`` × moved token mass (in
    mean-node times per unit of the layer's token mass). ``flop_s``, ``read_s`` ``[E]``:
    seconds of each expert whole on one node. ``max_weight_shares``: at most this many experts'
    weights per node (capacity; a node's whole experts always fit). None if the LP fails or its
    shares cannot be brought within the capacity."""
    E, D = len(node_of), mesh.num_nodes
    mean = max(flop_s.sum(), read_s.sum()) / D
    nbrs = []
    for n in range(D):
        r, c = mesh.coords(n)
        nbrs.append([mesh.node(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))
                     if 0 <= r + dr < mesh.rows and 0 <= c + dc < mesh.cols])
    var = [(i, m) for i in range(E) for m in nbrs[int(node_of[i])]]
    nv = len(var) + 1
    ii = np.array([v[0] for v in var], dtype=np.int64)
    mm = np.array([v[1] for v in var], dtype=np.int64)
    src = node_of[ii]
    k = np.arange(len(var))
    count = np.bincount(node_of, minlength=D)
    # rows: FLOP time per node (D), read time per node (D), moved share per expert (E), weights per node (D)
    rows = [src, mm, D + src, D + mm, 2 * D + ii]
    cols = [k, k, k, k, k]
    vals = [-flop_s[ii], flop_s[ii], -read_s[ii], read_s[ii], np.ones(len(var))]
    rhs = [-np.bincount(node_of, weights=flop_s, minlength=D), -np.bincount(node_of, weights=read_s, minlength=D),
           np.ones(E)]
    rows += [np.arange(2 * D)]
    cols += [np.full(2 * D, nv - 1)]
    vals += [-np.ones(2 * D)]
    nrows = 2 * D + E
    limit = None
    if max_weight_shares is not None:
        # the LP's rows hold a margin, so that its tolerance (about 1e-7) cannot tip a node over
        limit = np.maximum(max_weight_shares - CAP_MARGIN, count)
        rows += [2 * D + E + src, 2 * D + E + mm]
        cols += [k, k]
        vals += [-np.ones(len(var)), np.ones(len(var))]
        rhs.append(limit - count)
        nrows += D
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nrows, nv)).tocsr()
    f = np.asarray(freqs, dtype=float)
    c = np.concatenate([penalty * mean * f[ii] / max(f.sum(), 1e-300), [1.0]])
    res = linprog(c, A_ub=A, b_ub=np.concatenate(rhs), bounds=(0, None), method="highs")
    if res.status != 0 or res.x is None:
        return None
    shares = np.zeros((E, D))
    shares[np.arange(E), node_of] = 1.0
    x = np.clip(res.x[:-1], 0.0, 1.0)
    np.add.at(shares, (ii, src), -x)
    np.add.at(shares, (ii, mm), x)
    shares[shares < MIN_SHARE] = 0.0
    shares /= shares.sum(axis=1, keepdims=True)
    return shares if limit is None else _within(shares, node_of, limit, 4 * D)


def _within(shares: np.ndarray, node_of: np.ndarray, limit: np.ndarray, max_steps: int) -> np.ndarray | None:
    """``shares [E, D]`` with every node's weight shares at most ``limit [D]`` (to 1e-10): a node over its limit
    (by the LP's tolerance) hands the excess of its largest incoming share back to that expert's
    home node, which may pass it on in turn. None if that does not end within ``max_steps``."""
    load = shares.sum(axis=0)
    for _ in range(max_steps):
        # rounding below 1e-10 stays (the block model's capacity check allows 1e-9)
        over = np.flatnonzero(load > limit * (1 + 1e-10))
        if not over.size:
            return shares
        n = int(over[0])
        e = load[n] - limit[n]
        inc = np.flatnonzero((node_of != n) & (shares[:, n] >= e))
        if not inc.size:
            return None
        i = int(inc[np.argmax(shares[inc, n])])
        shares[i, n] -= e
        shares[i, node_of[i]] += e
        load[n] -= e
        load[node_of[i]] += e
    return None


def packings(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float, *, seed: int,
             capacity_bytes: float | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
    """Balanced packings with neighbour splits of one layer (``freqs [E]``): ``{name: shares [E, D]}``,
    one per random restart of :func:`pack`, path through the mesh and split penalty (duplicates
    dropped), empty when the layer has
    fewer than :data:`MIN_PER_NODE` experts per node or they do not fit ``capacity_bytes`` per node. ``deadline``: a
    ``time.perf_counter()`` time after which no new variant starts."""
    D, E = hw.num_nodes, model.num_experts
    if E < MIN_PER_NODE * D:
        return {}
    flop_s, read_s = expert_times_s(model, hw, freqs, batch)
    w = model.expert_weight_bytes()
    max_count = E if capacity_bytes is None else int(np.floor(capacity_bytes / w * (1 + 1e-9)))
    max_w = None if capacity_bytes is None else capacity_bytes / w
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for r in range(RESTARTS):
        bins = pack(flop_s, read_s, D, max_count, rng, deadline=deadline)
        if bins is None:
            return {}
        for pname, path in paths(hw.mesh).items():
            node_of = lay_out(bins, flop_s, path)
            for lam in SPLIT_PENALTIES:
                if deadline is not None and out and time.perf_counter() > deadline:
                    return out
                s = split_lp(node_of, flop_s, read_s, freqs, hw.mesh, lam, max_w)
                if s is not None and not any(np.array_equal(s, o) for o in out.values()):
                    out[f"{PACKED}{pname}-{lam:g}" + (f"-{r}" if r else "")] = s
    return out
