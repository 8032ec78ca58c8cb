"""The cost kernel: the one definition of every physics term that the evaluator, the block MILP's
coefficients, the heuristics, the online cost model and the HD-MoE re-implementation use.

- per-directed-link loads of flows under XY routing (:func:`link_loads`; tree or unicast delivery,
  spread or explicit homes), the same for spread homes and all layers at once on meshes up to 8x8
  (:func:`spread_link_loads`, flows as uint64 destination masks from :func:`pack_dest`) and the
  time of a communication phase (:func:`phase_time_s`);
- the probability that a batch activates an expert copy (:func:`activation_probability`);
- the per-node roofline (:func:`roofline_s`) and per-token unit costs (:class:`UnitCosts`);
- per-layer DRAM capacity (:func:`layer_capacity_bytes`, :func:`check_capacity`, :func:`check_model_fits`);
- the non-MoE time of a decode step (:func:`non_moe_time_s`).

Units: seconds, bytes, FLOP and FLOP/s throughout. Written out in ``formulations/evaluator.md``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import InputError
from .hardware import Hardware, Mesh
from .moe import MoEModel
from .placement import Placement

MODES = ("mesh", "paper")


@dataclass(frozen=True)
class UnitCosts:
    """Per-token and per-expert constants of one model in one unit mode.

    ``flops_per_token``: FLOPs of one expert for one token (mesh: SwiGLU, 6·h·I; paper: 2·h·IS).
    ``vector_bytes``: bytes of one token's hidden vector on the wire (paper: 1 byte per element).
    ``weight_bytes``: bytes of one expert's weights.
    """

    flops_per_token: float
    vector_bytes: float
    weight_bytes: float

    @classmethod
    def of(cls, model: MoEModel, mode: str = "mesh") -> UnitCosts:
        if mode == "paper":
            return cls(2.0 * model.hidden * (model.paper_intermediate or model.expert_intermediate),
                       1.0 * model.hidden, model.expert_weight_bytes())
        return cls(model.expert_flops_per_token(), model.hidden * model.activation_bytes,
                   model.expert_weight_bytes())


def activation_probability(tokens: np.ndarray | float, batch: float) -> np.ndarray:
    """Probability that a batch of ``batch`` tokens sends at least one token to a copy expected to
    serve ``tokens`` of them (its weights are then read): ``1 - (1 - tokens/B)^B``."""
    B = max(float(batch), 1e-12)
    return 1.0 - (1.0 - np.clip(np.asarray(tokens, dtype=float) / B, 0.0, 1.0)) ** B


def roofline_s(flops: np.ndarray, bytes_read: np.ndarray, hw: Hardware) -> np.ndarray:
    """Per-node time (s): ``max(flops / compute, bytes read from DRAM / DRAM bandwidth)``."""
    return roofline_of(np.asarray(flops) / hw.compute_flops, np.asarray(bytes_read) / hw.dram_bw_bytes_per_s)


def roofline_of(compute_s: np.ndarray, read_s: np.ndarray) -> np.ndarray:
    """The roofline on times already in seconds (any matching shapes): a node takes the longer of
    its compute time and its weight-read time (they overlap)."""
    return np.maximum(compute_s, read_s)


def phase_time_s(link_bytes: np.ndarray, link_bw: np.ndarray | float | None, hop_latency_s: float = 0.0,
                 hops: int | np.ndarray = 0) -> np.ndarray:
    """Time (s) of one communication phase: the busiest link's bytes over its bandwidth, plus the
    hop latency of the longest route. ``link_bytes [..., num_links]`` (the max is over the last axis);
    ``link_bw`` bytes/s per link, or None when ``link_bytes`` are already seconds (the bandwidths
    folded in beforehand, as the branch and bound does once per depth)."""
    per_link_s = np.asarray(link_bytes) if link_bw is None else np.asarray(link_bytes) / link_bw
    busiest = per_link_s.max(axis=-1, initial=0.0)
    return busiest + hop_latency_s * hops if hop_latency_s else busiest


def other_weight_bytes_per_node(model: MoEModel, hw: Hardware) -> float:
    """Bytes of the weights outside the routed experts (attention, embeddings, shared experts) that
    each node stores: an even ``1/D`` share. Every capacity rule subtracts this from a node's DRAM."""
    return model.non_expert_weight_bytes() / hw.num_nodes


