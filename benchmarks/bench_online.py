"""Online policies on real and synthetic drift, and the greedy rebalancer's decision time.

Prints: (1) decision time per layer per batch (target <= 100 us) for Mixtral-8x7B and
DeepSeek-V2-Lite on 4x8 and DeepSeek-V3 on 8x8; (2) shifted workloads (plan on one category or
task, replay on another; B = 512; 5/50 and 2.5/75) and unshifted controls, as speedups over static
after charging every weight move; (3) a synthetic drift scenario (hot set changes every few hundred
batches); (4) the share of the oracle's gain that greedy reaches on a small instance.
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
from hdmoe_milp.online import GreedyRebalancer, replay
from hdmoe_milp.strategies import build
from hdmoe_milp.synthetic import synthetic_trace
from hdmoe_milp.workload import Trace, iter_batches

ROOT = Path(__file__).resolve().parents[1]
T = ROOT / "instances" / "traces"


def decision_time(model, hw, plan_trace, run_trace, batches: int = 20) -> tuple[float, float]:
    plan = build("cb", model, hw, plan_trace.frequencies())
    reb = GreedyRebalancer(plan, model, hw, 512)
    per = []
    for j, wl in enumerate(iter_batches(run_trace, 512, "random", 0, count=batches)):
        if j:
            t = time.perf_counter()
            reb.step()
            per.append((time.perf_counter() - t) / model.moe_layers)
        reb.observe(wl.expert_loads())
    return float(np.mean(per) * 1e6), float(np.max(per) * 1e6)


def concat(traces: list[Trace], name: str) -> Trace:
    layers = tuple(np.concatenate([t.layers[li] for t in traces]) for li in range(traces[0].num_layers))
    return Trace(layers, traces[0].num_experts, traces[0].top_k, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
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
        mean_us, max_us = decision_time(model, make_hardware("5/50", mesh), a, b)
        rows.append({"model": name, "mesh": mesh, "decide_us_mean": mean_us, "decide_us_max": max_us})
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

    print("\n== synthetic drift: hot set changes every 200 batches (DeepSeek-V2-Lite-like, 5/50, B=256)")
    seg = 200 * 256 if not args.quick else 40 * 256
    drift = concat([synthetic_trace(ds, seg, seed=7, domain=d) for d in (0, 1, 2)], "synthetic-drift")
    hw = make_hardware("5/50", "4x8")
    plan = build("cb", ds, hw, synthetic_trace(ds, 4096, seed=7).frequencies())
    nb = 3 * seg // 256
    drows = []
    for pol in ("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic"):
        s = replay(plan, ds, hw, drift, 256, pol, batches=nb, batching="contiguous", seed=0).summary()
        drows.append(s)
    dd = pd.DataFrame(drows)
    dd["speedup_vs_static"] = dd["mean_us"].iloc[0] / dd["mean_us"]
    print(dd[["policy", "mean_us", "p99_us", "migration_us", "actions", "speedup_vs_static"]].to_string(
        index=False, float_format=lambda x: f"{x:.4g}"))

    print("\n== share of the oracle's gain reached by greedy (small instance: 16 experts, 2x4 mesh, 4 layers)")
    sm = MoEModel("small", num_experts=16, top_k=2, hidden=1024, expert_intermediate=1024, moe_layers=4)
    shw = Hardware(Mesh(2, 4), compute_flops=2e12, link_bw_bytes_per_s=2e10)
    base, shifted_tr = synthetic_trace(sm, 4096, seed=3), synthetic_trace(sm, 4096, seed=3, domain=5)
    splan = build("ep-lpt", sm, shw, base.frequencies())
    o = {p: replay(splan, sm, shw, shifted_tr, 256, p, batches=12, batching="random", seed=1).summary()["mean_us"]
         for p in ("static", "greedy", "oracle")}
    share = (o["static"] - o["greedy"]) / max(o["static"] - o["oracle"], 1e-12)
    print(f"static {o['static']:.1f} us, greedy {o['greedy']:.1f} us, oracle {o['oracle']:.1f} us: greedy reaches "
          f"{100 * share:.0f} % of the oracle's gain (target >= 90 %)")

    dt.to_csv(out / "online_decision_time.csv", index=False)
    shifted.to_csv(out / "online_shifted.csv", index=False)
    dd.to_csv(out / "online_drift.csv", index=False)
    (out / "online_shifted.md").write_text(shifted.to_string(index=False))


if __name__ == "__main__":
    main()
