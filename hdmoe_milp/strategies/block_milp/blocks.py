"""Candidate columns of the offline MILP: aligned rectangles of the mesh (blocks) and patterns.

A block of shape ``a x b`` (rows x cols, both powers of two dividing the mesh) starts at a row that
is a multiple of ``a`` and a column that is a multiple of ``b``. Its degree is ``d = a*b``; an expert
placed on it is split evenly, ``1/d`` of its weights and FLOPs per node.

A pattern is any node set with a share vector (summing to 1): the share of an expert's weights and
FLOPs each node holds. The MILP's family adds, per expert, the patterns the layer's baselines give
that expert (:func:`layer_patterns`), appended as extra columns (:meth:`Blocks.with_patterns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ...costs import link_loads
from ...hardware import Mesh
from ...placement import LayerPlacement

SHARE_TOL = 1e-12  # two share vectors on the same nodes closer than this (max abs difference) are one column


def _pow2_divisors(n: int) -> list[int]:
    out, d = [], 1
    while d <= n:
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


def _loads(mesh: Mesh, members: np.ndarray, tree: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[n, num_links]`` dispatch and combine link loads of one message (unit weight) to each node
    set ``members [n, D]`` from spread homes (:func:`costs.link_loads`)."""
    disp = np.zeros((len(members), mesh.num_links))
    comb = np.zeros((len(members), mesh.num_links))
    for i, m in enumerate(members):
        disp[i], comb[i], _ = link_loads(mesh, m[None, :].astype(bool), np.ones(1), None, tree)
    return disp, comb


