"""Candidate node blocks of the offline MILP: aligned rectangles of the mesh.

A block of shape ``a x b`` (rows x cols, both powers of two dividing the mesh) starts at a row that
is a multiple of ``a`` and a column that is a multiple of ``b``. Its degree is ``d = a*b``; an expert
placed on it is split evenly, ``1/d`` of its weights and FLOPs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...costs import link_loads
from ...hardware import Mesh


def _pow2_divisors(n: int) -> list[int]:
    out, d = [], 1
    while d <= n:
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


@dataclass(frozen=True)
class Blocks:
    """All candidate blocks of a mesh. ``members [nb, D]`` is 1 where the node is in the block,
    ``shape [nb, 2]`` (rows, cols), ``origin [nb, 2]``, ``degree [nb]``. ``disp``/``comb``
    ``[nb, num_links]``: link load of one token sent to the block from spread homes (units of one
    vector), under the chosen delivery rule: :func:`costs.link_loads` of that one message."""

    mesh: Mesh
    members: np.ndarray
    shape: np.ndarray
    origin: np.ndarray
    disp: np.ndarray
    comb: np.ndarray
    tree: bool

    @property
    def num_blocks(self) -> int:
        return self.members.shape[0]

    @property
    def degree(self) -> np.ndarray:
        return self.members.sum(axis=1)

    def index_of(self, nodes: np.ndarray) -> int:
        """Index of the block holding exactly ``nodes`` (raises KeyError if none)."""
        want = np.zeros(self.mesh.num_nodes, dtype=bool)
        want[np.asarray(nodes)] = True
        hit = np.flatnonzero((self.members.astype(bool) == want).all(axis=1))
        if hit.size == 0:
            raise KeyError("no aligned block holds exactly these nodes")
        return int(hit[0])


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
    disp = np.zeros((len(mem), mesh.num_links))
    comb = np.zeros((len(mem), mesh.num_links))
    for i, m in enumerate(members):
        disp[i], comb[i], _ = link_loads(mesh, m[None, :].astype(bool), np.ones(1), None, tree)
    return Blocks(mesh, members, np.array(shp), np.array(org), disp, comb, tree)
