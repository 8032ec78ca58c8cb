"""Hardening (issue 13): every bad input is one line naming the field, exit status 2, no traceback;
saves never lose the previous file; edge geometries answer or refuse clearly."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hdmoe_milp as hm
from hdmoe_milp.cli import main
from hdmoe_milp.errors import InputError
from hdmoe_milp.instance import Settings
from hdmoe_milp.placement import Placement, write_atomic
from hdmoe_milp.solvers import SolveParams, available_backends
from hdmoe_milp.strategies import STRATEGIES

from .conftest import ROOT, TRACES

MX = ["--model", "mixtral-8x7b", "--mesh", "2x2"]  # 32 layers, 8 experts, top-2, 4 nodes
BASE_TOML = '[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with a valid plan (Mixtral on 2x2) and a valid small JSON trace."""
    d = tmp_path_factory.mktemp("bad")
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=256).to_problem()
    hm.place(problem, "tp").save(d / "good_plan.json")
    rng = np.random.default_rng(0)
    trace = {str(li): [rng.choice(8, 2, replace=False).tolist() for _ in range(16)] for li in range(32)}
    (d / "good_trace.json").write_text(json.dumps(trace))
    return d


# --- builders: each returns argv for `main`, given the module's folder -------------------------------


def _toml(body: str, name: str = "x.toml"):
    def build(d: Path) -> list[str]:
        p = d / f"inst_{abs(hash(body))}_{name}"
        p.write_bytes(body.encode("utf-8") if isinstance(body, str) else body)
        return ["evaluate", "--instance", str(p), "--strategy", "tp"]
    return build


def _hw(line: str):
    return _toml(BASE_TOML + line + "\n")


def _sec(section: str, line: str):
    return _toml(BASE_TOML + f"[{section}]\n{line}\n")


def _trace_json(obj, suffix: str = ".json", raw: bytes | None = None, cmd: str = "evaluate"):
    def build(d: Path) -> list[str]:
        data = raw if raw is not None else json.dumps(obj).encode()
        p = d / f"trace_{abs(hash(data))}{suffix}"
        p.write_bytes(gzip.compress(data) if suffix.endswith(".gz") and raw is None else data)
        extra = ["--strategy", "tp"] if cmd == "evaluate" else []
        return [cmd, *MX, "--trace", str(p), *extra]
    return build


def _layers(fn, n: int = 32):
    """A JSON trace whose layer li is fn(li) (others valid)."""
    return {str(li): fn(li) for li in range(n)}


def _ok(li):
    return [[0, 1], [2, 3], [4, 5]]


def _bad_layer(bad, at: int = 3):
    return _layers(lambda li: bad if li == at else _ok(li))


def _npz(arrays: dict | None = None, raw: bytes | None = None):
    def build(d: Path) -> list[str]:
        p = d / f"npz_{len(os.listdir(d))}.npz"
        if raw is not None:
            p.write_bytes(raw)
        else:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            p.write_bytes(buf.getvalue())
        return ["evaluate", *MX, "--trace", str(p), "--strategy", "tp"]
    return build


def _plan(mutate, raw: str | None = None):
    def build(d: Path) -> list[str]:
        p = d / f"plan_{len(os.listdir(d))}.json"
        if raw is not None:
            p.write_text(raw)
        else:
            plan = json.loads((d / "good_plan.json").read_text())
            mutate(plan)
            p.write_text(json.dumps(plan))
        return ["evaluate", "--plan", str(p)]
    return build


def _plot_csv(data: bytes, kind: str = "tbt"):
    def build(d: Path) -> list[str]:
        p = d / f"table_{abs(hash(data))}.csv"
        p.write_bytes(data)
        return ["plot", kind, str(p), "--out", str(d / "fig.png")]
    return build


_RESULTS = (ROOT / "docs" / "results" / "results.csv").read_bytes()


def _edit_results(column: str, value: str) -> bytes:
    """docs/results/results.csv with ``column`` of its first row set to ``value``."""
    lines = _RESULTS.decode().splitlines()
    head = lines[0].split(",")
    row = lines[1].split(",")
    row[head.index(column)] = value
    return "\n".join([lines[0], ",".join(row), *lines[2:]]).encode() + b"\n"


def _blank_column(column: str) -> bytes:
    """docs/results/results.csv with ``column`` empty in every row."""
    lines = _RESULTS.decode().splitlines()
    col = lines[0].split(",").index(column)
    rows = [ln.split(",") for ln in lines[1:]]
    for r in rows:
        r[col] = ""
    return "\n".join([lines[0], *[",".join(r) for r in rows]]).encode() + b"\n"


def _only_tp() -> bytes:
    lines = _RESULTS.decode().splitlines()
    col = lines[0].split(",").index("strategy")
    return "\n".join([lines[0], *[ln for ln in lines[1:] if ln.split(",")[col] == "tp"]]).encode() + b"\n"


def _plot_results(*flags: str, kind: str = "tbt"):
    return lambda d: ["plot", kind, str(ROOT / "docs" / "results" / "results.csv"), *flags]


def _flags(*args: str):
    return lambda d: list(args)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _set(path: list, value):
    def mutate(plan):
        obj = plan
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return mutate


def _existing(cmd: str, flag: str):
    def build(d: Path) -> list[str]:
        p = d / "exists.json"
        p.write_text("{}")
        if cmd == "solve":
            return ["solve", *MX, "--no-baselines", flag, str(p)]
        return ["evaluate", *MX, "--strategy", "tp", flag, str(p)]
    return build


def _missing_dir(cmd: str, flag: str):
    def build(d: Path) -> list[str]:
        p = str(d / "no" / "such" / "dir" / "p.json")
        return ["solve", *MX, flag, p] if cmd == "solve" else ["evaluate", *MX, "--strategy", "tp", flag, p]
    return build


