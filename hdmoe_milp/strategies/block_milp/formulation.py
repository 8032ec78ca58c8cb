"""The offline block MILP of one MoE layer (written out in ``formulations/offline_milp.md``).

Each expert i picks one candidate column b (``x_ib`` binary): an aligned block (the expert spread
evenly over it) or one of the expert's patterns (a node set with a share vector, taken from the
layer's baselines; ``blocks.py``). Aggregates per column: tokens ``y_b = sum_i f_i x_ib``,
activation-weighted weight reads ``z_b = sum_i a_i x_ib`` and expert count ``n_b = sum_i x_ib``;
messages ``u_s`` per distinct node set s (columns with the same nodes share a message). Epigraph
variables ``T_comp``, ``T_disp``, ``T_comb`` (microseconds) bound the node times and the per-link times;
the objective is their sum plus a hop-latency constant.

Every constant comes from the cost kernel (:mod:`hdmoe_milp.costs`): ``UnitCosts`` (FLOPs, vector
and weight bytes), ``activation_probability``, the two sides of ``roofline_s``, the per-link terms of
``phase_time_s`` (over ``link_loads`` of one message per node set), ``layer_capacity_bytes``.

Exactness against :func:`hdmoe_milp.evaluator.evaluate` (mesh mode, spread homes, the same delivery
rule, the expected workload of the coactivation, ``f_i = sum_{g ni i} f_g``; ``tests/test_surrogates.py``):

- compute: ``parts(assign)[0]`` equals the evaluator's ``compute_s`` exactly (any coalesce rule);
- ``objective(assign)`` equals the evaluator with ``coalesce="block"`` when every co-activation
  group is modelled, ``coalesce="expert"`` when none is, and lies between the two otherwise
  (tail tokens are charged one message per expert), provided the hop latency is 0 or some expert
  with traffic sits on a block touching a mesh corner (the diameter's end); otherwise it
  over-estimates by exactly ``2 * hop_latency * (diameter - longest used route)``;
- against the default evaluator (``coalesce="node"``: one message per token to the union of its
  experts' nodes) it never under-estimates: per link, a token's union message loads at most the sum
  of its per-block messages (tree: the union tree is the union of the block trees; unicast: blocks
  may overlap), and compute is equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ...costs import (
    CAPACITY_RTOL,
    UnitCosts,
    activation_probability,
    layer_capacity_bytes,
    phase_time_s,
    roofline_s,
)
from ...errors import InputError
from ...hardware import Hardware
from ...moe import MoEModel
from ...placement import LayerPlacement
from ...solvers import LinearModel, ModelBuilder, lp_solution
from .blocks import Blocks, flip_copies, make_blocks

US = 1e6  # the linear model works in microseconds


def link_terms_s(link_bytes: np.ndarray, link_bw: np.ndarray) -> np.ndarray:
    """Each link's term of :func:`costs.phase_time_s` (``[..., num_links]`` seconds): the phase time
    if that link alone were counted. The MILP's epigraph ``T >= every term`` encodes the max."""
    return phase_time_s(np.asarray(link_bytes)[..., None], np.asarray(link_bw)[:, None])


@dataclass(frozen=True)
class MilpOptions:
    """Switches of the formulation.

    ``delivery``: ``tree`` or ``unicast`` (as the evaluator). ``per_expert_cut``: add
    ``T_comp >= sum_b x_ib * load_i / d_b`` for every expert. ``symmetry``: restrict the hottest
    expert to blocks centred in the top-left quadrant (valid when all links have one bandwidth: the
    mesh's row and column flips preserve XY routes). ``shapes``/``max_degree``: restrict the
    candidate blocks. ``capacity_share``: fraction of each node's free DRAM one layer may use
    (default 1 / MoE layers: the per-layer decomposition). ``coloc_rows``: row budget of the
    co-activation groups modelled exactly (A4); ``lower_rows``: row budget of the groups whose union
    routes the evaluator-lower model (:meth:`BlockModel.to_linear_lower`) bounds by their longest
    single-expert route per link (the others by the mean of their experts' routes).
    ``patterns``: :func:`solve_layer` adds, per expert, the patterns the layer's non-replicated
    baselines use (the family then contains every such baseline). ``pattern_flips``: each pattern
    also with the mesh's rows, columns or both flipped, so that the family stays closed under the
    flips and symmetry breaking stays valid; without them symmetry breaking is off whenever a
    pattern is a column. ``packings``: with ``patterns``, :func:`solve_layer` also adds the patterns
    of this many of the layer's balanced packings with neighbour splits (:mod:`.packing`; the best
    under the evaluator, or the first built without co-activation sets; layers with at least
    :data:`.packing.MIN_PER_NODE` experts per node), which are warm starts too. ``node_order``:
    with ``patterns``, the best two of those layouts (tree delivery, co-activation sets given) also
    with their nodes' contents reordered on the mesh by :mod:`.nodes` where that lowers their
    evaluator time and leaves the family floor where it was (a packing is replaced by its reordered
    self; :func:`.solve.layer_family`).
    """

    delivery: str = "tree"
    per_expert_cut: bool = True
    symmetry: bool = True
    shapes: tuple[tuple[int, int], ...] | None = None
    max_degree: int | None = None
    capacity_share: float | None = None
    coloc_rows: int = 6000
    lower_rows: int = 0
    patterns: bool = True
    pattern_flips: bool = True
    single_route: bool = True
    packings: int = 2
    node_order: bool = True


