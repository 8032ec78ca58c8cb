"""Peak memory of a long replay: does it stay flat as the number of batches grows?

Each run is a fresh subprocess (so peaks do not mix) that replays ``--batches`` batches of a small
batch on Mixtral-8x7B (synthetic trace, 2x2 mesh, ``cb`` plan) under one online policy, and reports

- ``maxrss_mb``: the process's peak resident set size (``resource.getrusage``), interpreter and
  imports included, next to ``maxrss_before_mb`` (the same just before the replay starts), and
- with ``--tracemalloc``, ``tracemalloc_peak_mb``: the peak of Python-tracked allocations (numpy
  arrays included) during the replay itself (tracing makes the replay many times slower).

Run: ``PYTHONPATH=. python benchmarks/bench_memory.py`` (about a minute and a half; ``--counts 1000
10000``, ``--policy greedy``, ``--batch 16``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time, tracemalloc
import hdmoe_milp as hm
from hdmoe_milp.instance import Settings

batches, batch, policy, trace_py = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
problem = Settings("bench-memory", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=4096).to_problem()
plan = hm.place(problem, "cb")
before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if trace_py:
    tracemalloc.start()
t0 = time.perf_counter()
result = hm.replay(problem, plan, policy=policy, batches=batches, batch=batch, batching="contiguous",
                   progress=False)
wall = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if trace_py else float("nan")
print(json.dumps({"batches": batches, "batch": batch, "policy": policy, "wall_s": wall,
                  "tracemalloc_peak_mb": peak / 2**20, "maxrss_before_mb": before_mb,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "mean_us": result.summary()["mean_us"]}))
"""


def run(batches: int, batch: int, policy: str, trace_py: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(batches), str(batch), policy, str(int(trace_py))],
                         check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--policy", default="greedy")
    ap.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (many times slower)")
    args = ap.parse_args()
    rows = [run(n, args.batch, args.policy, args.tracemalloc) for n in args.counts]
    print(f"policy={args.policy} batch={args.batch} model=mixtral-8x7b mesh=2x2")
    print(f"{'batches':>8} {'wall_s':>8} {'maxrss_before_MB':>17} {'maxrss_MB':>10} {'tracemalloc_peak_MB':>20}")
    for r in rows:
        print(f"{r['batches']:>8} {r['wall_s']:>8.1f} {r['maxrss_before_mb']:>17.1f} {r['maxrss_mb']:>10.1f} "
              f"{r['tracemalloc_peak_mb']:>20.2f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"peak RSS at {b['batches']} vs {a['batches']} batches: {b['maxrss_mb'] / a['maxrss_mb']:.3f}x "
              f"(growth during the replay: {a['maxrss_mb'] - a['maxrss_before_mb']:.1f} MB vs "
              f"{b['maxrss_mb'] - b['maxrss_before_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