def layer_capacity_bytes(model: MoEModel, hw: Hardware, share: float | None = None) -> float | None:
    """DRAM bytes per node one MoE layer's experts may use: the node's capacity minus its share of the
    non-expert weights, times ``share`` (default 1 / MoE layers). None when capacity is unlimited."""
    cap = hw.dram_capacity_bytes
    if cap is None:
        return None
    share = share if share is not None else 1.0 / model.moe_layers
    return (cap - other_weight_bytes_per_node(model, hw)) * share


# --- link loads under XY routing -----------------------------------------------------------


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
    if home is None:
        return _spread_loads(mesh, np.asarray(dest, dtype=bool), np.asarray(weight, dtype=np.float64), tree)
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

    # explicit homes (spread homes returned above)
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


def _spread_loads(mesh: Mesh, dest: np.ndarray, w: np.ndarray, tree: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`link_loads` with spread homes, from per-flow extremes instead of ``[F, R, C]`` prefix sums.

    A link position is used by a flow when some destination lies beyond it (the flow's furthest
    destination in that direction: tree) or once per destination beyond it (unicast, linear in the
    destinations: the loads of the weight reaching each node). Each position's load is then a
    suffix or prefix sum of a weighted histogram of those extremes, times the number of homes whose
    tree uses it (:func:`_spread_counts`). About 2x faster than the prefix sums on 16x16."""
    R, C = mesh.rows, mesh.cols
    F = dest.shape[0]
    m = dest.reshape(F, R, C)
    wd = w / mesh.num_nodes
    k = _spread_counts(mesh)

    def beyond(hist: np.ndarray) -> np.ndarray:  # [..., n] -> [..., n-1]: weight at an index > i
        return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]

    def upto(hist: np.ndarray) -> np.ndarray:  # [..., n] -> [..., n-1]: weight at an index <= i
        return np.cumsum(hist, axis=-1)[..., :-1]

    if tree:
        def extremes(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """First and last True index of ``a`` along ``axis``, and where there is one."""
            n = a.shape[axis]
            return a.argmax(axis=axis), n - 1 - np.flip(a, axis=axis).argmax(axis=axis), a.any(axis=axis)

        def hist(idx: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:
            """``[..., n]``: the weight ``wd`` of the flows per extreme index, per position of the
            middle axis (``idx``, ``ok``: ``[F]`` or ``[F, P]``)."""
            if idx.ndim == 1:
                return np.bincount(idx[ok], wd[ok], minlength=n)
            P = idx.shape[1]
            key = np.arange(P)[None, :] * n + idx
            return np.bincount(key[ok], np.broadcast_to(wd[:, None], idx.shape)[ok], minlength=P * n).reshape(P, n)

        col_lo, col_hi, col_ok = extremes(m.any(axis=1), 1)  # [F]: the columns a flow reaches
        row_lo, row_hi, row_ok = extremes(m.any(axis=2), 1)  # [F]: its rows
        top, bottom, in_col = extremes(m, 1)  # [F, C]: its rows within each column
        left, right, in_row = extremes(m, 2)  # [F, R]: its columns within each row
        east, west = beyond(hist(col_hi, col_ok, C)), upto(hist(col_lo, col_ok, C))  # [C-1]
        south, north = beyond(hist(bottom, in_col, R)).T, upto(hist(top, in_col, R)).T  # [R-1, C]
        c_west, c_east = beyond(hist(right, in_row, C)), upto(hist(left, in_row, C))  # [R, C-1]
        c_north, c_south = beyond(hist(row_hi, row_ok, R)), upto(hist(row_lo, row_ok, R))
    else:  # once per destination: linear in the weight reaching each node
        node = (wd @ m.reshape(F, -1)).reshape(R, C)
        cols, rows = node.sum(axis=0), node.sum(axis=1)
        east, west = beyond(cols), upto(cols)
        south, north = beyond(node.T).T, upto(node.T).T
        c_west, c_east = beyond(node), upto(node)
        c_north, c_south = beyond(rows), upto(rows)
    de = np.tile(east * k["d_east"], (R, 1))
    dw = np.tile(west * k["d_west"], (R, 1))
    ds = south * k["d_south"][:, None]
    dn = north * k["d_north"][:, None]
    cw = c_west * k["c_west"][None, :]
    ce = c_east * k["c_east"][None, :]
    cn = np.tile((c_north * k["c_north"])[:, None], (1, C))
    cs = np.tile((c_south * k["c_south"])[:, None], (1, C))
    reached = dest.any(axis=0)
    hops = int(mesh.distance.max(axis=0)[reached].max(initial=0))
    dispatch = np.concatenate([de.ravel(), dw.ravel(), ds.ravel(), dn.ravel()])
    combine = np.concatenate([ce.ravel(), cw.ravel(), cs.ravel(), cn.ravel()])
    return dispatch, combine, hops


def merge_flows(dest: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge flows with identical destination sets ``dest [F, D]`` (bool), summing their ``weight [F]``.
    Exact for link loads when homes are spread."""
    packed = np.packbits(dest, axis=1, bitorder="little")
    if packed.shape[1] <= 8:
        pad = np.zeros((packed.shape[0], 8), dtype=np.uint8)
        pad[:, : packed.shape[1]] = packed
        keys = pad.view(np.uint64).ravel()
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    else:  # rows as uint64 words, sorted stably (np.unique over rows of bytes was 10x slower on 16x16)
        F, nw = packed.shape[0], -(-packed.shape[1] // 8)
        pad = np.zeros((F, 8 * nw), dtype=np.uint8)
        pad[:, : packed.shape[1]] = packed
        words = pad.view(np.uint64)  # [F, nw]
        order = np.lexsort(words.T[::-1])
        ordered = words[order]
        new = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)] if F else np.zeros(0, dtype=bool)
        first = order[new]  # the first flow of each set (stable sort: its smallest index)
        inv = np.empty(F, dtype=np.intp)
        inv[order] = np.cumsum(new) - 1
    return dest[first], np.bincount(inv.ravel(), weights=weight, minlength=len(first))


