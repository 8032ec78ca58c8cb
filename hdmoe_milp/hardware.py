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

import numbers
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property

import numpy as np

from .errors import (
    DRAM_BW_GBPS_RANGE,
    MAX_HOP_LATENCY_NS,
    MAX_NODES,
    InputError,
    check_real,
    expect_instance,
    shown,
)

MESH_PRESETS = ("4x4", "4x8", "8x8")

# Ranges of the constructors' numbers. They keep every cost the evaluator and the solvers derive
# (work / rate, bytes / bandwidth, hops x latency, products of model sizes) finite and non-negative,
# and agree with the instance loader (``instance.py``), which checks the same quantities in GB/s and ns.
MAX_MESH_SIZE = MAX_NODES  # rows x cols
COMPUTE_FLOPS_PER_S_RANGE = (1.0, 1e30)  # FLOP/s per node: 1 FLOP/s up to ~1e16 times today's largest accelerators
LINK_BW_BYTES_PER_S_RANGE = (1.0, 1e30)  # bytes/s per directed link: 1 byte/s up to ~1e18 times today's fastest links
# bytes/s per node: [hardware].dram_bw_gbps's range, converted as the loader converts it (x 1e9)
DRAM_BW_BYTES_PER_S_RANGE = (DRAM_BW_GBPS_RANGE[0] * 1e9, DRAM_BW_GBPS_RANGE[1] * 1e9)
MAX_HOP_LATENCY_S = MAX_HOP_LATENCY_NS * 1e-9  # s per hop: [hardware].hop_latency_ns bound, converted likewise
MAX_DRAM_CAPACITY_BYTES = 1e30  # bytes per node: 1e21 GB; keeps capacity / (bytes of one expert) finite


