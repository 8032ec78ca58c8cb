"""Hardware: a 2D mesh of compute nodes with XY routing, per-node compute and DRAM.

Node ``n`` sits at row ``n // cols``, column ``n % cols`` (row-major). Directed links join
4-neighbours. Links are numbered in four families, in this order:

- east  ``(r, c) -> (r, c+1)``  for r < rows, c < cols-1   (``rows*(cols-1)`` links)
- west  ``(r, c+1) -> (r, c)``  same index set
- south ``(r, c) -> (r+1, c)``  for r < rows-1, c < cols    (``(rows-1)*cols`` links)
- north ``(r+1, c) -> (r, c)``  same index set

Inside a family, index = row-major position in its ``[rows, cols-1]`` or ``[rows-1, cols]`` grid.
XY routing moves along the row (X) first, then along the column (Y).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import InputError, check_choice

MESH_PRESETS = ("4x4", "4x8", "8x8")


@dataclass(frozen=True)
class Mesh:
    """A ``rows x cols`` 2D mesh."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"mesh.{name}", f"must be a positive integer, got {v!r}", "e.g. mesh '4x8'")

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parse ``"RxC"`` (rows x cols), e.g. ``"4x8"``."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise InputError(
                "mesh", f"malformed mesh {text!r}", "write ROWSxCOLS with positive integers, e.g. 4x8; presets: "
                + ", ".join(MESH_PRESETS)
            )
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def num_nodes(self) -> int:
        return self.rows * self.cols

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def n_horizontal(self) -> int:
        """Links per horizontal family (east or west)."""
        return self.rows * (self.cols - 1)

    @property
    def n_vertical(self) -> int:
        """Links per vertical family (south or north)."""
        return (self.rows - 1) * self.cols

    @property
    def num_links(self) -> int:
        return 2 * self.n_horizontal + 2 * self.n_vertical

    def coords(self, node: int) -> tuple[int, int]:
        return divmod(int(node), self.cols)

    def node(self, r: int, c: int) -> int:
        return r * self.cols + c

    @cached_property
    def link_endpoints(self) -> np.ndarray:
        """``[num_links, 2]`` (source node, destination node) of every directed link."""
        out = []
        R, C = self.rows, self.cols
        for r in range(R):
            for c in range(C - 1):
                out.append((self.node(r, c), self.node(r, c + 1)))
        for r in range(R):
            for c in range(C - 1):
                out.append((self.node(r, c + 1), self.node(r, c)))
        for r in range(R - 1):
            for c in range(C):
                out.append((self.node(r, c), self.node(r + 1, c)))
        for r in range(R - 1):
            for c in range(C):
                out.append((self.node(r + 1, c), self.node(r, c)))
        return np.array(out, dtype=np.int64).reshape(-1, 2)

    @cached_property
    def _link_index(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): i for i, (a, b) in enumerate(self.link_endpoints)}

    def link_id(self, src: int, dst: int) -> int:
        """Index of the directed link between two neighbouring nodes."""
        return self._link_index[(int(src), int(dst))]

    def xy_route(self, src: int, dst: int) -> list[int]:
        """Directed link ids on the XY (row first, then column) route from ``src`` to ``dst``."""
        (r, c), (r1, c1) = self.coords(src), self.coords(dst)
        path = []
        step = 1 if c1 > c else -1
        while c != c1:
            path.append(self.link_id(self.node(r, c), self.node(r, c + step)))
            c += step
        step = 1 if r1 > r else -1
        while r != r1:
            path.append(self.link_id(self.node(r, c), self.node(r + step, c)))
            r += step
        return path

    @cached_property
    def distance(self) -> np.ndarray:
        """``[D, D]`` hop counts (Manhattan distance)."""
        rr, cc = np.divmod(np.arange(self.num_nodes), self.cols)
        return np.abs(rr[:, None] - rr[None, :]) + np.abs(cc[:, None] - cc[None, :])

    def snake_order(self) -> np.ndarray:
        """Nodes in boustrophedon order: consecutive entries are mesh neighbours."""
        order = []
        for r in range(self.rows):
            cols = range(self.cols) if r % 2 == 0 else range(self.cols - 1, -1, -1)
            order.extend(self.node(r, c) for c in cols)
        return np.array(order, dtype=np.int64)


