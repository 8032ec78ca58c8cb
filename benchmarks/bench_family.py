"""The MILP's family with and without the baselines' patterns, per layer, on the shipped instances.

For each layer: the baseline layers (tp, ep, ep-lpt, cb and the hdmoe layer) scored by the
evaluator (``LayerScorer``: mesh mode, spread homes, coalesce=node, the expected workload of the
layer's co-activation sets), then ``solve_layer`` under three families:

- ``before`` (``--before``, run with ``PYTHONPATH`` at a checkout before patterns, e.g. ``git archive
  bc2a67a``): that code's ``solve_layer`` (aligned blocks; warm starts tp, ep, ep-lpt, cb when
  expressible and allowed by symmetry breaking);
- ``blocks``: aligned blocks only, no hdmoe layer (this code with ``MilpOptions(patterns=False)``);
- ``patterns``: blocks + the baselines' patterns + their mirror images, symmetry breaking on (default);
- ``no-flips``: blocks + the patterns as given, symmetry breaking off.

CP-SAT with a deterministic limit (``--det`` deterministic seconds), so the numbers do not depend on
the machine's load. Writes one JSON line per (instance, layer, family) to ``--out``.

Run: ``PYTHONPATH=. python benchmarks/bench_family.py --instances instances/mixtral-8x7b_2.5-75_4x8.toml
--layers 0 8 16 24 --det 5 --out family.jsonl``; ``--summary family.jsonl`` prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import hdmoe_milp as hm
from hdmoe_milp.strategies.block_milp import MilpOptions, SolveParams, solve_layer

FAMILIES = {  # MilpOptions switches of each family
    "blocks": {"patterns": False},
    "patterns": {},
    "no-flips": {"pattern_flips": False},
}


def run_before(path: str, layers: list[int], det: float, out: Path) -> None:
    """The MILP of the code on ``PYTHONPATH`` through the API it had before patterns."""
    p = hm.load_instance(path)
    params = SolveParams(time_limit_s=det, deterministic=True, seed=p.seed)
    for li in layers:
        r = solve_layer(p.model, p.hardware, p.frequencies[li], p.batch, params=params, layer=li,
                        options=MilpOptions(delivery=p.options.resolved_delivery), freqs_all=p.frequencies,
                        coactivation=p.coactivation[li])
        row = {"instance": Path(path).stem, "layer": li, "family": "before", "objective_us": r.objective_s * 1e6,
               "bound_us": r.bound_s * 1e6, "gap": r.gap, "time_s": r.time_s, "status": r.status, "source": r.source,
               "num_binaries": r.num_binaries, "num_vars": r.num_vars, "num_rows": r.num_rows}
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['instance']} L{li} before obj {row['objective_us']:.2f} bound {row['bound_us']:.2f} "
              f"gap {100 * r.gap:.2f}% t {r.time_s:.1f}s", flush=True)


def run(path: str, layers: list[int], det: float, families: list[str], out: Path) -> None:
    from hdmoe_milp.strategies.block_milp import family_model, layer_baselines
    from hdmoe_milp.strategies.block_milp.solve import LayerScorer

    p = hm.load_instance(path)
    m, hw, f = p.model, p.hardware, p.frequencies
    delivery = p.options.resolved_delivery
    params = SolveParams(time_limit_s=det, deterministic=True, seed=p.seed)
    for li in layers:
        co = p.coactivation[li]
        t = time.perf_counter()
        base, hd = layer_baselines(m, hw, f[li], p.batch, backend="cpsat", params=params, layer=li, freqs_all=f,
                                   coactivation=co)
        t_base = time.perf_counter() - t
        bm = family_model(m, hw, f[li], p.batch, MilpOptions(delivery=delivery), co, base)
        score = LayerScorer(bm)
        base_s = {n: score(bm.assign_from_shares(lp.shares)) for n, lp in base.items()}
        for fam in families:
            opts = MilpOptions(**FAMILIES[fam], delivery=delivery)
            given = base if fam != "blocks" else {n: lp for n, lp in base.items() if n != "hdmoe"}
            t = time.perf_counter()
            fm = family_model(m, hw, f[li], p.batch, opts, co, given)
            t_fam = time.perf_counter() - t
            r = solve_layer(m, hw, f[li], p.batch, params=params, options=opts, layer=li, coactivation=co,
                            baselines=given, hdmoe_work_limit=None)
            row = {"instance": Path(path).stem, "layer": li, "family": fam, "objective_us": r.objective_s * 1e6,
                   "bound_us": r.bound_s * 1e6, "gap": r.gap, "time_s": r.time_s, "status": r.status,
                   "source": r.source, "num_binaries": r.num_binaries, "num_vars": r.num_vars,
                   "num_rows": r.num_rows, "columns": fm.blocks.num_blocks, "patterns": fm.blocks.num_patterns,
                   "pattern_pairs": int(fm.family[:, ~fm.blocks.aligned].sum()), "family_build_s": t_fam,
                   "baselines_s": t_base, "hdmoe_info": {k: v for k, v in (hd[1] if hd else {}).items()
                                                         if isinstance(v, (int, float, str))},
                   **{f"base_{n}_us": s * 1e6 for n, s in base_s.items()}}
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['instance']} L{li} {fam:9s} obj {row['objective_us']:.2f} bound {row['bound_us']:.2f} "
                  f"gap {100 * r.gap:.2f}% best-base {min(base_s.values()) * 1e6:.2f} ({min(base_s, key=base_s.get)}) "
                  f"t {r.time_s:.1f}s cols {row['columns']} bins {r.num_binaries}", flush=True)


def summary(path: Path) -> None:
    df = pd.read_json(path, lines=True)
    bases = [c for c in df.columns if c.startswith("base_") and c.endswith("_us")]
    df[bases] = df.groupby(["instance", "layer"])[bases].transform("max")  # the 'before' rows have none
    df["best_base_us"] = df[bases].min(axis=1)
    df["best_base"] = df[bases].idxmin(axis=1).str[5:-3]
    df["vs_best_base_pct"] = 100 * (df["objective_us"] / df["best_base_us"] - 1)
    df["gap_pct"] = 100 * df["gap"]
    g = df.groupby(["instance", "family"])
    tab = g.agg(layers=("layer", "count"), vs_best_med=("vs_best_base_pct", "median"),
                vs_best_max=("vs_best_base_pct", "max"), vs_best_min=("vs_best_base_pct", "min"),
                gap_med=("gap_pct", "median"), gap_max=("gap_pct", "max"), bound_med=("bound_us", "median"),
                obj_med=("objective_us", "median"), time_med=("time_s", "median"), cols=("columns", "median"),
                pairs=("pattern_pairs", "median"), bins=("num_binaries", "median"), rows=("num_rows", "median"))
    pd.set_option("display.width", 250)
    print(tab.round(3).to_string())
    print(df.groupby(["instance", "family"])["best_base"].agg(lambda s: dict(s.value_counts())).to_string())
    wide = df.pivot_table(index=["instance", "layer"], columns="family", values=["objective_us", "bound_us"])
    print(wide.round(3).to_string())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", nargs="*", default=[])
    ap.add_argument("--layers", nargs="*", type=int, default=[0])
    ap.add_argument("--det", type=float, default=5.0, help="CP-SAT deterministic seconds per layer")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=Path("family.jsonl"))
    ap.add_argument("--summary", type=Path)
    ap.add_argument("--before", action="store_true", help="only the family 'before' (old code on PYTHONPATH)")
    a = ap.parse_args()
    for path in a.instances:
        if a.before:
            run_before(path, a.layers, a.det, a.out)
        else:
            run(path, a.layers, a.det, a.families, a.out)
    if a.summary:
        summary(a.summary)


if __name__ == "__main__":
    main()