CASES = {
    # --- flags -------------------------------------------------------------------------------------
    "flag-seed-negative": (_flags("evaluate", *MX, "--seed", "-1"), "--seed"),
    "flag-seed-float": (_flags("evaluate", *MX, "--seed", "1.5"), "--seed"),
    "flag-seed-text": (_flags("evaluate", *MX, "--seed", "abc"), "--seed"),
    # 2**63 - 1 is the largest seed; it once came back as 2**63 through a float and failed downstream
    "flag-seed-too-large": (_flags("solve", *MX, "--no-baselines", "--seed", str(2**63)), "--seed"),
    "toml-seed-float-huge": (_toml(BASE_TOML + "\n[workload]\nseed = 1e300\n"), "[workload].seed"),
    # the block family of a 32x32 mesh takes minutes per layer before any search: refused up front
    "solve-mesh-too-large": (_flags("solve", "--model", "mixtral-8x7b", "--mesh", "32x32", "--no-baselines"),
                             "--mesh"),
    "solve-toml-mesh-too-large": (lambda d: ["solve", "--instance", _toml(BASE_TOML.replace('"2x2"', '"32x32"'))(d)[2],
                                             "--no-baselines"], "[hardware].mesh"),
    "flag-batch-zero": (_flags("evaluate", *MX, "--batch", "0"), "--batch"),
    "flag-batch-negative": (_flags("evaluate", *MX, "--batch", "-4"), "--batch"),
    "flag-batch-nan": (_flags("evaluate", *MX, "--batch", "nan"), "--batch"),
    "flag-batch-inf": (_flags("evaluate", *MX, "--batch", "inf"), "--batch"),
    "flag-batch-text": (_flags("evaluate", *MX, "--batch", "many"), "--batch"),
    "flag-batch-full-width": (_flags("evaluate", *MX, "--batch", "\uff11\uff16"), "--batch"),
    "flag-seed-full-width": (_flags("evaluate", *MX, "--seed", "\uff11"), "--seed"),
    "plot-layer-full-width": (_flags("plot", "placement", "p.json", "--layer", "\uff11"), "--layer"),
    "flag-batch-fraction-random": (_flags("evaluate", *MX, "--batching", "random", "--batch", "1.5"), "--batch"),
    "flag-batch-memory-random": (_flags("evaluate", *MX, "--batching", "random", "--batch", "1e8"), "--batch"),
    "flag-time-limit-negative": (_flags("evaluate", *MX, "--strategy", "hdmoe", "--time-limit", "-1"),
                                 "--time-limit"),
    "flag-time-limit-zero": (_flags("evaluate", *MX, "--time-limit", "0"), "--time-limit"),
    "flag-time-limit-nan": (_flags("evaluate", *MX, "--strategy", "hdmoe", "--time-limit", "nan"), "--time-limit"),
    "flag-work-limit-negative": (_flags("evaluate", *MX, "--work-limit", "-1"), "--work-limit"),
    "flag-work-limit-inf": (_flags("evaluate", *MX, "--work-limit", "inf"), "--work-limit"),
    # limits past any real run (they ran on for ever; SCIP failed on its own range and exited 0)
    "flag-time-limit-huge": (_flags("evaluate", *MX, "--strategy", "hdmoe", "--time-limit", "1e300"), "--time-limit"),
    "solve-time-limit-huge": (_flags("solve", *MX, "--backend", "scip", "--time-limit", "1e21"), "--time-limit"),
    "flag-work-limit-huge": (_flags("evaluate", *MX, "--strategy", "hdmoe", "--work-limit", "1e300"), "--work-limit"),
    "flag-threads-huge": (_flags("solve", *MX, "--no-baselines", "--threads", str(2**63 - 1)), "--threads"),
    "flag-hop-latency-huge": (_flags("evaluate", *MX, "--hop-latency-ns", "1e300"), "--hop-latency-ns"),
    "bench-time-limit-huge": (_flags("bench", "--quick", "--out", "b", "--time-limit", "1e300"), "--time-limit"),
    "flag-strategy-empty": (_flags("evaluate", *MX, "--strategy", ""), "--strategy"),
    "flag-lns-patience-negative": (_flags("solve", *MX, "--lns-patience", "-1"), "--lns-patience"),
    "flag-lns-patience-fraction": (_flags("solve", *MX, "--lns-patience", "2.5"), "--lns-patience"),
    "flag-lns-patience-text": (_flags("solve", *MX, "--lns-patience", "often"), "--lns-patience"),
    "flag-capacity-zero": (_flags("evaluate", *MX, "--capacity-gb", "0"), "--capacity-gb"),
    "flag-capacity-nan": (_flags("evaluate", *MX, "--capacity-gb", "nan"), "--capacity-gb"),
    "flag-capacity-too-small": (_flags("evaluate", *MX, "--capacity-gb", "0.01"), "capacity"),
    "flag-hop-negative": (_flags("evaluate", *MX, "--hop-latency-ns", "-1"), "--hop-latency-ns"),
    "flag-hop-inf": (_flags("evaluate", *MX, "--hop-latency-ns", "inf"), "--hop-latency-ns"),
    "flag-mesh-zero": (_flags("evaluate", "--mesh", "0x8"), "--mesh"),
    "flag-mesh-malformed": (_flags("evaluate", "--mesh", "4by8"), "--mesh"),
    "flag-mesh-empty": (_flags("evaluate", "--mesh", ""), "--mesh"),
    "flag-mesh-memory": (_flags("evaluate", "--mesh", "1000x1000"), "--mesh"),
    "flag-trace-fifo": (lambda d: (os.path.exists(d / "fifo") or os.mkfifo(d / "fifo"), ["evaluate", *MX, "--trace",
                                                                                         str(d / "fifo")])[1],
                        "--trace"),
    "toml-mesh-memory": (_toml(BASE_TOML.replace('"2x2"', '"2000x2000"')), "[hardware].mesh"),
    "npz-object-array": (_npz({"topk_ids": np.array([[[0, 1]]], dtype=object)}), "topk_ids"),
    "flag-model-unknown": (_flags("evaluate", "--model", "gpt-5"), "--model"),
    "flag-hw-unknown": (_flags("evaluate", "--hw", "3/30x"), "--hw"),
    "flag-mode-unknown": (_flags("evaluate", *MX, "--mode", "fast"), "--mode"),
    "flag-delivery-unknown": (_flags("evaluate", *MX, "--delivery", "pigeon"), "--delivery"),
    "flag-home-unknown": (_flags("evaluate", *MX, "--home", "moon"), "--home"),
    "flag-batching-unknown": (_flags("evaluate", *MX, "--batching", "sideways"), "--batching"),
    "flag-strategy-unknown": (_flags("evaluate", *MX, "--strategy", "magic"), "--strategy"),
    "flag-strategy-twice": (_flags("evaluate", *MX, "--strategy", "tp,tp"), "--strategy"),
    "flag-strategy-empty-item": (_flags("evaluate", *MX, "--strategy", "tp,"), "--strategy"),
    "flag-replica-rule-unknown": (_flags("evaluate", *MX, "--replica-rule", "closest"), "--replica-rule"),
    "flag-backend-unknown": (_flags("solve", *MX, "--no-baselines", "--backend", "gurobi"), "--backend"),
    "flag-executor-unknown": (_flags("solve", *MX, "--no-baselines", "--executor", "slurm"), "--executor"),
    "flag-layers-text": (_flags("solve", *MX, "--no-baselines", "--layers", "first"), "--layers"),
    "flag-layers-range": (_flags("solve", *MX, "--no-baselines", "--layers", "0,99"), "--layers"),
    "flag-layers-range-syntax": (_flags("solve", *MX, "--no-baselines", "--layers", "1-3"), "e.g. --layers 0,5,12"),
    "solve-out-image-name": (lambda d: ["solve", *MX, "--no-baselines", "--out", str(d / "plan.png")], ".json"),
    "save-plan-image-name": (lambda d: ["evaluate", *MX, "--strategy", "tp", "--save-plan", str(d / "p.svg")],
                             "--save-plan"),
    # a value the instance gives, checked against a flag: named as the instance's key
    "toml-batch-fraction-random-flag": (lambda d: [*_toml(BASE_TOML + "\n[workload]\nbatch = 12.5\n")(d),
                                                   "--batching", "random"], "[workload].batch"),
    "stats-against-one-layer": (lambda d: (_write(d / "one.json", json.dumps({"0": [[0, 1]]})),
                                           ["stats", *MX, "--against", str(d / "one.json")])[1], "--against"),
    "replay-plan-trace-one-layer": (lambda d: (_write(d / "one.json", json.dumps({"0": [[0, 1]]})),
                                               ["replay", *MX, "--batches", "2", "--plan-trace",
                                                str(d / "one.json")])[1], "--plan-trace"),
    "replay-batching-unknown-lists-two": (_flags("replay", *MX, "--batches", "2", "--batching", "foo"),
                                          "allowed: contiguous, random)"),
    "replay-policy-all-and-more": (_flags("replay", *MX, "--batches", "2", "--policy", "all,static"), "--policy"),
    "plot-csv-wrong-columns": (_plot_csv(b"a,b\n1,2\n"), "file"),
    "plot-csv-binary": (_plot_csv(b"\x00\x01\xff garbage"), "file"),
    "plot-csv-empty": (_plot_csv(b""), "file"),
    "plot-csv-header-only": (_plot_csv(_RESULTS.split(b"\n", 1)[0] + b"\n"), ".csv: has no rows"),  # names it
    "plot-out-folder": (lambda d: ["plot", "link-load", str(d / "good_plan.json"), "--out", str(d)],
                        "is a directory (give a file name"),
    "solve-out-no-name": (_flags("solve", *MX, "--out", ".json"), "'.json' has no name"),
    "toml-capacity-tiny": (_toml(BASE_TOML + "dram_capacity_gb = 0.001\n"),
                           "instance inst_"),  # named as every instance key is, in GB that are not 0.00
    # tables edited by hand: a value that is no number, NaN, a zero reference, rows the figure lacks
    "plot-csv-batch-text": (_plot_csv(_edit_results("batch", "many")), "file"),
    "plot-csv-tbt-nan": (_plot_csv(_edit_results("tbt_us", "nan")), "file"),
    "plot-csv-tbt-zero": (_plot_csv(_edit_results("tbt_us", "0")), "file"),
    "plot-csv-ablation-tp-only": (_plot_csv(_only_tp(), kind="ablation"), "file"),
    "plot-csv-solver-gap-text": (_plot_csv(b"layer,gap,time_s\n0,x,1.0\n", kind="solver"), "file"),
    # tables a figure once drew wrongly or crashed on: repeated rows, no static part, a blank name, impossible values
    "plot-csv-repeated-rows": (_plot_csv(_RESULTS + b"\n".join(_RESULTS.splitlines()[1:3]) + b"\n",
                                         kind="decomposition"), "repeats"),
    "plot-csv-no-static-part": (_plot_csv(_RESULTS.replace(b",static,", b",online,"), kind="ablation"), "static"),
    "plot-csv-blank-mesh": (_plot_csv(_edit_results("mesh", "")), "mesh"),
    "plot-csv-batch-zero": (_plot_csv(_edit_results("batch", "0")), "batch"),
    "plot-csv-compute-negative": (_plot_csv(_edit_results("moe_compute_us", "-1"), kind="decomposition"),
                                  "moe_compute_us"),
    "plot-csv-decomposition-missing": (_plot_csv(_blank_column("dispatch_us"), kind="decomposition"),
                                       "decomposition"),
    "plot-csv-solver-time-negative": (_plot_csv(b"layer,gap,time_s\n0,0.1,-1\n", kind="solver"), "time_s"),
    "plot-csv-online-latency-nan": (_plot_csv(b"policy,batch,latency_us,actions\nstatic,0,nan,0\n", kind="online"),
                                    "latency_us"),
    # flags a figure does not read were silently ignored (an invalid --mesh drew the plan's own mesh)
    "plot-plan-kind-mesh": (lambda d: ["plot", "node-load", str(d / "good_plan.json"), "--mesh", "axb", "--out",
                                       str(d / "fig.png")], "--mesh"),
    "plot-plan-kind-batch": (lambda d: ["plot", "placement", str(d / "good_plan.json"), "--batch", "16", "--out",
                                        str(d / "fig.png")], "--batch"),
    "plot-csv-kind-layer": (_plot_results("--out", "x.png", "--layer", "999"), "--layer"),
    # values the plan file records, named as the plan's keys (not as flags nobody gave), and no silent defaults
    "plan-meta-batch-fraction": (_plan(lambda d: (_set(["meta", "problem", "batching"], "random")(d),
                                                  _set(["meta", "problem", "batch"], 12.5)(d))),
                                 "meta.problem.batch"),
    "plan-without-problem": (_plan(lambda d: d["meta"].pop("problem")), "--model"),
    "plan-num-nodes-mismatch": (_plan(lambda d: d.__setitem__("num_nodes", 2 * d["num_nodes"])), "num_nodes"),
    # a misspelt key in the plan's record was ignored, and its default used (context_len 1024)
    "plan-meta-misspelt-key": (_plan(lambda d: d["meta"]["problem"].__setitem__(
        "context_length", d["meta"]["problem"].pop("context_len"))),
        "meta.problem: has unknown key(s) 'context_length'"),
    "plan-meta-hardware-unknown-key": (
        _plan(lambda d: d["meta"]["problem"]["hardware"].__setitem__("hop_latency_ns", 5)),
        "meta.problem.hardware: has unknown key(s) 'hop_latency_ns'"),
    # 4.0 where an integer belongs: refused, and the message says how to write it (it read "must be a whole number")
    "plan-num-nodes-float": (_plan(lambda d: d.__setitem__("num_nodes", float(d["num_nodes"]))),
                             "num_nodes: must be an integer, got the float"),
    "plan-expert-of-integral-float": (_plan(lambda d: d["layers"][0]["expert_of"].__setitem__(0, 0.0)),
                             "expert_of: holds 0.0, not an integer"),
    # a whole number too large for a float (JSON reads it exactly) gave an OverflowError traceback
    **{f"plan-meta-huge-int-{key.rsplit('.', 1)[-1]}": (_plan(_set(["meta", "problem", *key.split(".")], 10**400)),
                                                        f"meta.problem.{key}")
       for key in ("batch", "hardware.hop_latency_s", "hardware.dram_capacity_bytes", "hardware.compute_flops",
                   "hardware.link_bw_bytes_per_s")},
    "plan-meta-capacity-too-large": (_plan(_set(["meta", "problem", "hardware", "dram_capacity_bytes"], 1e31)),
                                     "dram_capacity_bytes: must be <= 1e+30, got 1e+31"),  # bytes, as the key
    "replay-policy-empty-item": (_flags("replay", *MX, "--batches", "1", "--policy", "static,"),
                                 "--policy: has an empty item"),
    "evaluate-strategy-empty-item": (_flags("evaluate", *MX, "--strategy", ",ep"), "--strategy: has an empty item"),
    "trace-is-a-plan-file": (lambda d: ["evaluate", *MX, "--trace", str(d / "good_plan.json"), "--strategy", "tp"],
                             "is a plan file"),
    "plan-package-version-number": (_plan(lambda d: d.__setitem__("package_version", 0.8)), "package_version"),
    "plot-out-missing-dir": (_plot_results("--out", "no/such/dir/x.png"), "--out"),
    "plot-out-unknown-format": (_plot_results("--out", "x.notanimage"), "--out"),
    "plot-batch-nan": (_plot_results("--out", "x.png", "--batch", "nan"), "--batch"),
    "plot-batch-absent": (_plot_results("--out", "x.png", "--batch", "7"), "--batch"),
    "plot-model-absent": (_plot_results("--out", "x.png", "--model", "gpt-5"), "--model"),
    "bench-models-unknown": (_flags("bench", "--quick", "--out", "b", "--models", "gpt-5"), "--models"),
    "bench-hws-unknown": (_flags("bench", "--quick", "--out", "b", "--hws", "9/x"), "--hws"),
    "bench-meshes-malformed": (_flags("bench", "--quick", "--out", "b", "--meshes", "3by3"), "--meshes"),
    "bench-batches-zero": (_flags("bench", "--quick", "--out", "b", "--batches", "0"), "--batches"),
    "bench-jobs-zero": (_flags("bench", "--quick", "--out", "b", "--jobs", "0"), "--jobs"),
    "bench-time-limit-negative": (_flags("bench", "--quick", "--out", "b", "--time-limit", "-1"), "--time-limit"),
    "bench-online-batches-negative": (_flags("bench", "--quick", "--out", "b", "--online-batches", "-1"),
                                      "--online-batches"),
    "flag-save-plan-several": (_flags("evaluate", *MX, "--strategy", "tp,ep", "--save-plan", "x.json"),
                               "--save-plan"),
    "flag-save-plan-missing-dir": (_missing_dir("evaluate", "--save-plan"), "--save-plan"),
    "flag-save-plan-is-dir": (lambda d: ["evaluate", *MX, "--strategy", "tp", "--save-plan", str(d)], "--save-plan"),
    "flag-save-plan-exists": (_existing("evaluate", "--save-plan"), "--save-plan"),
    "flag-plan-and-strategy": (lambda d: ["evaluate", "--plan", str(d / "good_plan.json"), "--strategy", "tp"],
                               "--strategy"),
    "flag-plan-and-save-plan": (lambda d: ["evaluate", "--plan", str(d / "good_plan.json"), "--save-plan",
                                           str(d / "other.json")], "--save-plan"),
    "replay-plan-and-plan-trace": (lambda d: ["replay", "--plan", str(d / "good_plan.json"), "--plan-trace",
                                              str(d / "good_trace.json")], "--plan-trace"),
    "replay-plan-and-plan-strategy": (lambda d: ["replay", "--plan", str(d / "good_plan.json"), "--plan-strategy",
                                                 "ep"], "--plan-strategy"),
    "replay-plan-strategy-unknown": (_flags("replay", *MX, "--plan-strategy", "magic"), "--plan-strategy"),
    "flag-plan-missing": (_flags("evaluate", "--plan", "/no/such/plan.json"), "--plan"),
    "flag-plan-is-dir": (lambda d: ["evaluate", "--plan", str(d)], "--plan"),
    "flag-instance-missing": (_flags("evaluate", "--instance", "/no/such.toml"), "--instance"),
    "flag-instance-is-dir": (lambda d: ["evaluate", "--instance", str(d)], "--instance"),
    "flag-trace-missing": (_flags("evaluate", *MX, "--trace", "/no/such/trace.json"), "--trace"),
    "flag-trace-is-dir": (lambda d: ["evaluate", *MX, "--trace", str(d)], "--trace"),
    "flag-unknown-option": (_flags("evaluate", "--frobnicate"), "--frobnicate"),
    "flag-unknown-command": (_flags("optimise"), "optimise"),
    "replay-batch-zero": (_flags("replay", *MX, "--batch", "0"), "--batch"),
    "replay-batch-float": (_flags("replay", *MX, "--batch", "2.5"), "--batch"),
    "replay-batches-zero": (_flags("replay", *MX, "--batches", "0"), "--batches"),
    "replay-batch-memory": (_flags("replay", *MX, "--batch", "100000000", "--batches", "1"), "--batch"),
    "replay-policy-unknown": (_flags("replay", *MX, "--policy", "psychic"), "--policy"),
    "replay-batching-expected": (_flags("replay", *MX, "--batching", "expected"), "--batching"),
    "replay-plan-trace-missing": (_flags("replay", *MX, "--plan-trace", "/no/such.json"), "--plan-trace"),
    "solve-gap-one": (_flags("solve", *MX, "--gap", "1"), "--gap"),
    "solve-gap-negative": (_flags("solve", *MX, "--gap", "-0.1"), "--gap"),
    "solve-threads-zero": (_flags("solve", *MX, "--threads", "0"), "--threads"),
    "solve-jobs-zero": (_flags("solve", *MX, "--jobs", "0"), "--jobs"),
    "solve-time-limit-nan": (_flags("solve", *MX, "--time-limit", "nan"), "--time-limit"),
    "solve-out-missing-dir": (_missing_dir("solve", "--out"), "--out"),
    "solve-out-exists": (_existing("solve", "--out"), "--out"),
    "stats-against-missing": (_flags("stats", *MX, "--against", "/no/such.npz"), "--against"),
    "stats-hw-not-read": (_flags("stats", *MX, "--hw", "5/50"), "--hw"),
    "evaluate-plan-time-limit": (_flags("evaluate", "--plan", "/no/such.json", "--time-limit", "3"), "--time-limit"),
    "evaluate-plan-work-limit": (_flags("evaluate", "--plan", "/no/such.json", "--work-limit", "3"), "--work-limit"),
    "replay-plan-time-limit": (_flags("replay", "--plan", "/no/such.json", "--time-limit", "5"), "--time-limit"),
    "evaluate-every-misfit-named": (_flags("evaluate", "--model", "mixtral-8x7b", "--mesh", "4x4", "--strategy",
                                           "eplb-redundant,eplb", "--capacity-gb", "6"), "eplb does not fit either"),
    "evaluate-ep-time-limit": (_flags("evaluate", *MX, "--strategy", "ep,cb", "--time-limit", "3"), "--time-limit"),
    "evaluate-milp-work-limit": (_flags("evaluate", *MX, "--strategy", "milp", "--work-limit", "3"), "--work-limit"),
    "replay-cb-time-limit": (_flags("replay", *MX, "--time-limit", "5"), "--time-limit"),
    # --- instance files ------------------------------------------------------------------------------
    "toml-syntax": (_toml("[model\npreset = 1\n"), "instance"),
    # tomllib names a line and column only: the key the line sets is named, with the line
    "toml-key-twice": (_sec("workload", "batch = 64\nbatch = 32"), "[workload].batch: is not valid TOML: Cannot "
                       "overwrite a value (line 8: 'batch = 32') (a key given twice in its table: keep one)"),
    "toml-bool-capital": (_sec("workload", "seed = True"), "[workload].seed: is not valid TOML: Invalid value"),
    "toml-table-twice": (_toml(BASE_TOML + "[model]\n"), "[model]: is not valid TOML: Cannot declare"),
    "toml-not-utf8": (_toml(b"\xff\xfe[model]\n"), "instance"),
    "toml-top-level-model": (_toml('model = "mixtral-8x7b"\n' + BASE_TOML), "model"),
    "toml-model-not-table": (_toml('model = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'), "model"),
    "toml-unknown-section": (_toml(BASE_TOML + "[solver]\nx = 1\n"), "solver"),
    "toml-unknown-top-key": (_toml("colour = 1\n" + BASE_TOML), "colour"),
    "toml-unknown-key": (_hw("foo = 1"), "foo"),
    "toml-missing-preset": (_toml('[model]\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'), "[model].preset"),
    "toml-missing-mesh": (_toml('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\n'),
                          "[hardware].mesh"),
    "toml-preset-number": (_toml('[model]\npreset = 7\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'),
                           "[model].preset"),
    "toml-preset-unknown": (_toml('[model]\npreset = "gpt"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'),
                            "[model].preset"),
    "toml-hw-unknown": (_toml('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "1/"\nmesh = "2x2"\n'),
                        "[hardware].preset"),
    "toml-hw-number": (_toml('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = 5.50\nmesh = "2x2"\n'),
                       "[hardware].preset"),
    "toml-mesh-zero": (_toml(BASE_TOML.replace('"2x2"', '"0x2"')), "[hardware].mesh"),
    "toml-mesh-number": (_toml(BASE_TOML.replace('"2x2"', "22")), "[hardware].mesh"),
    "toml-capacity-zero": (_hw("dram_capacity_gb = 0"), "[hardware].dram_capacity_gb"),
    "toml-capacity-string": (_hw('dram_capacity_gb = "8"'), "[hardware].dram_capacity_gb"),
    "toml-capacity-too-small": (_hw("dram_capacity_gb = 0.001"), "capacity"),
    "toml-dram-bw-zero": (_hw("dram_bw_gbps = 0"), "[hardware].dram_bw_gbps"),
    "toml-dram-bw-inf": (_hw("dram_bw_gbps = inf"), "[hardware].dram_bw_gbps"),
    "toml-dram-bw-bool": (_hw("dram_bw_gbps = true"), "[hardware].dram_bw_gbps"),
    "toml-hop-negative": (_hw("hop_latency_ns = -1"), "[hardware].hop_latency_ns"),
    "toml-hop-nan": (_hw("hop_latency_ns = nan"), "[hardware].hop_latency_ns"),
    "toml-hop-huge": (_hw("hop_latency_ns = 1e300"), "[hardware].hop_latency_ns"),
    "toml-dram-bw-subnormal": (_hw("dram_bw_gbps = 5e-324"), "[hardware].dram_bw_gbps"),
    "toml-dram-bw-huge": (_hw("dram_bw_gbps = 1e308"), "[hardware].dram_bw_gbps"),
    "toml-batch-fraction-sampled": (_sec("workload", 'batch = 12.5\nbatching = "random"'), "[workload].batch"),
    "toml-batch-below-one": (_sec("workload", "batch = 0.5"), "[workload].batch"),
    "toml-batch-bool": (_sec("workload", "batch = true"), "[workload].batch"),
    "toml-batch-zero": (_sec("workload", "batch = 0"), "[workload].batch"),
    "toml-batch-negative": (_sec("workload", "batch = -8"), "[workload].batch"),
    "toml-batch-string": (_sec("workload", 'batch = "128"'), "[workload].batch"),
    "toml-batch-nan": (_sec("workload", "batch = nan"), "[workload].batch"),
    "toml-batch-array": (_sec("workload", "batch = [1, 2]"), "[workload].batch"),
    "toml-batch-memory": (_sec("workload", 'batch = 100000000\nbatching = "random"'), "[workload].batch"),
    "toml-seed-float": (_sec("workload", "seed = 1.7"), "[workload].seed"),
    "toml-seed-negative": (_sec("workload", "seed = -1"), "[workload].seed"),
    "toml-seed-string": (_sec("workload", 'seed = "abc"'), "[workload].seed"),
    "toml-seed-bool": (_sec("workload", "seed = false"), "[workload].seed"),
    "toml-synthetic-zero": (_sec("workload", "synthetic_tokens = 0"), "[workload].synthetic_tokens"),
    "toml-synthetic-float": (_sec("workload", "synthetic_tokens = 100.5"), "[workload].synthetic_tokens"),
    "toml-synthetic-huge": (_sec("workload", "synthetic_tokens = 100000000000"), "[workload].synthetic_tokens"),
    "toml-batching-unknown": (_sec("workload", 'batching = "sideways"'), "[workload].batching"),
    "toml-batching-number": (_sec("workload", "batching = 3"), "[workload].batching"),
    "toml-trace-missing": (_sec("workload", 'trace = "nope.npz"'), "[workload].trace"),
    "toml-trace-number": (_sec("workload", "trace = 5"), "[workload].trace"),
    "toml-mode-unknown": (_sec("evaluator", 'mode = "fast"'), "[evaluator].mode"),
    "toml-delivery-unknown": (_sec("evaluator", 'delivery = "pigeon"'), "[evaluator].delivery"),
    "toml-home-number": (_sec("evaluator", "home = 1"), "[evaluator].home"),
    "toml-context-negative": (_sec("evaluator", "context_len = -1"), "[evaluator].context_len"),
    "toml-context-float": (_sec("evaluator", "context_len = 10.5"), "[evaluator].context_len"),
    "toml-context-huge": (_sec("evaluator", "context_len = 1000000000000"), "[evaluator].context_len"),
    "toml-name-number": (_toml("name = 5\n" + BASE_TOML), "name"),
    "toml-workload-not-table": (_toml('workload = "big"\n' + BASE_TOML), "workload"),
    # --- traces --------------------------------------------------------------------------------------
    "trace-dict-values": (_trace_json(_layers(lambda li: {"a": 1})), "layer 0"),
    "trace-id-overflow": (_trace_json(_bad_layer([[0, 2**70]])), "layer 3"),
    "trace-id-float": (_trace_json(_bad_layer([[0.5, 1]])), "layer 3"),
    "trace-id-whole-float": (_trace_json(_bad_layer([[0.0, 1]])), "layer 3"),
    "trace-id-bool": (_trace_json(_bad_layer([[True, 1]])), "layer 3"),
    "trace-id-string": (_trace_json(_bad_layer([["0", 1]])), "layer 3"),
    "trace-id-null": (_trace_json(_bad_layer([[None, 1]])), "layer 3"),
    "trace-id-negative": (_trace_json(_bad_layer([[-1, 1]])), "layer 3"),
    "trace-id-too-large": (_trace_json(_bad_layer([[8, 1]])), "layer 3"),
    "trace-id-twice": (_trace_json(_bad_layer([[1, 1]])), "layer 3"),
    "trace-wrong-top-k": (_trace_json(_bad_layer([[1, 2, 3]])), "layer 3"),
    "trace-ragged": (_trace_json(_bad_layer([[0, 1], [2]])), "layer 3"),
    "trace-unequal-layers": (_trace_json(_bad_layer([[0, 1], [2, 3]])), "layer 3: has 2 tokens, layer 0 has 3"),
    "trace-row-not-list": (_trace_json(_bad_layer([5, 6])), "layer 3"),
    "trace-empty-layer": (_trace_json(_bad_layer([])), "layer 3"),
    "trace-null-layer": (_trace_json(_bad_layer(None)), "layer 3"),
    "trace-key-gap": (_trace_json({str(2 * li): _ok(li) for li in range(32)}), "layer keys"),
    "trace-key-negative": (_trace_json({str(li - 1): _ok(li) for li in range(32)}), "layer keys"),
    "trace-key-huge": (_trace_json({**_layers(_ok, 31), "99999999999": _ok(0)}), "layer keys"),
    "trace-key-text": (_trace_json({**_layers(_ok, 31), "last": _ok(0)}), "layer keys"),
    "trace-key-padded": (_trace_json({**_layers(_ok, 31), "031": _ok(0)}), "layer keys"),
    "trace-too-few-layers": (_trace_json(_layers(_ok, 31)), "layers"),
    "trace-top-level-list": (_trace_json([[0, 1]]), "trace"),
    "trace-empty-object": (_trace_json({}), "trace"),
    "trace-not-json": (_trace_json(None, raw=b"{not json"), "trace"),
    "trace-empty-file": (_trace_json(None, raw=b""), "trace"),
    "trace-gz-truncated": (_trace_json(None, ".json.gz", raw=gzip.compress(json.dumps(_layers(_ok)).encode())[:60]),
                           "trace"),
    "trace-gz-not-gzip": (_trace_json(None, ".json.gz", raw=b"plain text, not gzip"), "trace"),
    # a file whose bytes say another format than its name: a decoding error, now the name it needs
    "trace-gzip-named-json": (_trace_json(None, ".json", raw=gzip.compress(b'{"0": [[0, 1]]}')),
                              "is gzip-compressed (a .json.gz trace), but its name ends in .json"),
    "trace-npz-named-json-gz": (_trace_json(None, ".json.gz", raw=b"PK\x03\x04 rest of a zip archive"),
                                "rename it to end in .npz"),
    "trace-gz-bad-utf8": (_trace_json(None, ".json.gz", raw=gzip.compress(b"\xff\xfe\xfd")), "trace"),
    "trace-unsupported-ext": (_trace_json(_layers(_ok), ".txt"), "trace"),
    "trace-stats-bad": (_trace_json(_bad_layer([[0.5, 1]]), cmd="stats"), "layer 3"),
    "trace-replay-bad": (_trace_json(_bad_layer([[0, 9]]), cmd="replay"), "layer 3"),
    "npz-not-npz": (_npz(raw=b"hello, I am text"), "not an .npz"),
    "npz-pickle-header": (_npz(raw=b"\x80\x04\x95 pickled"), "not an .npz"),
    "npz-truncated": (lambda d: _npz(raw=_npz_bytes()[:100])(d), "trace"),
    "npz-no-topk": (_npz({"ids": np.zeros((4, 32, 2), dtype=np.int64)}), "topk_ids"),
    "npz-float-ids": (_npz({"topk_ids": np.zeros((4, 32, 2))}), "topk_ids"),
    "npz-bool-ids": (_npz({"topk_ids": np.zeros((4, 32, 2), dtype=bool)}), "topk_ids"),
    "npz-2d": (_npz({"topk_ids": np.zeros((4, 2), dtype=np.int64)}), "topk_ids"),
    "npz-wrong-layers": (_npz({"topk_ids": np.tile(np.array([0, 1]), (4, 5, 1))}), "layers"),
    "npz-no-layers": (_npz({"topk_ids": np.zeros((4, 0, 2), dtype=np.int64)}), "layers"),
    "npz-out-of-range": (_npz({"topk_ids": np.tile(np.array([0, 99]), (4, 32, 1))}), "layer 0"),
    # --- plan files ----------------------------------------------------------------------------------
    "plan-ragged-shares": (_plan(lambda p: p["layers"][3]["shares"].__setitem__(1, [1.0])), "layer 3"),
    "plan-text-share": (_plan(lambda p: p["layers"][2]["shares"][0].__setitem__(0, "a")), "layer 2"),
    "plan-null-share": (_plan(lambda p: p["layers"][2]["shares"][0].__setitem__(0, None)), "layer 2"),
    "plan-bool-share": (_plan(lambda p: p["layers"][2]["shares"][0].__setitem__(0, True)), "layer 2"),
    "plan-shares-not-list": (_plan(_set(["layers", 4, "shares"], "all")), "layer 4"),
    "plan-shares-sum": (_plan(lambda p: p["layers"][5]["shares"][0].__setitem__(0, 7)), "layer 5"),
    "plan-shares-negative": (_plan(lambda p: p["layers"][5]["shares"][0].__setitem__(0, -1)), "layer 5"),
    "plan-shares-nan": (_plan(lambda p: p["layers"][6]["shares"][0].__setitem__(0, float("nan"))), "layer 6"),
    "plan-expert-of-float": (_plan(lambda p: p["layers"][0]["expert_of"].__setitem__(0, 0.5)), "layer 0"),
    "plan-expert-of-range": (_plan(lambda p: p["layers"][1]["expert_of"].__setitem__(0, 99)), "layer 1"),
    "plan-expert-of-overflow": (_plan(lambda p: p["layers"][1]["expert_of"].__setitem__(0, 2**80)), "layer 1"),
    "plan-expert-missing": (_plan(lambda p: p["layers"][1]["expert_of"].__setitem__(0, 1)), "layer 1"),
    "plan-token-fraction": (_plan(lambda p: p["layers"][7]["token_fraction"].__setitem__(0, 0.5)), "layer 7"),
    "plan-layer-missing-key": (_plan(lambda p: p["layers"][8].pop("expert_of")), "layer 8"),
    "plan-layer-not-object": (_plan(lambda p: p["layers"].__setitem__(9, [1, 2])), "layer 9"),
    "plan-no-layers": (_plan(lambda p: p.pop("layers")), "layers"),
    "plan-layers-empty": (_plan(_set(["layers"], [])), "layers"),
    "plan-num-experts-bool": (_plan(_set(["num_experts"], True)), "num_experts"),
    "plan-num-experts-text": (_plan(_set(["num_experts"], "8")), "num_experts"),
    "plan-strategy-number": (_plan(_set(["strategy"], 5)), "strategy"),
    "plan-meta-list": (_plan(_set(["meta"], [1])), "meta"),
    "plan-format-unknown": (_plan(_set(["format"], "other/9")), "format"),
    "plan-wrong-layer-count": (_plan(lambda p: p["layers"].pop()), "plan"),
    "plan-other-model": (_plan(_set(["meta", "problem", "model"], "deepseek-v2-lite")), "plan"),
    "plan-meta-model-number": (_plan(_set(["meta", "problem", "model"], 5)), "meta.problem.model"),
    "plan-meta-batch-text": (_plan(_set(["meta", "problem", "batch"], "abc")), "meta.problem.batch"),
    "plan-meta-hop-text": (_plan(_set(["meta", "problem", "hardware", "hop_latency_s"], "x")),
                           "hop_latency_s"),
    "plan-meta-trace-path-number": (_plan(_set(["meta", "problem", "trace_path"], 3)), "trace_path"),
    "plan-other-mesh": (lambda d: ["evaluate", "--plan", str(d / "good_plan.json"), "--mesh", "4x4"], "plan"),
    "plan-not-json": (_plan(None, raw="{nope"), "plan"),
    "plan-json-list": (_plan(None, raw="[1, 2]"), "plan"),
    "plan-empty-file": (_plan(None, raw=""), "plan"),
    "plan-deep-nesting": (_plan(None, raw="[" * 100000), "plan"),
    "plan-meta-seed-negative": (_plan(_set(["meta", "problem", "seed"], -1)), "seed"),
    "plan-meta-synthetic-tokens-text": (_plan(_set(["meta", "problem", "synthetic_tokens"], "x")), "synthetic_tokens"),
    "plan-meta-trace-from-no-file": (_plan(_set(["meta", "problem", "trace"], "mine")), "plan"),
    # a bad value in the plan's record names the plan's field, not a flag the user never typed
    "plan-meta-model-unknown": (_plan(_set(["meta", "problem", "model"], "foo")), "meta.problem.model"),
    "plan-meta-hw-unknown": (_plan(_set(["meta", "problem", "hw_point"], "nine/9")), "meta.problem.hw_point"),
    "plan-meta-mesh-malformed": (_plan(_set(["meta", "problem", "mesh"], "4by4")), "meta.problem.mesh"),
    "plan-meta-batch-negative": (_plan(_set(["meta", "problem", "batch"], -3)), "meta.problem.batch"),
    "plan-meta-hop-negative": (_plan(_set(["meta", "problem", "hardware", "hop_latency_s"], -1.0)),
                               "meta.problem.hardware.hop_latency_s"),
    # --- numbers out of any sensible range (they used to give NaN times, or a layer 'error') ---------
    "flag-batch-huge": (_flags("evaluate", *MX, "--strategy", "tp", "--batch", "1e308"), "--batch"),
    "flag-batch-below-one": (_flags("solve", *MX, "--batch", "1e-20", "--layers", "0"), "--batch"),
    "flag-batch-zero-names-the-limit": (_flags("evaluate", *MX, "--strategy", "tp", "--batch", "0"),
                                        "--batch: must be >= 1, got 0"),
    # --- outputs that are not files or folders ---------------------------------------------------
    "out-not-regular-file": (lambda d: ["evaluate", *MX, "--strategy", "tp", "--save-plan", str(_fifo(d)),
                                        "--force"], "--save-plan"),
    "bench-out-empty": (_flags("bench", "--quick", "--out", ""), "--out"),
    "flag-trace-empty": (_flags("evaluate", *MX, "--trace", ""), "--trace"),
    "flag-policy-twice": (_flags("replay", *MX, "--policy", "static,static"), "--policy"),
    "flag-model-against-the-instance-trace": (
        _flags("evaluate", "--instance", str(ROOT / "instances" / "mixtral-8x7b_5-50_4x8.toml"), "--model",
               "deepseek-v2-lite", "--strategy", "tp"), "--model"),
    "flag-replay-window-longer-than-trace": (lambda d: ["replay", *MX, "--trace", str(d / "good_trace.json"),
                                                        "--batch", "64", "--policy", "static"], "--batch"),
    "out-names-a-folder": (_flags("solve", *MX, "--layers", "0", "--out", "newdir/"), "--out"),
    "plot-out-empty": (_plot_results("--out", ""), "--out"),
    "plot-out-exists": (lambda d: _plot_results("--out", str(_existing(d / "old.png")))(d), "--out"),
    "toml-trace-and-synthetic-tokens": (_sec("workload", 'trace = "good_trace.json"\nsynthetic_tokens = 64'),
                                        "synthetic_tokens"),
    "flag-strategy-all-in-a-list": (_flags("evaluate", *MX, "--strategy", "all,milp"), "--strategy"),
    "flag-replay-time-limit-zero": (_flags("replay", *MX, "--time-limit", "0"), "--time-limit"),
    "flag-instance-empty": (_flags("evaluate", "--instance", ""), "--instance"),
    "bench-out-a-file": (lambda d: ["bench", "--quick", "--out", str(d / "good_trace.json")], "--out"),
    "bench-batches-twice": (_flags("bench", "--quick", "--out", "b", "--batches", "8,8"), "--batches"),
    "bench-batches-empty-item": (_flags("bench", "--quick", "--out", "b", "--batches", "16,,32"),
                                 "--batches: has an empty item"),
    "bench-batches-full-width": (_flags("bench", "--quick", "--out", "b", "--batches", "16,\uff13\uff12"),
                                 "--batches: must be whole numbers"),
    "bench-meshes-twice": (_flags("bench", "--quick", "--out", "b", "--meshes", "4x4,4x4"), "--meshes"),
    "bench-models-empty": (_flags("bench", "--quick", "--out", "b", "--models", ","), "--models"),
    "bench-batches-huge": (_flags("bench", "--quick", "--out", "b", "--batches", "1e30"), "--batches"),
    "bench-solve-batch-huge": (_flags("bench", "--quick", "--out", "b", "--solve-batch", "9" * 23), "--solve-batch"),
    # --- lists and pools that used to be taken silently ------------------------------------------
    "flag-layers-twice": (_flags("solve", *MX, "--layers", "0,3,0"), "--layers"),
    "flag-jobs-above-the-cpus": (_flags("solve", *MX, "--layers", "0", "--jobs", "100000"), "--jobs"),
    "bench-jobs-above-the-cpus": (_flags("bench", "--quick", "--out", "b", "--jobs", "100000"), "--jobs"),
    # --- a plan whose record disagrees with the model or hardware point it names (edited by hand) ----
    "plan-meta-compute-edited": (_plan(_set(["meta", "problem", "hardware", "compute_flops"], 1e13)),
                                 "meta.problem.hardware.compute_flops"),
    "plan-meta-link-bw-text": (_plan(_set(["meta", "problem", "hardware", "link_bw_bytes_per_s"], "x")),
                               "meta.problem.hardware.link_bw_bytes_per_s"),
    "plan-meta-top-k-edited": (_plan(_set(["meta", "problem", "top_k"], 3)), "meta.problem.top_k"),
    "plan-meta-layers-edited": (_plan(_set(["meta", "problem", "moe_layers"], 31)), "meta.problem.moe_layers"),
    # --- a second audit: flags read as abbreviations, endless replays, outputs found unwritable late ---
    "flag-mode-not-read-as-model": (_flags("solve", *MX, "--mode", "paper"), "--mode"),
    "replay-batches-beyond-the-limit": (_flags("replay", *MX, "--batches", "1000001", "--policy", "static"),
                                        "--batches"),
    "bench-online-batches-beyond-the-limit": (_flags("bench", "--quick", "--out", "b", "--online-batches",
                                                     "1000000000"), "--online-batches"),
    "bench-out-under-a-file": (lambda d: ["bench", "--quick", "--out", str(d / "good_trace.json" / "sub")],
                               "good_trace.json is a file, not a folder"),
    # --- a bad value late in a bench list was found only after the points before it had solved ----
    "bench-model-late-in-the-list": (_flags("bench", "--quick", "--out", "b", "--models", "mixtral-8x7b,nope"),
                                     "--models"),
    "bench-mesh-late-in-the-list": (_flags("bench", "--quick", "--out", "b", "--meshes", "4x4,4000x4000"),
                                    "--meshes"),
    "bench-hw-late-in-the-list": (_flags("bench", "--quick", "--out", "b", "--hws", "5/50,7/"), "--hws"),
    # --- a third audit, of files (tracebacks, silent answers and wrong field names it found) --------
    "plan-int-too-long-to-read": (lambda d: _plan_text(d, "1" * 5000), "plan"),
    "plan-share-too-large-for-a-float": (lambda d: _plan_text(d, "1" * 400), "shares"),
    "plan-num-experts-huge": (_plan(_set(["num_experts"], 10**12)), "num_experts"),
    "plan-meta-capacity-zero": (_plan(_set(["meta", "problem", "hardware", "dram_capacity_bytes"], 0)),
                                "meta.problem.hardware.dram_capacity_bytes"),
    "plan-meta-dram-bw-negative": (_plan(_set(["meta", "problem", "hardware", "dram_bw_bytes_per_s"], -5.0)),
                                   "meta.problem.hardware.dram_bw_bytes_per_s"),
    "plan-meta-sha-a-number": (_plan(_set(["meta", "problem", "trace_sha256"], 5)), "meta.problem.trace_sha256"),
    "plan-meta-top-k-text": (_plan(_set(["meta", "problem", "top_k"], "2")), "meta.problem.top_k"),
    "plan-repeated-key": (lambda d: _plan_text(d, '0.0, "strategy": "x"', at="strategy"), "plan"),
    "toml-int-too-long-to-read": (_toml(BASE_TOML + "[workload]\nbatch = " + "1" * 5000 + "\n"), "instance"),
    "toml-trace-empty": (_sec("workload", 'trace = ""'), "[workload].trace"),
    "trace-repeated-layer-key": (_trace_json(None, raw=b'{"0": [[0, 1]], "1": [[0, 1]], "0": [[2, 3]]}'), "trace"),
    "trace-npz-header-claims-a-huge-shape": (lambda d: _huge_npz(d), "trace"),
}


