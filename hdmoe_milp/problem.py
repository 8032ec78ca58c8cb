"""The validated problem every strategy solves and every evaluation scores.

A :class:`Problem` is a model, a machine, the routing statistics of one layer set (per-layer
expert frequencies and co-activation sets, computed once), the batch a plan is made for and the
evaluator's options. It is checked once, when it is built: types, ranges, finiteness and the
agreement of its parts. Everything downstream trusts it.

A :class:`Budget` says how much effort a strategy that solves a MILP may spend.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np

from .costs import check_model_fits
from .errors import (
    MAX_THREADS,
    MAX_TIME_LIMIT_S,
    MAX_WORK_LIMIT,
    InputError,
    check_choice,
    check_real,
    check_seed,
)
from .evaluator import EvalOptions
from .hardware import Hardware, parse_point, point_name
from .moe import MoEModel
from .solvers.backends import BACKENDS
from .workload import (
    BATCHING,
    Trace,
    Workload,
    check_batch,
    check_observed_memory,
    check_window,
    expected_workload,
    physical_memory_bytes,
    sample_batch,
)

Coactivation = tuple[np.ndarray, np.ndarray]  # distinct sorted expert sets [G, k] and their frequencies [G]


def check_memory(field_name: str, model: MoEModel, tokens: float) -> None:
    """Refuse up front (an InputError with the estimate and the limit) an observed batch whose
    memory estimate exceeds the machine's physical memory."""
    check_observed_memory(field_name, tokens, model.moe_layers, model.top_k)


def check_mesh_memory(field_name: str, model: MoEModel, rows: int, cols: int) -> None:
    """Refuse up front a mesh whose per-node and per-link arrays (hop distances ``[D, D]``, per-layer
    node and link loads) would not fit in the machine's memory."""
    d = rows * cols
    links = 2 * rows * (cols - 1) + 2 * (rows - 1) * cols
    need = 8.0 * (4 * d * d + 4 * model.moe_layers * (d + links))
    limit = physical_memory_bytes()
    if limit is not None and need > limit:
        raise InputError(field_name, f"a {rows}x{cols} mesh ({d} nodes) needs about {need / 1e9:.3g} GB, more than "
                         f"this machine's {limit / 1e9:.3g} GB of memory", "use a smaller mesh")


def _point_of(hw: Hardware) -> str | None:
    """The design-point name of hardware made by ``make_hardware`` (its name is ``POINT@MESH``)."""
    return point_name(hw.name.split("@")[0])


@dataclass(frozen=True)
class Budget:
    """Effort a MILP-solving strategy may spend, per MoE layer.

    ``time_limit_s``: wall-clock seconds per layer (the block MILP). ``work_limit``: deterministic
    work per layer (CP-SAT deterministic seconds; None = the strategy's default): strategies that
    promise the same answer under any machine load (``hdmoe``) count this, not wall time.
    ``backend``: ``cbc``, ``cpsat``, ``highs`` or ``scip``. ``threads``: solver threads per layer. ``gap``:
    relative gap target.
    """

    time_limit_s: float = 10.0
    work_limit: float | None = None
    backend: str = "cpsat"
    threads: int = 1
    gap: float = 1e-4

    def __post_init__(self) -> None:
        # stored as plain Python numbers (numpy scalars are accepted), so that plan files can record them
        set_ = object.__setattr__
        set_(self, "time_limit_s", check_real("time_limit_s", self.time_limit_s, positive=True,
                                              maximum=MAX_TIME_LIMIT_S))
        if self.work_limit is not None:
            set_(self, "work_limit", check_real("work_limit", self.work_limit, minimum=0.0, maximum=MAX_WORK_LIMIT))
        check_choice("backend", self.backend, tuple(BACKENDS))
        set_(self, "threads", int(check_real("threads", self.threads, minimum=1, integer=True, maximum=MAX_THREADS)))
        g = check_real("gap", self.gap, minimum=0.0)
        if g >= 1:
            raise InputError("gap", f"must be in [0, 1), got {self.gap!r}")
        set_(self, "gap", g)


# what a plan file records about its problem (Problem.describe), so that a hand-edited record with a
# misspelt key is refused rather than read as the default
RECORD_KEYS = frozenset({
    "model", "moe_layers", "num_experts", "top_k", "mesh", "hw_point", "hardware", "batch", "batching", "seed",
    "trace", "trace_path", "trace_sha256", "synthetic_tokens", "mode", "delivery", "home", "context_len",
    "coalesce", "replica_rule", "model_dims"})
# the model's sizes beyond its shape (model_dims): a variant of a preset keeps the preset's name
RECORD_MODEL_KEYS = ("hidden", "expert_intermediate", "dense_layers", "dense_intermediate", "shared_experts",
                     "shared_intermediate", "weight_bytes", "activation_bytes", "paper_intermediate")
RECORD_HARDWARE_KEYS = frozenset({"compute_flops", "link_bw_bytes_per_s", "dram_bw_bytes_per_s",
                                  "dram_capacity_bytes", "hop_latency_s"})


