"""Command line: ``hdmoe-milp evaluate | solve | replay | stats``.

Flags become :class:`~hdmoe_milp.instance.Settings`, settings become a validated
:class:`~hdmoe_milp.problem.Problem`, and each command is one call into
:mod:`hdmoe_milp.pipeline`. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from . import cli_report
from . import pipeline as pl
from ._version import __version__
from .errors import (
    MAX_BATCHES,
    MAX_HOP_LATENCY_NS,
    MAX_THREADS,
    MAX_TIME_LIMIT_S,
    MAX_WORK_LIMIT,
    InputError,
    as_written,
    check_file,
    check_seed,
)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters written as escapes (``\\n``): an error
    stays one line even when it quotes a file name that holds them."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs")
                   else c for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line on stderr, exit status 2 (no usage block).
    No abbreviated flags: ``--mode`` on a command without it must not be read as ``--model``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"hdmoe-milp: error: {one_line(message)} (see {self.prog} --help)\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # int() and float() read full-width and other Unicode digits ("\uff11\uff16" as 16); meshes, --layers
        # and the files take 0-9 only, and so do the numeric flags
        if action.type in (int, float) and not arg_string.isascii():
            self.error(f"argument {'/'.join(action.option_strings) or action.dest}: invalid {action.type.__name__} "
                       f"value: {arg_string!r} (write digits 0-9)")
        return super()._get_value(action, arg_string)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hdmoe-milp", description="Expert placement for MoE models on 2D-mesh "
                                "accelerators: baselines, offline MILP, online replay, one evaluator.")
    p.add_argument("--version", action="version", version=f"hdmoe-milp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_report.add_commands(sub)

    def common(sp: argparse.ArgumentParser, hw: bool = True) -> None:
        sp.add_argument("--instance", help="instance TOML file; other flags override its values")
        sp.add_argument("--model", help="model preset: " + ", ".join(pl.MODEL_PRESETS))
        sp.add_argument("--mesh", help="mesh ROWSxCOLS, e.g. 4x8")
        # stats reads no hardware point: its --hw is kept only to be refused by name
        sp.add_argument("--hw", help="design point, TFLOP/s per node / GB/s per link: the paper's "
                        + ", ".join(pl.HARDWARE_PRESETS) + ", or any other such as 4/40" if hw else argparse.SUPPRESS)
        sp.add_argument("--trace", help="routing trace (.json, .json.gz or .npz); default: synthetic")
        sp.add_argument("--seed", type=int, help="seed for sampling, homes, random EP and synthetic traces")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: on in a terminal)")

    ev = sub.add_parser("evaluate", help="score baseline strategies (or a saved plan) with the shared evaluator")
    common(ev)
    ev.add_argument("--batch", type=float, help="tokens per decode step (default 128)")
    ev.add_argument("--strategy", help="one of " + ", ".join(pl.STRATEGIES) + ", a comma-separated list, or "
                    "'all' (default: every baseline)")
    ev.add_argument("--time-limit", type=float,
                    help="wall seconds per layer for the milp strategy's solve (default 2)")
    ev.add_argument("--work-limit", type=float, help="hdmoe's stage-1 MILP budget per layer, in CP-SAT "
                    "deterministic seconds (default 0: its node-balanced start, no solve); deterministic")
    ev.add_argument("--plan", help="evaluate a saved plan; model, mesh and hardware default to the plan's")
    ev.add_argument("--save-plan", help="write the placement of the (single) strategy to this JSON file")
    ev.add_argument("--force", action="store_true", help="overwrite an existing --save-plan file")
    ev.add_argument("--mode", help="unit mode: mesh (default) or paper")
    ev.add_argument("--delivery", help="tree (default in mesh mode) or unicast")
    ev.add_argument("--home", help="token home nodes: spread, holder or random")
    ev.add_argument("--batching", help="expected (default), random or contiguous")
    ev.add_argument("--replica-rule", "--dispatch", dest="replica_rule",
                    help="which copy of a replicated expert serves a token: fraction (default; with --plan, "
                    "the rule the plan records), affinity, balanced or nearest (see formulations/evaluator.md)")
    ev.add_argument("--capacity-gb", type=float, help="DRAM capacity per node, GB (default: unlimited)")
    ev.add_argument("--hop-latency-ns", type=float, help="per-hop latency, ns (default 0)")

    so = sub.add_parser("solve", help="offline block MILP per layer; compare the plan with every baseline")
    common(so)
    so.add_argument("--batch", type=float, help="tokens per decode step the plan is optimised for (default 128)")
    so.add_argument("--backend", default="cpsat",
                    help="cbc, cpsat, highs or scip (default cpsat; scip needs pip install '.[scip]')")
    so.add_argument("--time-limit", type=float, default=10.0, help="seconds per layer (default 10)")
    so.add_argument("--gap", type=float, default=1e-4, help="relative gap target (default 1e-4)")
    so.add_argument("--threads", type=int, default=1, help="solver threads per layer (default 1)")
    so.add_argument("--jobs", type=int, default=1, help="layers solved in parallel (default 1; at most the "
                    "machine's CPUs with the local executor)")
    so.add_argument("--executor", default="local", help="local (process pool) or ray")
    so.add_argument("--delivery", help="tree (default) or unicast: the traffic rule optimised and evaluated")
    so.add_argument("--capacity-gb", type=float, help="DRAM capacity per node, GB (default: unlimited); the "
                    "plan keeps within it, and baselines that do not fit are left out")
    so.add_argument("--hop-latency-ns", type=float, help="per-hop latency, ns (default 0)")
    so.add_argument("--out", help="write the plan file here")
    so.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    so.add_argument("--no-baselines", action="store_true", help="skip the baseline comparison")
    so.add_argument("--work-limit", type=float, help="the hdmoe baseline's stage-1 MILP budget per layer (CP-SAT "
                    "deterministic seconds; default 0: its node-balanced start)")
    so.add_argument("--layers", help="solve only these MoE layers, e.g. 0,5,12 (0-based; the others take the best "
                    "baseline and are reported not-solved)")
    so.add_argument("--deterministic", action="store_true", help="count --time-limit as CP-SAT deterministic time "
                    "(same inputs, same plan and numbers); default: wall seconds per layer, everything included")
    so.add_argument("--lns-patience", type=float, help="layers solved by LNS (more experts than one neighbourhood) "
                    "stop after this many steps in a row without improvement (default 2; 0: use the whole limit)")
    so.add_argument("--no-polish", action="store_true", help="skip the evaluator-driven local search (swaps and "
                    "moves) of each layer's plan")
    so.add_argument("--no-branch-and-bound", action="store_true", help="skip the branch and bound over the family "
                    "on layers with at most 16 experts (the bound stage runs instead)")
    so.add_argument("--no-node-order", action="store_true", help="skip the node-order search (swaps of whole "
                    "nodes' contents that lower the link loads of the best starting layouts)")

    rp = sub.add_parser("replay", help="stream a trace batch by batch under online policies")
    common(rp)
    rp.add_argument("--plan", help="offline plan file (model, mesh and hardware default to the plan's); "
                    "default: --plan-strategy on --plan-trace")
    rp.add_argument("--plan-strategy", help="baseline to build the plan from when no --plan (default cb)")
    rp.add_argument("--plan-trace", help="trace the plan is built on (default: --trace)")
    rp.add_argument("--time-limit", type=float,
                    help="wall seconds per layer when --plan-strategy is milp (default 2)")
    rp.add_argument("--batch", type=float, help="tokens per batch (default: the problem's, as evaluate: the instance's "
                    "[workload].batch or the batch the --plan was made for, else 128)")
    rp.add_argument("--policy", default="all", help="static, greedy, hdmoe-prebroadcast, eplb-periodic, oracle, "
                    "a comma-separated list, or all (default; all but oracle)")
    rp.add_argument("--batches", type=float, default=50, help="batches to replay (default 50)")
    rp.add_argument("--batching", help="contiguous or random (default: the instance's [workload].batching if one "
                    "of these, else contiguous)")
    rp.add_argument("--replica-rule", "--dispatch", dest="replica_rule", default="balanced",
                    help="which copy of a replicated expert serves a token: balanced (default: this batch's "
                    "tokens levelled over the copies, tokens prefer copies on nodes they touch), affinity (the "
                    "plan's fractions as quotas), nearest (no quotas) or fraction")

    st = sub.add_parser("stats", help="skew and drift statistics of a trace",
                        description="Skew statistics of a trace (and, with --against, its drift from another): "
                        "each is computed per MoE layer, then summarised over the layers.",
                        epilog=_stats_legend(STATS_KEYS), formatter_class=argparse.RawDescriptionHelpFormatter)
    common(st, hw=False)
    st.add_argument("--against", help="second trace: report per-layer total-variation drift")
    return p


_FLAGS = (
    ("model", "model"), ("mesh", "mesh"), ("hw", "hw"), ("trace", "trace"), ("seed", "seed"),
    ("batch", "batch"), ("mode", "mode"), ("delivery", "delivery"), ("home", "home"),
    ("batching", "batching"), ("capacity_gb", "dram_capacity_gb"), ("hop_latency_ns", "hop_latency_ns"),
)


def _settings(args: argparse.Namespace, plan: str | None = None) -> pl.Settings:
    """Instance file (or defaults, or the plan's record), then the flags on top."""
    if args.instance:
        s = pl.read_settings(args.instance)
        if args.model is not None and args.model != s.model and s.trace and args.trace is None:
            raise InputError("--model", f"{args.model} is not the model of {args.instance} ({s.model}), whose trace "
                             f"{Path(s.trace).name} routes {s.model}", f"give a trace of {args.model} with --trace, "
                             "or leave --model out")
    else:
        s = pl.Settings("cli", "deepseek-v2-lite", "5/50", "4x8")
        if plan:
            made = cli_report.plan_defaults(plan, args.trace, given=tuple(
                k for k in ("model", "mesh") if getattr(args, k, None) is not None))
            if args.model is not None and args.model != made.get("model"):
                made.pop("trace", None)  # the plan's trace routes the plan's model, not the one asked for
            unsaid = [f"--{a}" for a in ("model", "mesh", "hw") if a not in made and getattr(args, a, None) is None]
            if unsaid:  # no silent defaults: the plan does not say what it was made for
                raise InputError("--plan", f"{Path(plan).name} does not record the {', '.join(u[2:] for u in unsaid)} "
                                 "it was made for (meta.problem)",
                                 f"give {' and '.join(unsaid)} for the problem it was made for")
            s = replace(s, **made)
    over = {field: getattr(args, flag) for flag, field in _FLAGS if getattr(args, flag, None) is not None}
    return replace(s, **over)


def _to_problem(args: argparse.Namespace, s: pl.Settings, plan: str | None = None) -> pl.Problem:
    """``s.to_problem()``; an error about a value that the instance file or the plan file gave (not a
    flag) names that file's key."""
    if args.model is not None or not (args.instance or plan):
        model_field, source = "--model", "setting" if args.model is not None else "default"
    elif args.instance:
        model_field, source = f"[model].preset in {Path(args.instance).name}", "setting"
    else:
        model_field, source = f"the model of plan {Path(plan).name} (meta.problem.model)", "plan"
    try:
        problem = s.to_problem(model_field=model_field, model_source=source)
    except InputError as exc:
        # the Problem's own checks name its fields; the trace reader names the trace
        flag = {"batch": "--batch", "trace": "--trace"}.get(exc.field, exc.field)
        if flag not in _FILE_KEYS:
            raise
        if getattr(args, flag.removeprefix("--").replace("-", "_"), None) is not None:  # given: named as written
            raise InputError(flag, exc.problem, exc.fix) from None
        plan_key, instance_key = _FILE_KEYS[flag]
        override = f"; or give {flag} to override it" if flag.startswith("--") else ""
        if args.instance:
            raise InputError(f"instance {Path(args.instance).name} {instance_key}", exc.problem,
                             f"{exc.fix or 'correct it'}{override}") from None
        if plan:
            raise InputError(f"plan {Path(plan).name} meta.problem.{plan_key}", exc.problem,
                             f"{exc.fix or 'save the plan again'}{override}") from None
        raise
    if plan and not args.instance:
        cli_report.check_plan_record(plan, problem, model_given=args.model is not None,
                                     hw_given=getattr(args, "hw", None) is not None)
    return problem


# the field a Settings check names -> where the value came from when no flag gave it: the plan's
# meta.problem key and the instance file's key (the flag's attribute is its name without "--")
_FILE_KEYS = {flag: (plan_key, pl.INSTANCE_KEYS[flag]) for flag, plan_key in (
    ("--batch", "batch"), ("--batching", "batching"), ("--seed", "seed"), ("synthetic_tokens", "synthetic_tokens"),
    ("--capacity-gb", "hardware.dram_capacity_bytes"), ("--hop-latency-ns", "hardware.hop_latency_s"),
    ("--mesh", "mesh"), ("--hw", "hw_point"), ("--model", "model"), ("--mode", "mode"), ("--delivery", "delivery"),
    ("--home", "home"), ("--trace", "trace_path"))}


def layer_text(res: pl.PlanResult) -> str:
    """The result's layer table as text: times in µs to 3 decimals, gap and improvement in percent,
    ``-`` where a layer has no number (not solved), then its :meth:`~PlanResult.summary` in a line."""
    t = res.layer_table().rename(columns={"gap": "gap_%", "improvement": "improvement_%"})
    t["gap_%"] = t["gap_%"].astype(float) * 100
    t["improvement_%"] = t["improvement_%"].astype(float) * 100

    def fmt(digits: int):
        return lambda x: f"{x:.{digits}f}"

    formats = {"objective_us": fmt(3), "bound_us": fmt(3), "gap_%": fmt(2), "improvement_%": fmt(2),
               "time_s": fmt(2)}
    text = t.to_string(index=False, formatters=formats, na_rep="-")
    s = res.summary()
    if s["gap_median"] is None:
        return text
    n = s["layers_solved"]
    return (text + f"\n{n} layer{'' if n == 1 else 's'} solved: {s['proven_1pct']} proven within 1 %, gap median "
            f"{100 * s['gap_median']:.2f} %, max {100 * s['gap_max']:.2f} %; {s['improved']} improved on the "
            f"best heuristic" + (f" (up to {100 * s['improvement_max']:.2f} %)" if s["improved"] else ""))


def _print_left_out(problem: pl.Problem, names: list[str]) -> None:
    """The line naming the strategies left out because their layout does not fit the nodes' DRAM."""
    if names:
        print(f"left out (they do not fit {problem.hardware.dram_capacity_bytes / 1e9:g} GB per node): "
              + ", ".join(names))


def _capped_text(res: pl.PlanResult) -> str:
    """The layers a deterministic solve's wall-clock safety net stopped, for the note: "layers 3, 7"."""
    return "layers " + ", ".join(str(r.layer) for r in res.layers if r.wall_capped)


def _strategy_time_limit(args: argparse.Namespace) -> float:
    """evaluate's and replay's --time-limit for the strategies they build, default 2 s (None when not
    given, so that it can be refused with --plan)."""
    return 2.0 if args.time_limit is None else args.time_limit


# evaluate and replay build hdmoe with CP-SAT, whose stage 1 counts --work-limit (the wall-clock
# time limit reaches only cbc or highs, which these commands do not offer)
_CLI_UNREAD = {("hdmoe", "time_limit_s")}


def _check_budget_read(names: list[str], flags: tuple[tuple[str, Any, str], ...],
                       choose: str = "add a strategy that reads it") -> None:
    """Refuse a budget flag that none of the strategies ``names`` reads (tp, ep, ep-lpt, cb and
    eplb solve nothing). ``flags``: (flag as written, value or None, Budget field)."""
    for flag, value, fieldname in flags:
        readers = [n for n in pl.STRATEGIES
                   if fieldname in pl.USES_BUDGET.get(n, ()) and (n, fieldname) not in _CLI_UNREAD]
        if value is not None and not any(n in readers for n in names):
            why = ("it budgets a solve, and " + ("this strategy solves" if len(names) == 1 else
                                                  "these strategies solve") + " none")
            if "hdmoe" in names and ("hdmoe", fieldname) in _CLI_UNREAD:
                why = "hdmoe here solves with CP-SAT on a work budget (evaluate's --work-limit), not wall seconds"
            raise InputError(flag, f"is not read by {', '.join(names)} ({why})",
                             f"leave {flag} out, or {choose}: {', '.join(readers)}")


def _evaluate(args: argparse.Namespace) -> int:
    if args.replica_rule is not None:
        pl.check_choice("--replica-rule/--dispatch", args.replica_rule, pl.REPLICA_RULES)
    names = None
    if not args.plan:
        if args.strategy is not None and not args.strategy.strip():
            raise InputError("--strategy", "is empty", "name a strategy, a comma-separated list, or 'all'")
        names = (list(pl.BASELINES) if (args.strategy or "all").strip() == "all"
                 else cli_report.csv_items("--strategy", args.strategy))
        if len(names) > 1 and "all" in names:
            raise InputError("--strategy", f"'all' cannot be listed with other strategies: {args.strategy}",
                             "give 'all' alone, or a list of strategies")
        for n in names:
            pl.check_choice("--strategy", n, (*pl.STRATEGIES, "all"))
        if len(set(names)) != len(names):
            raise InputError("--strategy", f"lists a strategy twice: {args.strategy}", "name each strategy once")
        if args.save_plan and len(names) != 1:
            raise InputError("--save-plan", "needs a single --strategy", "e.g. --strategy cb --save-plan plan.json")
        _check_budget_read(names, (("--time-limit", args.time_limit, "time_limit_s"),
                                   ("--work-limit", args.work_limit, "work_limit")))
    cli_report.check_plan_out("--save-plan", args.save_plan, args.force)
    s = _settings(args, args.plan)
    problem = _to_problem(args, s, args.plan)
    # the plan's own rules unless a flag says otherwise (older plan files record none: the defaults)
    rules = cli_report.plan_rules(args.plan) if args.plan else {}
    if args.replica_rule is not None:
        rules["replica_rule"] = args.replica_rule
    if rules:  # else the problem's own: EvalOptions' defaults, as no instance key or flag sets these
        problem = problem.with_(options=replace(problem.options, **rules))
    budget = pl.Budget(time_limit_s=_strategy_time_limit(args), work_limit=args.work_limit)
    plans = {}
    if args.plan:
        plan = pl.load_plan(args.plan, problem)
        plans[plan.strategy] = plan
    cmp = pl.compare(problem, names or [], plans=plans, budget=budget, progress=args.progress)
    if args.save_plan:
        cmp.placements[names[0]].save(args.save_plan, force=args.force, field="--save-plan")
    df = cmp.table()
    o = problem.options
    setting = {
        "model": problem.model.name, "hw": problem.hw_point, "mesh": problem.mesh_name,
        "batch": int(s.batch) if float(s.batch).is_integer() else float(s.batch),  # 128 from a flag or a file
        "batching": s.batching, "trace": s.trace or problem.trace.name, "mode": o.mode,
        "delivery": o.resolved_delivery, "home": o.resolved_home, "seed": problem.seed,
        "context_len": o.context_len, "replica_rule": o.replica_rule,
    }
    if o.coalesce != "node":  # only a plan file made in Python can ask for another
        setting["coalesce"] = o.coalesce
    if args.json:
        rows = cmp.to_dict()["results"]
        if len(rows) == 1:  # its numbers at the top, as before; "results" as for several strategies
            out = {**setting, **{k: v for k, v in rows[0].items() if k not in setting},
                   "per_layer": next(iter(cmp.evaluations.values())).per_layer(), "results": rows}
        else:
            out = {**setting, "results": rows}
        if args.save_plan:
            out["saved_plan"] = str(args.save_plan)
        if cmp.over_capacity:
            out["over_capacity"] = cmp.over_capacity
        print(json.dumps(out, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in setting.items()))
    print(df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if args.save_plan:
        print(f"wrote {args.save_plan}")
    if o.mode == "paper":
        print("mode=paper reproduces HD-MoE's code: FLOPs only, and a layer split evenly over every node (tp) "
              "pays the ring formula 2*4*B*h/BW while every other layer is routed on the mesh; use --mode mesh "
              "to cost every strategy alike")
    _print_left_out(problem, list(cmp.over_capacity))
    return 0


# keywords of pl.solve that the solve command fills from a flag
_SOLVE_FLAGS = {"backend": "--backend", "executor": "--executor", "layers": "--layers", "jobs": "--jobs",
                "threads": "--threads", "gap": "--gap", "time_limit_s": "--time-limit", "work_limit": "--work-limit",
                "lns_patience": "--lns-patience", "deterministic": "--deterministic"}


def _solve(args: argparse.Namespace) -> int:
    cli_report.check_plan_out("--out", args.out, args.force)
    problem = _to_problem(args, _settings(args))
    o = problem.options
    for key, value, model_value in (("mode", o.mode, "mesh"), ("home", o.resolved_home, "spread")):
        if value != model_value:  # only an instance file can ask: solve has no such flag
            raise InputError(f"instance {Path(args.instance).name} [evaluator].{key}",
                             f"is {value!r}, but solve optimises and scores the mesh model with spread homes",
                             f"leave {key} out of the file for solve, then score the plan with "
                             f"`hdmoe-milp evaluate --instance {Path(args.instance).name} --plan PLAN`")
    if problem.batching != "expected":  # only an instance file can ask: solve has no --batching
        raise InputError(f"instance {Path(args.instance).name} {_FILE_KEYS['--batching'][1]}",
                         f"is {problem.batching!r}, but solve optimises, proves and scores the expected batch "
                         "(each expert's frequency x the batch); a sampled batch would score the comparison on "
                         "other tokens than the certificate", f"leave batching out of the file for solve, then "
                         f"score the plan on sampled batches with `hdmoe-milp evaluate --instance "
                         f"{Path(args.instance).name} --plan PLAN`")
    layers = None
    if args.layers is not None:
        items = args.layers.split(",")
        if not all(re.fullmatch(r"\s*\d+\s*", v, flags=re.ASCII) for v in items):
            raise InputError("--layers", f"must be comma-separated layer numbers, got {args.layers!r}",
                             "e.g. --layers 0,5,12 (0-based, digits 0-9; no ranges)")
        layers = [int(v) for v in items]
    try:
        res = pl.solve(problem, backend=args.backend, time_limit_s=args.time_limit, jobs=args.jobs,
                       threads=args.threads, gap=args.gap, baselines=not args.no_baselines, executor=args.executor,
                       progress=args.progress, work_limit=args.work_limit, layers=layers,
                       deterministic=args.deterministic,
                       lns_patience=None if args.lns_patience is None else int(args.lns_patience),
                       polish=not args.no_polish, branch_and_bound=not args.no_branch_and_bound,
                       node_order=not args.no_node_order, run_start=getattr(args, "started", None))
    except InputError as exc:  # name the flag the user wrote, not the keyword it became
        mesh = ("--mesh" if args.mesh is not None or not args.instance
                else f"instance {Path(args.instance).name} {_FILE_KEYS['--mesh'][1]}")
        raise as_written(exc, {**_SOLVE_FLAGS, "mesh": mesh}) from None
    unsaved = None  # the plan file could not be written (one that appeared during the solve, without --force)
    if args.out:
        try:
            res.save(args.out, force=args.force, field="--out")
        except InputError as exc:  # the results are printed all the same, then the error
            unsaved = exc
    layers = []
    for r in res.layers:
        d = r.to_dict()
        for key in ("objective_s", "bound_s", "warm_start_objective_s"):
            d[key.removesuffix("_s") + "_us"] = None if d[key] is None else d[key] * 1e6
        layers.append(d)
    tbt = {n: e.tbt_us for n, e in res.evaluations.items() if n != "milp"}
    s = res.solver
    out = {
        "model": problem.model.name, "hw": problem.hw_point, "mesh": problem.mesh_name, "batch": problem.batch,
        "backend": s["backend"], "time_limit_s": s["time_limit_s"], "time_mode": s["time_mode"],
        "family": s["family"], "layers_solved": s["layers"], "wall_s": s["wall_s"],
        "delivery": problem.options.resolved_delivery, "tbt_us": tbt, "layers": layers,
        "problem": problem.describe(), "baselines_over_capacity": s.get("baselines_over_capacity", []),
        "summary": res.summary(),
    }
    done = 130 if s.get("interrupted") else 0  # Ctrl-C: the finished layers are printed, exit status 130
    if s.get("interrupted"):
        cut = [r.layer for r in res.layers if r.status == "interrupted"]
        note = (f"hdmoe-milp: interrupted: {len(cut)} layer(s) did not finish ({', '.join(map(str, cut))}) and "
                "hold their best baseline" if cut else "hdmoe-milp: interrupted after the solved layers had finished")
        if s.get("baselines_interrupted"):
            note += f"; baselines not built or scored: {', '.join(s['baselines_interrupted'])}"
            if "hdmoe" in s["baselines_interrupted"]:
                note += " (hdmoe's layers are computed inside the solve)"
        if args.out and unsaved is None:
            note += f"; the plan written to {args.out} is this partial one"
        print(note, file=sys.stderr)
    if capped := out["summary"]["wall_capped"]:
        print(f"hdmoe-milp: note: {capped} layer(s) reached the wall-clock safety net of --deterministic "
              f"({_capped_text(res)}): their plans depend on the machine's speed and load, and may differ on "
              "another run",
              file=sys.stderr)
    if cuts := [r.cut_limit_s for r in res.layers if r.cut_limit_s is not None]:
        print(f"hdmoe-milp: note: {len(cuts)} layer(s) ran on a shorter limit, {min(cuts):.3g}-{max(cuts):.3g} s, to "
              f"keep the whole solve within layers x --time-limit / --jobs + 10 % from the command's start "
              "(imports, loading and the final scoring count too)", file=sys.stderr)
    if args.out and unsaved is None:
        out["out"] = str(args.out)
    if unsaved is not None:
        done = 2
    if args.json:
        print(json.dumps({**out, "interrupted": bool(s.get("interrupted"))}, indent=2))
        _say_unsaved(unsaved)
        return done
    print(f"model={problem.model.name} hw={problem.hw_point} mesh={problem.mesh_name} batch={problem.batch:g} "
          f"backend={s['backend']} time_limit={s['time_limit_s']}s ({s['time_mode']}) wall={s['wall_s']:.1f}s"
          + (" INTERRUPTED" if s.get("interrupted") else ""))
    print(f"objective, bound and gap: the evaluator's layer time, bounded over {s['family']}")
    print(layer_text(res))
    tb = pd.DataFrame({"strategy": list(tbt), "tbt_us": list(tbt.values())})
    tb["plan_speedup"] = tb["tbt_us"] / tbt["plan"]
    print(tb.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    _print_left_out(problem, s.get("baselines_over_capacity", []))
    if args.out and unsaved is None:
        print(f"wrote {args.out}")
    _say_unsaved(unsaved)
    return done


def _say_unsaved(exc: InputError | None) -> None:
    """The error that kept ``solve`` from writing its plan file, after the results it printed."""
    if exc is not None:
        print(f"hdmoe-milp: error: {one_line(str(exc))}; the plan above was not written", file=sys.stderr)


def _replay(args: argparse.Namespace) -> int:
    if args.plan_strategy is not None:
        pl.check_choice("--plan-strategy", args.plan_strategy, tuple(pl.STRATEGIES))
    args.plan_strategy = args.plan_strategy or "cb"
    if not args.plan:
        _check_budget_read([args.plan_strategy], (("--time-limit", args.time_limit, "time_limit_s"),),
                           choose="give --plan-strategy one that reads it")
    if args.batching is not None:  # before the settings check, which would also offer "expected"
        pl.check_choice("--batching", args.batching, ("random", "contiguous"))
    names = ([p for p in pl.POLICIES if p != "oracle"] if args.policy.strip() == "all"
             else cli_report.csv_items("--policy", args.policy))
    if len(names) > 1 and "all" in names:
        raise InputError("--policy", f"'all' cannot be listed with other policies: {args.policy}",
                         "give 'all' alone, or a list of policies")
    for n in names:
        pl.check_choice("--policy", n, pl.POLICIES)
    s = _settings(args, args.plan)
    batch, batch_field = args.batch, "--batch"
    if batch is not None:  # a float so that 1e3 reads; finite and >= 1 are checked with every flag
        if not float(batch).is_integer():
            raise InputError("--batch", f"replays whole tokens per batch, got {batch:.15g}",
                             "give a whole number, e.g. 64")
        batch = int(batch)
    args.batches = int(args.batches)  # a whole number (checked with every flag)
    if batch is None:  # the problem's batch: the instance's, the plan's, else 128
        if args.instance and "[workload].batch" in s.given:
            batch_field = f"instance {Path(args.instance).name} [workload].batch"
            if s.batch != int(s.batch):
                raise InputError(batch_field, f"replays whole tokens per batch, got {s.batch:.15g}",
                                 "give --batch N for the replay, or a whole number in the file")
        elif not float(s.batch).is_integer():  # a plan made for a fractional expected batch
            print(f"note: plan {Path(args.plan).name if args.plan else ''} was made for an expected batch of "
                  f"{s.batch:.15g} tokens; replaying whole batches of {pl.Settings.batch} (give --batch N to choose)",
                  file=sys.stderr)
            s = replace(s, batch=pl.Settings.batch)
        batch = int(s.batch)
    problem = _to_problem(args, s, args.plan)  # names the file's key for a batch it gave
    coalesce = cli_report.plan_rules(args.plan).get("coalesce") if args.plan else None
    if coalesce is not None:  # the plan's own message rule, as evaluate scores it (the replica rule is a flag)
        problem = problem.with_(options=replace(problem.options, coalesce=coalesce))
    if len(set(names)) != len(names):
        raise InputError("--policy", f"lists a policy twice: {args.policy}", "name each policy once")
    pl.check_choice("--replica-rule/--dispatch", args.replica_rule, pl.REPLICA_RULES)
    from_file = args.instance is not None and args.batching is None and s.batching in ("random", "contiguous")
    batching = args.batching or (s.batching if from_file else "contiguous")
    pl.check_choice("--batching", batching, ("random", "contiguous"))
    for flag, v in ((batch_field, batch), ("--batches", args.batches)):
        if v < 1:
            raise InputError(flag, f"must be >= 1, got {v}", f"e.g. {flag} 64")
    problem.check_memory(batch_field, batch)
    pl.check_window(batch_field, batch, batching, problem.trace, "lower --batch or use --batching random")
    if args.plan:
        plan = pl.load_plan(args.plan, problem)
    else:
        base = problem
        if args.plan_trace:
            try:
                base = problem.with_(trace=pl.load_trace(args.plan_trace, problem.model.num_experts,
                                                         problem.model.top_k), frequencies=None)
            except InputError as exc:
                raise InputError("--plan-trace", f"{exc.field}: {exc.problem}", _same_model_fix(exc, problem)
                                 or exc.fix or f"give a trace of {problem.model.name} with every layer") from None
        plan = pl.place(base, args.plan_strategy, budget=pl.Budget(time_limit_s=_strategy_time_limit(args)))
    rows = [pl.replay(problem, plan, policy=n, batches=args.batches, batch=batch, batching=batching,
                      replica_rule=args.replica_rule, progress=args.progress).summary() for n in names]
    static = next((r["mean_us"] for r in rows if r["policy"] == "static"), None)
    for r in rows:
        r["speedup_vs_static"] = None if static is None else static / r["mean_us"]
    trace = s.trace or problem.trace.name
    o = problem.options  # the evaluator's rules the latencies were scored with, as evaluate prints them
    rules = {"mode": o.mode, "delivery": o.resolved_delivery, "home": o.resolved_home, "context_len": o.context_len,
             "seed": problem.seed}
    if o.coalesce != "node":  # only a plan file made in Python can ask for another
        rules["coalesce"] = o.coalesce
    if args.json:
        print(json.dumps({"model": problem.model.name, "hw": problem.hw_point, "mesh": problem.mesh_name,
                          "batch": batch, "batching": batching, "plan": args.plan or f"{args.plan_strategy}",
                          "trace": trace, "replica_rule": args.replica_rule, **rules, "results": rows}, indent=2))
        return 0
    made = (Path(args.plan).name if args.plan
            else f"{args.plan_strategy}" + (f" on {Path(args.plan_trace).name}" if args.plan_trace else ""))
    print(f"model={problem.model.name} hw={problem.hw_point} mesh={problem.mesh_name} batch={batch} "
          f"batches={args.batches} batching={batching} plan={made!r} trace={trace} replica_rule={args.replica_rule} "
          + " ".join(f"{k}={v}" for k, v in rules.items()))
    cols = ["policy", "mean_us", "p50_us", "p99_us", "migration_us", "bytes_moved", "actions",
            "decide_us_per_layer_mean"] + (["speedup_vs_static"] if static is not None else [])
    df = pd.DataFrame(rows)[cols]
    fmt = {c: (lambda x: f"{x:.1f}") for c in df.columns if c.endswith("_us") or c.startswith("decide_us")}
    fmt |= {"bytes_moved": lambda x: f"{x:,.0f}", "speedup_vs_static": lambda x: "-" if pd.isna(x) else f"{x:.3f}"}
    print(df.to_string(index=False, formatters=fmt))  # µs to 0.1, bytes whole: no e-notation in a paper's table
    print("(mean/p50/p99_us: per decode step, moves included; migration_us, bytes_moved, actions: totals over "
          "the batches)")
    if static is None:
        print("(no speedup_vs_static: add static to --policy to compare with the plan left as it is)")
    return 0


def _same_model_fix(exc: InputError, problem: pl.Problem) -> str | None:
    """The fix for a second trace of another model: it must route the problem's model."""
    if not isinstance(exc, pl.TraceShapeError):
        return None
    m = problem.model
    return f"give a trace recorded from {m.name}, like the problem's: top_k={m.top_k} of {m.num_experts} experts"


# what each line of `stats` means (workload.summarize, workload.total_variation), for the legend under its
# table and its --help; {nodes} and {seed} name the mesh and seed used, or the flags that set them
STATS_KEYS: dict[tuple[str, ...], str] = {
    ("trace", "model"): "the trace read (or the synthetic one) and the model whose routing it records",
    ("layers",): "MoE layers in the trace",
    ("tokens",): "tokens of the trace (every layer routes them all)",
    ("hottest_share_min", "hottest_share_median", "hottest_share_max"):
        "skew: fraction of the layer's tokens (0-1) that pick its most-used expert; min, median and max over layers",
    ("expert_max_over_mean_median",):
        "skew: tokens routed to the layer's most-used expert / the mean over its experts (1 = every expert "
        "equally used); median over layers",
    ("top_pair_share_median",):
        "skew: fraction of the layer's tokens (0-1) whose top-k holds its most frequent pair of experts; median "
        "over layers",
    ("ep_node_max_over_mean_median",):
        "skew as placed: whole experts dealt at random ({seed}) over {nodes}, the tokens routed to the busiest "
        "node's experts / the mean node's (1 = balanced); median over layers",
    ("tv_median", "tv_max"):
        "drift against --against: total-variation distance between the two traces' expert popularity in the "
        "layer (each expert's share of the layer's routed token-expert slots), 0.5 * sum |p - q|: 0 = the same, "
        "1 = no expert in common; median and max over layers",
}


def _stats_legend(keys: dict[tuple[str, ...], str], shown: Any = None, *, nodes: str = "the --mesh's nodes",
                  seed: str = "--seed") -> str:
    """The legend of `stats`: one entry per group of ``keys`` of which some key is in ``shown`` (all when None),
    wrapped at 100 characters."""
    import textwrap

    lines = ["What each line means (counts, fractions and ratios: no unit):"]
    for names, text in keys.items():
        if shown is not None and not any(n in shown for n in names):
            continue
        head = ", ".join(n for n in names if shown is None or n in shown)
        lines.append(textwrap.fill(text.format(nodes=nodes, seed=seed), width=100, initial_indent=f"  {head}: ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    s = _settings(args)
    problem = _to_problem(args, s)
    against = None
    if args.against:
        try:
            against = pl.load_trace(args.against, problem.model.num_experts, problem.model.top_k)
        except InputError as exc:
            raise InputError("--against", f"{exc.field}: {exc.problem}", _same_model_fix(exc, problem)
                             or exc.fix or f"give a trace of {problem.model.name}") from None
    try:
        stats = pl.trace_stats(problem, against)
    except InputError as exc:
        raise as_written(exc, {"against": "--against"}) from None
    out: dict[str, Any] = {"trace": s.trace or problem.trace.name, "model": problem.model.name, **stats}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
        mesh = problem.hardware.mesh
        print("\n" + _stats_legend(STATS_KEYS, out, nodes=f"the {mesh.num_nodes} nodes of the {mesh.name} mesh",
                                   seed=f"seed {problem.seed}"))
    return 0


# numeric flags checked before any work: (attribute, flag, minimum, strict, integer)
_NUMERIC_FLAGS = (
    ("time_limit", "--time-limit", 0.0, True, False), ("work_limit", "--work-limit", 0.0, False, False),
    ("gap", "--gap", 0.0, False, False), ("threads", "--threads", 1, False, True), ("jobs", "--jobs", 1, False, True),
    ("batch", "--batch", 1, False, False), ("batches", "--batches", 1, False, True),
    ("capacity_gb", "--capacity-gb", 0.0, True, False), ("hop_latency_ns", "--hop-latency-ns", 0.0, False, False),
    ("seed", "--seed", 0, False, True), ("lns_patience", "--lns-patience", 0, False, True),
)

_FLAG_MAXIMA = {"--batches": MAX_BATCHES, "--time-limit": MAX_TIME_LIMIT_S, "--work-limit": MAX_WORK_LIMIT,
                "--threads": MAX_THREADS, "--hop-latency-ns": MAX_HOP_LATENCY_NS}


def _check_conflicts(args: argparse.Namespace) -> None:
    """Options that cannot go together, rejected before any file is read or strategy built."""
    if args.command == "evaluate" and args.plan:
        if args.strategy:
            raise InputError("--strategy", "cannot be combined with --plan", "give either --plan or --strategy")
        if args.save_plan:
            raise InputError("--save-plan", "cannot be combined with --plan (the plan is already saved)",
                             "give either --plan or --strategy NAME --save-plan FILE")
        for flag, value in (("--time-limit", args.time_limit), ("--work-limit", args.work_limit)):
            if value is not None:  # they budget the strategies' solves; a saved plan is not solved again
                raise InputError(flag, "cannot be combined with --plan (the plan is not solved again)",
                                 f"leave {flag} out, or give --strategy instead of --plan")
    if args.command == "replay" and args.plan:
        for flag, value in (("--plan-strategy", args.plan_strategy), ("--plan-trace", args.plan_trace),
                            ("--time-limit", args.time_limit)):
            if value is not None:
                raise InputError(flag, "cannot be combined with --plan (the plan is already made)",
                                 f"give either --plan or {flag}" if flag != "--time-limit" else
                                 "leave --time-limit out: it budgets the solve of --plan-strategy, without --plan")
    if args.command == "stats" and args.hw is not None:
        raise InputError("--hw", "is not read by stats (it reads the trace, and the mesh's node count)",
                         "leave --hw out")


def _check_flags(args: argparse.Namespace) -> None:
    """Type, range and finiteness of every numeric flag given, named as written, before any work."""
    for attr, flag, low, strict, integer in _NUMERIC_FLAGS:
        v = getattr(args, attr, None)
        if v is None:
            continue
        if attr == "seed":  # an int from argparse: checked exactly (a float rounds above 2**53)
            check_seed(v, flag)
            continue
        if v != v or v in (float("inf"), -float("inf")):
            raise InputError(flag, f"must be finite, got {v}", "give a finite number")
        if (v <= low) if strict else (v < low):
            op = ">" if strict else ">="
            raise InputError(flag, f"must be {op} {low:g}, got {v:g}", f"give a number {op} {low:g}")
        if integer and v != int(v):
            raise InputError(flag, f"must be a whole number, got {v:.15g}", "drop the fraction")
        top = _FLAG_MAXIMA.get(flag)
        if top is not None and v > top:
            got = f"{v:.15g}"  # 1000001, not 1e+06 (which reads as the limit itself)
            raise InputError(flag, f"must be <= {top:g}, got {got}", f"give a number <= {top:g}")
    if getattr(args, "gap", None) is not None and args.gap >= 1:
        raise InputError("--gap", f"must be below 1, got {args.gap:g}", "a relative gap such as 1e-4")
    _check_conflicts(args)
    for attr, flag in (("instance", "--instance"), ("trace", "--trace"), ("plan", "--plan"),
                       ("plan_trace", "--plan-trace"), ("against", "--against")):
        v = getattr(args, attr, None)
        if v is not None:
            check_file(flag, v, "give the path of an existing file")


def _capacity_as_written(exc: InputError, args: argparse.Namespace) -> InputError:
    """A DRAM-capacity error names where the capacity came from: the flag, the instance file or the plan."""
    if exc.field != "hardware.dram_capacity_bytes":
        return exc
    if getattr(args, "capacity_gb", None) is not None:
        where = "--capacity-gb"
    elif getattr(args, "instance", None):
        where = f"instance {Path(args.instance).name} [hardware].dram_capacity_gb"
    elif getattr(args, "plan", None):
        where = f"plan {Path(args.plan).name} meta.problem.hardware.dram_capacity_bytes"
    else:
        return exc
    return InputError(where, exc.problem, exc.fix)


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    """Entry point of the ``hdmoe-milp`` console script. Bad input: one line on stderr, exit 2.
    ``started``: when the command started (``time.time()``, before its imports; default now): a
    solve's whole-model time counts from then."""
    started = time.time() if started is None else started
    args = _parser().parse_args(argv)
    args.started = started
    try:
        if args.command in cli_report.COMMANDS:
            return cli_report.run(args)
        _check_flags(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "solve":
            return _solve(args)
        if args.command == "replay":
            return _replay(args)
        return _stats(args)
    except InputError as exc:
        print(f"hdmoe-milp: error: {one_line(str(_capacity_as_written(exc, args)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (one an import turned into an ImportError: hdmoe_milp._console)
        print("hdmoe-milp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