def _plan_text(d: Path, text: str, at: str = "shares") -> list[str]:
    """The good plan with ``text`` written in place of its first share (``at="shares"``), or added
    after the value of ``at`` (a repeated key), as raw JSON text."""
    plan = json.loads((d / "good_plan.json").read_text())
    if at == "shares":
        plan["layers"][0]["shares"][0][0] = "@@"
        raw = json.dumps(plan).replace('"@@"', text)
    else:
        raw = json.dumps(plan).replace(f'"{at}": ', f'"{at}": {text}, "{at}": ', 1)
    p = d / f"plan_raw_{abs(hash(raw))}.json"
    p.write_text(raw)
    return ["evaluate", "--plan", str(p)]


def _huge_npz(d: Path) -> list[str]:
    """An .npz whose topk_ids header claims (1e11, 32, 2) int64 over a few bytes of data."""
    head = b"{'descr': '<i8', 'fortran_order': False, 'shape': (100000000000, 32, 2), }"
    head += b" " * (117 - len(head)) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + b"\x00" * 64
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("topk_ids.npy", npy)
    p = d / "huge.npz"
    p.write_bytes(buf.getvalue())
    return ["evaluate", *MX, "--trace", str(p), "--strategy", "tp"]


def _existing(p: Path) -> Path:
    """``p``, created (empty) if missing: an output path that already exists."""
    p.touch()
    return p


