"""Fast latency model used by the online policies (written out in ``formulations/online.md``).

It is the evaluator's model with one message per (token, expert copy) (``coalesce="expert"``),
spread homes and expected counts: node time = the kernel's roofline (:func:`costs.roofline_s`)
of the copies' FLOPs and activation-weighted weight reads (:func:`costs.activation_probability`),
link time = :func:`costs.phase_time_s` of the copies' link bytes (:func:`costs.link_loads` of one
message per holder set, tabulated once per distinct holder set in :class:`LinkTable`). Constants
come from :class:`costs.UnitCosts` (mesh mode).

Exactness against :func:`hdmoe_milp.evaluator.evaluate` (``tests/test_surrogates.py``):
``OnlineCost.layer_latency_s`` with ``noise_z = 0`` equals the evaluator with
``EvalOptions(coalesce="expert")`` (mesh mode, spread homes, the same delivery, ``replica_rule="fraction"``)
on an expected workload whose expert loads are the ``counts``, when every expert has one copy (any
shares, blocks or not) and the hop latency is 0. It leaves out the hop-latency terms: with hop
latency ``alpha > 0`` it under-estimates by exactly ``2 * alpha * (longest route from a spread home
to a node holding a copy with tokens)``. With hop latency 0 it over-estimates the default evaluator
(``coalesce="node"``) and ``noise_z > 0`` only adds. With replicas the evaluator sends each whole
flow to one copy (cut at the token fractions) while the model splits the expected tokens exactly:
the error then has no fixed sign.
"""

from __future__ import annotations

import numpy as np

from ..costs import UnitCosts, activation_probability, link_loads, phase_time_s, roofline_s
from ..hardware import Hardware
from ..moe import MoEModel


class LinkTable:
    """Link loads (units of one token vector) on every link (dispatch links, then combine links) of one
    message sent to a holder set from spread homes. Holder sets get integer ids; ids ``0..D-1`` are the
    single nodes."""

    def __init__(self, hw: Hardware, tree: bool = True) -> None:
        self.hw, self.tree = hw, tree
        self._ids: dict[bytes, int] = {}
        self._rows: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        for c in range(hw.num_nodes):
            self.index(np.eye(hw.num_nodes, dtype=bool)[c])

    def index(self, holders: np.ndarray) -> int:
        """Id of the holder set ``holders [D]`` (bool), tabulating it on first use."""
        key = np.packbits(holders).tobytes()
        hid = self._ids.get(key)
        if hid is None:
            d, c, _ = link_loads(self.hw.mesh, holders[None, :], np.ones(1), None, self.tree)
            self._rows.append(np.concatenate([d, c]))
            hid = self._ids[key] = len(self._rows) - 1
            self._matrix = None
        return hid

    @property
    def matrix(self) -> np.ndarray:
        """``[holder sets, 2 * links]``."""
        if self._matrix is None:
            self._matrix = np.array(self._rows).reshape(len(self._rows), -1)
        return self._matrix


class OnlineCost:
    """Constants of the online model for one model on one machine (units: seconds, bytes)."""

    def __init__(self, model: MoEModel, hw: Hardware, batch: float, tree: bool = True,
                 noise_z: float = 0.0) -> None:
        self.model, self.hw, self.batch = model, hw, float(batch)
        self.noise_z = float(noise_z)
        self.links = LinkTable(hw, tree)
        self.unit = unit = UnitCosts.of(model, "mesh")
        self.phi_s = float(roofline_s(unit.flops_per_token, 0.0, hw))  # s per token on one node (compute side)
        self.w_s = float(roofline_s(0.0, unit.weight_bytes, hw))  # s to read one expert (DRAM side)
        self.vec = unit.vector_bytes  # bytes per token message
        self.nl = hw.mesh.num_links
        D = hw.num_nodes
        route_bw = np.full((D, D), np.inf)  # slowest link on each XY route
        for a in range(D):
            for b in range(D):
                if a != b:
                    route_bw[a, b] = float(hw.link_bw[hw.mesh.xy_route(a, b)].min())
        # one expert's weights from s to t: bytes / slowest link on the XY route + hop latency x hops
        self.move_pair = unit.weight_bytes / route_bw + hw.hop_latency_s * hw.mesh.distance
        np.fill_diagonal(self.move_pair, 0.0)

    def activation(self, tokens: np.ndarray) -> np.ndarray:
        """Probability that a batch uses a copy expected to serve ``tokens`` (its weights are then read)."""
        return activation_probability(tokens, self.batch)

    def comm_s(self, link_bytes: np.ndarray) -> np.ndarray:
        """Dispatch + combine time (s, no hop latency) from per-link bytes ``[..., 2 * links]``
        (dispatch links, then combine links)."""
        bw = self.hw.link_bw
        return phase_time_s(link_bytes[..., :self.nl], bw) + phase_time_s(link_bytes[..., self.nl:], bw)

    def layer_latency_s(self, shares: np.ndarray, expert_of: np.ndarray, frac: np.ndarray,
                        counts: np.ndarray) -> float:
        """Reference (unvectorised) modelled latency of one layer for expected counts ``[E]``.

        A node's tokens count ``noise_z`` standard deviations above their mean: an expert with one
        copy brings Poisson noise (variance: its expected tokens x share²); a replicated expert's
        noise is absorbed by the batch-level dispatch over its copies."""
        n = np.asarray(counts, dtype=float)
        tok = n[expert_of] * frac
        solo = np.bincount(expert_of, minlength=len(n))[expert_of] == 1
        tokens = tok @ shares + self.noise_z * np.sqrt((n[expert_of] * solo) @ shares**2)
        node = roofline_s(self.unit.flops_per_token * tokens, self.unit.weight_bytes * (self.activation(tok) @ shares),
                          self.hw)
        ids = [self.links.index(row > 0) for row in shares]
        lk = (tok * self.vec) @ self.links.matrix[ids]
        return float(node.max() + self.comm_s(np.asarray(lk)))
