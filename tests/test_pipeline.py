"""The public pipeline: Problem validation, the strategy registry, plan files that say what they were
made for, the README's Python example, and the layering (fresh-interpreter imports)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import hdmoe_milp as hm
from hdmoe_milp.cli import main
from hdmoe_milp.evaluator import evaluate as score
from hdmoe_milp.synthetic import synthetic_trace

from .conftest import ROOT, TRACES

SMALL = hm.MoEModel("small", num_experts=8, top_k=2, hidden=256, expert_intermediate=512, moe_layers=2)


def small_problem(mesh: str = "2x2", **kw) -> hm.Problem:
    return hm.Problem(SMALL, hm.make_hardware("5/50", mesh), synthetic_trace(SMALL, 512, seed=1), **kw)


# --- Problem ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"batch": True}, "batch"),
        ({"batch": float("nan")}, "batch"),
        ({"batch": -3}, "batch"),
        ({"batch": 12.5, "batching": "random"}, "batch"),
        ({"seed": 1.7}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"batching": "bursty"}, "batching"),
        ({"options": "mesh"}, "options"),
    ],
)
def test_problem_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(hm.InputError) as ei:
        small_problem(**kw)
    assert ei.value.field == field


def test_problem_rejects_a_trace_of_another_model(ds_trace):
    with pytest.raises(hm.InputError) as ei:
        hm.Problem(hm.get_model("mixtral-8x7b"), hm.make_hardware("5/50", "4x8"), ds_trace)
    assert ei.value.field == "trace" and "mixtral" in str(ei.value)


def test_problem_statistics_are_computed_once_and_match_the_trace():
    p = small_problem()
    assert p.coactivation is p.coactivation and p.workload is p.workload
    np.testing.assert_allclose(p.frequencies, p.trace.frequencies())
    ids, fg = p.coactivation[1]
    assert fg.sum() == pytest.approx(1.0) and ids.shape[1] == SMALL.top_k
    assert p.workload.batch_size == 128 and p.workload.kind == "expected"
    with pytest.raises(ValueError):
        p.frequencies[0, 0] = 1.0  # read-only
    q = p.with_(batch=64)
    assert q.batch == 64 and p.batch == 128


# --- registry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(hm.STRATEGIES))
def test_every_strategy_follows_the_protocol(name):
    p = small_problem()
    budget = hm.Budget(time_limit_s=0.5)
    a = hm.STRATEGIES[name](p, seed=3, budget=budget)
    assert isinstance(a, hm.Placement)
    assert (a.num_layers, a.num_experts, a.num_nodes) == (SMALL.moe_layers, SMALL.num_experts, 4)
    ev = hm.evaluate(p, a)
    assert np.isfinite(ev.tbt_s) and ev.tbt_s > 0
    assert ev.tbt_s == score(a, SMALL, p.hardware, p.workload, p.options).tbt_s


def test_solve_is_never_worse_than_a_baseline_and_reports_every_layer(tmp_path):
    p = small_problem()
    res = hm.solve(p, backend="cpsat", time_limit_s=0.5, baselines=["tp", "ep-lpt", "cb"], progress=False)
    assert len(res.layers) == SMALL.moe_layers
    for r in res.layers:
        assert r.status in ("optimal", "feasible") and r.bound_s <= r.objective_s * (1 + 1e-9)
        assert r.final_source in ("milp", "tp", "ep-lpt", "cb")
    tbt = {n: e.tbt_s for n, e in res.evaluations.items()}
    assert all(tbt["plan"] <= v * (1 + 1e-12) for v in tbt.values())
    df = res.table()
    assert list(df["strategy"])[0] == "plan" and df["plan_speedup"].min() == pytest.approx(1.0)
    assert set(res.layer_table().columns) >= {"status", "objective_us", "bound_us", "gap"}
    s = res.summary()
    gaps = [r.gap for r in res.layers]
    assert s["layers_solved"] == SMALL.moe_layers and s["proven_1pct"] == sum(g <= 0.01 for g in gaps)
    assert s["gap_max"] == max(gaps) and s["tbt_us"] == res.evaluations["plan"].tbt_us
    assert s["improved"] == sum((r.improvement or 0) > 0 for r in res.layers)


def test_summary_counts_only_the_layers_solved():
    res = hm.solve(small_problem(), time_limit_s=0.3, layers=[1], baselines=False, progress=False)
    s = res.summary()
    assert s["layers_solved"] == 1 and s["gap_max"] == s["gap_median"] == res.layers[1].gap
    # a layer cut by Ctrl-C was counted as solved (its warm start's gap in the median)
    cut = dataclasses.replace(res, layers=tuple(dataclasses.replace(r, status="interrupted") if r.layer == 1 else r
                                                for r in res.layers))
    s = cut.summary()
    assert s["layers_solved"] == 0 and s["gap_median"] is None and s["proven_1pct"] == 0


# --- plan files --------------------------------------------------------------------------------------


def test_plan_file_records_what_it_was_made_for_and_is_checked(tmp_path):
    p = small_problem()
    res = hm.solve(p, backend="cbc", time_limit_s=0.5, baselines=["tp"], progress=False)
    path = tmp_path / "plan.json"
    res.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == "hdmoe_milp.placement/3" and d["package_version"] == hm.__version__
    made = d["meta"]["problem"]
    assert made["model"] == "small" and made["mesh"] == "2x2" and made["batch"] == 128
    assert made["hardware"]["compute_flops"] == 5e12
    assert d["meta"]["solver"]["backend"] == "cbc" and len(d["meta"]["layers"]) == SMALL.moe_layers
    back = hm.load_plan(path, p)
    assert hm.evaluate(p, back).tbt_s == pytest.approx(res.evaluations["plan"].tbt_s, rel=1e-12)
    # the same plan against another model / mesh: one error naming both sides
    with pytest.raises(hm.InputError) as ei:
        hm.load_plan(path, small_problem(mesh="1x4"))
    assert "'2x2'" in str(ei.value) and "'1x4'" in str(ei.value)


def test_cli_evaluate_plan_takes_model_and_mesh_from_the_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    mx = str(TRACES / "mixtral_reasoning_4k.json.gz")
    assert main(["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "10/25", "--trace", mx,
                 "--time-limit", "0.1", "--no-baselines", "--out", str(plan), "--json"]) == 0
    solved = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0  # no --model / --mesh / --hw / --trace
    ev = json.loads(capsys.readouterr().out)
    assert (ev["model"], ev["mesh"], ev["hw"]) == ("mixtral-8x7b", "2x2", "10/25")
    assert ev["tbt_us"] == pytest.approx(solved["tbt_us"]["plan"], rel=1e-12)
    # told otherwise: a different model is refused with one line naming both
    assert main(["evaluate", "--plan", str(plan), "--model", "deepseek-v2-lite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixtral-8x7b" in err[0] and "deepseek-v2-lite" in err[0]


def test_cli_rejects_conflicting_options_before_any_work(tmp_path, capsys):
    inst = str(ROOT / "instances" / "mixtral-8x7b_5-50_4x8.toml")
    assert main(["evaluate", "--instance", inst, "--plan", "x.json", "--strategy", "cb"]) == 2
    assert "strategy" in capsys.readouterr().err
    assert main(["evaluate", "--instance", inst, "--strategy", "tp,cb", "--save-plan", "p.json"]) == 2
    assert "save-plan" in capsys.readouterr().err
    assert main(["solve", "--instance", inst, "--out", str(tmp_path / "no" / "such" / "plan.json")]) == 2
    assert "out" in capsys.readouterr().err


def test_atomic_save_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    p = small_problem()
    plan = hm.place(p, "tp")
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        hm.place(p, "ep").save(path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left


# --- the README's example and the layering -----------------------------------------------------------


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a Python API example"
    (tmp_path / "instances").symlink_to(ROOT / "instances")
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert hm.load_plan(tmp_path / "plan.json").meta["problem"]["model"] == "mixtral-8x7b"


@pytest.mark.parametrize("module", ["hdmoe_milp.strategies", "hdmoe_milp.strategies.block_milp",
                                    "hdmoe_milp.online", "hdmoe_milp.evaluator", "hdmoe_milp.solvers",
                                    "hdmoe_milp.costs", "hdmoe_milp.pipeline"])
def test_each_layer_imports_first_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_package_loads_its_public_names_on_first_use():
    """``import hdmoe_milp`` loads nothing heavy (the CLI answers Ctrl-C while the rest loads); every
    name in ``__all__`` and every submodule is reachable as an attribute, as before."""
    code = ("import sys, hdmoe_milp as hm; heavy = [m for m in ('numpy', 'pandas', 'ortools') if m in sys.modules]; "
            "assert not heavy, heavy; [getattr(hm, n) for n in hm.__all__]; "
            "assert hm.online.GreedyRebalancer and hm.strategies.eplb_placement; "
            "from hdmoe_milp import *; assert solve is hm.solve and Placement is hm.Placement")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'solv'"):
        hm.solv  # noqa: B018


def test_hdmoe_layers_in_the_solve_pool_equal_the_strategy_run_alone():
    p = small_problem(mesh="2x4")
    res = hm.solve(p, backend="cpsat", time_limit_s=0.3, jobs=2, baselines=["hdmoe"], progress=False)
    alone = hm.place(p, "hdmoe")
    for a, b in zip(res.candidates["hdmoe"].layers, alone.layers, strict=True):
        np.testing.assert_array_equal(a.shares, b.shares)
    assert res.evaluations["hdmoe"].tbt_s == hm.evaluate(p, alone).tbt_s


def test_review_regressions(tmp_path, monkeypatch, capsys):
    """A new trace replaces what came from the old one; seeds are checked everywhere; a plan path
    that is a directory is one clear error; a plan's recorded trace is found from any folder, or
    its absence is one clear error; plan files are readable by others."""
    p = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    other = hm.load_trace(TRACES / "mixtral_writing_4k.json.gz", 8, 2)
    q = p.with_(trace=other)
    np.testing.assert_allclose(q.frequencies, other.frequencies())
    assert q.describe()["trace_sha256"] == other.sha256 != p.describe()["trace_sha256"]
    for bad in (-1, 1.5, "a", True):
        with pytest.raises(hm.InputError):
            hm.place(p, "ep", seed=bad)
    with pytest.raises(hm.InputError):
        hm.load_plan(tmp_path)
    plan = tmp_path / "plan.json"
    mx = "instances/traces/mixtral_reasoning_4k.json.gz"
    monkeypatch.chdir(ROOT)
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--trace", mx, "--strategy", "cb",
                 "--save-plan", str(plan), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert plan.stat().st_mode & 0o044  # group/other may read it (umask permitting)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tbt_us"] == a["tbt_us"]
    d = json.loads(plan.read_text())
    d["meta"]["problem"]["trace_path"] = str(tmp_path / "gone.json.gz")
    plan.write_text(json.dumps(d))
    assert main(["evaluate", "--plan", str(plan)]) == 2
    assert "gone.json.gz" in capsys.readouterr().err


def test_a_plans_record_holds_exactly_the_keys_plan_files_accept():
    """Plan files refuse keys outside RECORD_KEYS (a misspelling would be read as the default), so
    what describe() writes must be those keys, with and without a capacity and a trace file."""
    from hdmoe_milp.problem import RECORD_HARDWARE_KEYS, RECORD_KEYS

    p = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    for q in (p, p.with_(hardware=dataclasses.replace(p.hardware, dram_capacity_bytes=1e12))):
        d = q.describe()
        assert set(d) == RECORD_KEYS and set(d["hardware"]) == RECORD_HARDWARE_KEYS


def test_every_result_speaks_summary_to_frame_and_to_dict():
    """Comparison, Evaluation, ReplayResult and PlanResult share one vocabulary: ``summary()`` (a
    dict), ``to_frame()`` (tidy rows) and ``to_dict()`` (JSON-ready), and they agree with each other."""
    p = small_problem(mesh="2x4")
    cmp = hm.compare(p, ["tp", "ep", "cb"])
    t = cmp.table()
    sm = cmp.summary()
    assert sm["best"] == t.loc[t["tbt_us"].idxmin(), "strategy"] and sm["tbt_us"]["ep"] == cmp.evaluations["ep"].tbt_us
    assert sm["speedup_vs_tp"]["tp"] == 1.0 and sm["over_capacity"] == []
    d = json.loads(json.dumps(cmp.to_dict()))
    assert d["problem"]["mesh"] == "2x4" and [r["strategy"] for r in d["results"]] == ["tp", "ep", "cb"]
    assert [r["speedup_vs_tp"] for r in d["results"]] == pytest.approx(t["speedup_vs_tp"].tolist())
    f = cmp.to_frame()
    assert list(f["strategy"]) == ["tp", "ep", "cb"] and set(f["mesh"]) == {"2x4"} and f["tbt_us"].equals(t["tbt_us"])
    assert set(hm.PlanResult.__dict__) >= {"summary", "to_frame", "to_dict"}

    ev = cmp.evaluations["cb"]
    e = json.loads(json.dumps(ev.to_dict()))
    assert e["tbt_us"] == pytest.approx(ev.tbt_us) and len(e["per_layer"]["compute_us"]) == len(ev.compute_s)

    rr = hm.replay(p, cmp.placements["cb"], policy="static", batches=3, progress=False)
    r = json.loads(json.dumps(rr.to_dict()))
    assert r["batches"] == 3 and r["per_batch"]["batch"] == [0, 1, 2]
    assert r["per_batch"]["latency_us"] == pytest.approx(rr.to_frame()["latency_us"].tolist())


def test_results_cannot_change_under_their_users():
    """Frozen results hold read-only arrays: editing ``Evaluation.compute_s`` in place changed
    ``tbt_us`` and the solve's table (cb: 45128 -> 26836 us in the review's case)."""
    p = small_problem(mesh="2x4")
    ev = hm.evaluate(p, "cb")
    tbt = ev.tbt_us
    for arr in (ev.compute_s, ev.node_time_s, ev.link_bytes_dispatch):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0.0
    assert ev.tbt_us == tbt
    rr = hm.replay(p, hm.place(p, "cb"), policy="static", batches=2, progress=False)
    with pytest.raises(ValueError, match="read-only"):
        rr.latency_s[0] = 0.0
    res = hm.solve(p, time_limit_s=1, layers=[0], progress=False)
    with pytest.raises(ValueError, match="read-only"):
        res.layers[0].assign[0] = -1
    with pytest.raises(ValueError, match="read-only"):
        res.evaluations["cb"].compute_s[0] = 0.0


def test_replay_keeps_the_problems_batching_unless_told():
    p = small_problem(mesh="2x4", batch=32, batching="random")
    plan = hm.place(p, "cb")
    run = {b: hm.replay(p, plan, policy="static", batches=3, batching=b, progress=False).latency_s
           for b in ("random", "contiguous")}
    default = hm.replay(p, plan, policy="static", batches=3, progress=False).latency_s
    assert np.array_equal(default, run["random"]) and not np.array_equal(run["random"], run["contiguous"])
    expected = hm.replay(p.with_(batching="expected"), plan, policy="static", batches=3, progress=False).latency_s
    assert np.array_equal(expected, run["contiguous"])  # an expected-batch problem replays contiguous batches


def test_ctrl_c_while_the_baselines_are_built_or_scored_keeps_the_solved_layers(monkeypatch):
    """Ctrl-C after every layer's solve (while the baselines are built, or the candidates scored)
    returns the plan of what was built, marked interrupted, with the baselines left out named; it
    used to lose the whole solve."""
    import hdmoe_milp.pipeline as pipeline

    p = small_problem()
    real_place, real_score = pipeline.place, pipeline._score_named

    def place(problem, name, **kw):
        if name == "eplb":
            raise KeyboardInterrupt
        return real_place(problem, name, **kw)

    monkeypatch.setattr(pipeline, "place", place)
    res = hm.solve(p, time_limit_s=0.3, baselines=["tp", "ep", "eplb", "cb"], progress=False)
    assert res.solver["interrupted"] and res.solver["baselines_interrupted"] == ["eplb", "cb"]
    assert res.solver["baselines"] == ["tp", "ep"] and set(res.evaluations) == {"plan", "milp", "tp", "ep"}
    assert all(r.status not in ("interrupted", "not-solved") for r in res.layers)
    assert res.evaluations["plan"].tbt_s <= min(res.evaluations[n].tbt_s for n in ("milp", "tp", "ep")) + 1e-15

    monkeypatch.setattr(pipeline, "place", real_place)

    def score_named(name, *a, **kw):
        if name == "cb":
            raise KeyboardInterrupt
        return real_score(name, *a, **kw)

    monkeypatch.setattr(pipeline, "_score_named", score_named)
    res = hm.solve(p, time_limit_s=0.3, baselines=["tp", "cb"], progress=False)
    assert res.solver["interrupted"] and res.solver["baselines_interrupted"] == ["tp", "cb"]
    assert set(res.evaluations) == {"plan", "milp"} and res.placement.meta["solver"]["interrupted"]


@pytest.mark.parametrize(("options", "field"), [(hm.EvalOptions(mode="paper"), "options.mode"),
                                                (hm.EvalOptions(home="holder"), "options.home"),
                                                (hm.EvalOptions(coalesce="expert"), "options.coalesce"),
                                                (hm.EvalOptions(replica_rule="nearest"), "options.replica_rule")])
def test_solve_refuses_options_it_would_not_score_with(options, field):
    """solve optimises and scores the mesh model (spread homes, node coalescing): a problem asking for
    another is refused by name, as the CLI refuses such an instance file, instead of being solved and
    scored under other options than it asked for (a paper-mode problem's plan could then beat cb in
    the result's table and lose to it under the caller's own evaluator)."""
    p = small_problem()
    with pytest.raises(hm.InputError) as e:
        hm.solve(p.with_(options=options), time_limit_s=0.2, progress=False)
    assert e.value.field == field and "hm.evaluate(problem, result.placement)" in e.value.fix
    if field == "options.mode":  # paper mode's delivery is unicast: the fix keeps it
        assert "hm.EvalOptions(delivery='unicast')" in e.value.fix
    res = hm.solve(p.with_(options=hm.EvalOptions(delivery="unicast", context_len=64)), time_limit_s=0.2,
                   baselines=["cb"], progress=False)
    assert res.problem.options.resolved_delivery == "unicast" and res.problem.options.context_len == 64


@pytest.mark.parametrize("batching", ["random", "contiguous"])
def test_solve_refuses_a_sampled_batch_it_would_not_prove_anything_about(batching, tmp_path, capsys):
    """The MILP's objective, bound and gap are about the expected batch; a problem that asks for a
    sampled batch had its table and per-layer choice scored on other tokens (the review's DeepSeek
    4x4 instance: layers reported at 173 us, scored at 194-232 us, the plan slower than tp)."""
    p = small_problem(batching=batching, batch=32)
    with pytest.raises(hm.InputError) as e:
        hm.solve(p, time_limit_s=0.2, progress=False)
    assert e.value.field == "batching" and "with_(batching='expected')" in e.value.fix
    src = (ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml").read_text()
    inst = tmp_path / "sampled.toml"
    trace = (ROOT / "instances" / "traces" / "mixtral_reasoning_4k.json.gz").as_posix()
    inst.write_text(src.replace('batching = "expected"', f'batching = "{batching}"')
                    .replace('"traces/mixtral_reasoning_4k.json.gz"', f'"{trace}"'))
    assert main(["solve", "--instance", str(inst), "--time-limit", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "instance sampled.toml [workload].batching" in err and "evaluate --instance sampled.toml --plan" in err


def test_solve_counts_the_whole_model_from_run_start():
    """hm.solve(run_start=...): a run that started long ago (the caller's clock) leaves every layer the
    floor of its limit, and the layers say why; a time that is not time.time() (a day or more back:
    time.monotonic() by mistake) or not a number is refused, naming run_start."""
    import time

    from hdmoe_milp.strategies.block_milp.solve import SCHEDULE_FLOOR

    p = small_problem()
    res = hm.solve(p, time_limit_s=0.4, baselines=False, progress=False, run_start=time.time() - 600)
    assert len(res.layers) == 2
    assert all(f"cut from 0.4 to {SCHEDULE_FLOOR * 0.4:.3g} s" in r.message for r in res.layers)
    assert [r.cut_limit_s for r in res.layers] == [pytest.approx(SCHEDULE_FLOOR * 0.4)] * 2
    fresh = hm.solve(p, time_limit_s=30.0, baselines=False, progress=False, run_start=time.time())
    assert "cut from" not in fresh.layers[0].message and fresh.layers[0].cut_limit_s is None
    # a quick look at chosen layers is not the whole model: its layers keep their limit
    look = hm.solve(p, time_limit_s=0.4, layers=[0], baselines=False, progress=False, run_start=time.time() - 600)
    assert look.layers[0].cut_limit_s is None
    for bad in (time.monotonic() - 2 * 86400, "now", float("nan")):
        with pytest.raises(hm.InputError) as e:
            hm.solve(p, time_limit_s=0.4, layers=[0], baselines=False, progress=False, run_start=bad)
        assert e.value.field == "run_start"