def _fifo(d: Path) -> Path:
    """A named pipe in ``d``: a path that exists but is no regular file (a write must not replace it)."""
    p = d / "a_pipe"
    if not p.exists():
        os.mkfifo(p)
    return p


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, topk_ids=np.tile(np.array([0, 1]), (64, 32, 1)))
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2(name, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    build, field = CASES[name]
    argv = build(files)
    with pytest.raises(SystemExit) if _argparse_case(name) else _nullcontext() as exc:
        rc = main(argv)
    if exc is not None and getattr(exc, "value", None) is not None:
        rc = exc.value.code
    assert rc == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hdmoe-milp: error:") and field in err[0], err[0]
    assert "Traceback" not in err[0]


def _argparse_case(name: str) -> bool:
    return name in {"flag-seed-float", "flag-seed-text", "flag-batch-text", "flag-unknown-option",
                    "flag-batch-full-width", "flag-seed-full-width", "plot-layer-full-width",
                    "flag-mode-not-read-as-model",
                    "flag-unknown-command", "flag-lns-patience-text"}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_console_script_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hdmoe_milp.cli", "evaluate", "--seed", "-3"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--seed" in r.stderr


# --- safe writes ---------------------------------------------------------------------------------------


def test_write_atomic_force(tmp_path):
    p = tmp_path / "a.json"
    write_atomic(p, "one")
    with pytest.raises(InputError, match="already exists"):
        write_atomic(p, "two", force=False, field="--save-plan")
    assert p.read_text() == "one"
    write_atomic(p, "two")  # the Python API overwrites by default
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_a_file_that_appears_while_the_command_runs_is_not_replaced_without_force(tmp_path, monkeypatch, capsys):
    """Without force the check is made again where the file is put in place (a hard link, which fails
    on an existing name): a file another job wrote meanwhile is kept. `solve --out` then prints its
    results, says the plan was not written, and exits 2 (it replaced the other file and said `wrote`)."""
    target = tmp_path / "p.json"
    real_fsync = os.fsync

    def fsync(fd):  # the other job writes between the command's check and its rename
        if not target.exists():
            target.write_text("other")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match="appeared while this command ran") as e:
        write_atomic(target, "mine", force=False, field="--out")
    assert e.value.field == "--out" and "--force" in e.value.fix
    assert target.read_text() == "other" and [f.name for f in tmp_path.iterdir()] == ["p.json"]
    write_atomic(target, "mine", force=True)
    assert target.read_text() == "mine"

    monkeypatch.setattr(os, "fsync", real_fsync)
    import hdmoe_milp.pipeline as pipeline

    real_solve = pipeline.solve
    out = tmp_path / "plan.json"

    def solve(*a, **kw):
        res = real_solve(*a, **kw)
        out.write_text("other")
        return res

    monkeypatch.setattr(pipeline, "solve", solve)
    rc = main(["solve", "--instance", str(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml"), "--layers", "0",
               "--time-limit", "0.5", "--no-baselines", "--out", str(out)])
    o, err = capsys.readouterr()
    assert rc == 2 and out.read_text() == "other" and "plan" in o and "wrote" not in o
    assert err.startswith("hdmoe-milp: error: --out:") and "the plan above was not written" in err


def test_write_atomic_writes_through_a_symlink(tmp_path):
    """A link named as the output keeps being a link; the file it names gets the new content."""
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(InputError, match="already exists"):
        write_atomic(link, "new", force=False, field="--out")
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere" / "x.json")
    with pytest.raises(InputError, match="does not exist"):
        write_atomic(dangling, "new")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["dangling.json", "link.json", "real.json"]


def test_save_plan_force(tmp_path, capsys):
    p = tmp_path / "plan.json"
    args = ["evaluate", *MX, "--strategy", "tp", "--save-plan", str(p)]
    assert main(args) == 0
    first = p.read_bytes()
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert p.read_bytes() == first
    assert main([*args, "--force", "--seed", "1"]) == 0


_WRITER = r"""
import sys
import numpy as np
import pandas as pd
from hdmoe_milp.placement import Placement
rng = np.random.default_rng(0)
shares = rng.random((24, 256, 256))
shares /= shares.sum(axis=2, keepdims=True)
plan = Placement.from_shares(shares, "big")
print("ready", flush=True)
plan.save(sys.argv[1])
print("done", flush=True)
"""


def test_sigkill_mid_save_keeps_old_file(tmp_path):
    target = tmp_path / "plan.json"
    old = json.dumps(Placement.from_shares(np.ones((2, 3, 1)), "old").to_dict())
    target.write_text(old)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    caught = False
    while time.monotonic() < deadline and proc.poll() is None:  # the temporary file is being written
        tmps = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
        if tmps and tmps[0].stat().st_size > 1_000_000:
            caught = True
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught and proc.returncode == -signal.SIGKILL
    assert target.read_text() == old  # the previous plan is intact (a temporary file may remain)
    assert Placement.load(target).strategy == "old"


# --- edge geometries ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_problems():
    out = {}
    for model in ("mixtral-8x7b", "olmoe-1b-7b"):  # 8 experts (fewer than 16 nodes) and 64 (more than nodes)
        for mesh in ("1x1", "1x4", "4x1", "1x16", "16x1", "4x4"):
            out[model, mesh] = Settings("e", model, "5/50", mesh, synthetic_tokens=256).to_problem()
    return out


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "milp"])
def test_edge_geometries(name, edge_problems):
    for (model, mesh), problem in edge_problems.items():
        plan = hm.place(problem, name, budget=hm.Budget(time_limit_s=1))
        assert plan.num_nodes == problem.hardware.num_nodes and plan.num_layers == problem.num_layers
        for lp in plan.layers:  # every expert whole over its copies, every share a valid fraction
            assert np.allclose(lp.expert_shares().sum(axis=1), 1.0) and np.all(lp.shares >= 0)
        ev = hm.evaluate(problem, plan)
        assert np.isfinite(ev.tbt_s) and ev.tbt_s > 0, (model, mesh)
        if mesh == "1x1":  # nothing to route, everything on the one node: every strategy scores the same
            assert float(np.sum(ev.dispatch_s) + np.sum(ev.combine_s)) == 0.0
            tp = hm.evaluate(problem, "tp")
            assert ev.tbt_s == pytest.approx(tp.tbt_s, rel=1e-9)


