"""Fast latency model used by the online policies (written out in ``formulations/online.md``).

It is the evaluator's model with one message per (token, expert copy) (``coalesce="expert"``),
spread homes and expected counts: node time = max(FLOPs/comp, weight bytes read/BWmem), link time =
max over links of the copies' traffic. Link loads depend only on a copy's *holder set*, so they are
tabulated once per distinct holder set (:class:`LinkTable`).
"""

from __future__ import annotations

import numpy as np

from ..costs import link_loads
from ..hardware import Hardware
from ..moe import MoEModel


class LinkTable:
    """Seconds per token on every link (dispatch links, then combine links) of one message sent to a
    holder set from spread homes. Holder sets get integer ids; ids ``0..D-1`` are the single nodes."""

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
            self._rows.append(np.concatenate([d / self.hw.link_bw, c / self.hw.link_bw]))
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
        self.phi_s = model.expert_flops_per_token() / hw.compute_flops  # s per token on one node
        self.w_s = model.expert_weight_bytes() / hw.dram_bw_bytes_per_s  # s to read one expert
        self.vec = model.hidden * model.activation_bytes  # bytes per token message
        self.nl = hw.mesh.num_links
        D = hw.num_nodes
        route_bw = np.full((D, D), np.inf)  # slowest link on each XY route
        for a in range(D):
            for b in range(D):
                if a != b:
                    route_bw[a, b] = float(hw.link_bw[hw.mesh.xy_route(a, b)].min())
        # one expert's weights from s to t: bytes / slowest link on the XY route + hop latency x hops
        self.move_pair = model.expert_weight_bytes() / route_bw + hw.hop_latency_s * hw.mesh.distance
        np.fill_diagonal(self.move_pair, 0.0)

    def activation(self, tokens: np.ndarray) -> np.ndarray:
        """Probability that a batch uses a copy expected to serve ``tokens`` (its weights are then read)."""
        B = max(self.batch, 1e-12)
        return 1.0 - (1.0 - np.clip(np.asarray(tokens) / B, 0.0, 1.0)) ** B

    def comm_s(self, link_time: np.ndarray) -> np.ndarray:
        """Dispatch + combine time from per-link times ``[..., 2 * links]``."""
        if self.nl == 0:
            return np.zeros(link_time.shape[:-1])
        return link_time[..., :self.nl].max(axis=-1) + link_time[..., self.nl:].max(axis=-1)

    def layer_latency_s(self, shares: np.ndarray, expert_of: np.ndarray, frac: np.ndarray,
                        counts: np.ndarray) -> float:
        """Reference (unvectorised) modelled latency of one layer for expected counts ``[E]``.

        A node's tokens count ``noise_z`` standard deviations above their mean: an expert with one
        copy brings Poisson noise (variance: its expected tokens x share²); a replicated expert's
        noise is absorbed by the batch-level dispatch over its copies."""
        n = np.asarray(counts, dtype=float)
        tok = n[expert_of] * frac
        solo = np.bincount(expert_of, minlength=len(n))[expert_of] == 1
        flops = self.phi_s * (tok @ shares + self.noise_z * np.sqrt((n[expert_of] * solo) @ shares**2))
        mem = self.w_s * (self.activation(tok) @ shares)
        ids = [self.links.index(row > 0) for row in shares]
        lk = (tok * self.vec) @ self.links.matrix[ids]
        return float(np.maximum(flops, mem).max() + self.comm_s(np.asarray(lk)))