# --- fast whole-model link loads: spread homes, destination sets as uint64 bitmasks -----------
#
# With spread homes every family of :func:`link_loads` depends on a flow only through extents of its
# destination set: east/west dispatch on its column extent, south/north dispatch in column c on the
# row extent of its destinations in column c, east/west combine in row r on the column extent within
# row r, north/south combine on its row extent. On a mesh of at most 8x8 a destination set is one
# uint64 in two byte layouts: row-major (node (r, c) is bit 8r + c: byte r holds row r) and
# column-major (bit 8c + r: byte c holds column c). Loads are then weighted histograms of byte values
# per (layer, row or column) times small tables (one column per link position). Unicast loads are
# linear in the weight reaching each node: ``W [L, D] @ U [D, num_links]``, U from :func:`link_loads`.

FAST_MAX_SIDE = 8  # rows and cols of the meshes the byte layout covers


def fast_links_supported(mesh: Mesh) -> bool:
    """Whether :func:`spread_link_loads` handles ``mesh`` (rows and cols <= 8, little-endian machine)."""
    return max(mesh.rows, mesh.cols) <= FAST_MAX_SIDE and sys.byteorder == "little"


@lru_cache(maxsize=32)
def node_bits(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row_major [D], col_major [D])`` uint64: node (r, c)'s bit ``1 << (8r + c)`` / ``1 << (8c + r)``."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    rb = np.left_shift(np.uint64(1), (8 * r + c).astype(np.uint64))
    cb = np.left_shift(np.uint64(1), (8 * c + r).astype(np.uint64))
    rb.setflags(write=False)
    cb.setflags(write=False)
    return rb, cb