def test_api_errors_are_typed():
    problem = Settings("e", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=256).to_problem()
    wrong = Placement.from_shares(np.ones((32, 8, 1)))
    with pytest.raises(InputError) as exc:
        hm.evaluate(problem, wrong)
    assert isinstance(exc.value, ValueError) and exc.value.field == "plan" and exc.value.fix
    with pytest.raises(InputError):
        problem.with_(batch=True)
    with pytest.raises(InputError):
        hm.Problem(problem.model, problem.hardware, problem.trace, batch=1e12, batching="random")
    with pytest.raises(InputError, match="GB"):  # refused before any batch is drawn
        hm.replay(problem, hm.place(problem, "tp"), policy="static", batches=1, batch=10**9)
    with pytest.raises(InputError, match="mesh"):
        hm.Problem(problem.model, hm.make_hardware("5/50", "3000x3000"), problem.trace)
    # limits past any real run, and trace sizes that no trace can have, name the argument
    for kw, field in (({"time_limit_s": 1e300}, "time_limit_s"), ({"work_limit": 1e300}, "work_limit")):
        with pytest.raises(InputError) as exc:
            hm.Budget(**kw)
        assert exc.value.field == field
        with pytest.raises(InputError) as exc:
            SolveParams(**kw)
        assert exc.value.field == field
    trace_path = ROOT / "instances" / "traces" / "mixtral_reasoning_4k.json.gz"
    for args, field in (((-1, 2), "num_experts"), ((8, 0), "top_k")):
        with pytest.raises(InputError) as exc:
            hm.load_trace(trace_path, *args)
        assert exc.value.field == field


# --- a saved plan is scored on the problem it was made for ------------------------------------------


def _tbt_of(argv: list[str], capsys) -> float:
    assert main([*argv, "--json"]) == 0
    return float(json.loads(capsys.readouterr().out)["tbt_us"])