class BlockModel:
    """Data and formulation of one layer; ``to_linear()`` gives the neutral MILP."""

    def __init__(self, model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                 options: MilpOptions | None = None, blocks: Blocks | None = None,
                 coactivation: tuple[np.ndarray, np.ndarray] | None = None,
                 patterns: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``freqs [E]`` tokens per token-slot, ``batch`` tokens. ``patterns``: ``(shares [P, D],
        expert [P])``, extra candidate columns, pattern p allowed for expert ``expert[p]`` only (with
        ``options.pattern_flips`` its mirror images too); see :func:`blocks.layer_patterns`."""
        self.model = model
        self.hw = hw
        self.opts = options or MilpOptions()
        self.f = np.asarray(freqs, dtype=float)
        if self.f.shape != (model.num_experts,):
            raise InputError("frequencies", f"expected {model.num_experts} values, got shape {self.f.shape}")
        if not np.all(np.isfinite(self.f)) or np.any(self.f < 0):
            raise InputError("frequencies", "must be finite and non-negative")
        self.B = float(batch)
        self.blocks = blocks or make_blocks(
            hw.mesh, tree=self.opts.delivery == "tree", max_degree=self.opts.max_degree,
            shapes=list(self.opts.shapes) if self.opts.shapes else None,
        )
        self.family = np.ones((model.num_experts, self.blocks.num_blocks), dtype=bool)  # [E, nb] candidates
        self.flip_closed = bool(self.blocks.aligned.all())  # aligned blocks map to aligned blocks
        if patterns is not None and len(patterns[1]):
            self._add_patterns(np.asarray(patterns[0], dtype=float), np.asarray(patterns[1], dtype=np.int64))
        bl = self.blocks
        per_node = bl.share  # [nb, D] share of a column's expert on each node
        self.set_of, self.set_first = bl.dest_sets  # [nb] node set of each column, [ns] one column per set
        self.unit = unit = UnitCosts.of(model, "mesh")
        # a_i: probability that a batch of B tokens activates expert i (the weight reads it causes)
        self.a = activation_probability(self.f * self.B, self.B)
        self.node_flops = per_node * (unit.flops_per_token * self.B)  # [nb, D] FLOPs per unit f
        self.mem_bytes = per_node * unit.weight_bytes  # [nb, D] bytes per expert placed (= per unit a)
        # the two sides of the roofline, linear in y_b and z_b
        self.comp_coef = roofline_s(self.node_flops, 0.0, hw)  # seconds per unit f
        self.mem_coef = roofline_s(0.0, self.mem_bytes, hw)  # seconds per unit a
        vec = self.B * unit.vector_bytes  # bytes on the wire per unit f
        self.disp_bytes = bl.disp * vec  # [nb, nl] link bytes per unit f
        self.comb_bytes = bl.comb * vec
        self.disp_coef = link_terms_s(self.disp_bytes, hw.link_bw)  # [nb, nl] seconds per unit f
        self.comb_coef = link_terms_s(self.comb_bytes, hw.link_bw)
        self.set_disp_bytes, self.set_comb_bytes = self.disp_bytes[self.set_first], self.comb_bytes[self.set_first]
        self.set_disp_coef, self.set_comb_coef = self.disp_coef[self.set_first], self.comb_coef[self.set_first]
        self.cap_layer = self._layer_capacity()
        self.allowed = self._allowed_blocks()
        self._set_coactivation(coactivation)

    def _add_patterns(self, shares: np.ndarray, expert: np.ndarray) -> None:
        """Append the patterns as columns allowed only for their experts (deduplicated; a pattern
        equal to a block is that block)."""
        E = self.model.num_experts
        if shares.shape[1] != self.hw.num_nodes or np.any((expert < 0) | (expert >= E)):
            raise InputError("patterns", f"need [P, {self.hw.num_nodes}] shares and expert ids in 0..{E - 1}")
        if self.opts.pattern_flips:
            shares = flip_copies(shares, self.hw.mesh).reshape(-1, shares.shape[1])
            expert = np.tile(expert, 4)
        self.blocks, cols = self.blocks.with_patterns(shares)
        nb = self.blocks.num_blocks
        fam = np.zeros((E, nb), dtype=bool)
        fam[:, : self.family.shape[1]] = self.family
        fam[expert, cols] = True
        self.family = fam
        self.flip_closed = self.opts.pattern_flips or bool(self.blocks.aligned.all())

    def _set_coactivation(self, coactivation: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Co-activation sets modelled exactly (ids ``[G, k]``, frequencies ``[G]``); the tail
        frequency ``f_tail`` of each expert is what remains, modelled additively."""
        # the row budget counts the aligned blocks (as before patterns): patterns add rows on top
        k, nb = self.model.top_k, int(self.blocks.aligned.sum())
        self.coactivation = coactivation
        G = 0
        if coactivation is not None and k > 1:
            ids, fg = np.asarray(coactivation[0]), np.asarray(coactivation[1], dtype=float)
            G = min(int((fg > 0).sum()), self.opts.coloc_rows // (k * nb))
            top = np.argsort(-fg, kind="stable")[:G]
            self.g_ids, self.g_f = ids[top].astype(np.int64), fg[top]
        if G == 0:
            self.g_ids, self.g_f = np.zeros((0, k), dtype=np.int64), np.zeros(0)
        covered = np.bincount(self.g_ids.ravel(), weights=np.repeat(self.g_f, k), minlength=self.model.num_experts)
        self.f_tail = np.clip(self.f - covered, 0.0, None)

    def traffic(self, assign: np.ndarray) -> np.ndarray:
        """``[ns]`` tokens-worth of messages sent to each distinct node set: one per (tail token,
        expert) and one per (modelled group token, distinct node set of its experts)."""
        a = self.set_of[np.asarray(assign)]
        u = np.bincount(a, weights=self.f_tail, minlength=len(self.set_first))
        if len(self.g_f):
            blk = np.sort(a[self.g_ids], axis=1)
            first = np.ones(blk.shape, dtype=bool)
            first[:, 1:] = blk[:, 1:] != blk[:, :-1]
            np.add.at(u, blk[first], np.broadcast_to(self.g_f[:, None], blk.shape)[first])
        return u

    # --- data --------------------------------------------------------------------------------
    def _layer_capacity(self) -> float | None:
        cap_layer = layer_capacity_bytes(self.model, self.hw, self.opts.capacity_share)
        if cap_layer is None:
            return None
        need = self.model.num_experts * self.unit.weight_bytes / self.hw.num_nodes
        if cap_layer < need * (1 - 1e-9):
            cap = self.hw.dram_capacity_bytes
            raise InputError(
                "hardware.dram_capacity_bytes",
                f"{cap / 1e9:.3f} GB per node leaves {cap_layer / 1e9:.3f} GB for this layer's experts, but even "
                f"spread evenly they need {need / 1e9:.3f} GB per node",
                "raise the capacity or use a larger mesh",
            )
        return cap_layer

    @property
    def symmetric(self) -> bool:
        """Whether symmetry breaking applies: asked for, one bandwidth on every link, and the family
        closed under the mesh's row and column flips."""
        bw = self.hw.link_bw
        return bool(self.opts.symmetry and self.model.num_experts > 0 and bw.size and np.all(bw == bw[0])
                    and self.flip_closed)

    def _allowed_blocks(self) -> np.ndarray:
        """``[E, nb]`` bool: candidate columns per expert (``family``) after symmetry breaking (the
        hottest expert's column has its share-weighted centre in the top-left quadrant; a flip maps
        any plan of the flip-closed family to one that satisfies this, at the same cost) and capacity."""
        allowed = self.family.copy()
        if self.symmetric:
            R, C = self.hw.mesh.rows, self.hw.mesh.cols
            centre = self.blocks.centroid
            eps = 1e-9
            ok = (centre[:, 0] <= (R - 1) / 2.0 + eps) & (centre[:, 1] <= (C - 1) / 2.0 + eps)
            allowed[int(np.argmax(self.f)), :] &= ok
        return allowed & self.column_fits[None, :]

    @property
    def cap_limit(self) -> float | None:
        """The most bytes of this layer's experts a node may hold (None: no capacity): the layer's
        capacity share with the rounding every capacity check forgives (:data:`costs.CAPACITY_RTOL`).
        One number for every check of the search and both models: a strict copy of it dropped every
        one-node column of a layer whose share is one expert rounded down by 1 ulp, and the bound
        with them."""
        return None if self.cap_layer is None else self.cap_layer * (1 + CAPACITY_RTOL)

    @property
    def column_fits(self) -> np.ndarray:
        """``[nb]`` bool: columns whose largest shard fits the layer's capacity on its own (all
        without a capacity); no plan uses the others."""
        if self.cap_layer is None:
            return np.ones(self.blocks.num_blocks, dtype=bool)
        return self.mem_bytes.max(axis=1) <= self.cap_limit

    @cached_property
    def hop_const_s(self) -> float:
        """Hop-latency terms of both phases (:func:`costs.phase_time_s` with no bytes) at the mesh's
        diameter: exact when some expert with traffic uses a node at the diameter's end (a corner),
        an over-estimate otherwise."""
        nl, diameter = self.hw.mesh.num_links, int(self.hw.mesh.distance.max())
        return 2.0 * float(phase_time_s(np.zeros(nl), self.hw.link_bw, self.hw.hop_latency_s, diameter))

    # --- exact objective of an assignment ----------------------------------------------------
    def node_time_s(self, y: np.ndarray, z: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Per-node roofline (s, ``[..., D]``) of weights ``y [..., n]`` (tokens, units of f) and
        ``z [..., n]`` (activations) on ``blocks [n]``."""
        return roofline_s(y @ self.node_flops[blocks], z @ self.mem_bytes[blocks], self.hw)

    def parts(self, assign: np.ndarray) -> tuple[float, float, float]:
        """(compute, dispatch, combine) seconds of ``assign [E]`` (column per expert), without the
        hop-latency constant."""
        a = np.asarray(assign)
        comp = self.node_time_s(self.f, self.a, a).max()
        u = self.traffic(a)
        disp = phase_time_s(u @ self.set_disp_bytes, self.hw.link_bw)
        comb = phase_time_s(u @ self.set_comb_bytes, self.hw.link_bw)
        return float(comp), float(disp), float(comb)

    def objective(self, assign: np.ndarray) -> float:
        """Layer latency in seconds under the MILP's model (= the evaluator with ``coalesce="block"``
        when every group is modelled, ``"expert"`` when none is; see the module docstring)."""
        return float(sum(self.parts(assign)) + self.hop_const_s)

    def fits(self, assign: np.ndarray) -> bool:
        """Whether ``assign [E]`` stays within the layer's capacity share on every node."""
        return self.cap_limit is None or self.mem_bytes[np.asarray(assign)].sum(axis=0).max() <= self.cap_limit

    def feasible(self, assign: np.ndarray) -> bool:
        """Whether ``assign [E]`` is feasible for the MILP (``allowed``: family, symmetry breaking,
        capacity)."""
        a = np.asarray(assign)
        return bool(np.all(self.allowed[np.arange(len(a)), a])) and self.fits(a)

    def in_family(self, assign: np.ndarray) -> bool:
        """Whether ``assign [E]`` is a plan of the family (every expert on one of its candidate columns,
        within capacity), whether or not symmetry breaking lets the MILP reach it."""
        a = np.asarray(assign)
        return bool(np.all(self.family[np.arange(len(a)), a])) and self.fits(a)

    def canonical(self, assign: np.ndarray) -> np.ndarray:
        """``assign [E]`` mapped by the mesh flip (none, rows, columns, both) that puts the hottest
        expert's column in the top-left quadrant when symmetry breaking is on: the same cost under
        the evaluator and the model, and :meth:`feasible` if ``assign`` is :meth:`in_family`.
        Unchanged when symmetry breaking is off or no flip does it."""
        a = np.asarray(assign)
        if not self.symmetric or self.feasible(a):
            return a
        for g in flip_copies(self.blocks.share[a], self.hw.mesh)[1:]:
            b = self.blocks.match(g, among=self.family)
            if np.all(b >= 0) and self.feasible(b):
                return b
        return a

    def placement(self, assign: np.ndarray) -> LayerPlacement:
        """The one-copy placement of ``assign [E]``: expert i with the shares of its column."""
        return LayerPlacement.from_shares(self.blocks.share[np.asarray(assign)])

    def assign_from_shares(self, shares: np.ndarray) -> np.ndarray | None:
        """Columns of a one-copy placement ``shares [E, D]``, or None if some expert's shares are not
        one of its candidate columns (a block evenly, or one of its patterns)."""
        s = np.asarray(shares, dtype=float)
        if s.shape != (self.model.num_experts, self.hw.num_nodes):
            return None
        cols = self.blocks.match(s, among=self.family)
        return None if np.any(cols < 0) else cols

    # --- the MILP ------------------------------------------------------------------------------
    def to_linear(self) -> LinearModel:
        """The layer's MILP as a neutral LinearModel (``full_vector`` turns an assignment into a hint)."""
        E, nb, D = self.model.num_experts, self.blocks.num_blocks, self.hw.num_nodes
        nl, ns = self.hw.mesh.num_links, len(self.set_first)
        G = len(self.g_f)
        mb = ModelBuilder()
        ix: dict[str, np.ndarray] = {}
        ix["x"] = x = self.add_x(mb)
        fsum, asum = float(self.f.sum()), float(self.a.sum())
        ix["y"] = y = mb.add_vars("y", nb, 0.0, fsum, integer=False)
        ix["z"] = z = mb.add_vars("z", nb, 0.0, asum, integer=False)
        ix["u"] = u = mb.add_vars("u", ns, 0.0, fsum, integer=False)
        ix["Y"] = Y = np.full((G, ns), -1, dtype=np.int64)  # Y_gs only where some expert of g can use s
        reach = self.group_reach()
        Y[reach] = mb.add_vars("Y", int(reach.sum()), 0.0, 1.0, integer=False)
        n = None
        if self.cap_layer is not None:
            ix["n"] = n = mb.add_vars("n", nb, 0.0, float(E), integer=True)
        # upper bounds of the epigraph variables (CP-SAT needs finite domains), with a little slack
        ub_comp = 1.001 * US * max((fsum * self.comp_coef).max(), (asum * self.mem_coef).max())
        ub_disp = 1.001 * US * fsum * max(self.disp_coef.max(initial=0.0), 1e-30)
        ub_comb = 1.001 * US * fsum * max(self.comb_coef.max(initial=0.0), 1e-30)
        ix["T"] = t = np.r_[mb.add_vars("T_comp", 1, 0.0, ub_comp, integer=False, cost=1.0),
                            mb.add_vars("T_disp", 1, 0.0, ub_disp, integer=False, cost=1.0),
                            mb.add_vars("T_comb", 1, 0.0, ub_comb, integer=False, cost=1.0)]
        self.build_assignment(mb, x)
        self.build_aggregates(mb, x, y, z, n)
        self.build_traffic(mb, x, u, Y)
        self.build_node_time(mb, y, z, t[0])
        self.build_link_time(mb, u, t[1], t[2], nl)
        if self.opts.per_expert_cut:
            self.build_per_expert_cut(mb, x, t[0])
        if n is not None:
            self.build_capacity(mb, n, D)
        lm = mb.build(obj_const=US * self.hop_const_s)
        self._ix = ix
        return lm

    def add_x(self, mb: ModelBuilder, exclude: np.ndarray | None = None) -> np.ndarray:
        """The binaries ``x_ib``, one per candidate pair of ``family`` (upper bound 0 where symmetry
        breaking or capacity excludes it, or ``exclude [E, nb]``): ``[E, nb]`` variable ids, -1 where
        (i, b) is no candidate."""
        x = np.full(self.family.shape, -1, dtype=np.int64)
        ok = self.allowed if exclude is None else self.allowed & ~exclude
        x[self.family] = mb.add_vars("x", int(self.family.sum()), 0.0, ok[self.family].astype(float), integer=True)
        return x

    def group_reach(self) -> np.ndarray:
        """``[G, ns]`` bool: node sets some expert of each modelled group may use (``family``)."""
        ns = len(self.set_first)
        use = np.zeros((self.model.num_experts, ns), dtype=bool)  # [E, ns] expert i has a column on set s
        ei, bi = np.nonzero(self.family)
        use[ei, self.set_of[bi]] = True
        return use[self.g_ids].any(axis=1) if len(self.g_f) else np.zeros((0, ns), dtype=bool)

    def build_assignment(self, mb: ModelBuilder, x: np.ndarray) -> None:
        """(A1) every expert on exactly one of its candidate columns: sum_b x_ib = 1."""
        for i in range(x.shape[0]):
            xi = x[i][x[i] >= 0]
            mb.add_row(xi, np.ones(len(xi)), 1.0, 1.0, kind="exact")

    def build_aggregates(self, mb: ModelBuilder, x, y, z, n) -> None:
        """(A2) y_b = sum_i f_i x_ib, z_b = sum_i a_i x_ib, n_b = sum_i x_ib."""
        for b in range(x.shape[1]):
            on = np.flatnonzero(x[:, b] >= 0)
            xb = x[on, b]
            mb.add_row(np.r_[y[b], xb], np.r_[1.0, -self.f[on]], 0.0, 0.0)
            mb.add_row(np.r_[z[b], xb], np.r_[1.0, -self.a[on]], 0.0, 0.0)
            if n is not None:
                mb.add_row(np.r_[n[b], xb], np.r_[1.0, -np.ones(len(on))], 0.0, 0.0, kind="exact")

    def build_traffic(self, mb: ModelBuilder, x, u, Y) -> None:
        """(A3) u_s = sum_i f_tail_i sum_{b in s} x_ib + sum_g f_g Y_gs and (A4) Y_gs >= sum_{b in s} x_ib
        for i in g: a modelled group sends one message per distinct node set of its experts."""
        cols = [np.flatnonzero(self.set_of == s) for s in range(len(self.set_first))]
        for s, bs in enumerate(cols):
            xs = x[:, bs]
            ok = xs >= 0
            ft = np.broadcast_to(self.f_tail[:, None], xs.shape)
            on = Y[:, s] >= 0
            mb.add_row(np.r_[u[s], xs[ok], Y[on, s]], np.r_[1.0, -ft[ok], -self.g_f[on]], 0.0, 0.0)
        for g, members in enumerate(self.g_ids):
            for i in members:
                for s, bs in enumerate(cols):
                    xs = x[i, bs][x[i, bs] >= 0]
                    if xs.size:
                        mb.add_row(np.r_[Y[g, s], xs], np.r_[1.0, -np.ones(len(xs))], 0.0, np.inf)

    def build_node_time(self, mb: ModelBuilder, y, z, t_comp) -> None:
        """(C1) per node c: T_comp >= sum_b y_b * FLOPs share / comp and >= sum_b z_b * bytes share / BWmem."""
        for c in range(self.hw.num_nodes):
            on = np.flatnonzero(self.blocks.members[:, c])
            mb.add_row(np.r_[t_comp, y[on]], np.r_[-1.0, US * self.comp_coef[on, c]], -np.inf, 0.0)
            mb.add_row(np.r_[t_comp, z[on]], np.r_[-1.0, US * self.mem_coef[on, c]], -np.inf, 0.0)

    def build_link_time(self, mb: ModelBuilder, u, t_disp, t_comb, nl: int) -> None:
        """(L1) per directed link l: T_disp >= sum_s u_s * dispatch bytes / BW_l, same for combine."""
        for ln in range(nl):
            for coef, t in ((self.set_disp_coef, t_disp), (self.set_comb_coef, t_comb)):
                used = np.flatnonzero(coef[:, ln] > 0)
                if used.size:
                    mb.add_row(np.r_[t, u[used]], np.r_[-1.0, US * coef[used, ln]], -np.inf, 0.0)

    def build_per_expert_cut(self, mb: ModelBuilder, x, t_comp) -> None:
        """(V1) T_comp >= sum_b x_ib * f_i * FLOPs / (d_b comp): a node holding a shard of i carries it."""
        top = self.comp_coef.max(axis=1)  # per-node share of one unit of f on block b
        topm = self.mem_coef.max(axis=1)
        for i in range(x.shape[0]):
            on = x[i] >= 0
            mb.add_row(np.r_[t_comp, x[i, on]], np.r_[-1.0, US * self.f[i] * top[on]], -np.inf, 0.0)
            mb.add_row(np.r_[t_comp, x[i, on]], np.r_[-1.0, US * self.a[i] * topm[on]], -np.inf, 0.0)

    def build_capacity(self, mb: ModelBuilder, n, D: int, kind: str = "safe") -> None:
        """(M1) per node: sum_b n_b * expert bytes / d_b <= this layer's capacity. ``kind``: how an
        integer-scaling backend may round the rows: ``safe`` (its solutions stay feasible; the
        optimisation model) or ``relax`` (its bound stays valid; the certificate's model)."""
        for c in range(D):  # :attr:`cap_limit`: both models admit every plan :meth:`fits` admits
            on = np.flatnonzero(self.blocks.members[:, c])
            mb.add_row(n[on], self.mem_bytes[on, c] / 1e9, -np.inf, self.cap_limit / 1e9, kind=kind)

    # --- the evaluator-lower relaxation (the certificate) -----------------------------------------
    @cached_property
    def hop_lower_s(self) -> float:
        """Hop-latency terms of both phases at the smallest route length any plan can have (the
        smallest eccentricity of a node from the spread homes): at most the evaluator's hop terms."""
        if not np.any(self.f > 0):
            return 0.0
        ecc = int(self.hw.mesh.distance.max(axis=0).min())
        nl = self.hw.mesh.num_links
        return 2.0 * float(phase_time_s(np.zeros(nl), self.hw.link_bw, self.hw.hop_latency_s, ecc))

    @cached_property
    def area_lower_s(self) -> float:
        """A bound needing no solve: the busiest node's roofline is at least the roofline of the mean
        node (every plan computes all tokens' FLOPs and reads every active expert's weights once),
        communication at least 0, hop terms as :attr:`hop_lower_s`."""
        D = self.hw.num_nodes
        flops = float(self.f.sum()) * self.unit.flops_per_token * self.B / D
        reads = float(self.a.sum()) * self.unit.weight_bytes / D
        return float(roofline_s(flops, reads, self.hw)) + self.hop_lower_s

    @cached_property
    def cut_floors_s(self) -> tuple[float, float]:
        """Bounds needing no solve on the dispatch and the combine phase's busiest-link term (s),
        from cuts of the mesh (spread homes; either delivery rule). Cut between columns ``j - 1``
        and ``j``, with a share ``a = j/C`` of the columns (so of the homes) on the left: every
        token's destination set meets the left part or the right part (shares ``q`` and ``p`` of
        the tokens, ``p + q >= 1``). The tokens homed on the left whose set meets the right cross the
        cut eastward in dispatch and westward in combine: ``a·p`` of the batch's vectors, and
        ``(1 - a)·q`` the other way. XY routes move along the sender's row first. So in dispatch
        every row's crossing link carries its own ``1/R`` of that, and ``max(load / BW)`` is at
        least that over the row's bandwidth. In combine only the sum over the rows is fixed, so
        the busiest link carries at least the sum over the direction's total bandwidth. Row cuts
        swap the roles: combine's Y leg runs in the home's column. Minimising
        ``max(A·p, B·(1 - p))`` over ``p`` gives ``A·B / (A + B)``. Each phase takes the largest
        value over all cuts. With one bandwidth on every link, that is the middle cut's
        ``max(a(1 - a)/R, b(1 - b)/C) · vectors / BW``. Unicast loads are at least tree loads.
        Argument: ``formulations/offline_milp.md``, "The cut floor"."""
        mesh = self.hw.mesh
        R, C = mesh.rows, mesh.cols
        if mesh.num_links == 0:
            return 0.0, 0.0
        bw = self.hw.link_bw
        lid = mesh.link_id

        def value(share: float, fwd: np.ndarray, back: np.ndarray, per_link: bool, parts: int) -> float:
            # fwd: the links the near side's tokens cross on (bandwidths); back: the other way
            if per_link:  # each link carries its 1/parts of the side's share
                A, B = share / (parts * fwd.min()), (1 - share) / (parts * back.min())
            else:  # only the sum over the links is fixed
                A, B = share / fwd.sum(), (1 - share) / back.sum()
            return A * B / (A + B)

        disp = comb = 0.0
        for j in range(1, C):  # column cuts: east links (r, j-1) -> (r, j), west links back
            east = bw[[lid(r * C + j - 1, r * C + j) for r in range(R)]]
            west = bw[[lid(r * C + j, r * C + j - 1) for r in range(R)]]
            a = j / C
            disp = max(disp, value(a, east, west, True, R))
            comb = max(comb, value(a, west, east, False, R))
        for i in range(1, R):  # row cuts: south links (i-1, c) -> (i, c), north links back
            south = bw[[lid((i - 1) * C + c, i * C + c) for c in range(C)]]
            north = bw[[lid(i * C + c, (i - 1) * C + c) for c in range(C)]]
            b = i / R
            disp = max(disp, value(b, south, north, False, C))
            comb = max(comb, value(b, north, south, True, C))
        unit = self.token_weight * self.unit.vector_bytes
        return disp * unit, comb * unit

    @property
    def token_weight(self) -> float:
        """Tokens of the layer's workload: ``B`` times the co-activation sets' total frequency, or,
        without sets, the tokens that frequencies summing to ``sum(f)`` over top-k imply."""
        if self.coactivation is not None:
            return self.B * float(np.asarray(self.coactivation[1], dtype=float).sum())
        return self.B * float(self.f.sum()) / max(self.model.top_k, 1)

    @cached_property
    def column_floor_s(self) -> np.ndarray:
        """``[E, nb]``: a lower bound (s) on the default evaluator's layer time of every plan of the
        family that puts expert i on column b: the busiest node carries at least i's largest shard
        and at least the mean node (:attr:`area_lower_s`), each phase takes at least i's tokens on
        the busiest link of b's message (U3) and at least its cut floor (:attr:`cut_floors_s`),
        plus the minimum hop terms."""
        single = np.maximum(self.f[:, None] * self.comp_coef.max(axis=1)[None, :],
                            self.a[:, None] * self.mem_coef.max(axis=1)[None, :])
        comp = np.maximum(single, self.area_lower_s - self.hop_lower_s)
        cut_disp, cut_comb = self.cut_floors_s
        disp = np.maximum(self.f[:, None] * self.disp_coef.max(axis=1, initial=0.0)[None, :], cut_disp)
        comb = np.maximum(self.f[:, None] * self.comb_coef.max(axis=1, initial=0.0)[None, :], cut_comb)
        return comp + disp + comb + self.hop_lower_s

    @cached_property
    def family_floor_s(self) -> float:
        """A bound needing no solve on every plan of the family: each expert sits on one of its
        columns (within capacity), so every plan takes at least ``max_i min_b column_floor_s[i, b]``.
        At least :attr:`area_lower_s` plus both :attr:`cut_floors_s`; on the layers measured
        it lies between 0.2 % below and 1.5 % above the relaxation's LP optimum, which may mix an
        expert's columns (``formulations/offline_milp.md``, "The family floor")."""
        ok = self.family & self.column_fits[None, :]  # not ``allowed``: no symmetry breaking here
        per_expert = np.where(ok, self.column_floor_s, np.inf).min(axis=1)
        floor = self.area_lower_s + sum(self.cut_floors_s)
        finite = per_expert[np.isfinite(per_expert)]
        return float(max(floor, finite.max(initial=floor)))

    def beaten_columns(self, incumbent_s: float) -> np.ndarray:
        """``[E, nb]`` bool: the pairs (i, b) whose :attr:`column_floor_s` exceeds ``incumbent_s``
        (the evaluator's time of a plan of the family): no plan using them beats that plan, so a
        bound over the rest, capped at ``incumbent_s``, is a bound on the family's optimum."""
        return self.column_floor_s > incumbent_s * (1 + 1e-9)

    @property
    def all_groups_rows(self) -> int | None:
        """Rows (U1) needs to track every co-activation group in :meth:`to_linear_lower`, or None
        without groups (no co-activation sets, or top-1)."""
        if self.coactivation is None or self.model.top_k < 2:
            return None
        G = int((np.asarray(self.coactivation[1], dtype=float) > 0).sum())
        return 2 * self.model.top_k * self.hw.mesh.num_links * G

    def lower_groups(self, lower_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Groups the lower model bounds per link by their longest single-expert route (ids ``[G, k]``,
        frequencies ``[G]``; as many as ``lower_rows``, default ``options.lower_rows``, allows) and every
        expert's remaining frequency, bounded by the mean route."""
        k, nl = self.model.top_k, self.hw.mesh.num_links
        budget = self.opts.lower_rows if lower_rows is None else lower_rows
        ids, fg = np.zeros((0, k), dtype=np.int64), np.zeros(0)
        if self.coactivation is not None and k > 1:
            gi, gf = np.asarray(self.coactivation[0]), np.asarray(self.coactivation[1], dtype=float)
            G = min(int((gf > 0).sum()), budget // (2 * k * max(nl, 1)))
            top = np.argsort(-gf, kind="stable")[:G]
            ids, fg = gi[top].astype(np.int64), gf[top]
        covered = np.bincount(ids.ravel(), weights=np.repeat(fg, k), minlength=self.model.num_experts)
        return ids, fg, np.clip(self.f - covered, 0.0, None)

    def to_linear_lower(self, lower_rows: int | None = None, incumbent_s: float | None = None) -> LinearModel:
        """A MILP whose optimum is at most the default evaluator's (``coalesce="node"``) best layer time
        over this family, blocks and patterns (``formulations/offline_milp.md``, "The certificate"):
        compute as in :meth:`to_linear` (exact); a token's union message loads each link at least as
        much as the message to any one of its experts' columns, so a tracked group g adds ``f_g * w_gl`` with
        ``w_gl >= route of expert i on link l`` for every i in g, and every other token adds the mean
        of its experts' routes (``f_i^rest / k`` per expert); hop terms at the smallest route length.

        ``incumbent_s``: the evaluator's time of a plan of the family; every ``x_ib`` whose
        :attr:`column_floor_s` exceeds it is fixed at 0 (no plan using that column beats the
        incumbent), so that ``min(incumbent_s, optimum)`` stays a bound on the family's optimum."""
        E, nb, D = self.model.num_experts, self.blocks.num_blocks, self.hw.num_nodes
        nl, k = self.hw.mesh.num_links, self.model.top_k
        ids, fg, rest = self.lower_groups(lower_rows)
        G = len(fg)
        mb = ModelBuilder()
        exclude = None if incumbent_s is None else self.beaten_columns(incumbent_s)
        x = self.add_x(mb, exclude)
        fsum, asum = float(self.f.sum()), float(self.a.sum())
        y = mb.add_vars("y", nb, 0.0, fsum, integer=False)
        z = mb.add_vars("z", nb, 0.0, asum, integer=False)
        u = mb.add_vars("u", nb, 0.0, fsum, integer=False)
        n = mb.add_vars("n", nb, 0.0, float(E), integer=True) if self.cap_layer is not None else None
        ub_comp = 1.001 * US * max((fsum * self.comp_coef).max(), (asum * self.mem_coef).max())
        ub_disp = 1.001 * US * fsum * max(self.disp_coef.max(initial=0.0), 1e-30)
        ub_comb = 1.001 * US * fsum * max(self.comb_coef.max(initial=0.0), 1e-30)
        cut_d, cut_c = (US * c for c in self.cut_floors_s)  # every plan's phases carry this (cuts of the mesh)
        t = np.r_[mb.add_vars("T_comp", 1, 0.0, ub_comp, integer=False, cost=1.0),
                  mb.add_vars("T_disp", 1, min(cut_d, ub_disp), max(ub_disp, cut_d), integer=False, cost=1.0),
                  mb.add_vars("T_comb", 1, min(cut_c, ub_comb), max(ub_comb, cut_c), integer=False, cost=1.0)]
        self.build_assignment(mb, x)
        self.build_aggregates(mb, x, y, z, n)
        for b in range(nb):  # u_b: every token not in a tracked group, 1/k of a message per expert
            on = x[:, b] >= 0
            mb.add_row(np.r_[u[b], x[on, b]], np.r_[1.0, -rest[on] / max(k, 1)], 0.0, 0.0)
        self.build_node_time(mb, y, z, t[0])
        if self.opts.per_expert_cut:
            self.build_per_expert_cut(mb, x, t[0])
        if n is not None:  # rounded as a relaxation: a backend's bound on this model stays a bound
            self.build_capacity(mb, n, D, kind="relax")
        tracked = np.unique(ids) if G else np.zeros(0, dtype=np.int64)
        for coef, tt, name in ((self.disp_coef, t[1], "wd"), (self.comb_coef, t[2], "wc")):
            top = US * float(coef.max(initial=0.0)) + 1e-9
            w = mb.add_vars(name, G * nl, 0.0, top, integer=False).reshape(G, nl)
            # r_il: expert i's own route on link l, once per tracked expert (its groups' rows share it)
            r = np.full((E, nl), -1, dtype=np.int64)
            if G:
                r[tracked] = mb.add_vars("r" + name, len(tracked) * nl, 0.0, top, integer=False).reshape(-1, nl)
            for ln in range(nl):
                used = np.flatnonzero(coef[:, ln] > 0)
                if not used.size:
                    continue
                for i in tracked:
                    on = used[x[i, used] >= 0]
                    mb.add_row(np.r_[r[i, ln], x[i, on]], np.r_[1.0, -US * coef[on, ln]], 0.0, 0.0)
                for g in range(G):
                    for i in ids[g]:  # (U1) w_gl >= the route of expert i of g on link l
                        mb.add_row(np.r_[w[g, ln], r[i, ln]], np.r_[1.0, -1.0], 0.0, np.inf)
                # (U2) T >= mean routes of the other tokens + tracked groups' longest routes
                mb.add_row(np.r_[tt, u[used], w[:, ln]], np.r_[-1.0, US * coef[used, ln], fg], -np.inf, 0.0)
            if self.opts.single_route:
                # (U3) every token holding expert i loads each link at least as its message to i's
                # column does: T >= f_i * (that column's busiest link), whatever the column
                busiest = coef.max(axis=1, initial=0.0)
                for i in range(E):
                    on = np.flatnonzero(x[i] >= 0)
                    mb.add_row(np.r_[tt, x[i, on]], np.r_[-1.0, US * self.f[i] * busiest[on]], -np.inf, 0.0)
        return mb.build(obj_const=US * self.hop_lower_s)

    @property
    def var_ids(self) -> dict[str, np.ndarray]:
        """Variable ids of the model the last :meth:`to_linear` built, by name: ``x [E, nb]``,
        ``y``, ``z [nb]``, ``u [sets]``, ``Y [G, sets]``, ``n [nb]`` (if capacity), ``T [3]``; -1 where a
        variable does not exist (no candidate, or a group that cannot reach the set)."""
        return self._ix

    def full_vector(self, assign: np.ndarray, lm: LinearModel) -> np.ndarray:
        """All variable values implied by an assignment (for hints and MIP starts)."""
        E, nb = self.model.num_experts, self.blocks.num_blocks
        ix = self._ix
        a = np.asarray(assign)
        v = np.zeros(lm.num_vars)
        X = np.zeros((E, nb))
        X[np.arange(E), a] = 1.0
        v[ix["x"][self.family]] = X[self.family]
        v[ix["y"]] = self.f @ X
        v[ix["z"]] = self.a @ X
        v[ix["u"]] = self.traffic(a)
        if len(self.g_f):
            S = np.zeros((E, len(self.set_first)))
            S[np.arange(E), self.set_of[a]] = 1.0
            reach = ix["Y"] >= 0
            v[ix["Y"][reach]] = S[self.g_ids].max(axis=1)[reach]
        if "n" in ix:
            v[ix["n"]] = X.sum(axis=0)
        comp, disp, comb = self.parts(a)
        # (V1): the node holding the largest shard of each expert, alone
        per_exp = float(roofline_s(self.f * self.node_flops.max(axis=1)[a], self.a * self.mem_bytes.max(axis=1)[a],
                                   self.hw).max())
        v[ix["T"]] = US * np.array([max(comp, per_exp), disp, comb])
        return v

    def lower_vector(self, assign: np.ndarray, lm: LinearModel) -> np.ndarray | None:
        """A point of :meth:`to_linear_lower` (``lm``) with the ``x`` of ``assign [E]`` (which symmetry
        breaking must allow: see :meth:`canonical`) and the other variables at their cheapest
        completion (an LP with ``x`` fixed), for a hint; None if that LP does not solve."""
        X = np.zeros(self.family.shape)
        X[np.arange(self.model.num_experts), np.asarray(assign)] = 1.0
        lb, ub = lm.lb.copy(), lm.ub.copy()
        nx = int(self.family.sum())
        lb[:nx] = ub[:nx] = X[self.family]
        return lp_solution(lm, lb, ub)

    def decode(self, xvec: np.ndarray) -> np.ndarray:
        """``[E]`` column per expert of a solution ``xvec`` of :meth:`to_linear` (or of
        :meth:`to_linear_lower`: both start with the ``x`` of :meth:`add_x`, in ``family`` order)."""
        X = np.full(self.family.shape, -np.inf)
        X[self.family] = np.asarray(xvec)[: int(self.family.sum())]
        return np.argmax(np.where(self.allowed, X, -np.inf), axis=1)
