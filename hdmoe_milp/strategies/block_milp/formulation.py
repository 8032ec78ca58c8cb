"""The offline block MILP of one MoE layer (written out in ``formulations/offline_milp.md``).

Each expert i picks one candidate block b (``x_ib`` binary). Aggregates per block: tokens
``y_b = sum_i f_i x_ib``, activation-weighted weight reads ``z_b = sum_i a_i x_ib`` and expert count
``n_b = sum_i x_ib``. Epigraph variables ``T_comp``, ``T_disp``, ``T_comb`` (microseconds) bound the
node times and the per-link times; the objective is their sum, i.e. the evaluator's expected layer
latency with one message per (token, expert) (``EvalOptions(coalesce=False)``), spread homes and
the same delivery rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ...errors import InputError
from ...hardware import Hardware
from ...moe import MoEModel
from ...placement import LayerPlacement
from ...solvers import LinearModel, ModelBuilder
from .blocks import Blocks, make_blocks

US = 1e6  # the linear model works in microseconds


@dataclass(frozen=True)
class MilpOptions:
    """Switches of the formulation.

    ``delivery``: ``tree`` or ``unicast`` (as the evaluator). ``per_expert_cut``: add
    ``T_comp >= sum_b x_ib * load_i / d_b`` for every expert. ``symmetry``: restrict the hottest
    expert to blocks centred in the top-left quadrant (valid when all links have one bandwidth: the
    mesh's row and column flips preserve XY routes). ``shapes``/``max_degree``: restrict the
    candidate blocks. ``capacity_share``: fraction of each node's free DRAM one layer may use
    (default 1 / MoE layers: the per-layer decomposition).
    """

    delivery: str = "tree"
    per_expert_cut: bool = True
    symmetry: bool = True
    shapes: tuple[tuple[int, int], ...] | None = None
    max_degree: int | None = None
    capacity_share: float | None = None
    coloc_rows: int = 6000


class BlockModel:
    """Data and formulation of one layer; ``to_linear()`` gives the neutral MILP."""

    def __init__(self, model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                 options: MilpOptions | None = None, blocks: Blocks | None = None,
                 groups: tuple[np.ndarray, np.ndarray] | None = None) -> None:
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
        bl = self.blocks
        d = bl.degree.astype(float)
        per_node = bl.members / d[:, None]  # [nb, D] share of a block's expert on each node
        # a_i: probability that a batch of B tokens activates expert i (the weight reads it causes)
        self.a = 1.0 - (1.0 - np.clip(self.f, 0.0, 1.0)) ** self.B
        self.comp_coef = per_node * (model.expert_flops_per_token() * self.B / hw.compute_flops)  # per unit f
        self.mem_coef = per_node * (model.expert_weight_bytes() / hw.dram_bw_bytes_per_s)  # per unit a
        vec = self.B * model.hidden * model.activation_bytes
        self.disp_coef = bl.disp * vec / hw.link_bw[None, :]  # [nb, nl] seconds per unit f
        self.comb_coef = bl.comb * vec / hw.link_bw[None, :]
        self.mem_bytes = per_node * model.expert_weight_bytes()  # [nb, D] bytes per expert placed
        self.cap_layer = self._layer_capacity()
        self.allowed = self._allowed_blocks()
        self._set_groups(groups)

    def _set_groups(self, groups: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Co-activation groups modelled exactly (ids ``[G, k]``, frequencies ``[G]``); the tail
        frequency ``f_tail`` of each expert is what remains, modelled additively."""
        k, nb = self.model.top_k, self.blocks.num_blocks
        G = 0
        if groups is not None and k > 1:
            ids, fg = np.asarray(groups[0]), np.asarray(groups[1], dtype=float)
            G = min(int((fg > 0).sum()), self.opts.coloc_rows // (k * nb))
            top = np.argsort(-fg, kind="stable")[:G]
            self.g_ids, self.g_f = ids[top].astype(np.int64), fg[top]
        if G == 0:
            self.g_ids, self.g_f = np.zeros((0, k), dtype=np.int64), np.zeros(0)
        covered = np.bincount(self.g_ids.ravel(), weights=np.repeat(self.g_f, k), minlength=self.model.num_experts)
        self.f_tail = np.clip(self.f - covered, 0.0, None)

    def traffic(self, assign: np.ndarray) -> np.ndarray:
        """``[nb]`` tokens-worth of messages sent to each block: one per (tail token, expert) and one
        per (modelled group token, distinct block of its experts)."""
        a = np.asarray(assign)
        u = np.bincount(a, weights=self.f_tail, minlength=self.blocks.num_blocks)
        if len(self.g_f):
            blk = np.sort(a[self.g_ids], axis=1)
            first = np.ones(blk.shape, dtype=bool)
            first[:, 1:] = blk[:, 1:] != blk[:, :-1]
            np.add.at(u, blk[first], np.broadcast_to(self.g_f[:, None], blk.shape)[first])
        return u

    # --- data --------------------------------------------------------------------------------
    def _layer_capacity(self) -> float | None:
        cap = self.hw.dram_capacity_bytes
        if cap is None:
            return None
        m = self.model
        other = m.non_expert_weight_bytes() / self.hw.num_nodes
        share = self.opts.capacity_share if self.opts.capacity_share is not None else 1.0 / m.moe_layers
        cap_layer = (cap - other) * share
        need = m.num_experts * m.expert_weight_bytes() / self.hw.num_nodes
        if cap_layer < need * (1 - 1e-9):
            raise InputError(
                "hardware.dram_capacity_bytes",
                f"{cap / 1e9:.3f} GB per node leaves {cap_layer / 1e9:.3f} GB for this layer's experts, but even "
                f"spread evenly they need {need / 1e9:.3f} GB per node",
                "raise the capacity or use a larger mesh",
            )
        return cap_layer

    def _allowed_blocks(self) -> np.ndarray:
        """``[E, nb]`` bool: candidate blocks per expert after symmetry breaking."""
        E, nb = self.model.num_experts, self.blocks.num_blocks
        allowed = np.ones((E, nb), dtype=bool)
        bw = self.hw.link_bw
        if self.opts.symmetry and E > 0 and np.all(bw == bw[0]):
            R, C = self.hw.mesh.rows, self.hw.mesh.cols
            centre = self.blocks.origin + (self.blocks.shape - 1) / 2.0
            ok = (centre[:, 0] <= (R - 1) / 2.0) & (centre[:, 1] <= (C - 1) / 2.0)
            allowed[int(np.argmax(self.f)), :] = ok
        if self.cap_layer is not None:
            allowed &= (self.mem_bytes.max(axis=1) <= self.cap_layer)[None, :]
        return allowed

    @cached_property
    def hop_const_s(self) -> float:
        """Hop latency of both phases; exact when some expert uses a node at the mesh's diameter."""
        return 2.0 * self.hw.hop_latency_s * int(self.hw.mesh.distance.max())

    # --- exact objective of an assignment ----------------------------------------------------
    def parts(self, assign: np.ndarray) -> tuple[float, float, float]:
        """(compute, dispatch, combine) seconds of ``assign [E]`` (block per expert)."""
        a = np.asarray(assign)
        comp = max((self.f @ self.comp_coef[a]).max(), (self.a @ self.mem_coef[a]).max())
        u = self.traffic(a)
        disp = (u @ self.disp_coef).max(initial=0.0)
        comb = (u @ self.comb_coef).max(initial=0.0)
        return float(comp), float(disp), float(comb)

    def objective(self, assign: np.ndarray) -> float:
        """Layer latency in seconds under the MILP's model (= the evaluator with ``coalesce="block"``
        when every group is modelled, ``"expert"`` when none is)."""
        return float(sum(self.parts(assign)) + self.hop_const_s)

    def feasible(self, assign: np.ndarray) -> bool:
        a = np.asarray(assign)
        if not np.all(self.allowed[np.arange(len(a)), a]):
            return False
        return self.cap_layer is None or self.mem_bytes[a].sum(axis=0).max() <= self.cap_layer * (1 + 1e-9)

    def placement(self, assign: np.ndarray) -> LayerPlacement:
        return LayerPlacement.from_shares(self.blocks.members[np.asarray(assign)] / self.blocks.degree[
            np.asarray(assign)][:, None])

    def assign_from_shares(self, shares: np.ndarray) -> np.ndarray | None:
        """Blocks of a one-copy placement, or None if some expert is not on a candidate block evenly."""
        out = []
        for row in np.asarray(shares):
            nodes = np.flatnonzero(row > 0)
            if not np.allclose(row[nodes], 1.0 / len(nodes)):
                return None
            try:
                out.append(self.blocks.index_of(nodes))
            except KeyError:
                return None
        return np.array(out)

    # --- the MILP ------------------------------------------------------------------------------
    def to_linear(self) -> LinearModel:
        """The layer's MILP as a neutral LinearModel (``full_vector`` turns an assignment into a hint)."""
        E, nb, D = self.model.num_experts, self.blocks.num_blocks, self.hw.num_nodes
        nl = self.hw.mesh.num_links
        G = len(self.g_f)
        mb = ModelBuilder()
        ix: dict[str, np.ndarray] = {}
        ix["x"] = x = mb.add_vars("x", E * nb, 0.0, self.allowed.ravel().astype(float), integer=True).reshape(E, nb)
        fsum, asum = float(self.f.sum()), float(self.a.sum())
        ix["y"] = y = mb.add_vars("y", nb, 0.0, fsum, integer=False)
        ix["z"] = z = mb.add_vars("z", nb, 0.0, asum, integer=False)
        ix["u"] = u = mb.add_vars("u", nb, 0.0, fsum, integer=False)
        ix["Y"] = Y = mb.add_vars("Y", G * nb, 0.0, 1.0, integer=False).reshape(G, nb)
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

    def build_assignment(self, mb: ModelBuilder, x: np.ndarray) -> None:
        """(A1) every expert on exactly one candidate block: sum_b x_ib = 1."""
        for i in range(x.shape[0]):
            mb.add_row(x[i], np.ones(x.shape[1]), 1.0, 1.0, kind="exact")

    def build_aggregates(self, mb: ModelBuilder, x, y, z, n) -> None:
        """(A2) y_b = sum_i f_i x_ib, z_b = sum_i a_i x_ib, n_b = sum_i x_ib."""
        for b in range(x.shape[1]):
            mb.add_row(np.r_[y[b], x[:, b]], np.r_[1.0, -self.f], 0.0, 0.0)
            mb.add_row(np.r_[z[b], x[:, b]], np.r_[1.0, -self.a], 0.0, 0.0)
            if n is not None:
                mb.add_row(np.r_[n[b], x[:, b]], np.r_[1.0, -np.ones(x.shape[0])], 0.0, 0.0, kind="exact")

    def build_traffic(self, mb: ModelBuilder, x, u, Y) -> None:
        """(A3) u_b = sum_i f_tail_i x_ib + sum_g f_g Y_gb and (A4) Y_gb >= x_ib for i in g:
        a modelled group sends one message per distinct block of its experts."""
        for b in range(x.shape[1]):
            mb.add_row(np.r_[u[b], x[:, b], Y[:, b]], np.r_[1.0, -self.f_tail, -self.g_f], 0.0, 0.0)
        for g, members in enumerate(self.g_ids):
            for i in members:
                for b in range(x.shape[1]):
                    mb.add_row(np.r_[Y[g, b], x[i, b]], np.array([1.0, -1.0]), 0.0, np.inf)

    def build_node_time(self, mb: ModelBuilder, y, z, t_comp) -> None:
        """(C1) per node c: T_comp >= sum_b y_b * FLOPs share / comp and >= sum_b z_b * bytes share / BWmem."""
        for c in range(self.hw.num_nodes):
            on = np.flatnonzero(self.blocks.members[:, c])
            mb.add_row(np.r_[t_comp, y[on]], np.r_[-1.0, US * self.comp_coef[on, c]], -np.inf, 0.0)
            mb.add_row(np.r_[t_comp, z[on]], np.r_[-1.0, US * self.mem_coef[on, c]], -np.inf, 0.0)

    def build_link_time(self, mb: ModelBuilder, u, t_disp, t_comb, nl: int) -> None:
        """(L1) per directed link l: T_disp >= sum_b u_b * dispatch bytes / BW_l, same for combine."""
        for ln in range(nl):
            for coef, t in ((self.disp_coef, t_disp), (self.comb_coef, t_comb)):
                used = np.flatnonzero(coef[:, ln] > 0)
                if used.size:
                    mb.add_row(np.r_[t, u[used]], np.r_[-1.0, US * coef[used, ln]], -np.inf, 0.0)

    def build_per_expert_cut(self, mb: ModelBuilder, x, t_comp) -> None:
        """(V1) T_comp >= sum_b x_ib * f_i * FLOPs / (d_b comp): a node holding a shard of i carries it."""
        top = self.comp_coef.max(axis=1)  # per-node share of one unit of f on block b
        topm = self.mem_coef.max(axis=1)
        for i in range(x.shape[0]):
            mb.add_row(np.r_[t_comp, x[i]], np.r_[-1.0, US * self.f[i] * top], -np.inf, 0.0)
            mb.add_row(np.r_[t_comp, x[i]], np.r_[-1.0, US * self.a[i] * topm], -np.inf, 0.0)

    def build_capacity(self, mb: ModelBuilder, n, D: int) -> None:
        """(M1) per node: sum_b n_b * expert bytes / d_b <= this layer's capacity."""
        for c in range(D):
            on = np.flatnonzero(self.blocks.members[:, c])
            mb.add_row(n[on], self.mem_bytes[on, c] / 1e9, -np.inf, self.cap_layer / 1e9, kind="safe")

    def full_vector(self, assign: np.ndarray, lm: LinearModel) -> np.ndarray:
        """All variable values implied by an assignment (for hints and MIP starts)."""
        E, nb = self.model.num_experts, self.blocks.num_blocks
        ix = self._ix
        a = np.asarray(assign)
        v = np.zeros(lm.num_vars)
        X = np.zeros((E, nb))
        X[np.arange(E), a] = 1.0
        v[ix["x"].ravel()] = X.ravel()
        v[ix["y"]] = self.f @ X
        v[ix["z"]] = self.a @ X
        v[ix["u"]] = self.traffic(a)
        if len(self.g_f):
            v[ix["Y"].ravel()] = (X[self.g_ids].max(axis=1)).ravel()
        if "n" in ix:
            v[ix["n"]] = X.sum(axis=0)
        comp, disp, comb = self.parts(a)
        per_exp = max((self.f * self.comp_coef.max(axis=1)[a]).max(), (self.a * self.mem_coef.max(axis=1)[a]).max())
        v[ix["T"]] = US * np.array([max(comp, per_exp), disp, comb])
        return v

    def decode(self, xvec: np.ndarray) -> np.ndarray:
        E, nb = self.model.num_experts, self.blocks.num_blocks
        X = np.asarray(xvec)[: E * nb].reshape(E, nb)
        return np.argmax(np.where(self.allowed, X, -np.inf), axis=1)
