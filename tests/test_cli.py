"""The console script: tables, JSON, instances and one-line errors with exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from hdmoe_milp import Placement, get_model, make_hardware
from hdmoe_milp.cli import main
from hdmoe_milp.costs import fits_capacity
from hdmoe_milp.strategies import BASELINES as STRATEGIES

from .conftest import ROOT, TRACES

INSTANCE = str(ROOT / "instances" / "deepseek-v2-lite_5-50_4x8.toml")


def test_all_baselines_table(capsys):
    assert main(["evaluate", "--instance", INSTANCE, "--mesh", "2x4"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split()[0] for ln in out.splitlines()[2:]]
    assert rows == list(STRATEGIES)
    assert "tbt_us" in out.splitlines()[1]


def test_solve_json_reports_layers_and_baselines(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    rc = main(["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "10/25",
               "--trace", str(TRACES / "mixtral_reasoning_4k.json.gz"), "--backend", "cpsat", "--time-limit", "0.1",
               "--out", str(plan), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["layers"]) == 32
    for layer in d["layers"]:
        for key in ("status", "objective_s", "bound_s", "gap", "time_s", "backend", "objective_us", "bound_us"):
            assert key in layer
        assert layer["status"] in ("optimal", "feasible") and layer["bound_s"] <= layer["objective_s"] * (1 + 1e-9)
        # every time carries its unit in its key (it was "objective", "bound", ... in seconds)
        assert not {"objective", "bound", "warm_start_objective", "model_objective", "model_bound"} & set(layer)
        assert layer["objective_us"] == pytest.approx(layer["objective_s"] * 1e6, rel=1e-12)
    tbt = d["tbt_us"]
    assert set(tbt) == {"plan", *STRATEGIES}
    assert all(tbt["plan"] <= v * (1 + 1e-12) for v in tbt.values())
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "10/25", "--trace",
                 str(TRACES / "mixtral_reasoning_4k.json.gz"), "--plan", str(plan), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["tbt_us"] == pytest.approx(tbt["plan"], rel=1e-12)


def test_json_single_strategy(capsys):
    rc = main(["evaluate", "--model", "deepseek-v2-lite", "--mesh", "4x8", "--hw", "5/50", "--batch", "128",
               "--strategy", "tp", "--trace", str(TRACES / "deepseek_v2_lite_law_4k.npz"), "--mode", "paper",
               "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("tbt_us", "moe_compute_us", "moe_comm_us", "strategy", "mode"):
        assert key in d
    assert d["strategy"] == "tp" and d["mode"] == "paper"
    assert d["tbt_us"] == pytest.approx(3448.0, rel=1e-3)  # the paper's DeepSeek-V2-Lite 4x8 5/50 B=128 TP
    # the same "results" list as with several strategies, and the batch as the header writes it
    assert [r["strategy"] for r in d["results"]] == ["tp"] and d["results"][0]["tbt_us"] == d["tbt_us"]
    assert d["batch"] == 128 and isinstance(d["batch"], int)


def test_paper_mode_text_says_tp_is_costed_by_another_formula(capsys):
    base = ["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "10/25", "--strategy", "tp,ep",
            "--trace", str(TRACES / "mixtral_reasoning_4k.json.gz")]
    assert main([*base, "--mode", "paper"]) == 0
    out = capsys.readouterr().out
    assert "ring formula" in out and "--mode mesh" in out
    assert main(base) == 0
    assert "ring formula" not in capsys.readouterr().out


def test_plan_round_trip(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["evaluate", "--instance", INSTANCE, "--strategy", "cb", "--save-plan", str(plan), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    made = json.loads(plan.read_text())["meta"]
    assert made["problem"]["model"] == "deepseek-v2-lite" and made["problem"]["hw_point"] == "5/50"
    assert len(made["problem"]["trace_sha256"]) == 64 and made["solver"]["strategy"] == "cb"
    assert main(["evaluate", "--instance", INSTANCE, "--plan", str(plan), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["tbt_us"] == b["tbt_us"]


@pytest.mark.parametrize(
    "args,field",
    [
        (["--model", "gpt-5"], "model"),
        (["--hw", "3/30x"], "hw"),
        (["--mesh", "4by8"], "mesh"),
        (["--mesh", "0x8"], "mesh"),
        (["--batch", "0"], "batch"),
        (["--strategy", "magic"], "strategy"),
        (["--mode", "fast"], "mode"),
        (["--capacity-gb", "0.01"], "capacity"),
        (["--strategy", "tp,nope"], "strategy"),
        (["--model", "mixtral-8x7b", "--trace", str(TRACES / "deepseek_v2_lite_law_4k.npz")], "trace"),
        (["--trace", "/no/such/file.json"], "trace"),
        (["--dispatch", "closest"], "--dispatch"),
        (["--replica-rule", "closest"], "--replica-rule"),
        # hdmoe's stage 1 here runs on CP-SAT's work budget: 0.001 s and 100 s gave the same plan
        (["--strategy", "hdmoe", "--time-limit", "100"], "--time-limit: is not read by hdmoe"),
    ],
)
def test_bad_input_exit_2(capsys, args, field):
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hdmoe-milp: error:") and field in err[0]
    assert "Traceback" not in err[0]


def test_console_script_exit_status(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npreset = "deepseek-v2-lite"\n[hardware]\npreset = "5/50"\nmesh = "4x8"\nfoo = 1\n')
    r = subprocess.run([sys.executable, "-m", "hdmoe_milp.cli", "evaluate", "--instance", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "foo" in r.stderr


def test_stats(capsys):
    assert main(["stats", "--model", "deepseek-v2-lite", "--trace", str(TRACES / "deepseek_v2_lite_law_4k.npz"),
                 "--against", str(TRACES / "deepseek_v2_lite_translation_4k.npz"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0 < d["tv_median"] <= 1 and d["hottest_share_max"] <= 1


def test_replay_json_and_bad_policy(capsys):
    args = ["replay", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "2.5/75",
            "--plan-trace", str(TRACES / "mixtral_reasoning_4k.json.gz"),
            "--trace", str(TRACES / "mixtral_writing_4k.json.gz"), "--batch", "64", "--batches", "3"]
    assert main([*args, "--policy", "static,greedy", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in d["results"]] == ["static", "greedy"]
    for r in d["results"]:
        assert r["tokens"] == 3 * 64 and r["p50_us"] <= r["p99_us"]
    assert main([*args, "--policy", "clairvoyant"]) == 2
    err = capsys.readouterr().err
    assert "policy" in err and "Traceback" not in err
    assert main([*args, "--policy", "static", "--dispatch", "closest"]) == 2
    assert "dispatch" in capsys.readouterr().err


def test_replay_takes_batch_and_batching_from_the_instance(tmp_path, capsys):
    """replay --instance replays the file's [workload].batch and batching (it replayed 512 contiguous
    tokens whatever the file said); flags still override, and a fractional batch names the key."""
    trace = (TRACES / "mixtral_writing_4k.json.gz").resolve()

    def instance(workload: str) -> str:
        p = tmp_path / "x.toml"
        p.write_text(f'[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "2.5/75"\nmesh = "2x2"\n'
                     f'[workload]\ntrace = "{trace}"\n{workload}\n')
        return str(p)

    run = ["replay", "--batches", "2", "--policy", "static", "--plan-strategy", "ep", "--json"]
    assert main([*run, "--instance", instance('batch = 48\nbatching = "random"')]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["batch"], d["batching"], d["results"][0]["tokens"]) == (48, "random", 96)
    assert main([*run, "--instance", instance('batch = 48\nbatching = "random"'), "--batch", "16",
                 "--batching", "contiguous"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["batch"], d["batching"], d["results"][0]["tokens"]) == (16, "contiguous", 32)
    assert main([*run, "--instance", instance("batch = 40")]) == 0  # expected batching: replayed contiguous
    d = json.loads(capsys.readouterr().out)
    assert (d["batch"], d["batching"]) == (40, "contiguous")
    assert main([*run, "--instance", instance("seed = 1")]) == 0  # no batch written: the problem's default, 128
    assert json.loads(capsys.readouterr().out)["batch"] == 128
    # the evaluator's rules the latencies were scored with are printed, as evaluate prints them
    paper = instance('[evaluator]\nmode = "paper"')
    assert main([*run, "--instance", paper]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["mode"], d["context_len"], d["seed"]) == ("paper", 1024, 0) and d["delivery"] and d["home"]
    assert main([a for a in run if a != "--json"] + ["--instance", paper]) == 0
    assert " mode=paper delivery=" in capsys.readouterr().out.splitlines()[0]
    # a plan file: the batch it was made for
    saved = tmp_path / "p48.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "2.5/75", "--trace", str(trace),
                 "--batch", "48", "--strategy", "ep", "--save-plan", str(saved)]) == 0
    capsys.readouterr()
    assert main(["replay", "--plan", str(saved), "--batches", "2", "--policy", "static", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 48
    # Python replays the problem's batch by default too, as the CLI does
    import hdmoe_milp as hm

    p = hm.load_instance(instance('batch = 48\nbatching = "random"'))
    r = hm.replay(p, hm.place(p, "ep"), policy="static", batches=2)
    assert int(r.tokens.sum()) == 96
    assert main([*run, "--instance", instance("batch = 40.5")]) == 2
    err = capsys.readouterr().err
    assert "x.toml [workload].batch" in err and "40.5" in err and "Traceback" not in err
    assert main([*run, "--instance", instance('batch = 9000\nbatching = "contiguous"')]) == 2
    err = capsys.readouterr().err
    assert "x.toml [workload].batch" in err and "longer than the trace" in err


def test_every_backend_the_help_names_is_accepted(capsys):
    """``--backend scip`` was refused by a list that predated the SCIP backend; every registered
    backend must get through the CLI (or say how to install it)."""
    import hdmoe_milp.solvers.backends as b

    for name in b.BACKENDS:
        rc = main(["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--no-baselines", "--backend", name,
                   "--layers", "0", "--time-limit", "0.5", "--json"])
        err = capsys.readouterr().err
        if name in b.available_backends():
            assert rc == 0, err
        else:
            assert rc == 2 and f"hdmoe_milp[{name}]" in err


def test_solve_notes_layers_the_deterministic_safety_net_stopped(capsys, monkeypatch):
    """A deterministic layer stopped by the wall-clock safety net is counted in the summary and named
    in a note on stderr (here the layers' flags are set after the solve: when the net stops a layer
    is tested in test_milp); an unhurried run has neither."""
    from dataclasses import replace

    import hdmoe_milp.pipeline as pl

    args = ["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--layers", "0,1", "--time-limit", "0.3",
            "--no-baselines", "--deterministic", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["summary"]["wall_capped"] == 0 and "safety net" not in err
    solve = pl.solve

    def capped(*a, **kw):
        res = solve(*a, **kw)
        return replace(res, layers=[replace(r, wall_capped=r.layer in (0, 1)) for r in res.layers])

    monkeypatch.setattr(pl, "solve", capped)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["summary"]["wall_capped"] == 2
    assert "2 layer(s) reached the wall-clock safety net of --deterministic (layers 0, 1)" in err


def test_solve_says_when_the_whole_models_schedule_cut_layers(capsys):
    """A run that started long before its layers (here: started given 10 minutes back) cuts every layer
    to the floor of its limit; the JSON records each layer's cut limit and stderr says how many and to
    what. A run on time cuts none and says nothing."""
    import time

    from hdmoe_milp.strategies.block_milp.solve import SCHEDULE_FLOOR

    args = ["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--time-limit", "0.4", "--no-baselines", "--json"]
    assert main(args, started=time.time() - 600) == 0
    out, err = capsys.readouterr()
    cut = [r["cut_limit_s"] for r in json.loads(out)["layers"]]
    assert cut == [pytest.approx(SCHEDULE_FLOOR * 0.4)] * len(cut)
    assert f"{len(cut)} layer(s) ran on a shorter limit, 0.1-0.1 s" in err
    assert main([*args[:-3], "30", "--no-baselines", "--json", "--layers", "0"]) == 0
    out, err = capsys.readouterr()
    assert all(r["cut_limit_s"] is None for r in json.loads(out)["layers"]) and "shorter limit" not in err


def test_solve_flags_reach_the_solver(capsys):
    """--deterministic and --no-branch-and-bound: the same numbers twice, counted in work, and no
    branch and bound in any layer's account (it would prove these 2x2 layers at once)."""
    args = ["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--layers", "0,1", "--time-limit", "0.5",
            "--no-baselines", "--json"]
    runs = []
    for _ in range(2):
        assert main([*args, "--deterministic", "--no-branch-and-bound"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["time_mode"] == "deterministic"
    keep = ("layer", "status", "objective_s", "bound_s", "source", "message")
    assert [{k: r[k] for k in keep} for r in runs[0]["layers"]] == [{k: r[k] for k in keep} for r in runs[1]["layers"]]
    assert all("branch and bound" not in r["message"] for r in runs[0]["layers"])
    assert main(args) == 0
    with_bnb = json.loads(capsys.readouterr().out)
    assert with_bnb["time_mode"] == "wall"
    assert any("branch and bound" in r["message"] for r in with_bnb["layers"][:2])


def test_replay_a_saved_plan_on_the_problem_it_records(tmp_path, capsys):
    """replay --plan FILE takes the model, mesh, hardware point and trace from the plan's record."""
    plan = tmp_path / "cb.json"
    trace = str(TRACES / "mixtral_writing_4k.json.gz")
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "2.5/75", "--trace", trace,
                 "--strategy", "cb", "--save-plan", str(plan)]) == 0
    capsys.readouterr()
    assert main(["replay", "--plan", str(plan), "--batch", "64", "--batches", "2", "--policy", "static,greedy",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "mixtral-8x7b" and d["mesh"] == "2x2" and d["hw"] == "2.5/75"
    assert d["replica_rule"] == "balanced"  # replay's own default, said (evaluate's is fraction)
    assert [r["policy"] for r in d["results"]] == ["static", "greedy"]
    assert all(r["tokens"] == 2 * 64 for r in d["results"])
    assert main(["replay", "--plan", str(plan), "--batch", "64", "--batches", "2", "--policy", "static"]) == 0
    assert "plan='cb.json'" in capsys.readouterr().out.splitlines()[0]  # the text header names the plan too


def test_evaluate_delivery_and_home_flags(capsys):
    """Unicast sends one message per destination node, so it never loads a link less than the
    tree; both settings are echoed."""
    base = ["evaluate", "--model", "deepseek-v2-lite", "--mesh", "4x8", "--hw", "10/25", "--strategy", "ep",
            "--trace", str(TRACES / "deepseek_v2_lite_law_4k.npz"), "--json"]
    out = {}
    for delivery in ("tree", "unicast"):
        assert main([*base, "--delivery", delivery, "--home", "spread"]) == 0
        out[delivery] = json.loads(capsys.readouterr().out)
        assert out[delivery]["delivery"] == delivery and out[delivery]["home"] == "spread"
    assert out["unicast"]["moe_comm_us"] > out["tree"]["moe_comm_us"]
    assert out["unicast"]["moe_compute_us"] == pytest.approx(out["tree"]["moe_compute_us"])
    assert main([*base, "--home", "holder"]) == 0
    assert json.loads(capsys.readouterr().out)["home"] == "holder"


def test_solve_text_gives_percent_gaps_and_a_summary_of_the_solved_layers(capsys):
    """The text table shows the same numbers as --json (gap and improvement in percent, times in
    µs), ``-`` for layers not solved, and one summary line over the solved layers only."""
    args = ["solve", "--model", "mixtral-8x7b", "--mesh", "2x2", "--layers", "0,2", "--time-limit", "0.5",
            "--no-baselines", "--deterministic"]
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    layers = {r["layer"]: r for r in d["layers"]}
    assert d["summary"]["layers_solved"] == 2 and d["summary"]["gap_max"] == max(layers[li]["gap"] for li in (0, 2))
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["layer", "status"])
    cols = lines[head].split()
    assert cols[4] == "gap_%" and cols[5] == "improvement_%"
    rows = {int(ln.split()[0]): ln.split() for ln in lines[head + 1:head + 33]}
    assert len(rows) == 32 and "NaN" not in "\n".join(lines)
    for li, row in rows.items():
        if li in (0, 2):
            assert float(row[2]) == pytest.approx(layers[li]["objective_s"] * 1e6, abs=5e-4)
            assert float(row[4]) == pytest.approx(layers[li]["gap"] * 100, abs=5e-3)
        else:
            assert row[1] == "not-solved" and row[3] == row[4] == "-"
    gaps = [layers[li]["gap"] * 100 for li in (0, 2)]
    summary = lines[head + 33]
    assert summary.startswith("2 layers solved: ")
    assert f"{sum(g <= 1 for g in gaps)} proven within 1 %" in summary and f"max {max(gaps):.2f} %" in summary


def test_stats_explains_every_line_true_to_its_definition(tmp_path, capsys):
    """stats printed bare names (hottest_share_median, tv_max, ...). A legend under the table (and in
    --help) now says what each measures; on a hand-made trace every number is what its line says.
    Trace A, every layer, 4 tokens: {0,1}, {0,1}, {0,2}, {3,4}; trace B: {0,1} four times."""
    import numpy as np

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, topk_ids=np.repeat(np.array([[0, 1], [0, 1], [0, 2], [3, 4]])[:, None, :], 32, axis=1))
    np.savez(b, topk_ids=np.repeat(np.array([[0, 1]] * 4)[:, None, :], 32, axis=1))
    args = ["stats", "--model", "mixtral-8x7b", "--mesh", "2x4", "--seed", "5", "--trace", str(a), "--against", str(b)]
    assert main(args) == 0
    table, legend = capsys.readouterr().out.split("\n\n", 1)
    row = dict(ln.split(maxsplit=1) for ln in table.splitlines())
    explained = {k: " ".join(line.split()) for line in re.split(r"\n(?=  \S)", legend)[1:]
                 for k in line.strip().split(":", 1)[0].split(", ")}
    assert set(explained) == set(row)  # every line of the table, and nothing else
    # "fraction of the layer's tokens that pick its most-used expert": 3 of 4 tokens pick expert 0
    assert "fraction of the layer's tokens" in explained["hottest_share_median"]
    assert float(row["hottest_share_median"]) == 0.75 == float(row["hottest_share_max"])
    # "tokens routed to the most-used expert / the mean over its experts": 3 / (8 slots / 8 experts)
    assert "/ the mean over its experts" in explained["expert_max_over_mean_median"]
    assert float(row["expert_max_over_mean_median"]) == 3.0
    # "fraction of tokens whose top-k holds its most frequent pair": {0,1} in 2 of 4
    assert "most frequent pair" in explained["top_pair_share_median"]
    assert float(row["top_pair_share_median"]) == 0.5
    # 8 experts dealt at random over the 8 nodes: one each, so busiest node / mean node = 3 whatever the seed
    assert "8 nodes of the 2x4 mesh" in explained["ep_node_max_over_mean_median"]
    assert "seed 5" in explained["ep_node_max_over_mean_median"]
    assert float(row["ep_node_max_over_mean_median"]) == 3.0
    # "0.5 * sum |p - q|" over each expert's share of the slots: 0.5 * (1/8 + 2/8 + 1/8 + 1/8 + 1/8)
    assert "total-variation" in explained["tv_max"] and "0.5 * sum |p - q|" in explained["tv_max"]
    assert float(row["tv_median"]) == 0.375
    assert int(row["tokens"]) == 4 and int(row["layers"]) == 32
    # --json: the same keys as before, no legend
    assert main([*args, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(row) == {
        "trace", "model", "layers", "tokens", "hottest_share_min", "hottest_share_median", "hottest_share_max",
        "expert_max_over_mean_median", "top_pair_share_median", "ep_node_max_over_mean_median", "tv_median", "tv_max"}
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    assert "tv_median, tv_max: drift against --against" in capsys.readouterr().out


def test_replay_without_static_says_why_it_has_no_speedup(capsys):
    base = ["replay", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "5/50", "--plan-strategy", "cb",
            "--trace", str(TRACES / "mixtral_writing_4k.json.gz"), "--batches", "2"]
    assert main([*base, "--policy", "greedy"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "speedup_vs_static" not in out.splitlines()[1]
    assert "add static to --policy" in out
    assert main([*base, "--policy", "greedy,static"]) == 0
    out = capsys.readouterr().out
    assert "speedup_vs_static" in out.splitlines()[1] and "add static" not in out


def test_a_saved_plan_is_scored_with_the_evaluator_settings_it_records(tmp_path, capsys):
    """A plan made for a 4,096-token context under the ``nearest`` replica rule was rescored with
    the defaults (1,024 tokens, ``fraction``) by ``evaluate --plan``: a silently different TBT. It
    now records both and is scored with them; a flag still overrides the rule."""
    inst = tmp_path / "ctx.toml"
    inst.write_text(f'[model]\npreset = "mixtral-8x7b"\n[hardware]\npreset = "5/50"\nmesh = "4x4"\n'
                    f'[workload]\ntrace = "{TRACES / "mixtral_writing_4k.json.gz"}"\n'
                    f'[evaluator]\ncontext_len = 4096\n')
    plan = tmp_path / "eplb.json"

    def tbt(*argv: str) -> dict:
        assert main(["evaluate", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    made = tbt("--instance", str(inst), "--strategy", "eplb", "--replica-rule", "nearest", "--save-plan", str(plan))
    record = json.loads(plan.read_text())["meta"]["problem"]
    assert (record["context_len"], record["replica_rule"], record["coalesce"]) == (4096, "nearest", "node")
    again = tbt("--plan", str(plan))
    assert again["context_len"] == 4096 and again["replica_rule"] == "nearest"
    assert again["tbt_us"] == pytest.approx(made["tbt_us"], rel=1e-12)
    # the settings matter here, so scoring with the defaults would have been a different answer
    plain = tmp_path / "plain.toml"  # an instance file's settings come before the plan's record
    plain.write_text(inst.read_text().replace("context_len = 4096", ""))
    default_ctx = tbt("--instance", str(plain), "--plan", str(plan))
    assert default_ctx["context_len"] == 1024 and default_ctx["tbt_us"] < made["tbt_us"]
    fraction = tbt("--plan", str(plan), "--replica-rule", "fraction")
    direct = tbt("--instance", str(inst), "--strategy", "eplb", "--replica-rule", "fraction")
    assert fraction["replica_rule"] == "fraction" and fraction["tbt_us"] == pytest.approx(direct["tbt_us"], rel=1e-12)
    assert fraction["tbt_us"] != pytest.approx(made["tbt_us"], rel=1e-6)
    # a record that is not a setting is refused in one line naming its key
    for key, value in (("context_len", -5), ("context_len", 1.5), ("replica_rule", "closest"), ("coalesce", 3)):
        d = json.loads(plan.read_text())
        d["meta"]["problem"][key] = value
        bad = tmp_path / f"bad_{key}.json"
        bad.write_text(json.dumps(d))
        assert main(["evaluate", "--plan", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"plan bad_{key}.json meta.problem.{key}" in err and len(err.strip().splitlines()) == 1, err


def test_solve_takes_the_capacity_and_hop_latency_flags(tmp_path, capsys):
    """The README offered ``solve --capacity-gb``, which solve did not read (only an instance file
    could set it). The plan keeps within it and records both settings."""
    out = tmp_path / "p.json"
    args = ["solve", "--model", "mixtral-8x7b", "--mesh", "4x4", "--hw", "5/50", "--layers", "0", "--time-limit", "0.5",
            "--no-baselines"]
    assert main([*args, "--capacity-gb", "7", "--hop-latency-ns", "20", "--out", str(out)]) == 0
    hw = json.loads(out.read_text())["meta"]["problem"]["hardware"]
    assert hw["dram_capacity_bytes"] == 7e9 and hw["hop_latency_s"] == pytest.approx(20e-9)
    plan = Placement.load(out)
    assert fits_capacity(plan, get_model("mixtral-8x7b"), make_hardware("5/50", "4x4", dram_capacity_bytes=7e9))
    capsys.readouterr()
    assert main([*args, "--capacity-gb", "2"]) == 2
    assert "--capacity-gb" in capsys.readouterr().err


def test_replay_reads_whole_numbers_in_any_notation(capsys):
    """``--batch 1e3`` and ``--batches 2.0`` are whole numbers and replay; ``--batch 64.5`` and
    ``--batches 2.5`` are refused by name, with exit status 2."""
    base = ["replay", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "5/50", "--plan-strategy", "ep",
            "--trace", str(TRACES / "mixtral_writing_4k.json.gz"), "--policy", "static", "--json"]
    assert main([*base, "--batch", "1e3", "--batches", "2.0"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["batch"], d["results"][0]["tokens"]) == (1000, 2000)
    assert isinstance(d["batch"], int)
    for flag, value in (("--batch", "64.5"), ("--batches", "2.5")):
        assert main([*base, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hdmoe-milp: error: {flag}:") and "whole" in err and "Traceback" not in err


def test_replaying_a_plan_made_for_a_fractional_batch_says_which_batch_it_replays(tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--batch", "64.5", "--strategy", "ep",
                 "--save-plan", str(plan)]) == 0
    capsys.readouterr()
    assert main(["replay", "--plan", str(plan), "--batches", "1", "--policy", "static", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["batch"] == 128
    assert "expected batch of 64.5" in cap.err and "--batch N" in cap.err


def test_a_plan_made_for_a_mesh_spelt_in_capitals_is_one_for_that_mesh(tmp_path, capsys):
    """``4X8`` is read as 4x8 everywhere; a plan file recording "2X2" was refused on 2x2, with a fix
    (score it on 2X2) that gave the same error."""
    plan = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2X2", "--strategy", "ep",
                 "--save-plan", str(plan)]) == 0
    d = json.loads(plan.read_text())
    d["meta"]["problem"]["mesh"] = "2X2"  # as other code might write it
    plan.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0
    assert main(["evaluate", "--plan", str(plan), "--mesh", "2X2", "--json"]) == 0
    assert main(["evaluate", "--plan", str(plan), "--mesh", "4x4"]) == 2


def test_policy_and_strategy_lists_may_have_spaces_after_commas(capsys):
    """``--policy "static, greedy"`` read ' greedy' as an unknown policy, where ``--layers "0, 1"``
    took the space."""
    base = ["--model", "mixtral-8x7b", "--mesh", "2x2", "--trace", str(TRACES / "mixtral_writing_4k.json.gz")]
    assert main(["replay", *base, "--batches", "1", "--batch", "8", "--policy", "static, greedy", "--json"]) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["results"]] == ["static", "greedy"]
    assert main(["evaluate", *base, "--strategy", "ep, tp", "--json"]) == 0
    assert [r["strategy"] for r in json.loads(capsys.readouterr().out)["results"]] == ["ep", "tp"]


def test_replay_scores_with_the_plans_message_rule(tmp_path, capsys):
    """A plan made in Python with coalesce="expert" is replayed under that rule, as evaluate scores it
    (the replay dropped it and merged messages per node), and the header says so."""
    from dataclasses import replace

    import hdmoe_milp as hm

    p = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    q = p.with_(hardware=make_hardware("5/50", "2x2"))
    per_expert = q.with_(options=replace(q.options, coalesce="expert"))
    plan = hm.place(per_expert, "ep")
    plan.save(tmp_path / "ep.json")
    assert main(["replay", "--plan", str(tmp_path / "ep.json"), "--batches", "2", "--policy", "static",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["coalesce"] == "expert"
    want = hm.replay(per_expert, plan, policy="static", batches=2, batch=d["batch"]).summary()["mean_us"]
    node = hm.replay(q, plan, policy="static", batches=2, batch=d["batch"]).summary()["mean_us"]
    assert d["results"][0]["mean_us"] == pytest.approx(want, rel=1e-9) and want != pytest.approx(node, rel=1e-6)


def test_ctrl_c_while_the_command_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    """The console script's entry (`hdmoe_milp._console`) imports the command inside its own handler:
    Ctrl-C while numpy, pandas and OR-Tools load is one line and exit status 130."""
    import importlib.abc

    from hdmoe_milp import _console

    class Interrupting(importlib.abc.MetaPathFinder):
        as_import_error = False

        def find_spec(self, name, path=None, target=None):
            if name == "hdmoe_milp.cli":
                if self.as_import_error:  # what a C extension makes of Ctrl-C during its init (matplotlib)
                    try:
                        raise KeyboardInterrupt
                    except KeyboardInterrupt as ki:
                        raise ImportError("initialization failed") from ki
                raise KeyboardInterrupt
            return None

    finder = Interrupting()
    monkeypatch.delitem(sys.modules, "hdmoe_milp.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for as_import_error in (False, True):
        finder.as_import_error = as_import_error
        assert _console.main(["--version"]) == 130
        assert capsys.readouterr().err == "hdmoe-milp: interrupted\n"
    assert _console.interrupted(ImportError("x")) is False  # a real ImportError is not swallowed


def test_ctrl_c_early_in_a_real_process_exits_130(tmp_path):
    """SIGINT 0.3 s after start (on this machine the command is still loading then; on a faster one it
    may be parsing or solving): exit status 130 and no traceback, wherever it lands."""
    import os
    import signal
    import time

    # the child gets Python's Ctrl-C handler even if the test runner's process ignores SIGINT
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from hdmoe_milp._console import main; sys.exit(main())")
    cmd = [sys.executable, "-c", code, "solve", "--instance", str(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml"),
           "--time-limit", "2", "--layers", "0", "--out", str(tmp_path / "plan.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


@pytest.mark.parametrize("backend", ["highs", "scip"])
def test_deterministic_is_refused_with_a_backend_that_has_no_work_limit(backend, capsys):
    """HiGHS and SCIP stop on the wall clock: `--deterministic` with them reported time_mode
    "deterministic" while SCIP's bound moved with the machine. Refused by name, before any work."""
    import hdmoe_milp as hm

    inst = str(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    assert main(["solve", "--instance", inst, "--layers", "0", "--deterministic", "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hdmoe-milp: error: --deterministic:") and f"{backend} has no work limit" in err
    with pytest.raises(hm.InputError) as e:
        hm.solve(hm.load_instance(inst), backend=backend, deterministic=True, layers=[0])
    assert e.value.field == "deterministic" and "cpsat or cbc" in e.value.fix


def test_a_plan_of_a_model_built_in_python_points_to_the_python_api(tmp_path, capsys):
    from hdmoe_milp import MoEModel, Problem, place
    from hdmoe_milp.synthetic import synthetic_trace

    m = MoEModel("custom-moe", num_experts=6, top_k=2, hidden=64, expert_intermediate=128, moe_layers=2)
    p = Problem(m, make_hardware("5/50", "2x2"), synthetic_trace(m, 256, seed=1), batch=32)
    place(p, "cb").save(tmp_path / "custom.json")
    for extra in ([], ["--model", "mixtral-8x7b"]):
        assert main(["evaluate", "--plan", str(tmp_path / "custom.json"), *extra]) == 2
        err = capsys.readouterr().err
        assert "meta.problem.model: is 'custom-moe', not one of the preset models" in err
        assert "hm.load_plan(path, problem)" in err
    assert main(["plot", "tbt", str(tmp_path)]) == 2
    assert "file: is a directory" in capsys.readouterr().err