@dataclass(frozen=True)
class Mesh:
    """A ``rows x cols`` 2D mesh."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InputError(f"mesh.{name}", f"must be a positive integer, got {shown(v)}", "e.g. mesh '4x8'")
            object.__setattr__(self, name, int(v))  # plain int (not np.int64): JSON-ready and exact
        if self.rows * self.cols > MAX_MESH_SIZE:
            raise InputError("mesh", f"{shown(self.rows)} x {shown(self.cols)} has more than {MAX_MESH_SIZE} nodes",
                             "use a smaller mesh, e.g. 4x8")

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parse ``"RxC"`` (rows x cols), e.g. ``"4x8"``."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text), flags=re.ASCII)  # no full-width digits
        if not m or len(m.group(1)) > 100 or len(m.group(2)) > 100 or int(m.group(1)) < 1 or int(m.group(2)) < 1:
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

# ASCII digits only (Python's float() reads full-width ones); an exponent, since names of tiny or huge
# points are written with one ("1e-06/25")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_POINT_RE = re.compile(rf"({_NUMBER})/({_NUMBER})")


def _short(x: float) -> str:
    """``x`` written without a trailing ``.0`` and without losing digits (``5.0`` → ``5``, ``2.5``,
    ``1e+16``)."""
    text = repr(x)
    return text[:-2] if text.endswith(".0") else text


def parse_point(text: object, field: str = "hw") -> tuple[str, HardwarePoint]:
    """The design point ``text`` names: a preset of the paper (``2.5/75``, ``5/50``, ``10/25``) or any
    pair ``TFLOPS/GBPS``, TFLOP/s of compute per node over GB/s per directed link (``4/40``).

    Returns its canonical name (numbers as written by :func:`repr` without ``.0``: ``"5.0/50"`` is
    ``"5/50"``, the preset) and the point; an :class:`InputError` naming ``field`` otherwise."""
    fix = ("give a preset (" + ", ".join(HARDWARE_PRESETS) + ") or TFLOP/s per node / GB/s per link, "
           "e.g. '4/40'")
    if not isinstance(text, str):
        raise InputError(field, f"must be a string, got {shown(text)}", fix)
    m = _POINT_RE.fullmatch(text.strip())
    if m is None:
        raise InputError(field, f"unknown design point {shown(text)}", fix)
    tflops, gbps = float(m.group(1)), float(m.group(2))
    parts = _short(tflops), _short(gbps)
    name = "/".join(parts)
    # "4.1" TFLOP/s is the float nearest 4.1e12 (4.1 * 1e12 is 4099999999999.9995): scale in decimal, from
    # the name, so that every spelling of one point gives the same numbers
    flops, link_bw = float(Decimal(parts[0]).scaleb(12)), float(Decimal(parts[1]).scaleb(9))
    if name in HARDWARE_PRESETS:
        return name, HARDWARE_PRESETS[name]
    for value, si, scale, (lo, hi), unit in (
            (tflops, flops, 1e12, COMPUTE_FLOPS_PER_S_RANGE, "TFLOP/s per node"),
            (gbps, link_bw, 1e9, LINK_BW_BYTES_PER_S_RANGE, "GB/s per link")):
        if not lo <= si <= hi:
            raise InputError(field, f"{shown(text)} asks for {value:g} {unit}, outside "
                             f"[{lo / scale:g}, {hi / scale:g}]", fix)
    return name, HardwarePoint(flops, link_bw)


def point_name(text: object) -> str | None:
    """The canonical name of the design point ``text`` (``"5.0/50"`` is ``"5/50"``), or None when
    ``text`` is not one (say the ``custom`` of hardware built by hand)."""
    try:
        return parse_point(text)[0]
    except InputError:
        return None


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
        expect_instance("hardware.mesh", self.mesh, Mesh,
                        "give a Mesh, e.g. Mesh.parse('4x4') or Mesh(4, 4), or use make_hardware(point, '4x4')")
        expect_instance("hardware.name", self.name, str, "give a string, e.g. 'custom'")
        ranges = {"compute_flops": (COMPUTE_FLOPS_PER_S_RANGE, "FLOP/s per node"),
                  "dram_bw_bytes_per_s": (DRAM_BW_BYTES_PER_S_RANGE, "bytes/s per node"),
                  "hop_latency_s": ((0.0, MAX_HOP_LATENCY_S), "seconds per hop"),
                  "dram_capacity_bytes": ((0.0, MAX_DRAM_CAPACITY_BYTES), "bytes per node; None = unlimited")}
        for fld, ((lo, hi), unit) in ranges.items():
            v = getattr(self, fld)
            if v is None and fld == "dram_capacity_bytes":
                continue
            try:
                v = check_real(f"hardware.{fld}", v, minimum=lo, maximum=hi, positive=fld == "dram_capacity_bytes")
            except InputError as exc:
                raise InputError(exc.field, exc.problem, f"{exc.fix}, in {unit}") from None
            object.__setattr__(self, fld, v)  # plain float (not np.float64 or int): JSON-ready
        bw = _link_bandwidths(self.mesh, self.link_bw_bytes_per_s)
        if bw.ndim == 0:
            object.__setattr__(self, "link_bw_bytes_per_s", float(bw))
            bw = np.full(self.mesh.num_links, float(bw))
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


def _link_bandwidths(mesh: Mesh, value: object) -> np.ndarray:
    """``value`` (one number, or one per directed link of ``mesh``) as a float array (0-d for one
    number), every entry finite and in :data:`LINK_BW_BYTES_PER_S_RANGE`; else an InputError."""
    f = "hardware.link_bw_bytes_per_s"
    lo, hi = LINK_BW_BYTES_PER_S_RANGE
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (numbers.Real, str, bytes)) or value is None:
        return np.asarray(check_real(f, value, minimum=lo, maximum=hi))
    if not isinstance(value, (np.ndarray, list, tuple)):  # a pandas Series, range, array.array ...
        try:
            value = np.asarray(value)
        except (TypeError, ValueError):
            return np.asarray(check_real(f, value, minimum=lo, maximum=hi))
        if value.ndim == 0:
            return np.asarray(check_real(f, value[()], minimum=lo, maximum=hi))
    fix = f"give one number for every link, or {mesh.num_links} numbers in this module's link order"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise InputError(f, f"must hold numbers, got an array of dtype {value.dtype}", fix)
        bw = value.astype(float)
    else:
        for i, x in enumerate(value):
            try:
                check_real(f, x)
            except InputError as exc:
                raise InputError(f, f"entry {i} {exc.problem}", fix) from None
        bw = np.array([float(x) for x in value], dtype=float)
    if bw.shape != (mesh.num_links,):
        raise InputError(f, f"expected a scalar or {mesh.num_links} values for mesh {mesh.name}, got shape {bw.shape}",
                         fix)
    bad = ~(np.isfinite(bw) & (bw >= lo) & (bw <= hi))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f, f"every link bandwidth must be finite and in [{lo:g}, {hi:g}] bytes/s, link {i} has "
                         f"{float(bw[i])!r}", f"give bandwidths in [{lo:g}, {hi:g}]")
    return bw


def make_hardware(
    point: str = "5/50",
    mesh: str | Mesh = "4x8",
    *,
    dram_bw_bytes_per_s: float = DEFAULT_DRAM_BW,
    dram_capacity_bytes: float | None = None,
    hop_latency_s: float = 0.0,
) -> Hardware:
    """Hardware from a design point (TFLOP/s per node / GB/s per link: the paper's ``"2.5/75"``,
    ``"5/50"``, ``"10/25"``, or any other such as ``"4/40"``; see :func:`parse_point`) and a mesh
    (``"RxC"``). Its ``name`` is ``POINT@MESH`` with the point's canonical name."""
    point, p = parse_point(point, "hw")
    m = mesh if isinstance(mesh, Mesh) else Mesh.parse(mesh)
    return Hardware(
        mesh=m,
        compute_flops=p.compute_flops,
        link_bw_bytes_per_s=p.link_bw_bytes_per_s,
        dram_bw_bytes_per_s=dram_bw_bytes_per_s,
        dram_capacity_bytes=dram_capacity_bytes,
        hop_latency_s=hop_latency_s,
        name=f"{point}@{m.name}",
    )