def test_a_plan_made_on_a_synthetic_trace_is_scored_on_that_trace(tmp_path, capsys):
    """The plan records the synthetic trace's seed and token count; `evaluate --plan` and the plot
    of its node loads rebuild that trace, not the default one (they used to score seed 0, 4096 tokens)."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", seed=3, synthetic_tokens=64).to_problem()
    path = tmp_path / "p.json"
    hm.place(problem, "cb").save(path)
    made = Placement.load(path).meta["problem"]
    assert (made["seed"], made["synthetic_tokens"]) == (3, 64)
    want = float(hm.evaluate(problem, "cb").tbt_us)
    default = float(hm.evaluate(Settings("t", "mixtral-8x7b", "5/50", "2x2").to_problem(), Placement.load(path)).tbt_us)
    assert abs(default - want) > 1e-6 * want  # the check below can tell the traces apart
    assert _tbt_of(["evaluate", "--plan", str(path)], capsys) == pytest.approx(want, rel=1e-12)
    assert main(["plot", "node-load", str(path), "--out", str(tmp_path / "n.png")]) == 0


def test_plot_refuses_a_plan_whose_trace_is_gone(tmp_path, capsys):
    trace = tmp_path / "t.json"
    rng = np.random.default_rng(0)
    trace.write_text(json.dumps({str(li): [rng.choice(8, 2, replace=False).tolist() for _ in range(16)]
                                 for li in range(32)}))
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", trace=str(trace)).to_problem()
    path = tmp_path / "p.json"
    hm.place(problem, "tp").save(path)
    moved = tmp_path / "moved.json"
    trace.rename(moved)
    capsys.readouterr()
    assert main(["plot", "node-load", str(path), "--out", str(tmp_path / "n.png")]) == 2
    err = capsys.readouterr().err
    assert "not there" in err and "--trace" in err and "Traceback" not in err and not (tmp_path / "n.png").exists()
    # --trace names where it went (as evaluate and replay take it); a bad one is refused by that name
    for kind in ("node-load", "placement"):
        assert main(["plot", kind, str(path), "--trace", str(moved), "--out", str(tmp_path / f"{kind}.png")]) == 0
        assert (tmp_path / f"{kind}.png").is_file()
    assert main(["plot", "node-load", str(path), "--trace", str(tmp_path / "nope.json"), "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hdmoe-milp: error: --trace") and "file not found" in err
    assert main(["plot", "bound-trace", str(path), "--trace", str(moved), "--out", str(tmp_path / "b.png")]) == 2
    assert "--trace: does not apply to plot bound-trace, which draws the solve" in capsys.readouterr().err
    qwen = tmp_path / "q.json"
    qwen.write_text(json.dumps({str(li): [rng.choice(64, 8, replace=False).tolist() for _ in range(16)]
                                for li in range(28)}))
    assert main(["plot", "node-load", str(path), "--trace", str(qwen), "--out", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert "q.json" in err and "give a trace recorded from mixtral-8x7b" in err and not (tmp_path / "q.png").exists()


def test_a_relative_trace_path_in_a_plan_is_read_from_the_plans_folder(tmp_path, capsys, monkeypatch):
    """An edited plan whose meta.problem.trace_path is relative reads the trace next to the plan
    (as instance files do), whatever the current folder."""
    d = tmp_path / "plans"
    d.mkdir()
    trace = d / "t.json"
    rng = np.random.default_rng(1)
    trace.write_text(json.dumps({str(li): [rng.choice(8, 2, replace=False).tolist() for _ in range(16)]
                                 for li in range(32)}))
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", trace=str(trace)).to_problem()
    want = float(hm.evaluate(problem, "cb").tbt_us)
    path = d / "p.json"
    hm.place(problem, "cb").save(path)
    raw = json.loads(path.read_text())
    assert Path(raw["meta"]["problem"]["trace_path"]).is_absolute()  # what the package writes
    raw["meta"]["problem"]["trace_path"] = "t.json"
    path.write_text(json.dumps(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _tbt_of(["evaluate", "--plan", str(path)], capsys) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("how", ["instance", "flag", "default", "api"])
def test_a_trace_of_another_model_names_the_model_setting_and_the_presets_it_fits(how, tmp_path, capsys):
    mixtral = ROOT / "instances" / "traces" / "mixtral_reasoning_4k.json.gz"
    inst = tmp_path / "x.toml"
    inst.write_text(f'[model]\npreset = "deepseek-v2-lite"\n[hardware]\npreset = "5/50"\nmesh = "4x8"\n'
                    f'[workload]\ntrace = "{mixtral}"\n')
    if how == "api":
        with pytest.raises(InputError) as exc:
            hm.load_instance(inst)
        msg = str(exc.value)
        assert exc.value.field == "trace mixtral_reasoning_4k.json.gz"
    else:
        argv = {"instance": ["--instance", str(inst)], "flag": ["--model", "deepseek-v2-lite", "--trace", str(mixtral)],
                "default": ["--trace", str(mixtral)]}[how]
        assert main(["evaluate", *argv, "--strategy", "tp"]) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg
    setting = "--model" if how in ("flag", "default") else "[model].preset"
    assert "routes 2 experts per token" in msg and "deepseek-v2-lite" in msg and "top_k=6" in msg
    assert "mixtral-8x7b fits it" in msg, msg
    if how == "default":  # nobody chose deepseek-v2-lite: it is not called the --model setting
        assert "the default model deepseek-v2-lite (no --model was given)" in msg and "give --model" in msg
    else:
        assert f"set {setting}" in msg, msg


def test_the_presets_a_trace_of_another_model_fits_have_its_layer_count(tmp_path, capsys):
    """A 26-layer top-8 trace of 64 experts fits no preset (the top-8 ones have 28, 61, 48 or 16 MoE
    layers): none is offered, where four were, each of which then failed on the layer count."""
    p = tmp_path / "top8.npz"
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(64, 8, replace=False) for _ in range(26)]) for _ in range(32)])
    np.savez(p, topk_ids=ids.astype(np.uint8))
    assert main(["evaluate", "--model", "deepseek-v2-lite", "--mesh", "4x4", "--trace", str(p), "--strategy",
                 "tp"]) == 2
    err = capsys.readouterr().err
    assert "routes 8 experts per token" in err and " fit it" not in err and " fits it" not in err, err


@pytest.mark.parametrize("flag", ["--against", "--plan-trace"])
def test_a_second_trace_of_another_model_asks_for_one_of_the_problems_model(flag, capsys):
    ds = ROOT / "instances" / "traces" / "deepseek_v2_lite_law_4k.npz"
    mixtral = ROOT / "instances" / "traces" / "mixtral_reasoning_4k.json.gz"
    cmd = ["stats"] if flag == "--against" else ["replay", "--batches", "2"]
    assert main([*cmd, "--model", "deepseek-v2-lite", "--trace", str(ds), flag, str(mixtral)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"hdmoe-milp: error: {flag}:")
    assert "routes 2 experts per token" in err and "give a trace recorded from deepseek-v2-lite" in err


def test_a_trace_naming_experts_beyond_the_model_is_refused_as_another_models(tmp_path, capsys):
    p = tmp_path / "wide.npz"
    ids = np.tile(np.array([0, 1, 2, 3, 4, 70]), (16, 26, 1))  # DeepSeek's width, but 71+ experts
    np.savez(p, topk_ids=ids)
    assert main(["evaluate", "--model", "deepseek-v2-lite", "--trace", str(p), "--strategy", "tp"]) == 2
    err = capsys.readouterr().err
    assert "names expert 70" in err and "64 experts" in err and "--model" in err
    with pytest.raises(hm.TraceShapeError) as exc:
        hm.load_trace(p, 64, 6)
    assert (exc.value.top_k, exc.value.max_id) == (6, 70)
    np.savez(p, topk_ids=np.tile(np.arange(6), (16, 30, 1)))  # DeepSeek's shape, 30 layers instead of 26
    assert main(["evaluate", "--model", "deepseek-v2-lite", "--trace", str(p), "--strategy", "tp"]) == 2
    err = capsys.readouterr().err
    assert "has 30 MoE layers" in err and "26 MoE layers" in err and "--model" in err and err.count("\n") == 1


def test_write_atomic_never_replaces_a_special_file_and_names_what_failed(tmp_path):
    pipe = _fifo(tmp_path)
    with pytest.raises(InputError, match="not a regular file"):
        write_atomic(pipe, "x", field="--out")
    assert pipe.is_fifo()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: a folder that cannot hold files instead
            with pytest.raises(InputError, match="cannot write"):
                write_atomic(Path("/proc/hdmoe_test.json"), "x", field="--out")
        else:
            with pytest.raises(InputError, match="cannot write"):
                write_atomic(ro / "p.json", "x", field="--out")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("backend", available_backends())
def test_one_node_mesh_solves(backend):
    """A 1x1 mesh has no links (the certificate's link rows are empty); the solve still answers
    (it used to raise), with the one possible layout."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "1x1", synthetic_tokens=64).to_problem()
    res = hm.solve(problem, backend=backend, layers=[0], time_limit_s=1, baselines=False)
    assert res.layers[0].status in ("optimal", "feasible")
    tp = hm.evaluate(problem, "tp").tbt_s
    assert float(res.evaluations["plan"].tbt_s) == pytest.approx(float(tp), rel=1e-9)


# --- a DRAM capacity some baselines do not fit ------------------------------------------------------


def test_solve_leaves_out_baselines_over_capacity_and_its_plan_fits():
    """At 6 GB per node (Mixtral on 4x4 needs 5.9 GB spread evenly) ep-lpt's layout does not fit: it is
    left out of the comparison, not the reason the solve fails; the plan, with the layers left out of
    the solve on baselines within their share, fits."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "4x4", synthetic_tokens=256, dram_capacity_gb=6.0).to_problem()
    res = hm.solve(problem, layers=[0], time_limit_s=1, baselines=["ep-lpt", "cb"])
    assert res.solver["baselines_over_capacity"] == ["ep-lpt"]
    assert set(res.candidates) == {"milp", "cb"}
    from hdmoe_milp.costs import fits_capacity
    assert fits_capacity(res.placement, problem.model, problem.hardware)
    with pytest.raises(InputError, match="the ep-lpt placement does not fit"):
        hm.evaluate(problem, "ep-lpt")


def test_capacity_error_names_the_flag_and_the_strategy(capsys):
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "4x4", "--capacity-gb", "6", "--strategy",
                 "ep-lpt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hdmoe-milp: error: --capacity-gb: the ep-lpt placement does not fit") and "\n" not in err


def test_compare_leaves_out_strategies_over_capacity_and_lists_them(capsys):
    """Comparing several strategies at a capacity that some do not fit scores the others and lists
    those left out (it used to fail the whole table); one strategy alone, or a given plan, that does
    not fit is still an error."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "4x4", synthetic_tokens=256, dram_capacity_gb=6.0).to_problem()
    cmp = hm.compare(problem, ["tp", "ep-lpt", "cb"])
    assert list(cmp.evaluations) == ["tp", "cb"] and list(cmp.over_capacity) == ["ep-lpt"]
    assert "GB" in cmp.over_capacity["ep-lpt"]
    with pytest.raises(InputError, match="the ep-lpt placement does not fit"):
        hm.compare(problem, ["ep-lpt"])
    big = Settings("t", "mixtral-8x7b", "5/50", "4x4", synthetic_tokens=256).to_problem()
    with pytest.raises(InputError, match="does not fit"):
        hm.compare(problem, ["cb"], plans={"mine": hm.place(big, "ep-lpt")})
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "4x4", "--capacity-gb", "6", "--strategy",
                 "tp,ep-lpt,cb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in out["results"]] == ["tp", "cb"] and list(out["over_capacity"]) == ["ep-lpt"]


def test_api_type_errors_are_input_errors(tmp_path):
    """Wrong types through the Python API: one InputError naming the argument, not a TypeError."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=64).to_problem()
    plan = hm.place(problem, "tp")
    saved = tmp_path / "p.json"
    plan.save(saved)
    for call, field in ((lambda: hm.load_instance(None), "instance"),
                        (lambda: problem.with_(frequencies=[["a"] * 8] * 32), "frequencies"),
                        (lambda: hm.EvalOptions(seed=-1), "seed"),
                        (lambda: hm.solve(problem, layers=[0], baselines=False, deterministic="no"), "deterministic"),
                        (lambda: hm.compare(problem, []), "strategies"),
                        (lambda: hm.compare(problem, ["tp"], plans=[plan]), "plans"),
                        (lambda: hm.evaluate(problem, plan, options={"mode": "mesh"}), "options"),
                        (lambda: hm.evaluate(problem, 5), "plan"),
                        (lambda: hm.place(problem, "tp", budget=5), "budget"),
                        (lambda: hm.solve("instances/x.toml"), "problem"),
                        (lambda: hm.load_plan(saved, "mixtral-8x7b"), "problem"),
                        (lambda: plan.save(None), "path"),
                        (lambda: hm.Placement(plan.layers, "x", {"when": object()}).save(tmp_path / "m.json"), "meta"),
                        (lambda: hm.EvalOptions(context_len=10**12), "context_len")):
        with pytest.raises(InputError) as exc:
            call()
        assert exc.value.field == field
    assert not (tmp_path / "m.json").exists()
    assert list(hm.compare(problem, "cb").evaluations) == ["cb"]  # one name, not its letters
    # a numpy integer is a whole number like any other (it used to be refused for jobs only)
    result = hm.solve(problem, layers=[0], baselines=False, time_limit_s=0.5, jobs=np.int64(1))
    assert result.solver["jobs"] == 1 and type(result.solver["jobs"]) is int


def test_bound_trace_of_a_layer_left_out_of_the_solve_says_so(tmp_path, capsys):
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=64).to_problem()
    path = tmp_path / "p.json"
    hm.solve(problem, layers=[0], time_limit_s=0.5, baselines=False).save(path)
    assert main(["plot", "bound-trace", str(path), "--layer", "0", "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main(["plot", "bound-trace", str(path), "--layer", "1", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "--layer" in err and "left out of the solve" in err and "\n" not in err.strip()


def test_bound_trace_refuses_records_no_solve_writes(tmp_path, capsys):
    """A bound above the primal drew "proven gap -87445 %"; a NaN primal, a negative gap or a
    meta.solver that is not a table were drawn or ignored. Each is refused, naming the plan's key."""
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=64).to_problem()
    good = tmp_path / "p.json"
    hm.solve(problem, layers=[0], time_limit_s=0.5, baselines=False).save(good)
    d0 = json.loads(good.read_text())

    def final(rec, col, v):
        rec["trace"][-1][col] = v

    edits = {
        "bound-above-primal": (lambda m: final(m["layers"][0], 2, m["layers"][0]["trace"][-1][1] * 900),
                               "meta.layers[0].trace", "above its primal"),
        "nan-primal": (lambda m: final(m["layers"][0], 1, float("nan")), "meta.layers[0].trace[", "finite"),
        "negative-gap": (lambda m: m["layers"][0].__setitem__("gap", -0.5), "meta.layers[0].gap", "-0.5"),
        "solver-not-a-table": (lambda m: m.__setitem__("solver", "x"), "meta.solver", "'x'"),
    }
    for name, (edit, field, what) in edits.items():
        d = json.loads(json.dumps(d0))
        edit(d["meta"])
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(d))
        out = tmp_path / f"{name}.png"
        assert main(["plot", "bound-trace", str(bad), "--layer", "0", "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}.json {field}" in err and what in err and "Traceback" not in err, (name, err)
        assert not out.exists()
    assert main(["plot", "bound-trace", str(good), "--layer", "0", "--out", str(tmp_path / "good.png")]) == 0


def test_plan_records_that_contradict_the_plan_are_named(tmp_path, capsys):
    """A plan whose meta.problem.model or mesh contradicts its own rows was blamed on the trace (or
    named no file); plot's fixes offered --trace, which plot lacks."""
    trace = tmp_path / "t.json.gz"
    shutil.copy(ROOT / "instances" / "traces" / "mixtral_writing_4k.json.gz", trace)
    good = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "5/50", "--trace", str(trace),
                 "--strategy", "cb", "--save-plan", str(good)]) == 0
    capsys.readouterr()
    d0 = json.loads(good.read_text())
    for key, value, says in (("model", "deepseek-v2-lite", "mixtral-8x7b fits its shape"), ("mesh", "4x8", "on 4")):
        d = json.loads(json.dumps(d0))
        d["meta"]["problem"][key] = value
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps(d))
        for cmd in (["plot", "placement", str(bad), "--out", str(tmp_path / f"{key}.png")], ["evaluate", "--plan",
                                                                                              str(bad)]):
            assert main(cmd) == 2
            err = capsys.readouterr().err
            assert f"plan {key}.json meta.problem.{key}" in err and says in err and "trace" not in err, err
    assert main(["evaluate", "--plan", str(good), "--mesh", "4x8"]) == 2  # another mesh: the file is named
    assert "plan p.json" in capsys.readouterr().err
    trace.rename(tmp_path / "moved.json.gz")
    assert main(["plot", "placement", str(good), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not there" in err and "give the trace with --trace" in err  # plot has the flag too (0.8.4)
    assert main(["evaluate", "--plan", str(good)]) == 2  # evaluate has the flag, and offers it
    assert "give the trace with --trace" in capsys.readouterr().err


def test_plan_mismatches_name_the_file_and_key(tmp_path, capsys):
    """A plan for another mesh or number of layers named the file but not the key that disagrees."""
    plan = tmp_path / "p.json"
    MX2 = ["--model", "mixtral-8x7b", "--mesh", "2x2"]
    assert main(["evaluate", *MX2, "--strategy", "ep", "--save-plan", str(plan)]) == 0
    d = json.loads(plan.read_text())
    del d["meta"]["problem"]["mesh"]
    nomesh = tmp_path / "nomesh.json"
    nomesh.write_text(json.dumps(d))
    d = json.loads(plan.read_text())
    d["layers"] = d["layers"][:5]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(d))
    capsys.readouterr()
    cases = [
        (["evaluate", "--plan", str(plan), "--mesh", "4x8"], "plan p.json meta.problem.mesh", "was made for mesh"),
        (["evaluate", "--plan", str(nomesh), "--mesh", "4x8"], "plan nomesh.json num_nodes", "on 4 nodes"),
        (["evaluate", *MX2, "--plan", str(short)], "plan short.json layers", "has 5 layers"),
    ]
    for argv, field, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {field}: " in err and says in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(InputError) as exc:  # in Python the plan is an object, not a file
        hm.check_plan(hm.load_plan(nomesh), Settings("e", "mixtral-8x7b", "5/50", "4x8",
                                                      synthetic_tokens=256).to_problem())
    assert exc.value.field == "plan"


def test_plot_names_the_plans_trace_not_flags_it_lacks(tmp_path, capsys):
    """plot on a plan whose recorded trace cannot be read said "trace:" (not the plan's key), and one
    whose trace has another number of layers said "set --model", which plot does not read."""
    import hashlib

    plan = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--strategy", "cb", "--save-plan",
                 str(plan)]) == 0
    capsys.readouterr()
    d = json.loads(plan.read_text())
    for name, text, field, says in (
            ("bad", "{oops", "plan bad.json meta.problem.trace_path", "cannot read"),
            ("short", json.dumps({str(i): [[0, 1]] * 10 for i in range(5)}), "trace t_short.json",
             "give a trace recorded from mixtral-8x7b, the model the plan was made for")):
        (tmp_path / f"t_{name}.json").write_text(text)
        d["meta"]["problem"].update(trace_path=f"t_{name}.json", trace_sha256=hashlib.sha256(text.encode()).hexdigest())
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        assert main(["plot", "placement", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert f"error: {field}: " in err and says in err and err.count("\n") == 1, err
        assert "--model" not in err and "--trace" not in err, err


def test_a_toml_integer_too_long_to_read_names_its_key_or_line(tmp_path, capsys):
    """Python refuses integers of over 4,300 digits with a message naming no key: only ``key = 999...``
    named its key; in an array, an inline table or under a dotted key it did not."""
    head = '[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'
    big = "9" * 5000
    cases = [
        ("array", f"[workload]\nbatch = [{big}]\n", "[workload].batch"),
        ("inline", f"[workload]\nbatch = {{a = {big}}}\n", "[workload].batch"),
        ("dotted", f"[evaluator]\n x . y = {big}\n", "[evaluator].x . y"),
        ("lines", f"[workload]\nbatch = [\n  {big},\n]\n", "line 8"),
    ]
    for name, body, field in cases:
        f = tmp_path / f"{name}.toml"
        f.write_text(head + body)
        assert main(["evaluate", "--instance", str(f)]) == 2
        err = capsys.readouterr().err
        assert f"error: instance {name}.toml {field}: holds a number of over 4,000 digits" in err, err
        assert "sys.set_int_max_str_digits" not in err and err.count("\n") == 1, err


def test_a_json_integer_too_long_to_read_names_the_file(tmp_path, capsys):
    """Plan and trace files with an integer of over 4,300 digits gave Python's own message (about
    sys.set_int_max_str_digits); they name the file as given."""
    plan = tmp_path / "p.json"
    MX2 = ["--model", "mixtral-8x7b", "--mesh", "2x2"]
    assert main(["evaluate", *MX2, "--strategy", "ep", "--save-plan", str(plan)]) == 0
    big = tmp_path / "big.json"
    big.write_text(plan.read_text().replace('"num_experts": 8', '"num_experts": ' + "9" * 5000, 1))
    trace = tmp_path / "t.json"
    trace.write_text('{"0": [[' + "9" * 5000 + ", 1]]}")
    inst = tmp_path / "i.toml"
    inst.write_text('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n[workload]\n'
                    'trace = "t.json"\n')
    capsys.readouterr()
    cases = [
        (["evaluate", "--plan", str(big)], "plan", "big.json holds a whole number of 5,000 digits"),
        (["plot", "placement", str(big), "--out", str(tmp_path / "x.png")], "plan", "big.json holds a whole number"),
        (["evaluate", *MX2, "--trace", str(trace)], "--trace", "t.json holds a whole number of 5,000 digits"),
        (["evaluate", "--instance", str(inst)], "instance i.toml [workload].trace", "t.json holds a whole number"),
    ]
    for argv, field, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {field}: " in err and says in err and err.count("\n") == 1, (argv, err)
        assert "set_int_max_str_digits" not in err, err
    with pytest.raises(InputError, match="holds a whole number") as exc:
        hm.load_trace(trace, 8, 2)
    assert exc.value.field == "trace"


def test_cli_review_findings(tmp_path, capsys):
    """Inputs a CLI review found accepted or misreported: each now gets one line naming what the
    user wrote."""
    import gzip

    trace = ROOT / "instances" / "traces" / "mixtral_writing_4k.json.gz"
    raw = json.loads(gzip.decompress(trace.read_bytes()))
    shifted = tmp_path / "from1.json"
    shifted.write_text(json.dumps({str(int(k) + 1): v for k, v in raw.items()}))
    big = tmp_path / "big.toml"
    big.write_text('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n[workload]\n'
                   "batch = " + "9" * 5000 + "\n")
    from_file = tmp_path / "i.toml"
    from_file.write_text('[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'
                         '[workload]\ntrace = "from1.json"\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    plan = tmp_path / "p.json"
    MX2 = ["--model", "mixtral-8x7b", "--mesh", "2x2"]
    assert main(["evaluate", *MX2, "--strategy", "ep", "--save-plan", str(plan)]) == 0
    d = json.loads(plan.read_text())
    d["strategyy"] = "typo"
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps(d))
    capsys.readouterr()
    cases = [
        (["evaluate", *MX2, "--trace", str(shifted)], "--trace", 'they run "1".."32"'),
        (["evaluate", "--instance", str(from_file)], "instance i.toml [workload].trace", 'they run "1".."32"'),
        (["evaluate", "--instance", str(big)], "instance big.toml [workload].batch", "4,000 digits"),
        (["evaluate", "--plan", str(typo)], "plan typo.json", "strategyy"),
        (["solve", *MX2, "--layers", "0", "--out", str(a_file / "p.json")], "--out", "is a file, not a folder"),
        (["solve", *MX2, "--layers", "0", "--force"], "--force", "only applies with --out"),
        (["evaluate", *MX2, "--force"], "--force", "only applies with --save-plan"),
        (["bench", "--quick", "--models", "mixtral-8x7b,", "--out", str(tmp_path / "b")], "--models", "empty item"),
        (["evaluate", "--model", "mixtral-8x7b", "--mesh", "\uff14x2"], "--mesh", "malformed"),
        (["solve", *MX2, "--layers", "\uff11"], "--layers", "comma-separated"),
    ]
    for argv, field, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {field}" in err and says in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "b").exists()
    # spaces around layer numbers are read as the numbers
    assert main(["solve", *MX2, "--layers", " 0, 1", "--time-limit", "0.5", "--no-baselines", "--json"]) == 0
    assert [r["layer"] for r in json.loads(capsys.readouterr().out)["layers"] if r["status"] != "not-solved"] == [0, 1]
    # Python: a plan is saved as .json only; speedups over a zero TBT are refused
    with pytest.raises(InputError, match="a plan file is JSON") as exc:
        hm.load_plan(plan).save(tmp_path / "p.txt")
    assert exc.value.field == "path" and not (tmp_path / "p.txt").exists()
    from hdmoe_milp import report as rp

    df = pd.DataFrame([{"model": "m", "hw": "h", "strategy": "tp", "tbt_us": 0.0},
                       {"model": "m", "hw": "h", "strategy": "plan", "tbt_us": 1.0}])
    with pytest.raises(InputError, match="tbt_us of the tp row"):
        rp.speedup_table(df)


def test_api_inputs_that_used_to_give_silently_wrong_answers():
    """Frequencies that disagree with the trace the evaluator scores (the solve then reported 'optimal,
    gap 0' for a beaten plan), rows not summing to top-k, a plan shadowed by a strategy of the same
    name, a contiguous replay window wrapping round the trace, fractional or boolean expert ids, an
    unknown hardware point recorded in plan files: each is one InputError naming the argument."""
    from hdmoe_milp.placement import LayerPlacement

    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=256).to_problem()
    plan = hm.place(problem, "tp")
    skewed = np.tile([1.0, 1.0, 0, 0, 0, 0, 0, 0], (32, 1))  # each expert at most every token
    for call, field in (
        (lambda: problem.with_(frequencies=skewed), "frequencies"),
        (lambda: hm.Problem(problem.model, problem.hardware, None, frequencies=skewed * 0.5), "frequencies"),
        (lambda: hm.compare(problem, ["tp"], plans={"tp": plan}), "plans"),
        (lambda: hm.replay(problem, plan, batch=5000, batching="contiguous", batches=2), "batch"),
        (lambda: LayerPlacement(np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3, 0]], np.r_[np.arange(8), 0.7], np.ones(9), 8),
         "placement.expert_of"),
        (lambda: hm.Trace((np.array([[False, True]]),) * 32, 8, 2), "trace layer 0"),
        (lambda: problem.with_(hw_point="99/1"), "hw_point"),
        (lambda: hm.EvalOptions(seed=2.5), "seed"),
        (lambda: hm.solve(problem, baselines=None), "baselines"),
        (lambda: hm.replay(problem, plan, foo=1, batches=1, batch=8), "foo"),
    ):
        with pytest.raises(InputError) as exc:
            call()
        assert exc.value.field == field
    # a whole float seed is taken as everywhere else (Problem, evaluate, place, replay), stored as an int
    assert type(hm.EvalOptions(seed=2.0).seed) is int and hm.EvalOptions(seed=2.0) == hm.EvalOptions(seed=2)
    # the frequencies a problem derives from its own trace still travel with it
    assert problem.with_(batch=64).frequencies.shape == (32, 8)
    assert hm.Problem(problem.model, problem.hardware, None, frequencies=skewed).frequencies.sum() == 64


