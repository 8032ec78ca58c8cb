"""Fast per-layer latency model used by the online policies (written out in ``formulations/online.md``).

It is the evaluator's model with one message per (token, expert copy) (``coalesce="expert"``),
spread homes and expected counts: node time = max(FLOPs/comp, weight bytes read/BWmem), link time =
max over links of the copies' traffic. Everything is arrays over copies, so a candidate action is
scored with a handful of numpy operations.
"""

from __future__ import annotations

import numpy as np

from ..evaluator import link_loads
from ..hardware import Hardware
from ..models import MoEModel


class LinkTable:
    """Link load of one token sent to a holder set from spread homes (cached per holder set)."""

    def __init__(self, hw: Hardware, tree: bool = True) -> None:
        self.hw = hw
        self.tree = tree
        self._cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        D = hw.num_nodes
        # single nodes, the common case for replicas: [D, 2 * links] (dispatch links, then combine links)
        self.node = np.array([np.concatenate(self.get(np.eye(D, dtype=bool)[c])) for c in range(D)])

    def get(self, holders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = np.packbits(holders).tobytes()
        hit = self._cache.get(key)
        if hit is None:
            d, c, _ = link_loads(self.hw.mesh, holders[None, :], np.ones(1), None, self.tree)
            hit = self._cache[key] = (d / self.hw.link_bw, c / self.hw.link_bw)
        return hit


class LayerCost:
    """Cost model of one layer for per-expert token counts ``n [E]`` in a batch of ``B`` tokens.

    Copies: ``shares [R, D]``, ``expert_of [R]``, ``frac [R]`` (token fraction of each copy).
    """

    def __init__(self, model: MoEModel, hw: Hardware, links: LinkTable) -> None:
        self.model, self.hw, self.links = model, hw, links
        self.phi_s = model.expert_flops_per_token() / hw.compute_flops  # s per token on one node
        self.w_s = model.expert_weight_bytes() / hw.dram_bw_bytes_per_s  # s to read one expert
        self.vec = model.hidden * model.activation_bytes  # bytes per token message
        D = hw.num_nodes
        self.route_bw = np.full((D, D), np.inf)  # slowest link on each XY route
        for a in range(D):
            for b in range(D):
                if a != b:
                    self.route_bw[a, b] = float(hw.link_bw[hw.mesh.xy_route(a, b)].min())
        self.hops = hw.mesh.distance
        # one expert's weights from s to t: bytes / slowest link on the XY route + hop latency x hops
        self.move_pair = model.expert_weight_bytes() / self.route_bw + hw.hop_latency_s * self.hops
        np.fill_diagonal(self.move_pair, 0.0)

    def copy_links(self, shares: np.ndarray) -> np.ndarray:
        """``[R, 2 * links]`` seconds per token of each copy on every link (dispatch, then combine)."""
        return np.array([np.concatenate(self.links.get(row > 0)) for row in shares])

    def activation(self, tokens: np.ndarray, batch: float) -> np.ndarray:
        """Probability that a batch uses each copy (its weights are then read)."""
        return 1.0 - (1.0 - np.clip(np.asarray(tokens) / max(batch, 1e-12), 0.0, 1.0)) ** batch

    def node_terms(self, shares: np.ndarray, tokens: np.ndarray, batch: float) -> tuple[np.ndarray, np.ndarray]:
        """(FLOP time [D], weight-read time [D]) of every node."""
        return self.phi_s * (tokens @ shares), self.w_s * (self.activation(tokens, batch) @ shares)

    def comm_s(self, link_time: np.ndarray) -> np.ndarray:
        """Dispatch + combine time from per-link times ``[..., 2 * links]``."""
        nl = self.hw.mesh.num_links
        if nl == 0:
            return np.zeros(link_time.shape[:-1])
        return link_time[..., :nl].max(axis=-1) + link_time[..., nl:].max(axis=-1)

    def move_time_s(self, holders: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Time to stream one expert's weights to each node ``targets [N]`` from the best node of
        ``holders [N, D]`` (one XY path, pipelined: bytes / slowest link on it + hop latency x hops)."""
        return np.where(holders, self.move_pair[:, targets].T, np.inf).min(axis=1)