def pack_dest(mesh: Mesh, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Destination sets ``dest [F, D]`` (bool) as ``(row_major [F], col_major [F])`` uint64 masks
    (bit layout of :func:`node_bits`; needs :func:`fast_links_supported`)."""
    R, C = mesh.rows, mesh.cols
    g = np.asarray(dest, dtype=bool).reshape(-1, R, C).astype(np.float32)
    out = np.zeros((2, g.shape[0], 8), dtype=np.uint8)  # bytes of the masks, little-endian
    out[0, :, :R] = g @ (2.0 ** np.arange(C, dtype=np.float32))  # row r's byte: bit c per column c
    out[1, :, :C] = (2.0 ** np.arange(R, dtype=np.float32)) @ g  # column c's byte: bit r per row r
    masks = out.view("<u8")[..., 0]
    return masks[0], masks[1]


def _byte_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every byte value v: highest set bit (-1 if v == 0), lowest set bit (8 if v == 0), bits ``[256, 8]``."""
    v = np.arange(256)
    bit = ((v[:, None] >> np.arange(8)) & 1).astype(bool)
    hi = np.where(v > 0, 7 - np.argmax(bit[:, ::-1], axis=1), -1)
    lo = np.where(v > 0, np.argmax(bit, axis=1), 8)
    return hi, lo, bit.astype(np.float64)


_HI, _LO, _BITS = _byte_tables()


@lru_cache(maxsize=32)
def _unicast_usage(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``[D, num_links]`` dispatch and combine loads of unit weight sent to one node, homes spread."""
    mesh = Mesh(rows, cols)
    D = mesh.num_nodes
    out = [link_loads(mesh, np.eye(D, dtype=bool)[[n]], np.ones(1), None, False) for n in range(D)]
    ud = np.array([o[0] for o in out]).reshape(D, mesh.num_links)
    uc = np.array([o[1] for o in out]).reshape(D, mesh.num_links)
    ud.setflags(write=False)
    uc.setflags(write=False)
    return ud, uc


_STRIPES = 4  # consecutive flows count into different copies of a histogram (no serial bin updates)


def _byte_hist(mask: np.ndarray, layer_key: np.ndarray, w: np.ndarray, nbytes: int, bits: int, num_layers: int,
               occupancy: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted histograms of the low ``nbytes`` bytes of ``mask [F]`` (little-endian; only the low
    ``bits`` of each byte may be set), flow f counted in layer ``(layer_key[f] >> 8) % L`` (key + byte
    value indexes ``_STRIPES`` copies of ``[L, 256]``, summed): per byte ``[L, nbytes, 256]`` and, if
    ``occupancy``, of the OR of the bytes ``[L, 256]`` (for a row-major mask: the columns the flow
    reaches). With ``bits <= 4`` two bytes share one bincount (as nibbles)."""
    b = mask.view(np.uint8).reshape(-1, 8)[:, :nbytes]
    if bits <= 4 and nbytes > 1:
        u = b[:, 0::2].copy()  # unit j: byte 2j in the low nibble, byte 2j+1 in the high one
        u[:, : nbytes // 2] |= b[:, 1::2] << 4
    else:
        u = b
    size = num_layers << 8
    h = np.empty((u.shape[1], size))
    key = np.empty_like(layer_key)
    for j in range(u.shape[1]):  # one bincount per byte: cheaper than one over [F, nbytes] keys
        np.add(layer_key, u[:, j], out=key)
        h[j] = np.bincount(key, weights=w, minlength=_STRIPES * size).reshape(_STRIPES, size).sum(axis=0)
    h = h.reshape(-1, num_layers, 256).transpose(1, 0, 2)
    if u is not b:  # split the units back into per-byte histograms over the 16 nibble values
        pairs = h.reshape(num_layers, -1, 16, 16)  # [L, unit, high, low]
        split = np.zeros((num_layers, 2 * pairs.shape[1], 256))
        split[:, 0::2, :16] = pairs.sum(axis=2)
        split[:, 1::2, :16] = pairs.sum(axis=3)
        h = split[:, :nbytes]
    if not occupancy:
        return h, None
    occ = mask >> np.uint64(32)  # fold the 8 bytes onto the lowest one
    occ |= mask
    t = occ >> np.uint64(16)
    occ |= t
    np.right_shift(occ, np.uint64(8), out=t)
    occ |= t
    np.add(layer_key, occ.view(np.uint8)[::8], out=key)
    occ_h = np.bincount(key, weights=w, minlength=_STRIPES * size).reshape(_STRIPES, size).sum(axis=0)
    return h, occ_h.reshape(num_layers, 256)


def spread_link_loads(
    mesh: Mesh, row_mask: np.ndarray, col_mask: np.ndarray | None, weight: np.ndarray, offsets: np.ndarray,
    tree: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`link_loads` with spread homes for the flows of many layers at once (same numbers).

    ``row_mask [F]`` / ``col_mask [F]``: uint64 destination masks (:func:`pack_dest`; ``col_mask`` is
    unused for unicast and may be None). ``weight [F]``: load units per flow (bytes). The flows of
    layer l are ``offsets[l]:offsets[l+1]`` (``offsets [L+1]`` non-decreasing, 0 to F). Needs
    :func:`fast_links_supported`. Returns ``(dispatch [L, num_links], combine [L, num_links], max_hops [L])``.
    """
    R, C = mesh.rows, mesh.cols
    N = mesh.num_nodes
    offsets = np.asarray(offsets, dtype=np.intp)
    L = len(offsets) - 1
    counts = np.diff(offsets)
    layer_key = np.repeat(np.arange(L) << 8, counts)
    layer_key += (np.arange(len(layer_key)) % _STRIPES) * (L << 8)
    w = np.asarray(weight, dtype=np.float64)
    rm = np.ascontiguousarray(row_mask, dtype=np.uint64)
    # [L, R, 256]: weight per (layer, row, the row's column bits); [L, 256]: per (layer, columns reached)
    h_row, h_cocc = _byte_hist(rm, layer_key, w, R, C, L, tree)
    # hops: the largest eccentricity over the nodes any flow of the layer reaches
    union = np.zeros(L, dtype=np.uint64)
    nz = counts > 0
    if rm.size:
        union[nz] = np.bitwise_or.reduceat(rm, offsets[:-1][nz])
    rb, _ = node_bits(R, C)
    ecc = mesh.distance.max(axis=0)
    hops = np.where((union[:, None] & rb[None, :]) != 0, ecc[None, :], 0).max(axis=1, initial=0)
    if not tree:
        ud, uc = _unicast_usage(R, C)
        node_w = (h_row @ _BITS[:, :C]).reshape(L, N)  # [L, D] weight reaching each node
        return node_w @ ud, node_w @ uc, hops
    cm = np.ascontiguousarray(col_mask, dtype=np.uint64)
    h_col, h_rocc = _byte_hist(cm, layer_key, w, C, R, L, True)  # per (layer, column, its row bits), rows reached
    c = np.arange(C - 1)
    r = np.arange(R - 1)
    k = {key: v / N for key, v in _spread_counts(mesh).items()}
    east, west = _HI[:, None] > c, _LO[:, None] <= c  # [256, C-1]: some node east of c / at or west of c
    south, north = _HI[:, None] > r, _LO[:, None] <= r  # [256, R-1]: some node below r / at or above r
    de = np.broadcast_to((h_cocc @ (east * k["d_east"]))[:, None, :], (L, R, C - 1))
    dw = np.broadcast_to((h_cocc @ (west * k["d_west"]))[:, None, :], (L, R, C - 1))
    ds = (h_col @ (south * k["d_south"])).transpose(0, 2, 1)  # [L, R-1, C]
    dn = (h_col @ (north * k["d_north"])).transpose(0, 2, 1)
    cw = h_row @ (east * k["c_west"])  # [L, R, C-1]
    ce = h_row @ (west * k["c_east"])
    cn = np.broadcast_to((h_rocc @ (south * k["c_north"]))[:, :, None], (L, R - 1, C))
    cs = np.broadcast_to((h_rocc @ (north * k["c_south"]))[:, :, None], (L, R - 1, C))
    dispatch = np.concatenate([a.reshape(L, -1) for a in (de, dw, ds, dn)], axis=1)
    combine = np.concatenate([a.reshape(L, -1) for a in (ce, cw, cs, cn)], axis=1)
    return dispatch, combine, hops


def non_moe_time_s(model: MoEModel, hw: Hardware, batch: float, mode: str = "mesh", context_len: int = 1024) -> float:
    """Attention, shared experts and dense layers of one decode step, summed over layers (s; the same
    for every strategy). ``context_len``: KV-cache length in tokens."""
    B, h, L, D = batch, model.hidden, context_len, hw.num_nodes
    if mode == "paper":
        IS = model.paper_intermediate or model.expert_intermediate
        E = model.num_experts
        attn = (4 * B * h * h + 2 * B * L * h) / (D * hw.compute_flops)
        mem = (2 * B * h * L + 4 * h * (B + h) + 2 * E * IS * h + B * (IS + h)) / (D * hw.dram_bw_bytes_per_s)
        return model.moe_layers * (attn + mem)
    wb, ab = model.weight_bytes, model.activation_bytes

    def roof(flops: float, nbytes: float) -> float:  # the work is spread over all D nodes
        return float(roofline_of(flops / (D * hw.compute_flops), nbytes / (D * hw.dram_bw_bytes_per_s)))

    attn_flops = 2 * (4 * B * h * h + 2 * B * L * h)
    attn_bytes = 4 * h * h * wb + 2 * B * L * h * ab
    sh_flops = 6 * h * model.shared_intermediate * model.shared_experts * B
    sh_bytes = 3 * h * model.shared_intermediate * model.shared_experts * wb
    dn_flops = 6 * h * model.dense_intermediate * B
    dn_bytes = 3 * h * model.dense_intermediate * wb
    return model.moe_layers * roof(attn_flops + sh_flops, attn_bytes + sh_bytes) + model.dense_layers * roof(
        attn_flops + dn_flops, attn_bytes + dn_bytes
    )


def hide_time_s(model: MoEModel, hw: Hardware, batch: float, mode: str = "mesh", context_len: int = 1024) -> float:
    """The non-MoE time of one layer (s): what a weight move overlapped with it can hide behind."""
    return non_moe_time_s(model, hw, batch, mode, context_len) / max(model.total_layers, 1)


CAPACITY_RTOL = 1e-9  # relative excess over a DRAM capacity that capacity checks forgive: rounding in sums of shares


def expert_room_bytes(model: MoEModel, hw: Hardware) -> float | None:
    """Bytes of routed-expert weights one node may store over all layers: its DRAM capacity less its
    ``1/D`` share of the other weights, plus half the excess :func:`check_capacity` forgives, so that
    a node filled exactly (up to rounding in sums of shares) passes it. None when unlimited."""
    cap = hw.dram_capacity_bytes
    return None if cap is None else cap * (1 + CAPACITY_RTOL / 2) - other_weight_bytes_per_node(model, hw)


def node_room_bytes(model: MoEModel, hw: Hardware) -> np.ndarray:
    """``[D]`` :func:`expert_room_bytes` per node (inf when the hardware sets no DRAM capacity)."""
    room = expert_room_bytes(model, hw)
    return np.full(hw.num_nodes, np.inf if room is None else room)


def check_capacity(placement: Placement, model: MoEModel, hw: Hardware) -> None:
    """Raise an InputError if any node must store more weights than its DRAM capacity."""
    cap = hw.dram_capacity_bytes
    if cap is None:
        return
    need = placement.memory_bytes_per_node(model.expert_weight_bytes()) + other_weight_bytes_per_node(model, hw)
    worst = int(np.argmax(need))
    if need[worst] > cap * (1 + CAPACITY_RTOL):
        raise InputError(
            "hardware.dram_capacity_bytes",
            f"node {worst} must hold {need[worst] / 1e9:.4g} GB of weights but its capacity is {cap / 1e9:.4g} GB",
            "raise the capacity, use a larger mesh, or a placement with fewer copies",
        )


def fits_capacity(placement: Placement, model: MoEModel, hw: Hardware) -> bool:
    """Whether every node can store what ``placement`` puts on it (:func:`check_capacity` passes)."""
    try:
        check_capacity(placement, model, hw)
    except InputError:
        return False
    return True


def check_model_fits(model: MoEModel, hw: Hardware) -> None:
    """Raise an InputError if the whole model cannot fit in the mesh's total DRAM, whatever the placement."""
    cap = hw.dram_capacity_bytes
    if cap is None:
        return
    total = model.moe_layers * model.num_experts * model.expert_weight_bytes() + model.non_expert_weight_bytes()
    if total > cap * hw.num_nodes:
        raise InputError(
            "hardware.dram_capacity_bytes",
            f"{model.name} needs {total / 1e9:.4g} GB of weights; {hw.num_nodes} nodes x {cap / 1e9:.4g} GB "
            f"hold {cap * hw.num_nodes / 1e9:.4g} GB",
            f"give each node at least {total / hw.num_nodes / 1e9:.4g} GB or use a larger mesh",
        )


