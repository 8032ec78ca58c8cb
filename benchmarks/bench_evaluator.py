"""Evaluator throughput: whole-model evaluations per second (all MoE layers of one placement).

Run: python benchmarks/bench_evaluator.py [--repeat N] [--model NAME] [--cpu]
(``--cpu``: rates from process CPU time, steadier on a busy machine than the default wall clock.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hdmoe_milp import EvalOptions, expected_workload, get_model, load_trace, make_hardware, sample_batch
from hdmoe_milp.evaluator import evaluate
from hdmoe_milp.strategies import build
from hdmoe_milp.synthetic import synthetic_trace

TRACES = Path(__file__).resolve().parents[1] / "instances" / "traces"


def rate(fn, repeat: int, clock=time.perf_counter) -> float:
    fn()
    t = clock()
    for _ in range(repeat):
        fn()
    return repeat / (clock() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--model", default=None, help="only the cases of this model")
    ap.add_argument("--cpu", action="store_true", help="process CPU time instead of wall time")
    args = ap.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    cases = [
        ("deepseek-v2-lite", "4x8", load_trace(TRACES / "deepseek_v2_lite_law_4k.npz", 64, 6)),
        ("mixtral-8x7b", "4x8", load_trace(TRACES / "mixtral_reasoning_4k.json.gz", 8, 2)),
        ("deepseek-v3", "8x8", None),
    ]
    print(f"{'model':18s} {'mesh':5s} {'strategy':8s} {'workload':16s} {'delivery':8s} {'evals/s':>9s} "
          f"{'layer-evals/s':>14s}")
    for name, mesh, trace in cases:
        if args.model and name != args.model:
            continue
        model = get_model(name)
        hw = make_hardware("5/50", mesh)
        tr = trace or synthetic_trace(model, 2048, seed=0)
        freqs = tr.frequencies()
        for strat in ("tp", "ep-lpt", "cb"):
            p = build(strat, model, hw, freqs)
            for label, wl in (("observed B=128", sample_batch(tr, 128, "random", 0)),
                              ("expected B=128", expected_workload(tr, 128))):
                for delivery in ("tree", "unicast"):
                    opts = EvalOptions(delivery=delivery)
                    r = rate(lambda p=p, wl=wl, opts=opts, m=model, h=hw: evaluate(p, m, h, wl, opts), args.repeat,
                             clock)
                    print(f"{name:18s} {mesh:5s} {strat:8s} {label:16s} {delivery:8s} {r:9.1f} "
                          f"{r * model.moe_layers:14.0f}")


if __name__ == "__main__":
    main()
