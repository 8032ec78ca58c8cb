"""A neutral description of a mixed-integer linear model, translated by each backend.

Rows are ``row_lo <= A x <= row_hi`` (use +-inf for one-sided rows). Every variable has finite
bounds (CP-SAT needs them). ``row_kind`` tells the integer-scaling CP-SAT backend how it may round a
row: ``"exact"`` (integer coefficients, kept as is), ``"relax"`` (rounded so that the integer model
is a relaxation: its bound stays valid) or ``"safe"`` (rounded so that its solutions stay feasible:
capacity rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class LinearModel:
    """Minimise ``c @ x + obj_const`` subject to the rows and bounds."""

    names: list[str]
    lb: np.ndarray
    ub: np.ndarray
    integer: np.ndarray
    c: np.ndarray
    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    row_kind: list[str]
    obj_const: float = 0.0

    @property
    def num_vars(self) -> int:
        return len(self.names)

    @property
    def num_binaries(self) -> int:
        return int(np.sum(self.integer & (self.lb >= 0) & (self.ub <= 1)))

    @property
    def num_rows(self) -> int:
        return self.A.shape[0]

    def objective(self, x: np.ndarray) -> float:
        return float(self.c @ x + self.obj_const)

    def max_violation(self, x: np.ndarray) -> float:
        ax = self.A @ x
        v = np.concatenate([self.row_lo - ax, ax - self.row_hi, self.lb - x, x - self.ub])
        return float(np.max(v[np.isfinite(v)], initial=0.0))


@dataclass
class ModelBuilder:
    """Collects variables and sparse rows."""

    names: list[str] = field(default_factory=list)
    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    c: list[float] = field(default_factory=list)
    _rows: list[np.ndarray] = field(default_factory=list)
    _cols: list[np.ndarray] = field(default_factory=list)
    _vals: list[np.ndarray] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    row_kind: list[str] = field(default_factory=list)

    def add_vars(self, prefix: str, n: int, lb: float, ub: float | np.ndarray, integer: bool,
                 cost: float = 0.0) -> np.ndarray:
        start = len(self.names)
        self.names += [f"{prefix}_{j}" for j in range(n)]
        self.lb += [lb] * n
        self.ub += list(np.broadcast_to(np.asarray(ub, dtype=float), (n,)))
        self.integer += [integer] * n
        self.c += [cost] * n
        return np.arange(start, start + n)

    def add_row(self, cols: np.ndarray, vals: np.ndarray, lo: float, hi: float, kind: str = "relax") -> None:
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.asarray(vals, dtype=float)
        keep = vals != 0
        r = len(self.row_lo)
        self._rows.append(np.full(int(keep.sum()), r))
        self._cols.append(cols[keep])
        self._vals.append(vals[keep])
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        self.row_kind.append(kind)

    def build(self, obj_const: float = 0.0) -> LinearModel:
        n = len(self.names)
        m = len(self.row_lo)
        rows = np.concatenate(self._rows) if self._rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(self._cols) if self._cols else np.zeros(0, dtype=np.int64)
        vals = np.concatenate(self._vals) if self._vals else np.zeros(0)
        A = sp.csr_matrix((vals, (rows, cols)), shape=(m, n))
        return LinearModel(
            list(self.names), np.array(self.lb, dtype=float), np.array(self.ub, dtype=float),
            np.array(self.integer, dtype=bool), np.array(self.c, dtype=float), A,
            np.array(self.row_lo, dtype=float), np.array(self.row_hi, dtype=float), list(self.row_kind), obj_const,
        )