@dataclass(frozen=True)
class Blocks:
    """All candidate columns of a mesh: the aligned blocks first, then the patterns (if any).

    ``members [nb, D]`` is 1 where the node holds a share of the column's expert, ``share [nb, D]``
    that share (rows sum to 1; ``1/d`` on a block's nodes), ``aligned [nb]`` True for blocks.
    ``shape [nb, 2]`` (rows, cols) and ``origin [nb, 2]`` of a block; of a pattern, its bounding box.
    ``disp``/``comb`` ``[nb, num_links]``: link load of one token sent to the column's node set from
    spread homes (units of one vector), under the chosen delivery rule: :func:`costs.link_loads` of
    that one message."""

    mesh: Mesh
    members: np.ndarray
    shape: np.ndarray
    origin: np.ndarray
    disp: np.ndarray
    comb: np.ndarray
    tree: bool
    share: np.ndarray | None = None
    aligned: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.share is None:
            object.__setattr__(self, "share", self.members / self.members.sum(axis=1, keepdims=True))
        if self.aligned is None:
            object.__setattr__(self, "aligned", np.ones(self.members.shape[0], dtype=bool))

    @property
    def num_blocks(self) -> int:
        """Number of columns (blocks and patterns)."""
        return self.members.shape[0]

    @property
    def num_patterns(self) -> int:
        return int((~self.aligned).sum())

    @property
    def degree(self) -> np.ndarray:
        """``[nb]`` nodes holding a share of the column's expert."""
        return self.members.sum(axis=1)

    @cached_property
    def centroid(self) -> np.ndarray:
        """``[nb, 2]`` share-weighted (row, col) centre of each column; a block's centre. The mesh's
        row and column flips map it as they map nodes."""
        r, c = np.divmod(np.arange(self.mesh.num_nodes), self.mesh.cols)
        return np.stack([self.share @ r, self.share @ c], axis=1)

    @cached_property
    def dest_sets(self) -> tuple[np.ndarray, np.ndarray]:
        """``(set_of [nb], first [ns])``: each column's distinct node set (columns with the same
        members share one message) and one column of each set."""
        _, first, inv = np.unique(self.members.astype(bool), axis=0, return_index=True, return_inverse=True)
        return inv.ravel(), first

    def index_of(self, nodes: np.ndarray) -> int:
        """Index of the block holding exactly ``nodes`` (raises KeyError if none)."""
        want = np.zeros(self.mesh.num_nodes, dtype=bool)
        want[np.asarray(nodes)] = True
        hit = np.flatnonzero(self.aligned & (self.members.astype(bool) == want).all(axis=1))
        if hit.size == 0:
            raise KeyError("no aligned block holds exactly these nodes")
        return int(hit[0])

    @cached_property
    def _by_support(self) -> dict[bytes, np.ndarray]:
        """Columns (ascending) keyed by their node set, packed to bytes."""
        keys = np.packbits(self.share > 0, axis=1)
        out: dict[bytes, list[int]] = {}
        for j, k in enumerate(keys):
            out.setdefault(k.tobytes(), []).append(j)
        return {k: np.array(v) for k, v in out.items()}

    def match(self, shares: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
        """``[n]`` first column whose share vector equals each row of ``shares [n, D]`` (the same
        nodes, shares within :data:`SHARE_TOL`), -1 where none does; ``among [n, nb]`` (bool)
        restricts the columns each row may match."""
        s = np.asarray(shares, dtype=float).reshape(-1, self.mesh.num_nodes)
        out = np.full(s.shape[0], -1, dtype=np.int64)
        index = self._by_support
        for r, key in enumerate(np.packbits(s > 0, axis=1)):
            cand = index.get(key.tobytes())
            if cand is not None and among is not None:
                cand = cand[np.asarray(among[r])[cand]]
            if cand is None or cand.size == 0:
                continue
            ok = np.abs(self.share[cand] - s[r]).max(axis=1) <= SHARE_TOL
            if ok.any():
                out[r] = cand[np.argmax(ok)]
        return out

    def with_patterns(self, shares: np.ndarray) -> tuple[Blocks, np.ndarray]:
        """These columns plus the patterns ``shares [P, D]`` (rows summing to 1, kept exactly as
        given) that no column already holds, and the column of each pattern ``[P]``."""
        s = np.asarray(shares, dtype=float).reshape(-1, self.mesh.num_nodes)
        cols = self.match(s)
        miss = np.flatnonzero(cols < 0)
        if miss.size == 0:
            return self, cols
        sh, inv = np.unique(s[miss], axis=0, return_inverse=True)  # new patterns, each once
        cols[miss] = self.num_blocks + inv.ravel()
        mem = (sh > 0).astype(float)
        R, C = self.mesh.rows, self.mesh.cols
        grid = mem.reshape(-1, R, C).astype(bool)
        rows, colsx = grid.any(axis=2), grid.any(axis=1)
        r0, r1 = np.argmax(rows, axis=1), R - np.argmax(rows[:, ::-1], axis=1)
        c0, c1 = np.argmax(colsx, axis=1), C - np.argmax(colsx[:, ::-1], axis=1)
        disp, comb = _loads(self.mesh, mem, self.tree)
        out = Blocks(
            self.mesh, np.vstack([self.members, mem]), np.vstack([self.shape, np.c_[r1 - r0, c1 - c0]]),
            np.vstack([self.origin, np.c_[r0, c0]]), np.vstack([self.disp, disp]), np.vstack([self.comb, comb]),
            self.tree, np.vstack([self.share, sh]), np.r_[self.aligned, np.zeros(len(sh), dtype=bool)],
        )
        return out, cols


def make_blocks(mesh: Mesh, tree: bool = True, max_degree: int | None = None,
                shapes: list[tuple[int, int]] | None = None) -> Blocks:
    """Candidate blocks: every aligned power-of-two rectangle (optionally restricted to ``shapes``
    or to degree <= ``max_degree``)."""
    R, C = mesh.rows, mesh.cols
    mem, shp, org = [], [], []
    for a in _pow2_divisors(R):
        for b in _pow2_divisors(C):
            if shapes is not None and (a, b) not in shapes:
                continue
            if max_degree is not None and a * b > max_degree:
                continue
            for r0 in range(0, R, a):
                for c0 in range(0, C, b):
                    m = np.zeros((R, C))
                    m[r0 : r0 + a, c0 : c0 + b] = 1
                    mem.append(m.ravel())
                    shp.append((a, b))
                    org.append((r0, c0))
    members = np.array(mem)
    disp, comb = _loads(mesh, members, tree)
    return Blocks(mesh, members, np.array(shp), np.array(org), disp, comb, tree)


def flip_copies(shares: np.ndarray, mesh: Mesh) -> np.ndarray:
    """``[4, P, D]``: the patterns ``shares [P, D]`` as they are, with the mesh's rows flipped, its
    columns flipped, and both (the row/column flips that map XY routes to XY routes)."""
    g = np.asarray(shares, dtype=float).reshape(-1, mesh.rows, mesh.cols)
    out = [g, g[:, ::-1, :], g[:, :, ::-1], g[:, ::-1, ::-1]]
    return np.stack([o.reshape(len(g), -1) for o in out])


def layer_patterns(baselines: dict[str, LayerPlacement], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The patterns the non-replicated baseline placements of one layer use: ``(shares [P, D],
    expert [P])``, one per (baseline, expert) in the order given (duplicates are merged by
    :meth:`Blocks.with_patterns`). Replicated placements (EPLB) are left out."""
    sh, ex = [], []
    for lp in baselines.values():
        if lp.is_replicated or lp.num_experts != num_experts:
            continue
        sh.append(np.asarray(lp.shares, dtype=float))
        ex.append(np.asarray(lp.expert_of, dtype=np.int64))
    if not sh:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return np.vstack(sh), np.concatenate(ex)
