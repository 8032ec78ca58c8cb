"""The benchmark grid: models x hardware points x meshes x batches, through the public pipeline.

For every (model, hardware point, mesh) the plan is solved once (``pipeline.solve`` at
``solve_batch`` with every baseline) and cached in ``OUT/cache/`` under a hash of everything that
decides it (the problem's description including the trace's sha256, the solver settings, the
package version); every batch of the grid is then scored with ``PlanResult.at_batch``. With
``solve_batch=None`` every batch gets its own solve (ours and every baseline made for that batch),
so the MILP's own plan is at each point at least as good as every baseline its family holds. The online
part replays ours from the plan at ``online_batch`` under several policies on a drifting trace; for
the ablation figure, ``cb`` and ours are also scored at ``online_batch`` (rows ``part == "ablation"``,
left out of the static tables).

Outputs in ``OUT``: ``results.csv`` (tidy, one row per point and strategy, units in column names,
floats rounded, no wall times), ``results.md`` (speedups of ours over each baseline), ``solver.csv``
(per layer: gap and solve time, which are wall-clock), ``online.csv`` (per batch), the figures
(``figures/*.png`` and ``*.svg``), plan files (``plans/``) and ``index.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from . import pipeline as pl
from . import report as rp
from ._version import __version__
from .errors import MAX_BATCH, MAX_BATCHES, MAX_TIME_LIMIT_S, InputError, check_choice, check_real, check_seed
from .hardware import Mesh, parse_point
from .moe import get_model
from .placement import write_atomic
from .problem import check_mesh_memory

__all__ = ["PRESETS", "GridSpec", "check_spec", "run_grid", "write_report"]

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "instances"
TRACES = INSTANCES / "traces"

# offline trace (the plan is solved on it) and drift trace (the online part replays it) per model;
# None: the calibrated synthetic trace (no public trace), replayed as it is
MODEL_TRACES: dict[str, tuple[str | None, str | None]] = {
    "mixtral-8x7b": ("mixtral_reasoning_4k.json.gz", "mixtral_writing_4k.json.gz"),
    "deepseek-v2-lite": ("deepseek_v2_lite_law_4k.npz", "deepseek_v2_lite_translation_4k.npz"),
    "qwen2-57b-a14b": (None, None),
}
OURS = "ours"  # the solve's final plan (per layer the best of the MILP and the baselines)
POLICIES = ("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic")


@dataclass(frozen=True)
class GridSpec:
    """What to run. ``time_limit_s``: CP-SAT per layer, counted in deterministic time (same inputs,
    same plan). ``solve_batch``: the batch the plan is solved at; every batch in ``batches`` scores
    the same candidates (per layer the best at that batch). ``None``: one solve per batch of
    ``batches`` (as many solves, each batch scored with its own plans; the online part starts from
    the largest batch's plan)."""

    models: tuple[str, ...] = ("mixtral-8x7b", "deepseek-v2-lite", "qwen2-57b-a14b")
    hws: tuple[str, ...] = ("2.5/75", "5/50", "10/25")
    meshes: tuple[str, ...] = ("4x4", "4x8", "8x8")
    batches: tuple[int, ...] = (8, 16, 32, 64, 128)
    solve_batch: int | None = 128
    online_batch: int = 512
    online_batches: int = 30
    policies: tuple[str, ...] = POLICIES
    backend: str = "cpsat"
    time_limit_s: float = 1.0
    threads: int = 1
    seed: int = 0
    mode: str = "mesh"
    online_meshes: tuple[str, ...] | None = None  # None: the first mesh only

    def describe(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, GridSpec] = {
    # every online policy but hdmoe-prebroadcast, to stay quick
    "quick": GridSpec(models=("mixtral-8x7b",), hws=("5/50", "10/25"), meshes=("4x4",), batches=(16, 64, 128),
                      time_limit_s=0.05, policies=("static", "greedy", "eplb-periodic")),
    "full": GridSpec(),
}


@dataclass
class GridResult:
    """What :func:`run_grid` gathered (frames) plus the objects the figures of one point need."""

    spec: GridSpec
    results: pd.DataFrame
    solver: pd.DataFrame
    online: pd.DataFrame
    detail: dict[str, Any] = field(default_factory=dict)  # first point: problem, evaluations, placements
    computed: int = 0  # plans solved (not from the cache)


# --- problems and the cache ---------------------------------------------------------------------------


def solve_batches(spec: GridSpec) -> tuple[int, ...]:
    """The batches plans are solved at: ``spec.solve_batch``, or every batch of the grid if it is None."""
    return tuple(spec.batches) if spec.solve_batch is None else (spec.solve_batch,)


def _settings(model: str, hw: str, mesh: str, spec: GridSpec, batch: int | None = None) -> pl.Settings:
    check_choice("model", model, tuple(MODEL_TRACES))
    offline = MODEL_TRACES[model][0]
    return pl.Settings(name=f"{model}_{hw}_{mesh}", model=model, hw=hw, mesh=mesh,
                       trace=None if offline is None else str(TRACES / offline),
                       batch=solve_batches(spec)[-1] if batch is None else batch, seed=spec.seed, mode=spec.mode)


def _mesh_name(text: str) -> str:
    try:
        return Mesh.parse(text).name
    except InputError as exc:
        raise InputError("mesh", exc.problem, exc.fix) from None


def _canonical(field: str, values: tuple | list, name_of: Any, what: str) -> tuple:
    """``values`` by their canonical names (``name_of``); two spellings of one ``what`` are refused."""
    names = tuple(name_of(v) for v in values)
    for i, n in enumerate(names):
        first = names.index(n)
        if first < i and values[i] != values[first]:
            raise InputError(field, f"{values[first]!r} and {values[i]!r} are one {what}, {n!r}",
                             f"name each {what.split()[-1]} once")
    return names


def check_spec(spec: GridSpec) -> GridSpec:
    """``spec`` if every name and number in it is valid, else an InputError naming the field: checked
    before any work, so a bad value late in a list is not found after the points before it solved."""
    check_choice("mode", spec.mode, ("mesh", "paper"))
    if isinstance(spec.hws, (tuple, list)):  # canonical names, so that "5.0/50" and "5/50" are one point
        if (hws := _canonical("hws", spec.hws, lambda h: parse_point(h, "hw")[0], "design point")) != tuple(spec.hws):
            spec = replace(spec, hws=hws)
    if isinstance(spec.meshes, (tuple, list)):  # canonical names too: "4X4" and "4x4" are one mesh
        if (meshes := _canonical("meshes", spec.meshes, _mesh_name, "mesh")) != tuple(spec.meshes):
            spec = replace(spec, meshes=meshes)
    for name, values in (("models", spec.models), ("hws", spec.hws), ("meshes", spec.meshes),
                         ("batches", spec.batches), ("policies", spec.policies)):
        if not isinstance(values, (tuple, list)) or (not values and name != "policies"):
            raise InputError(name, f"must be a non-empty tuple, got {values!r:.60}", f"e.g. {name}=(...)")
        if len(set(values)) != len(values):
            raise InputError(name, f"lists a value twice: {values!r:.60}", "name each value once")
    for m in spec.models:
        check_choice("model", m, tuple(MODEL_TRACES))
    for s in (*spec.meshes, *(spec.online_meshes or ())):
        try:
            mesh = Mesh.parse(s)
        except InputError as exc:
            raise InputError("mesh", exc.problem, exc.fix) from None
        for m in spec.models:
            check_mesh_memory("mesh", get_model(m), mesh.rows, mesh.cols)
        if s in spec.meshes:  # every grid point is solved
            pl.check_mesh_nodes(s, mesh.num_nodes, "bench solves every point, and the MILP",
                                f"use meshes of at most {pl.MAX_MESH_NODES} nodes")
    for b in (*spec.batches, *(() if spec.solve_batch is None else (spec.solve_batch,)), spec.online_batch):
        check_real("batch", b, minimum=1, maximum=MAX_BATCH, integer=True)
    check_real("online_batches", spec.online_batches, minimum=0, maximum=MAX_BATCHES, integer=True)
    for pol in spec.policies:
        check_choice("policy", pol, pl.POLICIES)
    check_real("time_limit_s", spec.time_limit_s, positive=True, maximum=MAX_TIME_LIMIT_S)
    check_seed(spec.seed)
    return spec


def cache_key(problem: pl.Problem, spec: GridSpec) -> str:
    """sha256 of everything that decides a solved plan: the problem (model, mesh, hardware, trace
    sha256, batch, evaluator options) and the solver settings (not ``jobs``: it does not change
    the answer), and the package version."""
    desc = problem.describe()
    if desc.get("trace_sha256") is None and problem.trace is not None:  # synthetic: hash its routing
        desc["trace_routing_sha256"] = hashlib.sha256(problem.frequencies.tobytes()).hexdigest()
    solver = {"backend": spec.backend, "time_limit_s": spec.time_limit_s, "threads": spec.threads,
              "seed": spec.seed, "baselines": True}
    blob = json.dumps({"problem": desc, "solver": solver, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _solve_cached(problem: pl.Problem, spec: GridSpec, cache: Path, jobs: int, executor: str) -> tuple[Any, bool]:
    """The solved :class:`PlanResult` of ``problem``, from ``cache`` if it holds one for the same
    inputs; second item: True if it was computed now. The key is the problem the solve is made on
    (:func:`pipeline.solve_problem`), so a paper-mode grid reuses a mesh-mode grid's solve where they
    are one solve."""
    path = cache / f"{cache_key(pl.solve_problem(problem), spec)}.pkl"
    if path.is_file():
        try:
            with path.open("rb") as fh:
                saved = pickle.load(fh)
            res = pl.PlanResult(problem, saved["candidates"]["milp"], saved["layers"], {}, saved["solver"],
                                saved["candidates"])
            return res, False
        except Exception:  # a broken cache entry is solved again
            pass
    # a paper-mode grid solves the mesh model (as solve scores), then re-scores the plans in its own mode
    res = pl.solve(pl.solve_problem(problem), backend=spec.backend, time_limit_s=spec.time_limit_s, jobs=jobs,
                   threads=spec.threads,
                   baselines=True, executor=executor, seed=spec.seed, progress=False,
                   deterministic=spec.backend in pl.WORK_LIMITED_BACKENDS)
    if res.solver.get("interrupted"):  # Ctrl-C inside the solve: no report and no cache entry from it
        raise KeyboardInterrupt
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pickle.dumps({"candidates": res.candidates, "layers": res.layers, "solver": res.solver}),
                 field="cache")
    return res, True


# --- the grid -------------------------------------------------------------------------------------------


def _evaluations(res: Any, problem: pl.Problem, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluations and placements of ours and every candidate at ``batch``, in the grid's mode
    (mesh: as the solve scored them; paper: the same placements re-scored in paper mode)."""
    rb = res.at_batch(batch)
    plans = {OURS: rb.placement, **rb.candidates}
    if problem.options.mode == "mesh":
        evs = {OURS: rb.evaluations["plan"], **{n: e for n, e in rb.evaluations.items() if n != "plan"}}
    else:
        pb = problem.with_(batch=batch)
        evs = {n: pl.evaluate(pb, p) for n, p in plans.items()}
    return evs, plans


def _layer_table(res: Any, spec: GridSpec) -> pd.DataFrame:
    """``res.layer_table()`` with the limit per layer and what each layer's limit counted
    (``time_limit_s``, ``time_mode``: ``deterministic`` for CP-SAT here; ``wall_capped``: the
    wall-clock safety net, not the work budget, stopped it): ``time_s`` is wall time."""
    return res.layer_table().assign(time_limit_s=spec.time_limit_s, time_mode=[r.time_mode for r in res.layers],
                                    wall_capped=[r.wall_capped for r in res.layers])


def _rows(evs: dict[str, Any], key: dict[str, Any], part: str = "static") -> list[dict[str, Any]]:
    tp = evs["tp"].tbt_s
    return [{**key, "part": part, "strategy": n, "tbt_us": e.tbt_us, "moe_compute_us": e.moe_compute_s * 1e6,
             "dispatch_us": float(e.dispatch_s.sum() * 1e6), "combine_us": float(e.combine_s.sum() * 1e6),
             "non_moe_us": e.non_moe_s * 1e6, "tbt_norm_tp": e.tbt_s / tp, "p99_us": float("nan"),
             "migration_us": 0.0, "actions": 0}
            for n, e in ((n, evs[n]) for n in rp.strategy_order(list(evs)))]


def run_grid(spec: GridSpec, out: str | Path, *, jobs: int = 1, executor: str = "local",
             progress: bool | None = None) -> GridResult:
    """Run the grid into ``out`` (plans cached in ``out/cache``); returns the frames. ``progress``:
    a bar on stderr (None: on in a terminal)."""
    spec = check_spec(spec)
    jobs = pl.check_jobs(jobs, executor)
    out = Path(out)
    cache = out / "cache"
    points = [(m, h, s) for m in spec.models for h in spec.hws for s in spec.meshes]
    online_meshes = spec.online_meshes if spec.online_meshes is not None else spec.meshes[:1]
    rows: list[dict[str, Any]] = []
    solver_rows: list[pd.DataFrame] = []
    online_rows: list[pd.DataFrame] = []
    detail: dict[str, Any] = {}
    computed = 0
    bar = tqdm(points, desc="bench", unit="point", file=sys.stderr, disable=None if progress is None else not progress)
    with pl.executor_session(executor):  # one Ray instance for the whole grid (--executor ray)
        for model, hw, mesh in bar:
            bar.set_postfix_str(f"{model} {hw} {mesh}")
            key = {"model": model, "mesh": mesh, "hw": hw, "mode": spec.mode}
            solved: dict[int, tuple[pl.Problem, Any]] = {}
            for sb in solve_batches(spec):
                problem = _settings(model, hw, mesh, spec, sb).to_problem()
                res, fresh = _solve_cached(problem, spec, cache, jobs, executor)
                computed += fresh
                solved[sb] = (problem, res)
                lt = _layer_table(res, spec)
                solver_rows.append(lt.assign(**key, solve_batch=sb, cached=not fresh))
            for b in spec.batches:
                problem, res = solved[b if spec.solve_batch is None else spec.solve_batch]
                lt = _layer_table(res, spec)
                evs, plans = _evaluations(res, problem, b)
                rows += _rows(evs, {**key, "batch": b})
                if not detail and b == max(spec.batches):
                    detail = {"problem": problem.with_(batch=b), "evaluations": evs, "placements": plans,
                              "layer_table": lt, "key": {**key, "batch": b}, "solve_layers": res.layers}
            problem, res = solved[max(solved)]  # the online part starts from the largest solve batch's plan
            if mesh in online_meshes and spec.policies:
                # the ablation's static steps (node balance: cb; + link balance: ours) at the online batch, so that
                # all its bars share one batch; part "ablation" keeps them out of the static tables
                evs, plans = _evaluations(res, problem, spec.online_batch)
                rows += [r for r in _rows(evs, {**key, "batch": spec.online_batch}, "ablation")
                         if r["strategy"] in ("cb", OURS)]
                start = plans[OURS]
                drift = MODEL_TRACES[model][1]
                trace = None if drift is None else pl.load_trace(TRACES / drift, problem.model.num_experts,
                                                                 problem.model.top_k)
                for pol in spec.policies:
                    r = pl.replay(problem, start, trace, policy=pol, batches=spec.online_batches,
                                  batch=spec.online_batch, seed=spec.seed, progress=False)
                    f = r.to_frame().assign(**key)
                    online_rows.append(f)
                    s = r.summary()
                    rows.append({**key, "batch": spec.online_batch, "part": "online", "strategy": f"{OURS}+{pol}",
                                 "tbt_us": s["mean_us"], "p99_us": s["p99_us"], "migration_us": s["migration_us"],
                                 "actions": s["actions"]})
    bar.close()
    results = pd.DataFrame(rows)
    online = pd.concat(online_rows, ignore_index=True) if online_rows else pd.DataFrame()
    return GridResult(spec, results, pd.concat(solver_rows, ignore_index=True), online, detail, computed)


# --- writing ----------------------------------------------------------------------------------------------

_ROUND = {"tbt_us": 3, "moe_compute_us": 3, "dispatch_us": 3, "combine_us": 3, "non_moe_us": 3, "p99_us": 3,
          "migration_us": 3, "tbt_norm_tp": 6}


def tidy(results: pd.DataFrame) -> pd.DataFrame:
    """``results.csv``'s frame: fixed column order, floats rounded (ns; 6 digits for ratios)."""
    cols = ["model", "mesh", "hw", "mode", "batch", "part", "strategy", "tbt_us", "tbt_norm_tp", "moe_compute_us",
            "dispatch_us", "combine_us", "non_moe_us", "p99_us", "migration_us", "actions"]
    d = results[cols].copy()
    d["actions"] = d["actions"].fillna(0).astype(int)
    return d.round(_ROUND)


def _save(fig: Any, figdir: Path, name: str) -> list[str]:
    figdir.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        p = figdir / f"{name}.{ext}"
        rp.save_figure(fig, p, field="--out")
        out.append(p.name)
    return out


def _slug(*parts: Any) -> str:
    return "_".join(str(p).replace("/", "-").replace(".", "p") for p in parts)


def headline(res: pd.DataFrame, sp: pd.DataFrame, online: pd.DataFrame | None = None, *,
             solve_batch: int | None = None) -> list[str]:
    """Three to five sentences from the numbers: what wins where and by how much. ``solve_batch``:
    the batch the plans were solved at (None: one solve per batch), to say where the MILP's own
    plan loses."""
    st = res[res["part"] == "static"]
    wide = st.pivot_table(index=["model", "mesh", "hw", "batch"], columns="strategy", values="tbt_us")
    base = [c for c in wide.columns if c not in (OURS, "milp")]
    best_base = wide[base].min(axis=1)
    gain = best_base / wide[OURS]
    out = []
    n = len(wide)
    losses = int((gain < 1 - 1e-9).sum())
    tail = ("it is never slower, since per layer it keeps the best of the MILP and every baseline" if losses == 0
            else f"it is slower than the best baseline at {losses} of them (its layers were chosen in mesh mode)")
    points = f"{n} grid point{'s' if n != 1 else ''}"
    out.append(f"Over {points}, the speedup of ours over the best baseline of each point averages "
               f"{gain.mean():.3f}x (min {gain.min():.3f}x, max {gain.max():.3f}x); {tail}.")
    own = (best_base / wide["milp"]).dropna() if "milp" in wide.columns else pd.Series(dtype=float)
    if len(own):  # the MILP's own plan, without the best-of step, where it was scored
        lost = own[own < 1 - 1e-9]
        where = f"{len(own)} points" + (f" where it was scored (of {n})" if len(own) < n else "")
        text = (f"The MILP's own plan (without the best-of step) is at least as fast as the best baseline at "
                f"{len(own) - len(lost)} of the {where}")
        if len(lost):
            batches = sorted({float(b) for b in lost.index.get_level_values("batch")})
            text += (f"; it is slower at {len(lost)} (down to {lost.min():.3f}x), at batch"
                     f"{'es' if len(batches) > 1 else ''} {', '.join(f'{b:g}' for b in batches)}")
            if solve_batch is not None and float(solve_batch) not in batches:
                text += (f", not at the batch {solve_batch:g} it was solved at (bench --solve-batch each "
                         "solves one plan per batch)")
        out.append(text + ".")
    by_base = sp.groupby("baseline")["mean"].mean().sort_values()
    out.append(f"Against single baselines the mean speedup ranges from {by_base.iloc[0]:.3f}x over "
               f"{by_base.index[0]} to {by_base.iloc[-1]:.3f}x over {by_base.index[-1]}.")
    top = gain.idxmax()
    winner = wide.loc[top, base].idxmin()
    if gain.max() > 1 + 1e-9:
        out.append(f"The largest margin over the best baseline is at {top[0]}, {top[1]} mesh, {top[2]}, batch "
                   f"{top[3]} (best baseline there: {winner}); at the median point the margin is "
                   f"{gain.median():.3f}x.")
    else:
        out.append(f"Ours is faster than the best baseline at no point (largest margin {gain.max():.3f}x).")
    on = res[res["part"] == "online"]
    if len(on):
        piv = on.pivot_table(index=["model", "mesh", "hw"], columns="strategy", values="tbt_us")
        static = f"{OURS}+static"
        others = [c for c in piv.columns if c != static]
        if static in piv.columns and others:
            ratio = piv[others].rdiv(piv[static], axis=0).mean()
            best = ratio.idxmax()
            ours = f"{OURS}+greedy"  # the package's own online policy leads, whether or not it wins
            lead = ours if ours in ratio.index else best
            text = (f"Online on a drifted trace, {lead} averages {ratio[lead]:.3f}x the speed of the static plan "
                    f"(mean latency per decode step, weight moves included)")
            if best != lead and ratio[best] > ratio[lead] + 1e-9:
                text += f"; the fastest policy there is {best}, at {ratio[best]:.3f}x"
            out.append(text + ".")
    return out


MANIFEST = ".bench-files"  # in OUT: the files the last report wrote, one path (relative to OUT) a line


def _replace_report(out: Path, written: set[str]) -> None:
    """Remove the files the previous report into ``out`` wrote (its manifest) that this one did not,
    then record this report's files. Only files a report wrote are ever removed."""
    man = out / MANIFEST
    old = set(man.read_text(encoding="utf-8").splitlines()) if man.is_file() else set()
    for rel in sorted(old - written):
        f = out / rel
        if rel and ".." not in Path(rel).parts and not Path(rel).is_absolute() and f.is_file() and not f.is_symlink():
            f.unlink()
    write_atomic(man, "".join(f"{r}\n" for r in sorted(written)), field="--out")


def write_report(g: GridResult, out: str | Path) -> dict[str, Path]:
    """Write results.csv, results.md, solver.csv, online.csv, figures, plans and index.md. A report
    written earlier into ``out`` is replaced as a whole: the files it wrote (listed in
    ``out/.bench-files``) that this run does not write are removed; nothing else is (the plan cache in
    ``out/cache`` stays). The files are written into a staging folder inside ``out`` first and moved
    into place at the end, with Ctrl-C held back for those renames, so an interrupted run leaves the
    previous report whole (or none), never a mix."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".bench-staging-", dir=out))
    try:
        written = _write_files(g, stage)
        with _sigint_held():
            for rel in sorted(written):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / rel, out / rel)
            _replace_report(out, written)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"results.csv": out / "results.csv", "results.md": out / "results.md", "index.md": out / "index.md",
            "figures": out / "figures"}


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends (then raise it), in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _write_files(g: GridResult, out: Path) -> set[str]:
    """The report's files written into ``out`` (a fresh folder); returns their paths relative to it."""
    figdir = out / "figures"
    spec = g.spec
    res = tidy(g.results)
    write_atomic(out / "results.csv", res.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    write_atomic(out / "solver.csv", g.solver.to_csv(index=False, lineterminator="\n"))
    if len(g.online):
        write_atomic(out / "online.csv", g.online.to_csv(index=False, lineterminator="\n"))
    sp = rp.speedup_table(res, ours=OURS).query("baseline != 'milp'")
    big = max(spec.batches)
    main = res[(res["part"] == "static") & (res["batch"] == big)][
        ["model", "mesh", "hw", "strategy", "tbt_us", "tbt_norm_tp", "moe_compute_us", "dispatch_us", "combine_us",
         "non_moe_us"]]
    solve_at = "each batch" if spec.solve_batch is None else spec.solve_batch
    settings = (f"mode `{spec.mode}`, solve batch {solve_at}, backend {spec.backend}, "
                f"{spec.time_limit_s:g} s per layer (CP-SAT deterministic time), seed {spec.seed}")
    if capped := int(g.solver["wall_capped"].sum()) if "wall_capped" in g.solver.columns else 0:
        settings += (f"; {capped} of {len(g.solver)} layers reached the wall-clock safety net of that limit "
                     "(their plans depend on the machine's speed and load and may differ on another run; `wall_capped` "
                     "in solver.csv)")
    md = ["# Benchmark results", "", f"Settings: {settings}. Speedup = baseline TBT / our TBT at the same point "
          "(model, mesh, hardware point, batch); mean/min/max over the meshes and batches of each group.", "",
          "## Speedup of ours over each baseline", "", rp.markdown(sp), "",
          f"## TBT at batch {big} (us)", "", rp.markdown(main, floatfmt=".2f"), ""]
    on = res[res["part"] == "online"]
    if len(on):
        md += [f"## Online (batch {spec.online_batch}, {spec.online_batches} batches of the drift trace; us)", "",
               "`tbt_us` and `p99_us` per decode step (weight moves included); `migration_us` and `actions` are "
               "totals over the batches.", "",
               rp.markdown(on[["model", "mesh", "hw", "strategy", "tbt_us", "p99_us", "migration_us", "actions"]],
                           floatfmt=".1f"), ""]
    write_atomic(out / "results.md", "\n".join(md))

    figs: list[tuple[str, str]] = []  # (caption, file stem)
    for mesh in spec.meshes:
        name = _slug("tbt_norm_tp", mesh)
        _save(rp.fig_tbt_normalised(res, batch=big, mesh=mesh), figdir, name)
        figs.append((f"TBT normalised to TP, {mesh} mesh, batch {big}", name))
    first_mesh = spec.meshes[0]
    for model in spec.models:
        for hw in spec.hws:
            d = res[(res["part"] == "static") & (res["model"] == model) & (res["hw"] == hw)
                    & (res["mesh"] == first_mesh) & (res["batch"] == big)]
            name = _slug("decomposition", model, hw, first_mesh)
            _save(rp.fig_decomposition(d), figdir, name)
            figs.append((f"Decomposition, {model} {hw} {first_mesh} batch {big}", name))
            ab = res[(res["model"] == model) & (res["hw"] == hw) & (res["mesh"] == first_mesh)
                     & res["part"].isin(("ablation", "online"))]
            if (ab["part"] == "ablation").any():
                name = _slug("ablation", model, hw, first_mesh)
                _save(rp.fig_ablation(ab), figdir, name)
                figs.append((f"Ablation: node balance, + link balance, + online ({model}, {hw}, {first_mesh}, "
                             f"batch {spec.online_batch})", name))
    det = g.detail
    if det:
        k = det["key"]
        cap = rp.caption(model=k["model"], mesh=k["mesh"], hw=k["hw"], batch=k["batch"], mode=k["mode"])
        mesh = det["problem"].hardware.mesh
        evs = {n: det["evaluations"][n] for n in ("ep", "hdmoe", OURS) if n in det["evaluations"]}
        layer = int(pd.Series(evs["ep"].layer_s - evs[OURS].layer_s).idxmax()) if "ep" in evs else 0
        sb = k["batch"] if spec.solve_batch is None else spec.solve_batch
        solve_cap = cap.replace(f", batch={k['batch']}", "") + f", solve batch={sb}"
        trace = det["solve_layers"][layer].trace if "solve_layers" in det else ()
        extra = [] if not trace else [(rp.fig_bound_trace(trace, layer=layer, settings=solve_cap + (
            f", {spec.backend}, {spec.time_limit_s:g} s deterministic limit (times: wall)")), "bound_trace",
            f"Primal and bound against time, layer {layer}")]
        for fig, name, what in (
            (rp.fig_node_load(evs, layer, settings=cap), "node_load", f"Per-node load, layer {layer}"),
            (rp.fig_link_load(evs, mesh, layer, settings=cap), "link_load", f"Link-load map, layer {layer}"),
            (rp.fig_placement_map(det["placements"][OURS], mesh, layer, settings=cap), "placement_ours",
             f"Placement map of ours, layer {layer}"),
            (rp.fig_solver(det["layer_table"], settings=solve_cap), "solver", "MILP gap and time per layer"),
            *extra,
        ):
            stem = _slug(name, k["model"], k["hw"], k["mesh"])
            _save(fig, figdir, stem)
            figs.append((f"{what} ({k['model']}, {k['hw']}, {k['mesh']})", stem))
        plans = out / "plans"
        plans.mkdir(exist_ok=True)
        ours = det["placements"][OURS]
        if spec.mode != "mesh":  # the tables re-score it in this mode: its record says so, and evaluate --plan agrees
            ours = replace(ours, meta={**ours.meta, "problem": det["problem"].describe()})
        plan_name = f"{_slug(k['model'], k['hw'], k['mesh'])}_ours.json"
        ours.save(plans / plan_name, field="--out")
    if len(g.online):
        for (model, hw, mesh), f in g.online.groupby(["model", "hw", "mesh"], sort=False):
            reps = {p: grp for p, grp in f.groupby("policy", sort=False)}
            cap = rp.caption(model=model, mesh=mesh, hw=hw, batch=spec.online_batch, mode=spec.mode)
            stem = _slug("online", model, hw, mesh)
            _save(rp.fig_online(reps, settings=cap), figdir, stem)
            figs.append((f"Online per-batch latency ({model}, {hw}, {mesh})", stem))

    idx = ["# Benchmark report", "", f"Settings: {settings}; grid: models {', '.join(spec.models)}; hardware points "
           f"{', '.join(spec.hws)} (TFLOP/s per node / GB/s per link); meshes {', '.join(spec.meshes)}; batches "
           f"{', '.join(map(str, spec.batches))}.", "", " ".join(headline(res, sp, solve_batch=spec.solve_batch)), "",
           "## Speedups", "", rp.markdown(sp), "", "## Figures", ""]
    for caption, stem in figs:
        idx += [f"### {caption}", "", f"![{caption}](figures/{stem}.png)", ""]
    idx += ["Tables: [results.md](results.md); data: [results.csv](results.csv), [solver.csv](solver.csv)"
            + (", [online.csv](online.csv)" if len(g.online) else "") + ".", ""]
    write_atomic(out / "index.md", "\n".join(idx))
    written = {"results.csv", "results.md", "solver.csv", "index.md"}
    written |= {f"figures/{stem}.{ext}" for _, stem in figs for ext in ("png", "svg")}
    written |= {f"plans/{plan_name}"} if det else set()
    written |= {"online.csv"} if len(g.online) else set()
    return written


def run(spec: GridSpec | str, out: str | Path, *, jobs: int = 1, executor: str = "local", mode: str | None = None,
        progress: bool | None = None) -> GridResult:
    """Run a grid (a :class:`GridSpec` or a preset name) and write its report into ``out``."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise InputError("preset", f"unknown grid {spec!r}", "allowed: " + ", ".join(PRESETS))
        spec = PRESETS[spec]
    if mode is not None:
        spec = replace(spec, mode=check_choice("mode", mode, ("mesh", "paper")))
    g = run_grid(spec, out, jobs=jobs, executor=executor, progress=progress)
    write_report(g, out)
    return g