@dataclass(frozen=True)
class HardwarePoint:
    """Per-node compute and per-link bandwidth of one of the paper's design points."""

    compute_flops: float
    link_bw_bytes_per_s: float


HARDWARE_PRESETS: dict[str, HardwarePoint] = {
    "2.5/75": HardwarePoint(2.5e12, 75e9),
    "5/50": HardwarePoint(5e12, 50e9),
    "10/25": HardwarePoint(10e12, 25e9),
}

DEFAULT_DRAM_BW = 625e9  # bytes/s per node, from the HD-MoE code


@dataclass(frozen=True)
class Hardware:
    """A mesh accelerator.

    Units: ``compute_flops`` in FLOP/s per node, ``dram_bw_bytes_per_s`` in bytes/s per node,
    ``dram_capacity_bytes`` in bytes per node (None = unlimited), ``hop_latency_s`` in seconds,
    ``link_bw_bytes_per_s`` in bytes/s: a scalar (every directed link) or an array of length
    ``mesh.num_links`` in the link order documented in this module.
    """

    mesh: Mesh
    compute_flops: float
    link_bw_bytes_per_s: float | np.ndarray
    dram_bw_bytes_per_s: float = DEFAULT_DRAM_BW
    dram_capacity_bytes: float | None = None
    hop_latency_s: float = 0.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for fld in ("compute_flops", "dram_bw_bytes_per_s"):
            v = getattr(self, fld)
            if not np.isfinite(v) or v <= 0:
                raise InputError(f"hardware.{fld}", f"must be a positive finite number, got {v!r}")
        if self.dram_capacity_bytes is not None and not (self.dram_capacity_bytes > 0):
            raise InputError(
                "hardware.dram_capacity_bytes", f"must be positive, got {self.dram_capacity_bytes!r}",
                "or leave it unset for unlimited capacity",
            )
        if not np.isfinite(self.hop_latency_s) or self.hop_latency_s < 0:
            raise InputError("hardware.hop_latency_s", f"must be >= 0, got {self.hop_latency_s!r}")
        bw = np.asarray(self.link_bw_bytes_per_s, dtype=float)
        if bw.ndim == 0:
            bw = np.full(self.mesh.num_links, float(bw))
        if bw.shape != (self.mesh.num_links,):
            raise InputError(
                "hardware.link_bw_bytes_per_s",
                f"expected a scalar or {self.mesh.num_links} values for mesh {self.mesh.name}, got shape {bw.shape}",
            )
        if not np.all(np.isfinite(bw)) or np.any(bw <= 0):
            raise InputError("hardware.link_bw_bytes_per_s", "every link bandwidth must be positive and finite")
        bw.setflags(write=False)
        object.__setattr__(self, "_link_bw", bw)

    @property
    def link_bw(self) -> np.ndarray:
        """``[num_links]`` bandwidth of every directed link, bytes/s."""
        return self._link_bw  # type: ignore[attr-defined]

    @property
    def num_nodes(self) -> int:
        return self.mesh.num_nodes

    @property
    def min_link_bw(self) -> float:
        return float(self.link_bw.min()) if self.link_bw.size else float("inf")


def make_hardware(
    point: str = "5/50",
    mesh: str | Mesh = "4x8",
    *,
    dram_bw_bytes_per_s: float = DEFAULT_DRAM_BW,
    dram_capacity_bytes: float | None = None,
    hop_latency_s: float = 0.0,
) -> Hardware:
    """Hardware from a paper design point name (``"2.5/75"``, ``"5/50"``, ``"10/25"``: TFLOP/s per
    node / GB/s per link) and a mesh (``"RxC"``)."""
    check_choice("hw", point, tuple(HARDWARE_PRESETS))
    m = mesh if isinstance(mesh, Mesh) else Mesh.parse(mesh)
    p = HARDWARE_PRESETS[point]
    return Hardware(
        mesh=m,
        compute_flops=p.compute_flops,
        link_bw_bytes_per_s=p.link_bw_bytes_per_s,
        dram_bw_bytes_per_s=dram_bw_bytes_per_s,
        dram_capacity_bytes=dram_capacity_bytes,
        hop_latency_s=hop_latency_s,
        name=f"{point}@{m.name}",
    )
