"""Online policies on real and synthetic drift, and the greedy rebalancer's decision time.

Prints: (1) decision time per layer per batch (target <= 100 us) for Mixtral-8x7B and
DeepSeek-V2-Lite on 4x8 and DeepSeek-V3 on 8x8; (2) shifted workloads (plan on one category or
task, replay on another; B = 512; 5/50 and 2.5/75) and unshifted controls, as speedups over static
after charging every weight move; (3) a synthetic drift scenario (hot set changes every few hundred
batches); (4) the share of the gain of two ceilings that greedy reaches on a small instance: the
per-batch oracle (clairvoyant, free moves) and the best static plan in hindsight (MILP on the
replayed workload), over five trace seeds; (5) the replica dispatch rules side by side.
Writes CSV + markdown to benchmarks/out/.

Run: python benchmarks/bench_online.py [--batches 40] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hdmoe_milp import Hardware, Mesh, MoEModel, get_model, load_trace, make_hardware
from hdmoe_milp.evaluator import EvalOptions, evaluate
from hdmoe_milp.online import GreedyRebalancer, RebalancerConfig, replay
from hdmoe_milp.online.policies import OraclePolicy
from hdmoe_milp.replica_rules import REPLICA_RULES
from hdmoe_milp.strategies import build
from hdmoe_milp.strategies.block_milp import SolveParams, solve_model
from hdmoe_milp.synthetic import drifting_trace, synthetic_trace
from hdmoe_milp.workload import iter_batches

ROOT = Path(__file__).resolve().parents[1]
T = ROOT / "instances" / "traces"


def decision_time(model, hw, plan_trace, run_trace, batches: int = 20) -> tuple[float, float, float]:
    plan = build("cb", model, hw, plan_trace.frequencies())
    reb = GreedyRebalancer(plan, model, hw, 512)
    per = []
    for j, wl in enumerate(iter_batches(run_trace, 512, "random", 0, count=batches)):
        if j:
            t = time.perf_counter()
            reb.step()
            per.append((time.perf_counter() - t) / model.moe_layers)
        reb.observe(wl.expert_loads())
    return float(np.mean(per) * 1e6), float(np.median(per) * 1e6), float(np.max(per) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--segment", type=int, default=None,
                    help="batches per drift segment (default 200; 40 with --quick)")
    ap.add_argument("--seeds", default="3,4,5,6,7", help="trace seeds of the ceiling instance")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mx, ds, v3 = get_model("mixtral-8x7b"), get_model("deepseek-v2-lite"), get_model("deepseek-v3")
    mix = {c: load_trace(T / f"mixtral_{c}_4k.json.gz", 8, 2) for c in ("reasoning", "writing")}
    dst = {c: load_trace(T / f"deepseek_v2_lite_{c}_4k.npz", 64, 6) for c in ("law", "translation", "intent")}

    print("== decision time per layer per batch (greedy, B=512; target <= 100 us)")
    v3_tr = synthetic_trace(v3, 2048, seed=0)
    rows = []
    for name, model, mesh, a, b in (("mixtral-8x7b", mx, "4x8", mix["reasoning"], mix["writing"]),
                                    ("deepseek-v2-lite", ds, "4x8", dst["law"], dst["translation"]),
                                    ("deepseek-v3", v3, "8x8", v3_tr, synthetic_trace(v3, 2048, seed=0, domain=1))):
        mean_us, p50_us, max_us = decision_time(model, make_hardware("5/50", mesh), a, b)
        rows.append({"model": name, "mesh": mesh, "decide_us_mean": mean_us, "decide_us_p50": p50_us,
                     "decide_us_max": max_us})
    dt = pd.DataFrame(rows)
    print(dt.to_string(index=False, float_format=lambda x: f"{x:.1f}"))

    print("\n== shifted and unshifted workloads (B=512, speedup over static after move costs)")
    cases = [("deepseek-v2-lite", ds, dst["law"], dst["translation"], "law->translation"),
             ("deepseek-v2-lite", ds, dst["law"], dst["intent"], "law->intent"),
             ("deepseek-v2-lite", ds, dst["law"], dst["law"], "law->law (unshifted)"),
             ("mixtral-8x7b", mx, mix["reasoning"], mix["writing"], "reasoning->writing"),
             ("mixtral-8x7b", mx, mix["reasoning"], mix["reasoning"], "reasoning->reasoning (unshifted)")]
    if args.quick:
        cases = cases[:1] + cases[2:3]
    res = []
    for name, model, plan_tr, run_tr, label in cases:
        for hwp in ("5/50", "2.5/75"):
            hw = make_hardware(hwp, "4x8")
            plan = build("cb", model, hw, plan_tr.frequencies())
            summ = {}
            for pol in ("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic"):
                summ[pol] = replay(plan, model, hw, run_tr, 512, pol, batches=args.batches, batching="random",
                                   seed=0).summary()
            st = summ["static"]["mean_us"]
            row = {"model": name, "case": label, "hw": hwp, "static_us": st}
            for pol, s in summ.items():
                row[f"{pol}_speedup"] = st / s["mean_us"]
            row["greedy_p99_us"] = summ["greedy"]["p99_us"]
            row["greedy_moved_GB"] = summ["greedy"]["bytes_moved"] / 1e9
            res.append(row)
            print(f"{name:17s} {label:34s} {hwp:6s} greedy x{row['greedy_speedup']:.3f}  prebroadcast "
                  f"x{row['hdmoe-prebroadcast_speedup']:.3f}  eplb-periodic x{row['eplb-periodic_speedup']:.3f}",
                  flush=True)
    shifted = pd.DataFrame(res)

    seg = args.segment if args.segment is not None else (40 if args.quick else 200)
    print("\n== synthetic drift: the 4 hottest experts of every layer trade places with cold ones every "
          f"{seg} batches (DeepSeek-V2-Lite-like, 5/50, B=256, contiguous)")
    drift = drifting_trace(ds, seg * 256, 3, seed=7)
    hw = make_hardware("5/50", "4x8")
    plan = build("cb", ds, hw, synthetic_trace(ds, 4096, seed=7).frequencies())
    drows = []
    for pol in ("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic"):
        r = replay(plan, ds, hw, drift, 256, pol, batches=3 * seg, batching="contiguous", seed=0)
        s = r.summary()
        for k in range(3):
            s[f"segment{k}_us"] = float(r.latency_s[k * seg:(k + 1) * seg].mean() * 1e6)
        drows.append(s)
    dd = pd.DataFrame(drows)
    dd["speedup_vs_static"] = dd["mean_us"].iloc[0] / dd["mean_us"]
    print(dd[["policy", "mean_us", "segment0_us", "segment1_us", "segment2_us", "migration_us", "actions",
              "speedup_vs_static"]].to_string(index=False, float_format=lambda x: f"{x:.4g}"))

    print("\n== replica dispatch rules (law->translation, B=512, speedup over static; the replay's default "
          "is balanced)")
    drows2 = []
    for hwp in ("5/50", "2.5/75") if not args.quick else ("5/50",):
        hw = make_hardware(hwp, "4x8")
        plan = build("cb", ds, hw, dst["law"].frequencies())
        for rule in REPLICA_RULES:
            o = EvalOptions(replica_rule=rule)
            st = replay(plan, ds, hw, dst["translation"], 512, "static", batches=args.batches, batching="random",
                        seed=0, options=o).summary()["mean_us"]
            row = {"hw": hwp, "dispatch": rule}
            for pol in ("greedy", "hdmoe-prebroadcast", "eplb-periodic"):
                row[f"{pol}_speedup"] = st / replay(plan, ds, hw, dst["translation"], 512, pol, batches=args.batches,
                                                    batching="random", seed=0, options=o).summary()["mean_us"]
            drows2.append(row)
    disp = pd.DataFrame(drows2)
    print(disp.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    print("\n== greedy against ceilings (small instance: 16 experts, 2x4 mesh, 4 layers, B=256, shifted)")
    sm = MoEModel("small", num_experts=16, top_k=2, hidden=1024, expert_intermediate=1024, moe_layers=4)
    shw = Hardware(Mesh(2, 4), compute_flops=2e12, link_bw_bytes_per_s=2e10)
    nb = 60 if not args.quick else 24
    opts = EvalOptions(replica_rule="balanced")
    ceil_rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        base, shifted_tr = synthetic_trace(sm, 4096, seed=seed), synthetic_trace(sm, 256 * nb, seed=seed, domain=5)
        splan = build("ep-lpt", sm, shw, base.frequencies())
        hind = solve_model(sm, shw, shifted_tr.frequencies(), 256, params=SolveParams(time_limit_s=5.0),
                           coactivation=[shifted_tr.coactivation(li) for li in range(sm.moe_layers)]).placement
        lat = {p: replay(splan, sm, shw, shifted_tr, 256, p, batches=nb, batching="random", seed=1).latency_s
               for p in ("static", "greedy")}
        lat["greedy-ema0.8"] = replay(splan, sm, shw, shifted_tr, 256, "greedy", batches=nb, batching="random",
                                      seed=1, config=RebalancerConfig(ema_decay=0.8)).latency_s
        lat["greedy-fraction-dispatch"] = replay(splan, sm, shw, shifted_tr, 256, "greedy", batches=nb,
                                                 batching="random", seed=1,
                                                 options=EvalOptions(replica_rule="fraction")).latency_s
        lat["hindsight-static"] = replay(hind, sm, shw, shifted_tr, 256, "static", batches=nb, batching="random",
                                         seed=1).latency_s
        # the per-batch oracle (a MILP solve per layer and batch, no move cost) on every 2nd batch of the
        # second half, where the greedy has paid for its moves
        sample = np.arange(nb // 2, nb, 2)
        oracle = OraclePolicy(splan, sm, shw, 256, opts)
        o_lat = []
        for j, wl in enumerate(iter_batches(shifted_tr, 256, "random", 1, count=nb)):
            if j in sample:
                oracle.peek(wl)
                o_lat.append(evaluate(oracle.decide(j).placement, sm, shw, wl, opts).tbt_s)
        half = slice(nb // 2, nb)
        cmp = {p: float(v[sample].mean() * 1e6) for p, v in lat.items()} | {"oracle": float(np.mean(o_lat) * 1e6)}
        late = {p: float(v[half].mean() * 1e6) for p, v in lat.items()}
        for ceil, m, where in (("oracle", cmp, "sampled batches"), ("hindsight-static", late, "second half")):
            for g in ("greedy", "greedy-ema0.8", "greedy-fraction-dispatch"):
                share = (m["static"] - m[g]) / max(m["static"] - m[ceil], 1e-12)
                ceil_rows.append({"seed": seed, "ceiling": ceil, "over": where, "policy": g, "static_us": m["static"],
                                  "policy_us": m[g], "ceiling_us": m[ceil], "share_of_gain": share})
    ceil_df = pd.DataFrame(ceil_rows)
    print(ceil_df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    summ = ceil_df.groupby(["ceiling", "policy"])["share_of_gain"].agg(["min", "mean"]).reset_index()
    print("share of the ceiling's gain over seeds (target >= 0.90 of the oracle's):")
    print(summ.to_string(index=False, float_format=lambda x: f"{x:.2f}"))

    dt.to_csv(out / "online_decision_time.csv", index=False)
    shifted.to_csv(out / "online_shifted.csv", index=False)
    dd.to_csv(out / "online_drift.csv", index=False)
    ceil_df.to_csv(out / "online_ceilings.csv", index=False)
    disp.to_csv(out / "online_dispatch.csv", index=False)
    (out / "online_shifted.md").write_text(shifted.to_string(index=False))


if __name__ == "__main__":
    main()