@dataclass(frozen=True)
class Problem:
    """One placement problem. Shapes: ``frequencies [layers, E]`` (expert i's share of tokens; from
    a trace each row sums to top_k), ``coactivation[l]`` = (sets ``[G, k]``, frequencies ``[G]``).

    ``trace``: the routing trace the statistics come from (needed to evaluate; a problem built from
    ``frequencies`` alone can be placed by the baselines that need only frequencies).
    ``batch``: tokens per decode step. ``batching``: how the scored batch is drawn from the trace
    (``expected``: frequencies x B; ``random`` / ``contiguous``: observed tokens, seeded by ``seed``).
    ``hw_point``: the design-point name the hardware came from (``"5/50"``), for plan files.
    ``trace_path`` / ``trace_sha256``: where the trace was read from, for plan files.
    """

    model: MoEModel
    hardware: Hardware
    trace: Trace | None = None
    batch: float = 128
    options: EvalOptions = field(default_factory=EvalOptions)
    batching: str = "expected"
    seed: int = 0
    frequencies: np.ndarray | None = None
    name: str = ""
    hw_point: str | None = None
    trace_path: str | None = None
    trace_sha256: str | None = None

    def __repr__(self) -> str:  # the arrays it holds would fill a notebook cell
        src = self.trace.name if self.trace is not None else "frequencies only"
        point = self.hw_point or _point_of(self.hardware) or "custom hardware"
        return (f"Problem({self.model.name}, {point}, mesh {self.mesh_name}, "
                f"batch {self.batch:g} ({self.batching}), trace {src}, mode {self.options.mode}, seed {self.seed})")

    def __post_init__(self) -> None:
        if not isinstance(self.model, MoEModel):
            raise InputError("model", f"must be a MoEModel, got {type(self.model).__name__}", "use get_model(name)")
        if not isinstance(self.hardware, Hardware):
            raise InputError("hardware", f"must be a Hardware, got {type(self.hardware).__name__}",
                             "use make_hardware(point, mesh)")
        if not isinstance(self.options, EvalOptions):
            raise InputError("options", f"must be an EvalOptions, got {type(self.options).__name__}")
        check_mesh_memory("hardware", self.model, self.hardware.mesh.rows, self.hardware.mesh.cols)
        check_choice("batching", self.batching, BATCHING)
        check_batch(self.batch, whole=self.batching != "expected")
        object.__setattr__(self, "batch", float(self.batch))
        if self.batching != "expected":
            check_memory("batch", self.model, self.batch)
        object.__setattr__(self, "seed", check_seed(self.seed))
        for name in ("name", "hw_point", "trace_path", "trace_sha256"):
            v = getattr(self, name)
            if not (isinstance(v, str) or (v is None and name != "name")):
                raise InputError(name, f"must be a string, got {v!r}")
        if self.hw_point is not None:  # plan files record it: it must be the hardware's point
            try:
                point, pt = parse_point(self.hw_point, "hw_point")
            except InputError as exc:
                raise InputError(exc.field, exc.problem, exc.fix + ", or None") from None
            object.__setattr__(self, "hw_point", point)
            hw = self.hardware
            if hw.compute_flops != pt.compute_flops or not np.all(hw.link_bw == pt.link_bw_bytes_per_s):
                raise InputError("hw_point", f"{self.hw_point!r} is {pt.compute_flops / 1e12:g} TFLOP/s per node "
                                 f"and {pt.link_bw_bytes_per_s / 1e9:g} GB/s per link, but the hardware has "
                                 f"{hw.compute_flops / 1e12:g} TFLOP/s and {hw.min_link_bw / 1e9:g} GB/s "
                                 "(slowest link)", "leave hw_point out, or build the hardware with "
                                 f"make_hardware({self.hw_point!r}, mesh)")
        m = self.model
        if self.trace is not None:
            t = self.trace
            if not isinstance(t, Trace):
                raise InputError("trace", f"must be a Trace, got {type(t).__name__}", "use load_trace(path, E, k)")
            if t.num_experts != m.num_experts or t.top_k != m.top_k:
                raise InputError("trace", f"routes top-{t.top_k} of {t.num_experts} experts but {m.name} routes "
                                 f"top-{m.top_k} of {m.num_experts}", "use a trace recorded on this model")
            if t.num_layers != m.moe_layers:
                raise InputError("trace", f"has {t.num_layers} layers but {m.name} has {m.moe_layers} MoE layers",
                                 "use a trace recorded on this model")
            check_window("batch", self.batch, self.batching, t,
                         "lower the batch or sample batches at random (batching 'random'; --batching random)")
        if self.frequencies is None:
            if self.trace is None:
                raise InputError("problem", "needs a trace or frequencies", "give trace=load_trace(...)")
            f = self.trace.frequencies()
        else:
            try:
                f = np.array(self.frequencies, dtype=float)
            except (TypeError, ValueError):
                raise InputError("frequencies", "must be an array of numbers",
                                 "one row of expert frequencies per MoE layer") from None
        if f.shape != (m.moe_layers, m.num_experts):
            raise InputError("frequencies", f"expected shape [{m.moe_layers}, {m.num_experts}] for {m.name}, "
                             f"got {f.shape}", "one row of expert frequencies per MoE layer")
        if not np.all(np.isfinite(f)) or np.any(f < 0):
            raise InputError("frequencies", "must be finite and non-negative", "frequencies are token fractions")
        over = np.argwhere(f > 1 + 1e-9)
        if over.size:
            li, i = (int(v) for v in over[0])
            raise InputError("frequencies", f"layer {li} expert {i} has {f[li, i]:g}, but a token picks each expert at "
                             "most once", "give each expert's share of the tokens, at most 1")
        sums = f.sum(axis=1)
        off = np.flatnonzero(np.abs(sums - m.top_k) > 1e-6 * m.top_k)
        if off.size:
            li = int(off[0])
            raise InputError("frequencies", f"layer {li} sums to {sums[li]:g}, but every token picks top_k={m.top_k} "
                             "experts", f"scale each row to sum to {m.top_k} (expert i's tokens per token)")
        if self.frequencies is not None and self.trace is not None and not np.allclose(
                f, self.trace.frequencies(), rtol=1e-9, atol=1e-12):
            raise InputError("frequencies", "differ from the trace's, which the evaluator scores",
                             "give either a trace or frequencies (with_(trace=...) drops the old ones)")
        f.setflags(write=False)
        object.__setattr__(self, "frequencies", f)
        check_model_fits(m, self.hardware)

    # --- derived once ----------------------------------------------------------------------------
    @cached_property
    def coactivation(self) -> list[Coactivation] | None:
        """Per layer, the distinct expert sets and their frequencies (None without a trace)."""
        if self.trace is None:
            return None
        return [self.trace.coactivation(li) for li in range(self.trace.num_layers)]

    @cached_property
    def workload(self) -> Workload:
        """The batch every evaluation of this problem scores."""
        if self.trace is None:
            raise InputError("trace", "is needed to evaluate a placement", "build the problem with a trace")
        if self.batching == "expected":
            return expected_workload(self.trace, self.batch)
        return sample_batch(self.trace, int(self.batch), self.batching, self.seed)

    @property
    def num_layers(self) -> int:
        return self.model.moe_layers

    @property
    def mesh_name(self) -> str:
        return self.hardware.mesh.name

    def check_memory(self, field_name: str, tokens: float) -> None:
        """Refuse an observed batch of ``tokens`` (e.g. a replay's) that would not fit in memory."""
        check_memory(field_name, self.model, tokens)

    def with_(self, **changes: Any) -> Problem:
        """A copy with some fields changed (validated again)."""
        names = {f.name for f in fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise InputError("problem", f"unknown field(s) {bad}", "fields: " + ", ".join(sorted(names)))
        if "trace" in changes:  # what came from the old trace goes with it
            changes.setdefault("frequencies", None)
            changes.setdefault("trace_path", None)
            changes.setdefault("trace_sha256", None)
        if "hardware" in changes:
            changes.setdefault("hw_point", None)
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """What a plan made for this problem records (JSON-ready): the keys of :data:`RECORD_KEYS`,
        with ``hardware`` holding those of :data:`RECORD_HARDWARE_KEYS` and ``model_dims`` those of
        :data:`RECORD_MODEL_KEYS`."""
        hw = self.hardware
        bw = hw.link_bw
        return {
            "model": self.model.name,
            "moe_layers": self.model.moe_layers,
            "num_experts": self.model.num_experts,
            "top_k": self.model.top_k,
            "model_dims": {k: getattr(self.model, k) for k in RECORD_MODEL_KEYS},
            "mesh": hw.mesh.name,
            "hw_point": self.hw_point or _point_of(hw),
            "hardware": {
                "compute_flops": hw.compute_flops,
                "link_bw_bytes_per_s": float(bw[0]) if bw.size and np.all(bw == bw[0]) else bw.tolist(),
                "dram_bw_bytes_per_s": hw.dram_bw_bytes_per_s,
                "dram_capacity_bytes": hw.dram_capacity_bytes,
                "hop_latency_s": hw.hop_latency_s,
            },
            "batch": int(self.batch) if float(self.batch).is_integer() else float(self.batch),  # 128, not 128.0
            "batching": self.batching,
            "seed": self.seed,
            "trace": None if self.trace is None else self.trace.name,
            "trace_path": self.trace_path or (None if self.trace is None else self.trace.path),
            "trace_sha256": self.trace_sha256 or (None if self.trace is None else self.trace.sha256),
            # a trace read from no file (synthetic): its tokens, which with the seed rebuild it
            "synthetic_tokens": (int(self.trace.layers[0].shape[0]) if self.trace is not None
                                 and not (self.trace_path or self.trace.path) else None),
            "mode": self.options.mode,
            "delivery": self.options.resolved_delivery,
            "home": self.options.resolved_home,
            # the rest of the evaluator's settings: the attention term's KV length, how a token's
            # messages merge and which copy of a replicated expert serves it
            "context_len": int(self.options.context_len),
            "coalesce": self.options.coalesce,
            "replica_rule": self.options.replica_rule,
        }