def test_a_plan_scored_on_another_hardware_point_or_pool_is_not_refused(files, capsys, monkeypatch):
    """The record check (plan-meta-*-edited above) compares the plan with the hardware point it
    names; asking for another point with --hw is a question of its own and is answered."""
    monkeypatch.chdir(files)
    assert main(["evaluate", "--plan", str(files / "good_plan.json"), "--hw", "10/25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hw"] == "10/25" and out["tbt_us"] > 0
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=256).to_problem()
    for bad in ([1, 1], (0, 2, 0)):
        with pytest.raises(InputError, match="more than once") as exc:
            hm.solve(problem, layers=bad, time_limit_s=0.5)
        assert exc.value.field == "layers"
    with pytest.raises(InputError, match="CPU") as exc:
        hm.solve(problem, layers=[0], jobs=10_000, time_limit_s=0.5)
    assert exc.value.field == "jobs"


def test_bench_keeps_no_report_or_cache_entry_of_an_interrupted_solve(tmp_path, monkeypatch):
    """Ctrl-C inside a solve comes back as a result marked interrupted (solve prints it and exits
    130); bench must not write it to its cache or build a report on it: it stops with Ctrl-C."""
    from hdmoe_milp import grid

    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=256).to_problem()
    spec = grid.PRESETS["quick"]
    real = hm.solve(problem, time_limit_s=0.2, layers=[0], baselines=["tp"])
    cut = dataclasses.replace(real, solver={**real.solver, "interrupted": True})
    monkeypatch.setattr(grid.pl, "solve", lambda *a, **k: cut)
    with pytest.raises(KeyboardInterrupt):
        grid._solve_cached(problem, spec, tmp_path / "cache", 1, "local")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_plot_solver_draws_one_solve_and_ablation_needs_online_rows(tmp_path, capsys):
    """bench --solve-batch each writes one solve per batch into solver.csv: the figure draws one
    (the first, named in its caption), not the solves on top of each other. The ablation figure's
    third bar is the online policy: a table without online rows is refused."""
    import argparse

    from hdmoe_milp import cli_report

    df = pd.read_csv(ROOT / "docs" / "results" / "solver.csv")
    one = df[(df["model"] == df["model"].iloc[0]) & (df["hw"] == df["hw"].iloc[0]) & (df["mesh"] == df["mesh"].iloc[0])]
    two = pd.concat([one, one.assign(solve_batch=16, gap=one["gap"] * 2)])
    two.to_csv(tmp_path / "solver.csv", index=False)
    args = argparse.Namespace(model=None, hw=None, mesh=None, batch=None, layer=None)
    fig = cli_report._csv_figure("solver", cli_report._read_csv(tmp_path / "solver.csv", "solver"),
                                 tmp_path / "solver.csv", args)
    assert len(fig.axes[0].patches) == len(one)  # one bar per layer
    assert "batch=128" in fig.axes[0].get_title()
    res = pd.read_csv(ROOT / "docs" / "results" / "results.csv")
    res[res["part"] != "online"].to_csv(tmp_path / "results.csv", index=False)
    assert main(["plot", "ablation", str(tmp_path / "results.csv"), "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "online rows" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--models", "mixtral-8x7b,nope"], ["--hws", "5/50,7/"], ["--jobs", "100000"],
                                   ["--meshes", "4x4,4x"], ["--meshes", "4X4,4x4"], ["--solve-batch", "0"]])
