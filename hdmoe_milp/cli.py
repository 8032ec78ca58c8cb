"""Command line: ``hdmoe-milp evaluate ...`` and ``hdmoe-milp stats ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from .costs import MODES, check_model_fits
from .errors import InputError, check_choice
from .evaluator import DELIVERIES, HOMES, EvalOptions, evaluate
from .hardware import HARDWARE_PRESETS, Mesh, make_hardware
from .instance import Instance, load_instance
from .moe import MODEL_PRESETS, get_model
from .placement import Placement
from .strategies import STRATEGIES, build
from .synthetic import synthetic_trace
from .workload import BATCHING, expected_workload, load_trace, sample_batch, summarize


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdmoe-milp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--instance", help="instance TOML file; other flags override its values")
        sp.add_argument("--model", help="model preset: " + ", ".join(MODEL_PRESETS))
        sp.add_argument("--mesh", help="mesh ROWSxCOLS, e.g. 4x8")
        sp.add_argument("--hw", help="hardware point: " + ", ".join(HARDWARE_PRESETS))
        sp.add_argument("--trace", help="routing trace (.json, .json.gz or .npz); default: synthetic")
        sp.add_argument("--seed", type=int, help="seed for sampling, homes, random EP and synthetic traces")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    ev = sub.add_parser("evaluate", help="score baseline strategies (or a saved plan) with the shared evaluator")
    common(ev)
    ev.add_argument("--batch", type=float, help="tokens per decode step (default 128)")
    ev.add_argument("--strategy", help="one of " + ", ".join(STRATEGIES) + ", a comma-separated list, or 'all' "
                    "(default)")
    ev.add_argument("--time-limit", type=float, default=2.0,
                    help="seconds per layer for strategies that solve a MILP (hdmoe; default 2)")
    ev.add_argument("--plan", help="evaluate a saved placement JSON instead of a strategy")
    ev.add_argument("--save-plan", help="write the placement of the (single) strategy to this JSON file")
    ev.add_argument("--mode", help="unit mode: mesh (default) or paper")
    ev.add_argument("--delivery", help="tree (default in mesh mode) or unicast")
    ev.add_argument("--home", help="token home nodes: spread, holder or random")
    ev.add_argument("--batching", help="expected (default), random or contiguous")
    ev.add_argument("--dispatch", default="fraction", help="replica dispatch rule: fraction (default), affinity, "
                    "balanced or nearest (see formulations/evaluator.md)")
    ev.add_argument("--capacity-gb", type=float, help="DRAM capacity per node, GB (default: unlimited)")
    ev.add_argument("--hop-latency-ns", type=float, help="per-hop latency, ns (default 0)")

    so = sub.add_parser("solve", help="offline block MILP per layer; compare the plan with every baseline")
    common(so)
    so.add_argument("--batch", type=float, help="tokens per decode step the plan is optimised for (default 128)")
    so.add_argument("--backend", default="cpsat", help="cbc, cpsat or highs (default cpsat)")
    so.add_argument("--time-limit", type=float, default=10.0, help="seconds per layer (default 10)")
    so.add_argument("--gap", type=float, default=1e-4, help="relative gap target (default 1e-4)")
    so.add_argument("--threads", type=int, default=1, help="solver threads per layer (default 1)")
    so.add_argument("--jobs", type=int, default=1, help="layers solved in parallel (default 1)")
    so.add_argument("--executor", default="local", help="local (process pool) or ray")
    so.add_argument("--delivery", help="tree (default) or unicast: the traffic rule optimised and evaluated")
    so.add_argument("--out", help="write the plan (placement JSON) here")
    so.add_argument("--no-baselines", action="store_true", help="skip the baseline comparison")
    so.add_argument("--progress", action="store_true", help="show a progress bar on stderr")

    rp = sub.add_parser("replay", help="stream a trace batch by batch under online policies")
    common(rp)
    rp.add_argument("--plan", help="offline plan (placement JSON); default: --plan-strategy on --plan-trace")
    rp.add_argument("--plan-strategy", default="cb", help="baseline to build the plan from when no --plan (cb)")
    rp.add_argument("--plan-trace", help="trace the plan is built on (default: --trace)")
    rp.add_argument("--batch", type=int, default=512, help="tokens per batch (default 512)")
    rp.add_argument("--policy", default="all", help="static, greedy, hdmoe-prebroadcast, eplb-periodic, oracle, "
                    "a comma-separated list, or all (default; all but oracle)")
    rp.add_argument("--batches", type=int, default=50, help="batches to replay (default 50)")
    rp.add_argument("--batching", help="contiguous (default) or random")
    rp.add_argument("--dispatch", default="balanced", help="replica dispatch rule: balanced (default: this "
                    "batch's tokens levelled over the copies, tokens prefer copies on nodes they touch), "
                    "affinity (the plan's fractions as quotas), nearest (no quotas) or fraction")

    st = sub.add_parser("stats", help="skew and drift statistics of a trace")
    common(st)
    st.add_argument("--against", help="second trace: report per-layer total-variation drift")
    return p


def _settings(args: argparse.Namespace) -> Instance:
    inst = load_instance(args.instance) if args.instance else Instance("cli", "deepseek-v2-lite", "5/50", "4x8")
    over: dict[str, Any] = {}
    for flag, field in (
        ("model", "model"), ("mesh", "mesh"), ("hw", "hw"), ("trace", "trace"), ("seed", "seed"),
        ("batch", "batch"), ("mode", "mode"), ("delivery", "delivery"), ("home", "home"),
        ("batching", "batching"), ("capacity_gb", "dram_capacity_gb"), ("hop_latency_ns", "hop_latency_ns"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = v
    s = replace(inst, **over)
    check_choice("model", s.model, tuple(MODEL_PRESETS))
    check_choice("hw", s.hw, tuple(HARDWARE_PRESETS))
    Mesh.parse(s.mesh)
    check_choice("mode", s.mode, MODES)
    check_choice("batching", s.batching, BATCHING)
    if s.delivery is not None:
        check_choice("delivery", s.delivery, DELIVERIES)
    if s.home is not None:
        check_choice("home", s.home, HOMES)
    if not (isinstance(s.batch, (int, float)) and np.isfinite(s.batch) and s.batch > 0):
        raise InputError("batch", f"must be a positive number of tokens, got {s.batch!r}", "e.g. --batch 128")
    return s


def _trace(s: Instance, model):
    if s.trace:
        return load_trace(s.trace, model.num_experts, model.top_k)
    return synthetic_trace(model, s.synthetic_tokens, seed=s.seed)


def _setup(s: Instance):
    """Model, hardware and trace of the settings, checked against each other."""
    model = get_model(s.model)
    hw = _hardware(s)
    check_model_fits(model, hw)
    trace = _trace(s, model)
    if trace.num_layers != model.moe_layers:
        raise InputError(
            "trace", f"has {trace.num_layers} layers but {model.name} has {model.moe_layers} MoE layers",
            "use a trace recorded on this model",
        )
    return model, hw, trace


def _evaluate(args: argparse.Namespace) -> int:
    s = _settings(args)
    model, hw, trace = _setup(s)
    if s.batching == "expected":
        wl = expected_workload(trace, s.batch)
    else:
        wl = sample_batch(trace, s.batch, s.batching, s.seed)
    opts = EvalOptions(mode=s.mode, delivery=s.delivery, home=s.home, seed=s.seed, context_len=s.context_len,
                       dispatch=args.dispatch)
    freqs = trace.frequencies()

    if args.plan:
        placements = [Placement.load(args.plan)]
    else:
        names = list(STRATEGIES) if (args.strategy or "all") == "all" else args.strategy.split(",")
        for n in names:
            check_choice("strategy", n, tuple(STRATEGIES) + ("all",))
        groups = [trace.groups(li) for li in range(trace.num_layers)] if "hdmoe" in names else None
        placements = [build(n, model, hw, freqs, seed=s.seed, groups=groups, batch=s.batch,
                            time_limit_s=args.time_limit) for n in names]
    if args.save_plan:
        if len(placements) != 1:
            raise InputError("save-plan", "needs a single --strategy", "e.g. --strategy cb --save-plan plan.json")
        placements[0].save(args.save_plan)

    results = [evaluate(p, model, hw, wl, opts) for p in placements]
    tp = next((r for r in results if r.strategy == "tp"), None)
    if tp is None:
        tp = evaluate(build("tp", model, hw, freqs), model, hw, wl, opts)
    rows = []
    for r in results:
        row = r.summary()
        row["speedup_vs_tp"] = tp.tbt_s / r.tbt_s
        rows.append(row)
    setting = {
        "model": model.name, "hw": s.hw, "mesh": hw.mesh.name, "batch": s.batch, "batching": s.batching,
        "trace": s.trace or trace.name, "mode": opts.mode, "delivery": opts.resolved_delivery,
        "home": opts.resolved_home, "seed": s.seed,
    }
    if args.json:
        if len(rows) == 1:
            out = {**setting, **rows[0], "per_layer": results[0].per_layer()}
        else:
            out = {**setting, "results": rows}
        print(json.dumps(out, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in setting.items()))
    df = pd.DataFrame(rows)[
        ["strategy", "tbt_us", "moe_compute_us", "moe_comm_us", "non_moe_us", "max_node_imbalance", "speedup_vs_tp"]
    ]
    print(df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return 0


def _hardware(s: Instance):
    cap = None if s.dram_capacity_gb is None else float(s.dram_capacity_gb) * 1e9
    if cap is not None and cap <= 0:
        raise InputError("capacity", f"must be positive, got {s.dram_capacity_gb} GB")
    return make_hardware(s.hw, s.mesh, dram_bw_bytes_per_s=s.dram_bw_gbps * 1e9, dram_capacity_bytes=cap,
                         hop_latency_s=s.hop_latency_ns * 1e-9)


def _solve(args: argparse.Namespace) -> int:
    from .strategies.block_milp import MilpOptions, SolveParams, best_per_layer, solve_model

    s = _settings(args)
    model, hw, trace = _setup(s)
    if args.time_limit <= 0:
        raise InputError("time-limit", f"must be positive seconds, got {args.time_limit}")
    if args.threads < 1:
        raise InputError("threads", f"must be >= 1, got {args.threads}")
    if not 0 <= args.gap < 1:
        raise InputError("gap", f"must be in [0, 1), got {args.gap}")
    opts = EvalOptions(mode="mesh", delivery=s.delivery, seed=s.seed, context_len=s.context_len)
    freqs = trace.frequencies()
    params = SolveParams(time_limit_s=args.time_limit, threads=args.threads, seed=s.seed, gap=args.gap)
    res = solve_model(model, hw, freqs, s.batch, backend=args.backend, params=params,
                      options=MilpOptions(delivery=opts.resolved_delivery), jobs=args.jobs,
                      executor=args.executor, progress=args.progress,
                      groups=[trace.groups(li) for li in range(trace.num_layers)])
    wl = expected_workload(trace, s.batch)
    candidates = {"milp": res.placement}
    if not args.no_baselines:
        groups = [trace.groups(li) for li in range(trace.num_layers)]
        for n in STRATEGIES:
            candidates[n] = build(n, model, hw, freqs, seed=s.seed, groups=groups, batch=s.batch,
                                  time_limit_s=args.time_limit, backend=args.backend)
    evals = {n: evaluate(p, model, hw, wl, opts) for n, p in candidates.items()}
    plan, sources = best_per_layer(candidates, {n: e.layer_s for n, e in evals.items()}, f"milp-{args.backend}")
    plan_eval = evaluate(plan, model, hw, wl, opts)
    if args.out:
        plan.save(args.out)
    layers = []
    for r, src in zip(res.layers, sources, strict=True):
        d = r.to_dict()
        for key in ("objective", "bound", "warm_start"):
            d[key + "_us"] = None if d[key] is None else d[key] * 1e6
        d["final_source"] = src
        layers.append(d)
    tbt = {"plan": plan_eval.tbt_us, **{n: e.tbt_us for n, e in evals.items() if n != "milp"}}
    out = {
        "model": model.name, "hw": s.hw, "mesh": hw.mesh.name, "batch": s.batch, "backend": args.backend,
        "time_limit_s": args.time_limit, "wall_s": res.wall_s, "delivery": opts.resolved_delivery,
        "tbt_us": tbt, "layers": layers,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model={model.name} hw={s.hw} mesh={hw.mesh.name} batch={s.batch} backend={args.backend} "
          f"time_limit={args.time_limit}s wall={res.wall_s:.1f}s")
    df = pd.DataFrame(layers)[["layer", "status", "objective_us", "bound_us", "gap", "time_s", "source",
                               "final_source"]]
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    tb = pd.DataFrame({"strategy": list(tbt), "tbt_us": list(tbt.values())})
    tb["plan_speedup"] = tb["tbt_us"] / tbt["plan"]
    print(tb.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .online import POLICIES, replay

    s = _settings(args)
    model = get_model(s.model)
    hw = _hardware(s)
    trace = _trace(s, model)
    if args.batch < 1 or args.batches < 1:
        raise InputError("batch/batches", "must be positive integers")
    batching = args.batching or "contiguous"
    check_choice("batching", batching, ("random", "contiguous"))
    if args.plan:
        plan = Placement.load(args.plan)
    else:
        base = load_trace(args.plan_trace, model.num_experts, model.top_k) if args.plan_trace else trace
        plan = build(args.plan_strategy, model, hw, base.frequencies(), seed=s.seed)
    names = [p for p in POLICIES if p != "oracle"] if args.policy == "all" else args.policy.split(",")
    for n in names:
        check_choice("policy", n, POLICIES)
    if trace.num_layers != plan.num_layers:
        raise InputError("trace", f"has {trace.num_layers} layers, the plan {plan.num_layers}")
    opts = EvalOptions(seed=s.seed, dispatch=args.dispatch)
    rows = [replay(plan, model, hw, trace, args.batch, n, batches=args.batches, batching=batching,
                   seed=s.seed, options=opts).summary() for n in names]
    static = next((r["mean_us"] for r in rows if r["policy"] == "static"), None)
    for r in rows:
        r["speedup_vs_static"] = None if static is None else static / r["mean_us"]
    if args.json:
        print(json.dumps({"model": model.name, "hw": s.hw, "mesh": hw.mesh.name, "batch": args.batch,
                          "plan": args.plan or f"{args.plan_strategy}", "trace": s.trace or trace.name,
                          "results": rows}, indent=2))
        return 0
    print(f"model={model.name} hw={s.hw} mesh={hw.mesh.name} batch={args.batch} batches={args.batches} "
          f"batching={batching} trace={s.trace or trace.name}")
    df = pd.DataFrame(rows)[["policy", "mean_us", "p50_us", "p99_us", "migration_us", "bytes_moved", "actions",
                             "decide_us_per_layer_mean", "speedup_vs_static"]]
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .workload import total_variation

    s = _settings(args)
    model = get_model(s.model)
    trace = _trace(s, model)
    out: dict[str, Any] = {"trace": s.trace or trace.name, "model": model.name,
                           **summarize(trace, Mesh.parse(s.mesh).num_nodes, s.seed)}
    if args.against:
        other = load_trace(args.against, model.num_experts, model.top_k)
        if other.num_layers != trace.num_layers:
            raise InputError("against", f"has {other.num_layers} layers, the trace has {trace.num_layers}")
        tv = total_variation(trace.frequencies(), other.frequencies())
        out.update(tv_median=float(np.median(tv)), tv_max=float(tv.max()))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hdmoe-milp`` console script. Bad input: one line on stderr, exit 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "solve":
            return _solve(args)
        if args.command == "replay":
            return _replay(args)
        return _stats(args)
    except InputError as exc:
        print(f"hdmoe-milp: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
