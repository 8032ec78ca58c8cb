"""The public pipeline: ``load_instance`` -> ``solve`` / ``evaluate`` / ``compare`` / ``replay``.

The CLI and the benchmark scripts call these functions and nothing below them::

    import hdmoe_milp as hm
    problem = hm.load_instance("instances/deepseek-v2-lite_5-50_4x8.toml")
    result = hm.solve(problem, backend="cpsat", time_limit_s=5, jobs=2)
    result.table()

Every number comes from the one evaluator (:func:`hdmoe_milp.evaluator.evaluate`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ._version import __version__
from .costs import check_capacity, fits_capacity
from .errors import MAX_BATCHES, InputError, check_choice, check_real, check_seed, expect_instance, expect_int
from .evaluator import EvalOptions, Evaluation
from .evaluator import evaluate as score
from .hardware import HARDWARE_PRESETS, Mesh
from .instance import INSTANCE_KEYS, Settings, load_instance, read_settings
from .moe import MODEL_PRESETS
from .online import POLICIES, ReplayResult
from .online import replay as _replay
from .placement import Placement
from .problem import Budget, Problem
from .replica_rules import REPLICA_RULES
from .solvers import SolveParams
from .solvers.tasks import TasksInterrupted, check_jobs, executor_session, run_tasks
from .strategies import BASELINES, STRATEGIES, USES_BUDGET, place
from .strategies.block_milp import (
    EXECUTORS,
    MAX_MESH_NODES,
    LayerSolveResult,
    LnsSettings,
    MilpOptions,
    best_per_layer,
    layer_tasks,
    model_result,
    not_solved_task,
    schedule_tasks,
    select_layers,
    solve_layer_task,
)
from .strategies.hdmoe import WORK_LIMIT
from .workload import Trace, TraceShapeError, check_window, load_trace, summarize, total_variation

__all__ = [
    "BASELINES", "HARDWARE_PRESETS", "INSTANCE_KEYS", "MODEL_PRESETS", "POLICIES", "REPLICA_RULES", "STRATEGIES",
    "USES_BUDGET",
    "Budget", "Comparison", "LayerReport", "PlanResult", "Problem", "Settings", "TraceShapeError", "check_choice",
    "check_jobs", "check_plan", "compare", "evaluate", "file_sha256", "load_instance", "load_plan", "load_trace",
    "place", "plan_settings", "read_settings", "replay", "solve", "trace_stats",
]


def _progress(progress: bool | None, **kw: Any) -> tqdm:
    """A progress bar on stderr: on in a terminal by default (``progress=None``), forced by True/False."""
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise InputError("progress", f"must be True, False or None, got {progress!r:.60}",
                         "None shows the bar in a terminal only")
    return tqdm(disable=None if progress is None else not progress, leave=False, **kw)


def _place_all(problem: Problem, names: list[str], seed: int | None, budget: Budget | None,
               progress: bool | None, *, into: dict[str, Placement] | None = None) -> dict[str, Placement]:
    """Every named strategy's placement, with a progress bar; added to ``into`` (a new dict if None)
    as each is built, so that a caller catching Ctrl-C keeps the ones built before it."""
    out = {} if into is None else into
    bar = _progress(progress, total=len(names), desc="strategies", unit="strategy")
    try:
        for n in names:
            bar.set_postfix_str(n)
            out[n] = place(problem, n, seed=seed, budget=budget)
            bar.update()
    finally:
        bar.close()
    return out


def _check_problem(problem: Any, *, optional: bool = False) -> None:
    expect_instance("problem", problem, Problem, "use hm.load_instance(path) or hm.Problem(...)", optional=optional)


# --- scoring --------------------------------------------------------------------------------------


def evaluate(problem: Problem, plan: str | Placement, *, seed: int | None = None, budget: Budget | None = None,
             options: EvalOptions | None = None) -> Evaluation:
    """Score a strategy (by name, built on ``problem``) or a :class:`Placement` on the problem's
    workload with the shared evaluator (``options``: the problem's unless given). ``seed`` and
    ``budget`` (time and work limits, backend) go to the strategy a name builds (``seed``: the
    problem's unless given); a Placement takes neither. Times in the result are seconds."""
    _check_problem(problem)
    expect_instance("plan", plan, (str, Placement), "give a strategy name or a Placement")
    expect_instance("options", options, EvalOptions, "use hm.EvalOptions(...)", optional=True)
    expect_instance("budget", budget, Budget, "use hm.Budget(...)", optional=True)
    if isinstance(plan, Placement):
        for name, v in (("seed", seed), ("budget", budget)):
            if v is not None:
                raise InputError(name, "builds a strategy named by a string; this plan is a Placement, already built",
                                 f"leave {name} out, or give the strategy's name")
    placement = plan if isinstance(plan, Placement) else place(problem, plan, seed=seed, budget=budget)
    if isinstance(plan, Placement):
        check_plan(placement, problem)
    name = plan if isinstance(plan, str) else (placement.strategy or "given")
    return _score_named(name, placement, problem, options or problem.options)


def _score_named(name: str, placement: Placement, problem: Problem, options: EvalOptions) -> Evaluation:
    """:func:`score`, with an error about the placement (it does not fit the DRAM) naming the strategy."""
    try:
        return score(placement, problem.model, problem.hardware, problem.workload, options)
    except InputError as exc:
        if exc.field != "hardware.dram_capacity_bytes":
            raise
        raise _misfit(name, exc) from None


def _misfit(name: str, exc: InputError, others: list[str] | tuple[str, ...] = ()) -> InputError:
    """A capacity error from :func:`check_capacity` naming the strategy whose placement it is about
    (and ``others`` that do not fit either)."""
    also = f" ({', '.join(others)} {'does' if len(others) == 1 else 'do'} not fit either)" if others else ""
    return InputError(exc.field, f"the {name} placement does not fit: {exc.problem}{also}", exc.fix)


@dataclass(frozen=True)
class Comparison:
    """Evaluations of several placements of one problem; ``table()`` puts them side by side."""

    problem: Problem
    evaluations: dict[str, Evaluation]
    placements: dict[str, Placement] = field(repr=False)
    reference: Evaluation | None = field(default=None, repr=False)
    over_capacity: dict[str, str] = field(default_factory=dict)  # strategy -> why it does not fit the DRAM

    def __repr__(self) -> str:
        return f"Comparison({self.problem!r}, strategies {list(self.evaluations)}; .table() for the numbers)"

    def table(self) -> pd.DataFrame:
        """One row per strategy: TBT and its decomposition (us), node imbalance, speedup vs TP."""
        ref = (self.reference or self.evaluations["tp"]).tbt_s
        rows = []
        for name, ev in self.evaluations.items():
            row = ev.summary()
            row["strategy"] = name
            row["speedup_vs_tp"] = ref / ev.tbt_s
            rows.append(row)
        return pd.DataFrame(rows)[["strategy", "tbt_us", "moe_compute_us", "moe_comm_us", "non_moe_us",
                                   "max_node_imbalance", "speedup_vs_tp"]]

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows as :meth:`PlanResult.to_frame` gives them, one per strategy: ``model``, ``mesh``,
        ``hw``, ``mode``, ``batch``, then the columns of :meth:`table` (so that comparisons of
        several problems concatenate)."""
        d = self.problem.describe()
        df = self.table()
        head = pd.DataFrame({"model": d["model"], "mesh": d["mesh"], "hw": d["hw_point"],
                             "mode": [ev.mode for ev in self.evaluations.values()],
                             "batch": [float(ev.batch_size) for ev in self.evaluations.values()]})
        return pd.concat([head, df], axis=1)

    def summary(self) -> dict[str, Any]:
        """``best``: the strategy with the lowest TBT; ``tbt_us`` and ``speedup_vs_tp`` per strategy;
        ``over_capacity``: the strategies left out because they do not fit the DRAM."""
        df = self.table()
        best = df.loc[df["tbt_us"].idxmin(), "strategy"]
        return {"best": str(best), "tbt_us": dict(zip(df["strategy"], df["tbt_us"].astype(float), strict=True)),
                "speedup_vs_tp": dict(zip(df["strategy"], df["speedup_vs_tp"].astype(float), strict=True)),
                "over_capacity": sorted(self.over_capacity)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the problem (as a plan file records it), one ``results`` row per strategy (its
        :meth:`Evaluation.summary` and ``speedup_vs_tp``), and ``over_capacity`` (strategy -> why)."""
        speedup = self.table()["speedup_vs_tp"]
        return {"problem": self.problem.describe(),
                "results": [{**ev.summary(), "strategy": name, "speedup_vs_tp": float(sp)}
                            for (name, ev), sp in zip(self.evaluations.items(), speedup, strict=True)],
                "over_capacity": dict(self.over_capacity)}


def compare(problem: Problem, strategies: list[str] | tuple[str, ...] | None = None, *,
            plans: dict[str, Placement] | None = None, seed: int | None = None, budget: Budget | None = None,
            progress: bool | None = None) -> Comparison:
    """Build every strategy in ``strategies`` (default, or ``"all"`` as in the CLI: the baselines) on
    ``problem`` and score them,
    plus any ready ``plans``; TP is always scored as the reference. A built strategy whose placement
    does not fit the nodes' DRAM is left out and listed in ``over_capacity`` (an error if it is the
    only one); a given plan that does not fit is an error."""
    _check_problem(problem)
    expect_instance("plans", plans, dict, "give a dict of name -> Placement", optional=True)
    expect_instance("budget", budget, Budget, "use hm.Budget(...)", optional=True)
    if not isinstance(strategies, (str, list, tuple, type(None))):
        raise InputError("strategies", f"must be a name or a list of names, got {strategies!r}",
                         "e.g. ['tp', 'ep'], or leave it out for the baselines")
    names = list(BASELINES if strategies is None or strategies == "all"
                 else [strategies] if isinstance(strategies, str) else strategies)
    if not names and not plans:
        raise InputError("strategies", "is empty", "name at least one strategy, or leave it out for the baselines")
    for n in names:
        check_choice("strategies", n, tuple(STRATEGIES))
    if len(set(names)) != len(names):
        raise InputError("strategies", f"lists a strategy twice: {names}", "name each strategy once")
    placements: dict[str, Placement] = {}
    for name, p in (plans or {}).items():
        if name in names:
            raise InputError("plans", f"{name!r} is also a strategy to build", "name the plan differently")
        if not isinstance(name, str) or not name:
            raise InputError("plans", f"keys are the plans' names, got {name!r}", "name each plan with a string")
        expect_instance("plans", p, Placement, f"the value of {name!r} must be a Placement")
        wrong = _plan_mismatch(p, problem)
        if wrong is not None:
            raise InputError(f"plans[{name!r}]", *wrong[1:])
        if name == "tp" and not _same_layout(p, place(problem, "tp")):  # "tp" is the speedups' reference
            raise InputError("plans", "'tp' names the reference of every speedup, but this plan is not tensor "
                             "parallel", "give the plan another name")
        placements[name] = p
    built = _place_all(problem, names, seed, budget, progress)
    # a built strategy that does not fit the DRAM is no plan: it is left out and listed (as in solve),
    # unless nothing else is left to compare; a plan the caller gave must fit
    misfit: dict[str, InputError] = {}
    for n, p in built.items():
        try:
            check_capacity(p, problem.model, problem.hardware)
        except InputError as exc:
            misfit[n] = exc
    if misfit and len(misfit) == len(built) and not placements:
        first, *rest = misfit
        raise _misfit(first, misfit[first], rest)
    placements.update({n: p for n, p in built.items() if n not in misfit})
    evals = {n: _score_named(n, p, problem, problem.options) for n, p in placements.items()}
    ref = evals.get("tp") or score(place(problem, "tp"), problem.model, problem.hardware, problem.workload,
                                   problem.options)
    return Comparison(problem, evals, placements, ref, {n: e.problem for n, e in misfit.items()})


def _same_layout(a: Placement, b: Placement) -> bool:
    """Whether two placements put the same shares of every expert on every node, layer by layer."""
    return a.num_layers == b.num_layers and all(
        x.shares.shape == y.shares.shape and np.allclose(x.shares, y.shares, rtol=0.0, atol=1e-12)
        for x, y in zip(a.layers, b.layers, strict=True))


# --- the offline solve ------------------------------------------------------------------------------


LayerReport = LayerSolveResult  # one layer of a solve: status, objective_s, bound_s, gap, time_s, sources


@dataclass(frozen=True)
class PlanResult:
    """What :func:`solve` returns.

    ``placement``: the final plan (per layer the best of the MILP and the baselines under the
    evaluator). ``layers``: one :class:`LayerReport` per MoE layer. ``evaluations``: ``{"plan": ...,
    "milp": ..., "tp": ..., ...}``. ``solver``: the settings and the wall time.
    """

    problem: Problem
    placement: Placement
    layers: tuple[LayerReport, ...]
    evaluations: dict[str, Evaluation]
    solver: dict[str, Any]
    candidates: dict[str, Placement] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        sm = self.summary()
        return (f"PlanResult({self.problem!r}: TBT {sm['tbt_us']:.3f} us, {sm['layers_solved']} layer"
                f"{'' if sm['layers_solved'] == 1 else 's'} solved, "
                f"{sm['proven_1pct']} proven within 1 %; .table(), .layer_table(), .summary())")

    def at_batch(self, batch: float) -> PlanResult:
        """The same candidates (MILP and baselines, as solved) combined and scored at another batch
        size: per layer the best at ``batch``."""
        return _combine(self.problem.with_(batch=batch), self.candidates, self.layers, self.solver)

    def table(self) -> pd.DataFrame:
        """One row per strategy (the plan first): TBT and its decomposition in us, and the plan's
        speedup over each."""
        plan = self.evaluations["plan"].tbt_s
        rows = []
        for name, ev in self.evaluations.items():
            rows.append({
                "strategy": name, "tbt_us": ev.tbt_us, "moe_compute_us": ev.moe_compute_s * 1e6,
                "dispatch_us": float(ev.dispatch_s.sum() * 1e6), "combine_us": float(ev.combine_s.sum() * 1e6),
                "non_moe_us": ev.non_moe_s * 1e6, "plan_speedup": ev.tbt_s / plan,
            })
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows, one per strategy (the plan first): settings, TBT and its decomposition in us,
        TBT / TBT(TP)."""
        d = self.problem.describe()
        tp = self.evaluations["tp"].tbt_s if "tp" in self.evaluations else float("nan")
        return pd.DataFrame([{
            "model": d["model"], "mesh": d["mesh"], "hw": d["hw_point"], "mode": ev.mode,
            "batch": float(ev.batch_size), "strategy": name, "tbt_us": ev.tbt_us,
            "moe_compute_us": ev.moe_compute_s * 1e6, "dispatch_us": float(ev.dispatch_s.sum() * 1e6),
            "combine_us": float(ev.combine_s.sum() * 1e6), "non_moe_us": ev.non_moe_s * 1e6,
            "tbt_norm_tp": ev.tbt_s / tp,
        } for name, ev in self.evaluations.items()])

    def layer_table(self) -> pd.DataFrame:
        """One row per layer: status, ``objective_us`` and ``bound_us`` (µs), ``gap`` and
        ``improvement`` (fractions, as in :meth:`summary`: 0.05 is 5 %), ``time_s``, sources."""
        df = pd.DataFrame([r.to_dict() for r in self.layers])
        df["objective_us"] = df["objective_s"] * 1e6
        df["bound_us"] = df["bound_s"].astype(float) * 1e6
        return df[["layer", "status", "objective_us", "bound_us", "gap", "improvement", "time_s", "source",
                   "final_source"]]

    def summary(self) -> dict[str, Any]:
        """What the solve proved, over the layers it solved (``--layers`` may leave some out, and
        Ctrl-C leaves layers ``interrupted``):
        ``layers_solved``, ``proven_1pct`` (gap ≤ 1 %), ``gap_median`` and ``gap_max`` (fractions;
        None when no layer has a gap), ``improved`` (layers where the search beat the best
        heuristic) and ``improvement_max`` (fraction), the plan's ``tbt_us`` and ``wall_s``;
        ``wall_capped``: layers whose deterministic search the wall-clock safety net stopped (their
        plans depend on the machine's load; always 0 in wall mode)."""
        # a layer cut by Ctrl-C holds its best start, not a solve: it is not counted either
        solved = [r for r in self.layers if r.status not in ("not-solved", "interrupted")]
        gaps = np.array([r.gap for r in solved if r.gap is not None and np.isfinite(r.gap)], dtype=float)
        gains = np.nan_to_num(np.array([r.improvement or 0.0 for r in solved], dtype=float))
        return {
            "layers_solved": len(solved), "proven_1pct": int((gaps <= 0.01).sum()),
            "gap_median": float(np.median(gaps)) if gaps.size else None,
            "gap_max": float(gaps.max()) if gaps.size else None,
            "improved": int((gains > 0).sum()), "improvement_max": float(gains.max(initial=0.0)),
            "tbt_us": self.evaluations["plan"].tbt_us, "wall_s": self.solver.get("wall_s"),
            "wall_capped": sum(r.wall_capped for r in solved),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the problem, the solver settings, per-layer reports, TBT per strategy."""
        return {
            "problem": self.problem.describe(), "solver": self.solver,
            "layers": [r.to_dict() for r in self.layers],
            "tbt_us": {n: e.tbt_us for n, e in self.evaluations.items()},
        }

    def save(self, path: str | Path, *, force: bool = True, field: str = "path") -> None:
        """Write the plan file (atomically): the placement plus what it was made for. ``force=False``
        refuses to replace an existing file."""
        self.placement.save(path, force=force, field=field)


WORK_LIMITED_BACKENDS = ("cpsat", "cbc")  # the backends that can stop on work, not the clock (deterministic)


def solve(problem: Problem, *, backend: str = "cpsat", time_limit_s: float = 10.0, jobs: int = 1,
          threads: int = 1, gap: float = 1e-4, baselines: bool | list[str] | tuple[str, ...] = True,
          executor: str = "local", seed: int | None = None, progress: bool | None = None,
          work_limit: float | None = None, layers: list[int] | tuple[int, ...] | None = None,
          deterministic: bool = False, lns_patience: int | None = None, polish: bool = True,
          branch_and_bound: bool = True, node_order: bool = True, run_start: float | None = None) -> PlanResult:
    """Solve every layer's block MILP (warm-started from the best baseline and heuristic), then keep
    per layer whichever of the MILP's plan and the baselines scores best under the evaluator, so the
    plan is never worse than any baseline.

    ``time_limit_s``: per layer. ``jobs``: layers solved in parallel (process pool).
    ``executor``: ``local`` or ``ray``. ``baselines``: True (all), False (none) or a list of names.
    ``work_limit``: the ``hdmoe`` baseline's stage-1 budget per layer (CP-SAT deterministic seconds;
    None: its default). Each MILP layer computes that layer's hdmoe baseline itself (within its
    ``time_limit_s``; a warm start and part of its family), which is also the ``hdmoe`` candidate.
    Scoring uses ``mesh`` mode with spread homes and ``coalesce="node"`` (the model the MILP
    optimises) and the problem's delivery rule; a problem whose options ask for another mode, home
    rule, coalescing or replica rule is refused (an InputError naming ``options.mode``,
    ``options.home``, ``options.coalesce`` or ``options.replica_rule``: its plan would be optimised
    and scored for the mesh model all the same;
    solve the problem with the default options and re-score the plan with :func:`evaluate`); so is a
    problem whose ``batching`` is not ``expected`` (the certificate is about the expected batch).
    ``layers``: solve only these MoE layers (0-based; the MILP and the hdmoe baseline); every other
    layer takes the best of the other baselines (hdmoe's layer too, if ``baselines`` has hdmoe) and is
    reported ``not-solved``. ``deterministic``:
    CP-SAT counts ``time_limit_s`` as deterministic time (reproducible; default: wall seconds).
    ``lns_patience``: on layers solved by LNS, stop after this many steps in a row without
    improvement (None: the default, 2; 0: use the whole time limit). ``polish``: the evaluator-driven
    local search of each layer's plan (swaps and moves, before and after the model solve and LNS).
    ``branch_and_bound``: on layers with at most 16 experts (Mixtral), a best-first branch and bound
    over the family on the evaluator's score takes the layer's time left after the polish, in
    place of the bound stage (it proves Mixtral 4x8 layers within 1 % in seconds; see
    ``formulations/offline_milp.md``).
    ``node_order``: the node-order search, which swaps whole nodes' contents on the mesh where that
    lowers the link loads of the best two starting layouts (the reordered layouts join the family).
    ``run_start``: the wall-clock time (``time.time()``) the whole model's time counts from (default:
    this call; the CLI gives its own start). Solving the whole model (no ``layers``) in wall mode
    with the local pool, the solve takes at most about layers x ``time_limit_s`` / ``jobs`` + 10 %
    from then: where the fixed work of a run (imports, loading, the final scoring) would push it
    past that, at small limits, a layer gets a shorter limit, and says so (``cut_limit_s``).
    """
    started = time.time()
    _check_problem(problem)
    if run_start is not None:
        run_start = check_real("run_start", run_start)
        if started - run_start > 86400:  # time.monotonic() or perf_counter() by mistake: every layer cut
            raise InputError("run_start", f"is {started - run_start:.0f} s before now",
                             "give time.time() taken when the run started, or leave it out")
        started = min(run_start, started)
    o = problem.options
    for key, value, model_value in (("mode", o.mode, "mesh"), ("home", o.resolved_home, "spread"),
                                    ("coalesce", o.coalesce, "node"), ("replica_rule", o.replica_rule, "fraction")):
        if value != model_value:  # it would be optimised and scored for the mesh model all the same
            raise InputError(f"options.{key}", f"is {value!r}, but solve optimises and scores the mesh model "
                             "(mode 'mesh', spread homes, coalesce 'node', replica rule 'fraction')",
                             f"solve problem.with_(options=hm.EvalOptions({_solve_options_text(o)})) and score its "
                             "plan under these options with hm.evaluate(problem, result.placement)")
    if problem.batching != "expected":  # the certificate is about the expected batch: score that too
        raise InputError("batching", f"is {problem.batching!r}, but solve optimises, proves and scores the expected "
                         "batch (each expert's frequency x the batch); the comparison would score other tokens "
                         "than the certificate", "solve problem.with_(batching='expected') and score its plan on "
                         "sampled batches with hm.evaluate(problem, result.placement)")
    if problem.trace is None:  # before any layer is solved: the plans are scored on the trace
        raise InputError("trace", "is needed to solve (every plan is scored by the evaluator on its tokens)",
                         "build the problem with a trace (hm.load_trace or an instance file)")
    budget = Budget(time_limit_s=time_limit_s, work_limit=work_limit, backend=backend, threads=threads, gap=gap)
    check_mesh_nodes(problem.mesh_name, problem.hardware.num_nodes, "the MILP solve",
                     f"use a mesh of at most {MAX_MESH_NODES} nodes, or score the baselines on this mesh with "
                     "`hdmoe-milp evaluate --strategy all`")
    check_choice("executor", executor, EXECUTORS)
    jobs = check_jobs(jobs, executor)
    if not isinstance(baselines, (bool, str, list, tuple)):
        raise InputError("baselines", f"must be True, False, a name or a list of names, got {baselines!r}")
    names: list[str] = (list(BASELINES) if baselines is True else [] if baselines is False
                        else [baselines] if isinstance(baselines, str) else list(baselines))
    if len(set(names)) != len(names):
        raise InputError("baselines", f"lists a baseline twice: {names}", "name each baseline once")
    for n in names:
        check_choice("baselines", n, BASELINES)
    lns_settings = None
    if lns_patience is not None:
        if isinstance(lns_patience, bool) or not isinstance(lns_patience, (int, np.integer)) or lns_patience < 0:
            raise InputError("lns_patience", f"must be a whole number >= 0, got {lns_patience!r}",
                             "0 lets LNS use the whole time limit")
        lns_settings = LnsSettings(patience=int(lns_patience))
    for name, flag in (("polish", polish), ("deterministic", deterministic), ("branch_and_bound", branch_and_bound),
                       ("node_order", node_order)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(name, f"must be True or False, got {flag!r}")
    if deterministic and backend not in WORK_LIMITED_BACKENDS:  # its model solve would stop on the clock
        raise InputError("deterministic", f"{backend} has no work limit: its solves stop on the wall clock, so "
                         "the same inputs could give other plans and bounds", "use the cpsat or cbc backend for "
                         "reproducible runs, or leave it out")
    if not polish:
        lns_settings = replace(lns_settings or LnsSettings(), polish=False)
    if not branch_and_bound:
        lns_settings = replace(lns_settings or LnsSettings(), bnb=False)
    seed = problem.seed if seed is None else check_seed(seed)
    params = SolveParams(time_limit_s=budget.time_limit_s, threads=budget.threads, seed=seed, gap=budget.gap,
                         deterministic=deterministic)
    t0 = time.perf_counter()
    # one pool task per layer: its MILP computes the layer's hdmoe baseline too (a deterministic
    # budget, so the pool does not change its answer) and the pipeline reuses it as the candidate
    m, L = problem.model, problem.model.moe_layers
    coact = problem.coactivation
    work = WORK_LIMIT if work_limit is None else work_limit
    milp_tasks = layer_tasks(m, problem.hardware, problem.frequencies, problem.batch, backend=backend, params=params,
                             options=MilpOptions(delivery=problem.options.resolved_delivery,
                                                 node_order=bool(node_order)),
                             coactivation=coact, hdmoe_work_limit=work, lns_settings=lns_settings)
    chosen = select_layers(layers, L)
    tasks = [milp_tasks[li] for li in chosen]
    # the whole model's time (not a quick look at chosen layers); Ray places tasks on its own CPUs: no slots
    if layers is None and not deterministic and executor == "local":
        tasks = schedule_tasks(tasks, jobs, budget.time_limit_s, started)
    bar = _progress(progress, total=len(tasks), desc=f"solve {m.name}", unit="layer")
    # one Ray instance (--executor ray) for both calls: each started and stopped its own
    with executor_session(executor):
        interrupted = False
        try:
            out = run_tasks(solve_layer_task, tasks, jobs=jobs, executor=executor, bar=bar, num_cpus=threads)
        except TasksInterrupted as exc:  # Ctrl-C: keep the finished layers, the others take their best start
            out, interrupted = exc.results, True
        finally:
            bar.close()
        milp_out = dict(zip(chosen, out, strict=True))
        # a layer left out computes its hdmoe layer (in the pool, like the solved layers) when the hdmoe
        # baseline is asked for; after a Ctrl-C no layer does, so that the run stops promptly
        missing = [li for li in range(L) if milp_out.get(li) is None]
        if interrupted:
            filled = [not_solved_task(milp_tasks[li]._replace(hdmoe_work_limit=None)) for li in missing]
        else:
            todo = [milp_tasks[li] if "hdmoe" in names else milp_tasks[li]._replace(hdmoe_work_limit=None)
                    for li in missing]
            try:
                filled = run_tasks(not_solved_task, todo, jobs=jobs, executor=executor, num_cpus=threads)
            except TasksInterrupted as exc:  # Ctrl-C after the solved layers: those are kept
                interrupted = True
                filled = [r if r is not None else not_solved_task(t._replace(hdmoe_work_limit=None))
                          for r, t in zip(exc.results, todo, strict=True)]
    results = [milp_out.get(li) for li in range(L)]
    for li, r in zip(missing, filled, strict=True):
        results[li] = r
    asked = names
    if interrupted:
        results = [replace(r, status="interrupted", message="Ctrl-C before this layer finished")
                   if li in milp_out and milp_out[li] is None else r for li, r in enumerate(results)]
        names = [nm for nm in names if nm != "hdmoe"]  # hdmoe's layers are computed inside the solve
    res = model_result(results, backend, problem.batch, params, time.perf_counter() - t0)
    candidates = {"milp": res.placement}
    if "hdmoe" in names:  # a layer without its hdmoe layer (interrupted): the MILP candidate's
        hd = {li: r.hdmoe for li, r in enumerate(results) if r.hdmoe is not None}
        candidates["hdmoe"] = Placement(
            tuple(hd[li][0] if li in hd else results[li].placement for li in range(L)), "hdmoe",
            {"stage1": [hd[li][1] if li in hd else {"not-solved": True} for li in range(L)], "work_limit": work})
    try:
        _place_all(problem, [n for n in names if n != "hdmoe"], seed, budget, progress, into=candidates)
    except KeyboardInterrupt:  # the solved layers stand: the plan is the best of what was built so far
        interrupted = True
    left_out = [n for n in asked if n not in candidates]  # baselines a Ctrl-C stopped before they were built
    names = [n for n in names if n in candidates]
    candidates = {"milp": candidates["milp"], **{n: candidates[n] for n in names}}
    # a baseline that does not fit the DRAM is no plan: it is left out of the comparison (and said so)
    misfits = [n for n, p in candidates.items()
               if n != "milp" and not fits_capacity(p, problem.model, problem.hardware)]
    candidates = {n: p for n, p in candidates.items() if n not in misfits}
    names = [n for n in names if n not in misfits]
    wall = time.perf_counter() - t0
    layers = res.layers
    solver = {"backend": backend, "time_limit_s": budget.time_limit_s, "threads": budget.threads, "jobs": jobs,
              "gap": budget.gap,
              "seed": seed, "executor": executor, "baselines": names, "pool_wall_s": res.wall_s, "wall_s": wall,
              "layers": chosen, "time_mode": "deterministic" if deterministic else "wall",
              "family": next((r.family for r in results if r.family), ""), "interrupted": interrupted,
              "baselines_over_capacity": misfits, "baselines_interrupted": left_out}
    try:
        return _combine(problem, candidates, layers, solver)
    except KeyboardInterrupt:  # while the candidates were scored: the MILP's plan alone, scored again
        solver.update(interrupted=True, baselines=[], baselines_interrupted=left_out + names)
        return _combine(problem, {"milp": candidates["milp"]}, layers, solver)


def check_mesh_nodes(mesh_name: str, num_nodes: int, who: str, fix: str) -> None:
    """An InputError naming ``mesh`` if a mesh of ``num_nodes`` is beyond what the MILP builds its
    block family for (``who``: what solves there; ``fix``: what to do instead)."""
    if num_nodes > MAX_MESH_NODES:
        raise InputError("mesh", f"{mesh_name} has {num_nodes} nodes; {who} builds its block family for meshes of "
                         f"at most {MAX_MESH_NODES} nodes (16x16)", fix)


def _solve_options_text(o: EvalOptions) -> str:
    """The arguments of the EvalOptions :func:`solve_problem` gives, as code (defaults left out)."""
    d = EvalOptions()
    return ", ".join(f"{k}={v!r}" for k, v, dv in (("delivery", o.resolved_delivery, d.resolved_delivery),
                                                   ("seed", o.seed, d.seed), ("context_len", o.context_len,
                                                                              d.context_len)) if v != dv)


def solve_problem(problem: Problem) -> Problem:
    """``problem`` with the evaluator options :func:`solve` optimises and scores: mesh mode, spread
    homes, ``coalesce="node"``, and the problem's own delivery rule (``unicast`` for a paper-mode
    problem that names none), seed and context length."""
    o = problem.options
    return problem.with_(options=EvalOptions(mode="mesh", delivery=o.resolved_delivery, home="spread",
                                             seed=o.seed, context_len=o.context_len))


def _combine(problem: Problem, candidates: dict[str, Placement], layers: tuple[LayerReport, ...],
             solver: dict[str, Any]) -> PlanResult:
    """Per layer the candidate the evaluator scores best (mesh mode, spread homes, the delivery rule
    the MILP optimised), the plan's record, and every candidate's evaluation. The result's problem,
    and the plan's record, carry these options: what the plan was made and scored for."""
    problem = solve_problem(problem)
    opts = problem.options
    evals = {n: _score_named(n, p, problem, opts) for n, p in candidates.items()}
    plan, sources = best_per_layer(candidates, {n: e.layer_s for n, e in evals.items()}, "plan")
    # a layer left out of the solve holds a baseline's layout under the name "milp": say which one
    sources = [r.source.removeprefix("baseline:") if src == "milp" and r.status in ("not-solved", "interrupted")
               else src
               for r, src in zip(layers, sources, strict=True)]
    plan = Placement(plan.layers, plan.strategy, {**plan.meta, "layer_sources": sources})
    layers = tuple(replace(r, final_source=src) for r, src in zip(layers, sources, strict=True))
    meta = {"problem": problem.describe(), "solver": solver,
            "layers": [{"layer": r.layer, "status": r.status, "gap": r.gap, "final_source": r.final_source,
                        "trace": [list(p) for p in r.trace]} for r in layers],
            "package_version": __version__}
    plan = Placement(plan.layers, plan.strategy, {**plan.meta, **meta})
    evals = {"plan": score(plan, problem.model, problem.hardware, problem.workload, opts), **evals}
    return PlanResult(problem, plan, layers, evals, solver, candidates)


# --- plan files ------------------------------------------------------------------------------------


def check_plan(plan: Placement, problem: Problem) -> None:
    """Raise one InputError naming both sides if ``plan`` cannot be scored on ``problem``: a
    different model or mesh than the plan file records, or a different shape."""
    expect_instance("plan", plan, Placement, "use hm.load_plan(path) or hm.place(problem, name)")
    _check_problem(problem)
    wrong = _plan_mismatch(plan, problem)
    if wrong is not None:
        raise InputError("plan", *wrong[1:])


def _plan_mismatch(plan: Placement, problem: Problem) -> tuple[str, str, str] | None:
    """``(key, problem, fix)`` of the first way ``plan`` does not fit ``problem``, where ``key`` is the
    plan file's key that says so (``meta.problem.mesh``, ``num_nodes``, ...); None if it fits."""
    made = plan.meta.get("problem") if isinstance(plan.meta, dict) else None
    if isinstance(made, dict):
        for key, here in (("model", problem.model.name), ("mesh", problem.mesh_name)):
            rec = made.get(key)
            if key == "mesh" and isinstance(rec, str):  # "4X8" and "4x8" are one mesh
                try:
                    rec = Mesh.parse(rec).name
                except InputError:
                    pass
            if rec is not None and rec != here:
                return (f"meta.problem.{key}", f"was made for {key} {made[key]!r} but the problem has {key} {here!r}",
                        f"solve again for {here} or score the plan on {made[key]}")
    m = problem.model
    if plan.num_nodes != problem.hardware.num_nodes:
        return ("num_nodes", f"places experts on {plan.num_nodes} nodes but the mesh {problem.mesh_name} has "
                f"{problem.hardware.num_nodes}", "use a plan made for this mesh")
    if plan.num_experts != m.num_experts or plan.num_layers != m.moe_layers:
        return ("num_experts" if plan.num_experts != m.num_experts else "layers", f"has {plan.num_layers} layers "
                f"of {plan.num_experts} experts but {m.name} has {m.moe_layers} MoE layers of {m.num_experts}",
                "use a plan made for this model")
    return None


def load_plan(path: str | Path, problem: Problem | None = None) -> Placement:
    """Read a plan file; with ``problem``, check that the plan fits it (see :func:`check_plan`)."""
    _check_problem(problem, optional=True)
    plan = Placement.load(path)
    if problem is not None:
        wrong = _plan_mismatch(plan, problem)
        if wrong is not None:  # a file: name it and its key
            raise InputError(f"plan {Path(path).name} {wrong[0]}", *wrong[1:])
    return plan


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (what plan files record of their trace)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plan_settings(path: str | Path) -> dict[str, Any] | None:
    """What a plan file records about the problem it was made for (None for older plan files)."""
    made = Placement.load(path).meta.get("problem")
    return made if isinstance(made, dict) else None


# --- online ---------------------------------------------------------------------------------------


def replay(problem: Problem, plan: Placement, trace: Trace | None = None, *, policy: str = "greedy",
           batches: int = 50, batch: int | None = None, batching: str | None = None,
           replica_rule: str = "balanced", seed: int | None = None, progress: bool | None = None,
           **policy_kw: Any) -> ReplayResult:
    """Stream ``batches`` batches of ``batch`` tokens (default: the problem's batch, as the CLI)
    from ``trace`` (default: the problem's) under an online ``policy`` starting from ``plan``;
    every batch is scored by the evaluator on its observed tokens with the replica rule
    ``replica_rule``. ``batching``: ``random`` or ``contiguous`` (default: the problem's when it is
    one of them, as the CLI keeps an instance's, else ``contiguous``); contiguous batches are the
    trace's windows from its first token on, whatever the seed. ``seed`` (default: the problem's)
    draws the random batches. ``policy``: ``static``, ``greedy``, ``hdmoe-prebroadcast``,
    ``eplb-periodic`` or ``oracle``; ``policy_kw`` go to it (greedy: ``config``, a
    ``RebalancerConfig``; ``hdmoe-prebroadcast``: ``k``; ``eplb-periodic``: ``period``, ``window``,
    ``extra_replicas``; ``oracle``: ``time_limit_s``, ``backend``; see ``formulations/online.md``). The result's
    latencies are seconds per decode step, its weights moved bytes."""
    _check_problem(problem)
    check_choice("policy", policy, POLICIES)
    expect_instance("plan", plan, Placement, "use hm.place(problem, name) or hm.load_plan(path, problem)")
    expect_instance("trace", trace, Trace, "use hm.load_trace(path, E, k)", optional=True)
    check_plan(plan, problem)
    tr = trace if trace is not None else problem.trace
    if tr is None:
        raise InputError("trace", "is needed to replay", "give a trace or a problem built from one")
    m = problem.model
    if tr.num_experts != m.num_experts or tr.top_k != m.top_k or tr.num_layers != m.moe_layers:
        raise InputError("trace", f"routes top-{tr.top_k} of {tr.num_experts} experts in {tr.num_layers} layers, "
                         f"{m.name} top-{m.top_k} of {m.num_experts} in {m.moe_layers}",
                         f"give a trace of {m.name}: hm.load_trace(path, {m.num_experts}, {m.top_k})")
    if batch is None:
        if float(problem.batch) != int(problem.batch):
            raise InputError("batch", f"defaults to the problem's batch, {problem.batch:g} tokens, which is not a "
                             "whole number of tokens to replay", "give batch=N")
        batch = int(problem.batch)
    batch = expect_int("batch", batch, minimum=1, why="tokens per batch")
    batches = expect_int("batches", batches, minimum=1, maximum=MAX_BATCHES, why="batches to replay")
    if batching is None:
        batching = problem.batching if problem.batching in ("random", "contiguous") else "contiguous"
    check_choice("batching", batching, ("random", "contiguous"))
    problem.check_memory("batch", batch)  # refused before any batch is drawn
    check_window("batch", batch, batching, tr, "lower batch or use batching='random'")
    for key in ("model", "hw", "options"):  # the problem gives these; they are no policy setting
        if key in policy_kw:
            raise InputError(key, "comes from the problem, not from a policy setting",
                             "build the problem with it (hm.Problem / Problem.with_), and leave it out here")
    o = problem.options
    opts = EvalOptions(mode=o.mode, delivery=o.delivery, home=o.home, seed=o.seed, context_len=o.context_len,
                       coalesce=o.coalesce, replica_rule=replica_rule)
    return _replay(plan, problem.model, problem.hardware, tr, int(batch), policy, batches=int(batches),
                   batching=batching, seed=problem.seed if seed is None else check_seed(seed), options=opts,
                   progress=progress, **policy_kw)


def trace_stats(problem: Problem, against: Trace | None = None) -> dict[str, float]:
    """Skew statistics of the problem's trace (median/min/max over layers) and, with ``against``, the
    per-layer total-variation drift between the two (median and max)."""
    if problem.trace is None:
        raise InputError("trace", "is needed for statistics", "give a trace")
    out: dict[str, float] = summarize(problem.trace, problem.hardware.num_nodes, problem.seed)
    if against is not None:
        if against.num_layers != problem.trace.num_layers:
            raise InputError("against", f"has {against.num_layers} layers, the trace has {problem.trace.num_layers}",
                             f"give a trace of {problem.model.name} with every layer")
        tv = total_variation(problem.trace.frequencies(), against.frequencies())
        out.update(tv_median=float(np.median(tv)), tv_max=float(tv.max()))
    return out