def test_refused_bench_leaves_no_folder(tmp_path, flags, capsys):
    """Every flag is checked before bench creates its output folder (or solves anything)."""
    out = tmp_path / "report"
    assert main(["bench", "--quick", "--out", str(out), "--no-progress", *flags]) == 2
    assert not out.exists()
    assert capsys.readouterr().err.startswith("hdmoe-milp: error: " + flags[0])


def test_files_with_a_byte_order_mark_read_like_plain_utf8(tmp_path):
    """Windows editors write a UTF-8 byte-order mark: instance, trace and plan files with one read
    exactly as without (they were refused as invalid TOML/JSON at line 1, column 1)."""
    bom = b"\xef\xbb\xbf"
    trace = tmp_path / "t.json"
    layers = {str(layer): [[layer % 8, (layer + 1) % 8], [0, 3], [5, 2]] for layer in range(32)}
    trace.write_bytes(bom + json.dumps(layers).encode())
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(layers))
    a, b = hm.load_trace(trace, 8, 2), hm.load_trace(plain, 8, 2)
    assert all((x == y).all() for x, y in zip(a.layers, b.layers, strict=True))
    toml = (ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml").read_text()
    toml = toml.replace('"traces/', f'"{ROOT / "instances" / "traces"}/')
    inst = tmp_path / "bom.toml"
    inst.write_bytes(bom + toml.replace("\n", "\r\n").encode())
    (tmp_path / "plain.toml").write_text(toml)
    p_bom, p_plain = hm.load_instance(inst), hm.load_instance(tmp_path / "plain.toml")
    assert p_bom.batch == p_plain.batch and p_bom.trace.sha256 == p_plain.trace.sha256
    plan = tmp_path / "plan.json"
    hm.place(p_plain, "ep").save(plan)
    bom_plan = tmp_path / "bom_plan.json"
    bom_plan.write_bytes(bom + plan.read_bytes())
    assert Placement.load(bom_plan).to_dict() == Placement.load(plan).to_dict()


def test_a_trace_missing_a_middle_layer_names_that_layer(files, capsys):
    trace = {str(li): [[0, 1], [2, 3]] for li in range(32) if li != 5}
    (files / "gap.json").write_text(json.dumps(trace))
    assert main(["evaluate", *MX, "--trace", str(files / "gap.json"), "--strategy", "tp"]) == 2
    err = capsys.readouterr().err
    assert "lack '5'" in err and "'31'" not in err


def test_trace_files_with_upper_case_extensions_are_read(files, tmp_path):
    src = json.loads((files / "good_trace.json").read_text())
    (tmp_path / "T.JSON").write_text(json.dumps(src))
    (tmp_path / "T.JSON.GZ").write_bytes(gzip.compress(json.dumps(src).encode()))
    a = hm.load_trace(files / "good_trace.json", 8, 2)
    for name in ("T.JSON", "T.JSON.GZ"):
        b = hm.load_trace(tmp_path / name, 8, 2)
        assert all((x == y).all() for x, y in zip(a.layers, b.layers, strict=True))


def test_solve_records_the_evaluator_settings_it_scored_with(tmp_path, capsys):
    """solve scores in mesh mode with spread homes. An instance asking for paper mode or holder homes
    was solved anyway, and its numbers (mesh, spread) were labelled paper/holder in the output and
    the plan's record, so ``evaluate --plan`` then gave another TBT. The CLI now refuses such an
    instance, and so does the Python API (0.8.4; it solved the mesh problem and recorded that)."""
    for key, value in (("mode", "paper"), ("home", "holder")):
        inst = tmp_path / f"{key}.toml"
        inst.write_text(f'[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'
                        f'[workload]\nsynthetic_tokens = 64\n[evaluator]\n{key} = "{value}"\n')
        out = tmp_path / f"{key}.json"
        assert main(["solve", "--instance", str(inst), "--time-limit", "0.5", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"instance {key}.toml [evaluator].{key}" in err and f"--instance {key}.toml --plan" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    problem = Settings("t", "mixtral-8x7b", "5/50", "2x2", synthetic_tokens=64, mode="paper").to_problem()
    with pytest.raises(InputError) as e:
        hm.solve(problem, layers=[0], time_limit_s=0.5, baselines=False)
    assert e.value.field == "options.mode" and "hm.EvalOptions(delivery='unicast')" in e.value.fix
    res = hm.solve(problem.with_(options=hm.EvalOptions(delivery="unicast")), layers=[0], time_limit_s=0.5,
                   baselines=False)
    made = res.placement.meta["problem"]
    # a paper-mode problem names no delivery rule: its own (unicast) is what the MILP optimised
    assert (made["mode"], made["home"], made["delivery"]) == ("mesh", "spread", "unicast")
    assert res.problem.options.mode == "mesh"
    again = hm.evaluate(res.problem, res.placement).summary()["tbt_us"]
    assert again == pytest.approx(res.summary()["tbt_us"], rel=1e-12)
    path = tmp_path / "p.json"
    res.save(path)
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tbt_us"] == pytest.approx(again, rel=1e-12)
    # a recorded number that is text (or uneven lists) was a traceback in the record check
    for key, value in (("num_experts", ["x"]), ("hardware.compute_flops", ["a"]),
                       ("hardware.link_bw_bytes_per_s", [[1], [1, 2]])):
        d = json.loads(path.read_text())
        rec = d["meta"]["problem"]
        for part in key.split(".")[:-1]:
            rec = rec[part]
        rec[key.split(".")[-1]] = value
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        assert main(["evaluate", "--plan", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"plan bad.json meta.problem.{key}" in err and "Traceback" not in err, err


def test_error_lines_say_what_was_given(tmp_path, capsys):
    """Four messages that misled: a file name holding a line break split the error over two lines;
    ``--time-limit 1000001`` was "got 1e+06" against a limit of 1e+06; ``--out`` naming a folder
    was "a plan file is JSON"; a plan's hop latency of 10 s was shown in nanoseconds under the key
    in seconds."""
    folder = tmp_path / "plans"
    folder.mkdir()
    plan = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--strategy", "cb",
                 "--save-plan", str(plan)]) == 0
    d = json.loads(plan.read_text())
    d["meta"]["problem"]["hardware"]["hop_latency_s"] = 10.0
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(d))
    pk = tmp_path / "pk.npz"
    pk.write_bytes(b"PK")
    cut = tmp_path / "cut.npz"
    whole = (TRACES / "deepseek_v2_lite_law_4k.npz").read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    cases = [
        (["stats", "--model", "mixtral-8x7b", "--trace", "bad\nname.json"], "--trace", "bad\\nname.json"),
        (["solve", "--model", "mixtral-8x7b", "--time-limit", "1000001"], "--time-limit", "got 1000001"),
        (["solve", "--model", "mixtral-8x7b", "--out", str(folder)], "--out", "is a folder"),
        (["solve", "--model", "mixtral-8x7b", "--out", ""], "--out", "is empty"),
        (["evaluate", "--plan", str(slow)], "meta.problem.hardware.hop_latency_s", "<= 1, got 10.0"),
        # two bytes "PK": numpy took it for a pickle and said so
        (["stats", "--model", "mixtral-8x7b", "--trace", str(pk)], "--trace", "is not an .npz archive"),
        (["stats", "--model", "deepseek-v2-lite", "--trace", str(cut)], "--trace", "is a truncated or corrupt .npz"),
        # the OLMoE counts the synthetic profile is built from: "layer keys must be exactly 0..3"
        (["stats", "--model", "olmoe-1b-7b", "--trace", str(ROOT / "tests" / "data" / "olmoe_expert_counts.json")],
         "--trace", "per-expert counts (expert_counts), not a routing trace"),
    ]
    for argv, field, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and field in err and says in err, (argv, err)
    from hdmoe_milp.cli import one_line  # only breaks and control characters are escaped
    assert one_line("caf\u00e9 10.00\u202fAM\u00a0x\tb\nc\u2028d") == "caf\u00e9 10.00\u202fAM\u00a0x\\tb\\nc\\u2028d"


def test_an_instance_trace_that_is_missing_or_a_folder_says_which(tmp_path):
    """As the --trace flag says it: "file not found" or "is a directory" (it said "is not a file")."""
    (tmp_path / "traces").mkdir()
    for trace, says in (("nope.npz", "file not found"), ("traces", "is a directory")):
        inst = tmp_path / "i.toml"
        inst.write_text(f'[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "2x2"\n'
                        f'[workload]\ntrace = "{trace}"\n')
        with pytest.raises(InputError) as e:
            hm.load_instance(inst)
        assert e.value.field == "instance i.toml [workload].trace" and e.value.problem.startswith(says)


def test_a_plan_made_for_a_variant_of_a_preset_is_not_scored_as_the_preset(tmp_path, capsys):
    """Plans record the model's sizes (meta.problem.model_dims): a variant of mixtral-8x7b (8-bit
    weights, same name) is refused by the commands, which rebuild presets only; before, `evaluate
    --plan` scored it as the bf16 preset (8875.7 against the variant's 4681.5 us), exit 0."""
    base = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml").with_(batch=8)
    variant = base.with_(model=dataclasses.replace(base.model, weight_bytes=1.0))
    path, plain = tmp_path / "q8.json", tmp_path / "plain.json"
    hm.place(variant, "cb").save(path)
    hm.place(base, "cb").save(plain)
    assert Placement.load(path).meta["problem"]["model_dims"]["weight_bytes"] == 1.0
    for cmd in (["evaluate", "--plan", str(path)], ["replay", "--plan", str(path), "--batches", "2"],
                ["plot", "node-load", str(path), "--out", str(tmp_path / "n.png")]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert "meta.problem.model_dims.weight_bytes: records 1.0 but the preset mixtral-8x7b has 2.0" in err, err
        assert "hm.evaluate(hm.Problem(model" in err and err.count("\n") == 1
    # a size the preset leaves unset (paper_intermediate on mixtral) is a variant too
    paper = tmp_path / "paper.json"
    hm.place(base.with_(model=dataclasses.replace(base.model, paper_intermediate=4096)), "cb").save(paper)
    assert main(["evaluate", "--plan", str(paper)]) == 2
    err = capsys.readouterr().err
    assert "model_dims.paper_intermediate: records 4096 but the preset mixtral-8x7b sets none" in err
    assert main(["evaluate", "--plan", str(plain), "--json"]) == 0  # the preset's own plan is scored as before
    assert json.loads(capsys.readouterr().out)["tbt_us"] == pytest.approx(hm.evaluate(base, "cb").tbt_us, rel=1e-12)
    # a hand-edited record: an unknown size, or not an object, is refused by name
    for dims, says in (({"hidden": 4096, "hiden": 1}, "unknown key(s) 'hiden'"), ([1, 2], "must be an object")):
        d = json.loads(plain.read_text())
        d["meta"]["problem"]["model_dims"] = dims
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        assert main(["evaluate", "--plan", str(bad)]) == 2
        assert says in capsys.readouterr().err
