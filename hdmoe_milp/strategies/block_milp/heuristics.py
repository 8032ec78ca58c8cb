"""Warm starts for the block MILP: objective-aware greedy (all blocks, or one block shape at a time:
the uniform-degree LPT of the notes) and a move-one-expert local search. All vectorised over blocks.

Scores call the kernel on the block model's per-unit loads (:func:`costs.roofline_s` on node FLOPs
and weight reads, :func:`costs.phase_time_s` on link bytes). Exactness: a
candidate score plus ``BlockModel.hop_const_s`` is the objective of the resulting (partial)
assignment with one message per (token, expert), i.e. ``BlockModel(..., coactivation=None).objective``
and, for a complete assignment, the evaluator with ``coalesce="expert"`` under the block model's
conditions. With co-activation groups modelled the scores ignore them: an over-estimate of
``BlockModel.objective`` (never an under-estimate), checked in ``tests/test_surrogates.py``.
"""

from __future__ import annotations

import time

import numpy as np

from ...costs import phase_time_s, roofline_s
from .formulation import BlockModel


def _state(bm: BlockModel, assign: np.ndarray, skip: int | None = None) -> tuple[np.ndarray, ...]:
    """Node FLOPs, node activation-weighted weight reads (bytes), link dispatch/combine bytes and
    stored weight bytes per node of a (partial) assignment. Experts with ``assign < 0`` or index
    ``skip`` are left out."""
    mask = assign >= 0
    if skip is not None:
        mask = mask.copy()
        mask[skip] = False
    a = assign[mask]
    f, act = bm.f[mask], bm.a[mask]
    return (f @ bm.node_flops[a], act @ bm.mem_bytes[a], f @ bm.disp_bytes[a], f @ bm.comb_bytes[a],
            bm.mem_bytes[a].sum(axis=0))


def _candidate_scores(bm: BlockModel, i: int, state: tuple[np.ndarray, ...], allowed: np.ndarray) -> np.ndarray:
    """Objective (s, without the hop constant) after adding expert ``i`` to each block (inf where not
    allowed or over capacity)."""
    flops, reads, disp, comb, memb = state
    c = roofline_s(flops + bm.f[i] * bm.node_flops, reads + bm.a[i] * bm.mem_bytes, bm.hw).max(axis=1)
    score = c + phase_time_s(disp + bm.f[i] * bm.disp_bytes, bm.hw.link_bw) \
        + phase_time_s(comb + bm.f[i] * bm.comb_bytes, bm.hw.link_bw)
    ok = allowed.copy()
    if bm.cap_limit is not None:
        ok &= (memb[None, :] + bm.mem_bytes).max(axis=1) <= bm.cap_limit
    return np.where(ok, score, np.inf)


def greedy(bm: BlockModel, block_mask: np.ndarray | None = None) -> np.ndarray | None:
    """Heaviest expert first, each onto the allowed block that minimises the layer objective so far.
    ``block_mask [nb]`` restricts the blocks (e.g. one shape). None if some expert cannot be placed."""
    E = bm.model.num_experts
    assign = np.full(E, -1, dtype=np.int64)
    for i in np.argsort(-bm.f, kind="stable"):
        allowed = bm.allowed[i] if block_mask is None else bm.allowed[i] & block_mask
        s = _candidate_scores(bm, i, _state(bm, assign), allowed)
        if not np.isfinite(s).any():
            return None
        assign[i] = int(np.argmin(s))
    return assign


def local_search(bm: BlockModel, assign: np.ndarray, max_passes: int = 4, deadline: float | None = None
                 ) -> np.ndarray:
    """Move one expert at a time to its best block while the objective strictly improves (and,
    with ``deadline``, a ``time.perf_counter()`` time, until then)."""
    cur = assign.copy()
    best = bm.objective(cur)
    for _ in range(max_passes):
        improved = False
        for i in np.argsort(-bm.f, kind="stable"):
            if deadline is not None and time.perf_counter() >= deadline:
                return cur
            s = _candidate_scores(bm, i, _state(bm, cur, skip=i), bm.allowed[i])
            b = int(np.argmin(s))
            if b != cur[i]:
                trial = cur.copy()
                trial[i] = b
                obj = bm.objective(trial)
                if obj < best * (1 - 1e-12) and bm.feasible(trial):
                    cur, best, improved = trial, obj, True
        if not improved:
            break
    return cur


def warm_starts(bm: BlockModel, extra: dict[str, np.ndarray] | None = None, deadline: float | None = None
                ) -> dict[str, np.ndarray]:
    """Candidate assignments: ``extra`` (e.g. baselines), the greedy over all columns (blocks and
    the experts' patterns) and the greedy per block shape (aligned blocks only); the three best are
    also polished by local search (from their :meth:`BlockModel.canonical` copies, which symmetry
    breaking allows). Only plans of the family that fit the capacity are returned; ``extra`` ones as
    given (symmetry breaking may exclude them from the MILP, not from the returned plans).
    ``deadline`` (a ``time.perf_counter()`` time, None: none): no greedy or local-search move starts
    after it, except the greedies that run while there is no plan at all."""
    out: dict[str, np.ndarray] = {}
    for name, a in (extra or {}).items():
        if a is not None and bm.in_family(a):
            out[name] = a

    def in_time() -> bool:
        return deadline is None or time.perf_counter() < deadline

    if not out or in_time():
        g = greedy(bm)
        if g is not None:
            out["greedy"] = g
    aligned = bm.blocks.aligned
    shapes = {tuple(s) for s in bm.blocks.shape[aligned].tolist()}
    # square blocks first, small to large, then the more elongated ones: on large meshes the time
    # limit may cut this loop, and the square shapes (shortest routes for their size) are the ones
    # that pay (DeepSeek-V2-Lite on 16x16: 4x4 blocks, 15 % faster than cb, were reached only at 30 s)
    for shp in sorted(shapes, key=lambda rc: (abs(np.log2(rc[0] / rc[1])), rc[0] * rc[1], rc)):
        if out and not in_time():  # without any plan yet, the greedies go on: better late than none
            break
        mask = aligned & (bm.blocks.shape == np.array(shp)).all(axis=1)
        g = greedy(bm, mask)
        if g is not None:
            out[f"uniform-{shp[0]}x{shp[1]}"] = g
    # polish the three best
    ranked = sorted(out, key=lambda k: bm.objective(out[k]))[:3]
    for k in ranked:
        if not in_time():
            break
        out[k + "+ls"] = local_search(bm, bm.canonical(out[k]), deadline=deadline)
    return out
