"""Report figures and tables, the benchmark grid, and the bench/plot commands."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrow

import hdmoe_milp as hm
from hdmoe_milp import cli_report, grid
from hdmoe_milp import report as rp
from hdmoe_milp.solvers import available_backends

ROOT = Path(__file__).resolve().parents[1]
INSTANCE = ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bars(ax) -> int:
    return sum(len(c) for c in ax.containers)


def _png_ok(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


@pytest.fixture(scope="module")
def small():
    problem = hm.load_instance(INSTANCE).with_(batch=32)
    cmp = hm.compare(problem, ["tp", "ep", "cb", "eplb"], progress=False)
    return problem, cmp


def test_to_frame_methods(small):
    problem, cmp = small
    ev = cmp.evaluations["ep"]
    f = ev.to_frame()
    assert len(f) == problem.num_layers
    assert np.allclose(f["compute_us"], ev.compute_s * 1e6)
    assert np.isclose(f["layer_us"].sum() + f.attrs["non_moe_us"], ev.tbt_us)
    r = hm.replay(problem, cmp.placements["ep"], policy="greedy", batch=64, batches=3)
    rf = r.to_frame()
    assert list(rf["batch"]) == [0, 1, 2] and np.allclose(rf["latency_us"], r.latency_s * 1e6)
    assert (rf["policy"] == "greedy").all()


def test_tables(small):
    problem, cmp = small
    df = rp.plan_frame(cmp)
    assert list(df["strategy"]) == ["cb", "eplb", "ep", "tp"]
    assert np.isclose(df.set_index("strategy").loc["tp", "tbt_norm_tp"], 1.0)
    two = pd.concat([df.assign(hw="5/50"), df.assign(hw="10/25", tbt_us=df["tbt_us"] * 2)])
    sp = rp.speedup_table(two, ours="cb")
    row = sp[(sp["hw"] == "5/50") & (sp["baseline"] == "tp")].iloc[0]
    assert np.isclose(row["mean"], cmp.evaluations["tp"].tbt_s / cmp.evaluations["cb"].tbt_s)
    md = rp.markdown(sp)
    assert md.startswith("| model") and "|:--" in md.splitlines()[1]


def test_figures_counts_and_png(small, tmp_path):
    problem, cmp = small
    mesh = problem.hardware.mesh
    df = rp.plan_frame(cmp)
    two = pd.concat([df.assign(hw="5/50"), df.assign(hw="10/25")])
    fig = rp.fig_tbt_normalised(two)
    assert isinstance(fig, Figure) and _bars(fig.axes[0]) == 2 * 4
    assert "mesh=4x4" in fig.axes[0].get_title()
    _png_ok(fig, tmp_path / "a.png")

    fig = rp.fig_decomposition(df)
    assert _bars(fig.axes[0]) == 4 * 4 and "batch=32" in fig.axes[0].get_title()
    _png_ok(fig, tmp_path / "b.png")

    evs = {n: cmp.evaluations[n] for n in ("ep", "cb", "tp")}
    fig = rp.fig_node_load(evs, layer=1)
    assert _bars(fig.axes[0]) == 3 * mesh.num_nodes
    _png_ok(fig, tmp_path / "c.png")

    fig = rp.fig_link_load(evs, mesh, layer=1)
    panels = fig.axes[:3]
    for ax in panels:
        assert sum(isinstance(p, FancyArrow) for p in ax.patches) == mesh.num_links == 48
    _png_ok(fig, tmp_path / "d.png")

    fig = rp.fig_placement_map(cmp.placements["cb"], mesh, layer=1, settings="x")
    assert len(fig.axes[0].texts) == mesh.num_nodes
    _png_ok(fig, tmp_path / "e.png")

    lt = pd.DataFrame({"layer": range(5), "gap": [0.0, 0.01, 0.02, None, 0.0], "time_s": [1, 2, 3, 4, 5]})
    fig = rp.fig_solver(lt, settings="x")
    assert [_bars(ax) for ax in fig.axes] == [4, 5]  # the layer without a gap is marked n/a, not a bar
    _png_ok(fig, tmp_path / "f.png")

    reps = {p: hm.replay(problem, cmp.placements["ep"], policy=p, batch=64, batches=4) for p in ("static", "greedy")}
    fig = rp.fig_online(reps, settings="x")
    assert len(fig.axes[0].get_lines()) == 2
    _png_ok(fig, tmp_path / "g.png")


def _md_table(text: str, heading: str) -> pd.DataFrame:
    block = text.split(heading, 1)[1].strip().split("\n\n")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|:")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return pd.DataFrame(cells[1:], columns=cells[0])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    p = argparse.ArgumentParser()
    cli_report.add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", "--quick", "--out", str(out), "--hws", "5/50", "--batches", "16,128",
                         "--time-limit", "0.02", "--online-batches", "3", "--jobs", "2", "--no-progress"])
    assert cli_report.run(args) == 0
    return out, p


def test_bench_writes_report(bench):
    out, _ = bench
    for name in ("results.csv", "results.md", "index.md", "solver.csv", "online.csv"):
        assert (out / name).stat().st_size > 0
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == 9 and len(list((out / "figures").glob("*.svg"))) == 9
    assert {p.name.split("_mixtral")[0] for p in pngs} >= {"ablation", "bound_trace"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    index = (out / "index.md").read_text()
    assert all(f"figures/{p.name}" in index for p in pngs)
    assert "over the best baseline of each point averages" in index
    res = pd.read_csv(out / "results.csv")
    assert set(res["strategy"]) >= {"ours", "tp", "ep", "cb", "eplb", "hdmoe", "milp", "ours+greedy"}
    assert not any("wall" in c or "time_s" in c for c in res.columns)
    ab = res[res["part"] == "ablation"]
    assert sorted(ab["strategy"]) == ["cb", "ours"] and (ab["batch"] == 512).all()
    # the ablation's static rows equal the evaluator's at the online batch, and stay out of the static tables
    sp = _md_table((out / "results.md").read_text(), "## Speedup of ours over each baseline")
    assert (sp["points"] == "2").all()  # batches 16 and 128: the ablation rows at 512 are not static points
    plan = hm.Placement.load(next((out / "plans").glob("*.json")))
    traces = [r["trace"] for r in plan.meta["layers"]]
    assert all(t and t[-1][3] == "final" for t in traces)


def test_results_md_equals_evaluator(bench):
    out, _ = bench
    md = (out / "results.md").read_text()
    problem = hm.load_instance(INSTANCE).with_(batch=128)
    plan = hm.load_plan(next((out / "plans").glob("*.json")), problem)
    tbt = {"ours": hm.evaluate(problem, plan).tbt_us}
    for name in ("tp", "ep", "ep-lpt", "cb", "eplb"):
        tbt[name] = hm.evaluate(problem, name).tbt_us
    table = _md_table(md, "## TBT at batch 128 (us)").set_index("strategy")
    for name, v in tbt.items():
        assert float(table.loc[name, "tbt_us"]) == pytest.approx(v, abs=0.006), name
    sp = _md_table(md, "## Speedup of ours over each baseline").set_index("baseline")
    res = pd.read_csv(out / "results.csv")
    st = res[res["part"] == "static"].pivot_table(index="batch", columns="strategy", values="tbt_us")
    assert float(st.loc[128, "tp"]) == pytest.approx(tbt["tp"], abs=1e-3)
    tp_speedup = st["tp"] / st["ours"]
    assert float(sp.loc["tp", "mean"]) == pytest.approx(tp_speedup.mean(), abs=6e-4)
    assert float(sp.loc["tp", "max"]) == pytest.approx(tp_speedup.max(), abs=6e-4)
    assert float(tp_speedup.loc[128]) == pytest.approx(tbt["tp"] / tbt["ours"], rel=1e-6)


def test_bench_rerun_uses_cache_and_is_byte_identical(bench, tmp_path):
    out, p = bench
    before = (out / "results.csv").read_bytes()
    args = p.parse_args(["bench", "--quick", "--out", str(out), "--hws", "5/50", "--batches", "16,128",
                         "--time-limit", "0.02", "--online-batches", "3", "--no-progress"])
    g = grid.run(grid.GridSpec(models=("mixtral-8x7b",), hws=("5/50",), meshes=("4x4",), batches=(16, 128),
                               time_limit_s=0.02, online_batches=3, policies=("static", "greedy", "eplb-periodic")),
                 out, progress=False)
    assert g.computed == 0
    assert cli_report.run(args) == 0
    assert (out / "results.csv").read_bytes() == before
    assert "wall" not in (out / "results.md").read_text()
    # every file of the report went through a temporary file and a rename: none is left behind
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]


def test_bench_into_a_used_folder_replaces_the_report_as_a_whole(bench, tmp_path):
    """A second, smaller run into the same folder leaves no figure, plan or online.csv of the first:
    every figure left is one index.md shows (the cache is kept, so nothing is solved again)."""
    out, p = bench
    again = tmp_path / "report"
    shutil.copytree(out, again)
    (again / "figures" / "mine.png").write_bytes(b"a figure bench did not write")  # a user's own file stays
    (again / "notes.md").write_text("mine")
    args = p.parse_args(["bench", "--quick", "--out", str(again), "--hws", "5/50", "--batches", "128",
                         "--time-limit", "0.02", "--online-batches", "0", "--no-progress"])
    assert cli_report.run(args) == 0
    assert not (again / "online.csv").exists()
    assert (again / "figures" / "mine.png").exists() and (again / "notes.md").exists()
    index = (again / "index.md").read_text()
    figures = sorted(f for f in (again / "figures").iterdir() if f.name != "mine.png")
    assert figures and all(f"figures/{f.stem}.png" in index for f in figures)
    listed = set((again / ".bench-files").read_text().split())
    assert listed == {str(f.relative_to(again)) for f in again.rglob("*")
                      if f.is_file() and f.parts[len(again.parts)] != "cache"} - {"figures/mine.png", "notes.md",
                                                                                   ".bench-files"}
    assert len(list((again / "figures").glob("*.png"))) < len(list((out / "figures").glob("*.png")))
    assert [f.name for f in (again / "plans").iterdir()] == [f.name for f in (out / "plans").iterdir()]
    assert (again / "cache").is_dir() and any((again / "cache").iterdir())


def test_ctrl_c_while_the_report_is_written_leaves_the_previous_report_whole(bench, tmp_path, monkeypatch):
    """The report is staged and moved into place at the end: a Ctrl-C while its files are written
    leaves the previous report as it was (the CSVs of a second run beside the first run's index.md
    and figures, before), and no staging folder."""
    out, p = bench
    again = tmp_path / "report"
    shutil.copytree(out, again)
    before = {f.relative_to(again): f.read_bytes() for f in again.rglob("*") if f.is_file()}
    calls = []

    def interrupted(*a, **k):  # the second figure: the CSVs and results.md are written by then
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = grid._save
    monkeypatch.setattr(grid, "_save", interrupted)
    args = p.parse_args(["bench", "--quick", "--out", str(again), "--hws", "5/50", "--batches", "128",
                         "--time-limit", "0.02", "--online-batches", "0", "--no-progress"])
    with pytest.raises(KeyboardInterrupt):  # the console entry turns it into exit status 130
        cli_report.run(args)
    after = {f.relative_to(again): f.read_bytes() for f in again.rglob("*") if f.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != "cache"} == \
        {k: v for k, v in before.items() if k.parts[0] != "cache"}
    assert not list(again.glob(".bench-staging-*"))


def test_plot_command(bench, tmp_path):
    out, p = bench
    plan = next((out / "plans").glob("*.json"))
    for kind, src in (("tbt", out / "results.csv"), ("decomposition", out / "results.csv"),
                      ("solver", out / "solver.csv"), ("online", out / "online.csv"), ("placement", plan),
                      ("link-load", plan), ("ablation", out / "results.csv"), ("bound-trace", plan)):
        target = tmp_path / f"{kind}.png"
        assert cli_report.run(p.parse_args(["plot", kind, str(src), "--out", str(target)])) == 0
        assert target.read_bytes()[:8] == PNG_MAGIC


def test_plot_says_which_point_it_drew_from_a_table_of_several(bench, tmp_path, capsys):
    out, p = bench
    res = pd.read_csv(out / "results.csv")
    two = tmp_path / "results.csv"
    pd.concat([res, res.assign(hw="10/25")]).to_csv(two, index=False)
    capsys.readouterr()
    assert cli_report.run(p.parse_args(["plot", "decomposition", str(two), "--out", str(tmp_path / "d.png")])) == 0
    assert "drew hw 5/50 (of 5/50, 10/25; --hw picks)" in capsys.readouterr().err
    assert cli_report.run(p.parse_args(["plot", "decomposition", str(two), "--hw", "10/25", "--out",
                                        str(tmp_path / "e.png")])) == 0
    assert capsys.readouterr().err == ""
    assert cli_report.run(p.parse_args(["plot", "decomposition", str(out / "results.csv"), "--out",
                                        str(tmp_path / "f.png")])) == 0
    assert capsys.readouterr().err == ""  # one point: nothing was picked


def test_plot_refuses_tables_bench_does_not_write(bench, tmp_path):
    """An ablation without cb rows left that bar out silently; a strategy or part of "zzz" and a
    fractional solver layer were drawn; a missing column gave a catch-all message or blamed the
    online rows. Each is refused, naming the file, the row or the column."""
    out, p = bench
    res, solver = pd.read_csv(out / "results.csv"), pd.read_csv(out / "solver.csv")
    online = pd.read_csv(out / "online.csv")

    def edit(df, f):
        d = df.copy()
        f(d)
        return d

    cases = {
        "nocb": ("ablation", res[res["strategy"] != "cb"], "no cb row"),
        "nogreedy": ("ablation", res[res["strategy"] != "ours+greedy"], "no ours+greedy (part online) row"),
        "nonmoe": ("ablation", res.drop(columns=["non_moe_us"]), "no column non_moe_us"),
        "nopart": ("ablation", res.drop(columns=["part"]), "no column part"),
        "nopart-tbt": ("tbt", res.drop(columns=["part"]), "no column part"),
        "strategy": ("decomposition", edit(res, lambda d: d.__setitem__("strategy", d["strategy"].where(
            d.index != 3, "zzz"))), "row 5: column strategy is 'zzz'"),
        "part": ("tbt", edit(res, lambda d: d.__setitem__("part", d["part"].where(d.index != 3, "zzz"))),
                 "row 5: column part is 'zzz'"),
        "layer": ("solver", edit(solver, lambda d: d.__setitem__("layer", d["layer"].astype(float).where(
            d.index != 2, 1.5))), "row 4: column layer is '1.5'"),
        # a gap above 1, a bound above its plan, a latency of 0 and a fractional batch index were drawn
        "gap": ("solver", edit(solver, lambda d: d.__setitem__("gap", d["gap"].astype(float).where(
            d.index != 1, 2.0))), "row 3: column gap is '2.0', not a relative gap <= 1"),
        "bound": ("solver", edit(solver, lambda d: d.__setitem__("bound_us", d["bound_us"].where(
            d.index != 0, d["objective_us"] * 1.5))), "row 2: column bound_us is"),
        "latency": ("online", edit(online, lambda d: d.__setitem__("latency_us", d["latency_us"].where(
            d.index != 1, 0.0))), "row 3: column latency_us is '0.0', not a number > 0"),
        "index": ("online", edit(online, lambda d: d.__setitem__("batch", d["batch"].astype(float).where(
            d.index != 1, 0.5))), "row 3: column batch is '0.5', not a whole batch index"),
    }
    for name, (kind, df, says) in cases.items():
        src = tmp_path / f"{name}.csv"
        df.to_csv(src, index=False)
        with pytest.raises(hm.InputError, match=re.escape(says)) as exc:
            cli_report.run(p.parse_args(["plot", kind, str(src), "--out", str(tmp_path / f"{name}.png")]))
        assert exc.value.field == "file" and f"{name}.csv" in exc.value.problem
        assert not (tmp_path / f"{name}.png").exists()


def test_bad_input():
    with pytest.raises(hm.InputError, match="preset"):
        grid.run("nope", "/nonexistent")
    assert re.search("x", rp.caption(model="x"))


def test_bench_on_ray_matches_local(bench, tmp_path):
    """``--executor ray`` on a local Ray instance gives the same results.csv as the local pool."""
    pytest.importorskip("ray", reason="ray is an optional extra (pip install '.[ray]')")
    out, p = bench
    args = p.parse_args(["bench", "--quick", "--out", str(tmp_path), "--hws", "5/50", "--batches", "16,128",
                         "--time-limit", "0.02", "--online-batches", "3", "--executor", "ray", "--no-progress"])
    assert cli_report.run(args) == 0
    assert (tmp_path / "results.csv").read_bytes() == (out / "results.csv").read_bytes()
    assert (tmp_path / "results.md").read_bytes() == (out / "results.md").read_bytes()


def test_plot_bound_trace_errors(bench, tmp_path):
    out, p = bench
    plan = next((out / "plans").glob("*.json"))
    with pytest.raises(hm.InputError, match="give one of 0..31"):
        cli_report.run(p.parse_args(["plot", "bound-trace", str(plan), "--layer", "99", "--out",
                                     str(tmp_path / "x.png")]))
    d = json.loads(plan.read_text())  # a layer that Ctrl-C stopped records no trace: said so, by layer
    d["meta"]["layers"][4].update(status="interrupted", trace=[])
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(d))
    with pytest.raises(hm.InputError, match="interrupted") as e:
        cli_report.run(p.parse_args(["plot", "bound-trace", str(cut), "--layer", "4",
                                     "--out", str(tmp_path / "y.png")]))
    assert e.value.field == "--layer" and "solve this one again" in e.value.fix
    # plot solver draws bench's solver.csv: a plan file is named as such, with where its layers are shown
    with pytest.raises(hm.InputError, match="is a plan file") as e:
        cli_report.run(p.parse_args(["plot", "solver", str(plan), "--out", str(tmp_path / "z.png")]))
    assert "bound-trace" in e.value.fix


# --- progress traces and the two figures built on them ------------------------------------------------------


def _tiny_layer(E: int = 6, mesh: str = "2x4"):
    from hdmoe_milp.synthetic import synthetic_trace

    m = hm.MoEModel("tiny", num_experts=E, top_k=2, hidden=256, expert_intermediate=512, moe_layers=1)
    hw = hm.Hardware(hm.Mesh.parse(mesh), compute_flops=1e9, link_bw_bytes_per_s=3e8)
    tr = synthetic_trace(m, 400, seed=1)
    return m, hw, tr.frequencies()[0], tr.coactivation(0)


def _check_backend_trace(out) -> None:
    t = [p[0] for p in out.trace]
    assert t == sorted(t) and t[0] >= 0
    primals = [p[1] for p in out.trace if p[1] is not None]
    bounds = [p[2] for p in out.trace if p[2] is not None]
    if primals and bounds:  # every bound is valid: below every solution found
        assert max(bounds) <= min(primals) * (1 + 1e-9)
    assert out.trace[-1][1:] == (out.primal, out.bound)


@pytest.mark.parametrize("backend", [b for b in ("cpsat", "cbc", "highs") if b in available_backends()])
def test_backend_trace(backend):
    from hdmoe_milp.solvers import SolveParams, get_backend
    from hdmoe_milp.strategies.block_milp import BlockModel

    m, hw, f, groups = _tiny_layer(E=4, mesh="2x2")
    lm = BlockModel(m, hw, f, 32, coactivation=groups).to_linear()
    out = get_backend(backend).solve(lm, SolveParams(time_limit_s=2, gap=1e-3, deterministic=True))
    assert out.primal is not None
    _check_backend_trace(out)
    if backend == "cpsat":  # incumbents through the callback, then the final point
        assert len(out.trace) >= 2
    else:  # no callback: the final point only
        assert len(out.trace) == 1


def test_layer_trace_of_a_real_cpsat_solve(tmp_path):
    from hdmoe_milp.solvers import SolveParams
    from hdmoe_milp.strategies.block_milp import LnsSettings, solve_layer

    m, hw, f, groups = _tiny_layer()
    # without the branch and bound, which proves this small layer before the model solve
    r = solve_layer(m, hw, f, 32, backend="cpsat", params=SolveParams(time_limit_s=5, gap=1e-6, deterministic=True),
                    coactivation=groups, lns_settings=LnsSettings(bnb=False))
    tr = r.trace
    times = [p[0] for p in tr]
    assert times == sorted(times) and times[-1] == pytest.approx(r.time_s)
    kinds = [p[3] for p in tr]
    assert kinds[0].startswith("warm-start:") and kinds[1] == "bound" and kinds[-1] == "final"
    assert any(k == "model:cpsat" for k in kinds)
    assert tr[-1][1:3] == (r.objective_s, r.bound_s)
    # evaluator terms: the certified bound is below every evaluator primal; the model's own bound below its primals
    ev = [p for p in tr if not p[3].startswith("model:")]
    assert max(p[2] for p in ev if p[2] is not None) <= min(p[1] for p in ev if p[1] is not None) * (1 + 1e-12)
    mo = [p for p in tr if p[3].startswith("model:")]
    assert max(p[2] for p in mo if p[2] is not None) <= min(p[1] for p in mo if p[1] is not None) * (1 + 1e-9)
    assert r.to_dict()["trace"] == [list(p) for p in tr]
    fig = rp.fig_bound_trace(tr, layer=0, settings="tiny")
    assert len(fig.axes[0].get_lines()) == 2 and "gap" in " ".join(t.get_text() for t in fig.axes[0].texts)
    _png_ok(fig, tmp_path / "trace.png")


def test_captions_fit_the_figures_of_a_small_mesh():
    """On a 2x2 mesh the figures are narrow: the caption's settings line is wrapped, not cut at both
    edges (node load, link load, placement map), and the link-load bar's label stays beside its bar."""
    problem = hm.load_instance(INSTANCE).with_(hardware=hm.make_hardware("5/50", "2x2"))
    cmp = hm.compare(problem, ["ep", "cb"], progress=False)
    settings = rp.caption(model=problem.model.name, mesh="2x2", hw="5/50", batch=128, mode="mesh")
    figs = {"node-load": (rp.fig_node_load(cmp.evaluations, settings=settings), lambda f: f.axes[0].title),
            "link-load": (rp.fig_link_load(cmp.evaluations, problem.hardware.mesh, settings=settings),
                          lambda f: f._suptitle),
            "placement": (rp.fig_placement_map(cmp.placements["cb"], problem.hardware.mesh, settings=settings),
                          lambda f: f.axes[0].title)}
    for name, (fig, title) in figs.items():
        fig.canvas.draw()
        box, page = title(fig).get_window_extent(), fig.bbox
        assert box.x0 >= page.x0 and box.x1 <= page.x1, name
        assert "\n" in title(fig).get_text().split("\n", 1)[1], name  # the settings line was wrapped


def test_fig_bound_trace_counts_and_png(tmp_path):
    trace = [(0.01, 6.4e-3, None, "warm-start:cb"), (0.02, None, 6.0e-3, "bound"),
             (0.5, 6.5e-3, 1e-3, "model:cpsat"), (0.9, 6.3e-3, 6.1e-3, "model:cpsat"),
             (1.0, 6.3e-3, 6.0e-3, "final")]
    fig = rp.fig_bound_trace(trace, layer=3, settings="x")
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and len(ax.get_lines()) == 2
    primal, bound = ax.get_lines()
    assert list(primal.get_ydata()) == pytest.approx([6400, 6300]) and list(bound.get_ydata()) == pytest.approx(
        [6000, 6000])
    assert len(ax.collections) == 2  # the solver's incumbents and its bounds, as markers only
    assert "1 lower, off the axis" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "MoE layer 3" in ax.get_title()
    _png_ok(fig, tmp_path / "bt.png")
    with pytest.raises(ValueError, match="empty"):
        rp.fig_bound_trace([])


def test_fig_bound_trace_draws_the_polish_and_branch_and_bound_points():
    """The polish's and the branch and bound's points are evaluator numbers found mid-solve; they
    were left out, so the primal dropped only at "final" and a bnb bound appeared only at the end.
    A trace with no evaluator number at all was a matplotlib traceback (NaN axis limits)."""
    trace = [(0.01, 6.4e-3, None, "warm-start:hdmoe"), (0.02, None, 5.0e-3, "bound"),
             (0.1, 6.2e-3, None, "polish"), (0.3, 6.1e-3, 6.05e-3, "bnb"), (0.4, 6.1e-3, 6.05e-3, "final")]
    primal, bound = rp.fig_bound_trace(trace).axes[0].get_lines()
    assert list(primal.get_xdata()) == pytest.approx([0.01, 0.1, 0.3, 0.4])
    assert list(primal.get_ydata()) == pytest.approx([6400, 6200, 6100, 6100])
    assert list(bound.get_ydata()) == pytest.approx([5000, 6050, 6050])
    for pts in ([(0.1, None, None, "final")], [(0.1, 6e-3, 5e-3, "done")]):
        with pytest.raises(ValueError, match="no evaluator primal or bound"):
            rp.fig_bound_trace(pts)


def _ablation_frame() -> pd.DataFrame:
    key = {"model": "m", "mesh": "4x4", "hw": "5/50", "mode": "mesh"}
    parts = {"moe_compute_us": 100.0, "dispatch_us": 20.0, "combine_us": 20.0, "non_moe_us": 60.0}
    rows = [{**key, "batch": 128, "part": "static", "strategy": s, "tbt_us": 200.0, **parts} for s in ("cb", "ours")]
    rows += [{**key, "batch": 512, "part": "ablation", "strategy": "cb", "tbt_us": 250.0, **parts,
              "moe_compute_us": 150.0},
             {**key, "batch": 512, "part": "ablation", "strategy": "ours", "tbt_us": 230.0, **parts,
              "moe_compute_us": 130.0},
             {**key, "batch": 512, "part": "online", "strategy": "ours+static", "tbt_us": 300.0},
             {**key, "batch": 512, "part": "online", "strategy": "ours+greedy", "tbt_us": 270.0}]
    return pd.DataFrame(rows)


def test_fig_ablation_counts_and_png(tmp_path):
    df = _ablation_frame()
    fig = rp.fig_ablation(df)
    ax = fig.axes[0]
    assert _bars(ax) == 4 + 4 + 1  # two stacked bars (4 parts each) and the online total
    heights = [sum(r.get_height() for c in ax.containers for r in c if abs(r.get_x() + r.get_width() / 2 - i) < 0.1)
               for i in range(3)]
    assert heights == pytest.approx([0.25, 0.23, 0.27])  # ms
    assert len(ax.get_lines()) == 1 and ax.get_lines()[0].get_ydata()[0] == pytest.approx(0.3)  # ours+static
    # the online bar's value sits above the dashed line (at 0.3 ms) it would otherwise be crossed by
    online_label = next(t for t in ax.texts if t.get_text() == "0.27 ms")
    assert online_label.xy[1] == pytest.approx(0.3)
    assert [t.get_text() for t in ax.get_xticklabels()][0].startswith("node balance")
    assert "batch 512" in ax.get_title() and "another batch" not in ax.get_title()
    _png_ok(fig, tmp_path / "ab.png")
    # without static rows at the online batch, the largest static batch stands in and the title says so
    fig = rp.fig_ablation(df[df["part"] != "ablation"])
    assert _bars(fig.axes[0]) == 9 and "batch 128 (another batch)" in fig.axes[0].get_title()
    # no online rows: the two static steps
    assert _bars(rp.fig_ablation(df[df["part"] == "ablation"]).axes[0]) == 8
    assert _bars(rp.fig_ablation(df[df["part"] == "static"]).axes[0]) == 8


def test_bench_solve_each_batch_keeps_the_milp_plan_at_least_as_good_as_its_family(tmp_path):
    """With one solve per batch, every batch is scored with plans made for it: the MILP's own plan
    (no best-of step) is never slower than a baseline its family holds (all but eplb)."""
    p = argparse.ArgumentParser()
    cli_report.add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", "--quick", "--out", str(tmp_path), "--hws", "10/25", "--batches", "8,128",
                         "--time-limit", "0.02", "--online-batches", "0", "--solve-batch", "each", "--jobs", "2",
                         "--no-progress"])
    assert cli_report.run(args) == 0
    res = pd.read_csv(tmp_path / "results.csv")
    st = res[res["part"] == "static"].pivot_table(index="batch", columns="strategy", values="tbt_us")
    assert list(st.index) == [8, 128]
    family = ["tp", "ep", "ep-lpt", "cb", "hdmoe"]
    assert (st["milp"].values[:, None] <= st[family].values * (1 + 1e-9) + 1e-3).all()
    solver = pd.read_csv(tmp_path / "solver.csv")
    assert sorted(solver["solve_batch"].unique()) == [8, 128]
    assert "solve batch each batch" in (tmp_path / "index.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.pkl"))) == 2  # one solve per batch
    # the default (one solve at the largest batch) is the same problem as the B = 128 solve above:
    # with that cache it solves nothing and reports the same plan
    shutil.copytree(tmp_path / "cache", tmp_path / "b" / "cache")
    again = p.parse_args(["bench", "--quick", "--out", str(tmp_path / "b"), "--hws", "10/25", "--batches", "8,128",
                          "--time-limit", "0.02", "--online-batches", "0", "--no-progress"])
    assert cli_report.run(again) == 0
    assert pd.read_csv(tmp_path / "b" / "solver.csv")["cached"].all()
    one = pd.read_csv(tmp_path / "b" / "results.csv")
    one = one[one["part"] == "static"].pivot_table(index="batch", columns="strategy", values="tbt_us")
    assert one.loc[128, "milp"] == pytest.approx(st.loc[128, "milp"])


@pytest.mark.parametrize("value", ["0", "-3", "x", "1.5"])
def test_bench_bad_solve_batch(value, tmp_path, capsys):
    from hdmoe_milp import cli
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "--solve-batch", value]) == 2
    err = capsys.readouterr().err
    assert "--solve-batch" in err and "each" in err and "Traceback" not in err


@pytest.mark.parametrize("change,field", [
    ({"models": ("mixtral-8x7b", "nope")}, "model"), ({"hws": ("5/50", "1/")}, "hw"),
    ({"meshes": ("4x4", "x")}, "mesh"),
    ({"batches": (16, 0)}, "batch"), ({"batches": (16, 16)}, "batches"), ({"models": ()}, "models"),
    ({"policies": ("static", "nope")}, "policy"), ({"online_batch": 2.5}, "batch"),
    ({"time_limit_s": 0}, "time_limit_s"),
    ({"mode": "x"}, "mode"), ({"seed": -1}, "seed"), ({"online_batches": -1}, "online_batches"),
    ({"online_meshes": ("9x",)}, "mesh"),
])
def test_grid_spec_is_checked_before_any_work(change, field, tmp_path):
    spec = replace(grid.PRESETS["quick"], **change)
    with pytest.raises(hm.InputError) as exc:
        grid.check_spec(spec)
    assert exc.value.field == field
    with pytest.raises(hm.InputError):
        grid.run_grid(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert grid.check_spec(grid.PRESETS["full"]) is grid.PRESETS["full"]


def test_figure_and_table_functions_refuse_what_they_cannot_draw():
    """Called from Python with an empty table, a missing column, a layer or mesh the data does not
    have, each figure and table function raises one InputError naming its argument (they used to
    raise KeyError, IndexError or StopIteration, or draw 2 of 16 nodes for a wrong mesh)."""
    P = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    res = hm.compare(P, ["tp", "cb"])
    pf, evs, mesh = rp.plan_frame(res), res.evaluations, P.hardware.mesh
    tp = hm.place(P, "tp")
    cases = [
        (lambda: rp.speedup_table(pd.DataFrame()), "df"),
        (lambda: rp.speedup_table(pf, ours="zzz"), "ours"),
        # a blank or text TBT left the point out silently (an empty table) or raised TypeError
        (lambda: rp.speedup_table(pf.assign(tbt_us=pf["tbt_us"].where(pf["strategy"] != "tp")), ours="cb"), "df"),
        (lambda: rp.speedup_table(pf.assign(tbt_us=pf["tbt_us"].astype(object).where(pf["strategy"] != "tp", "abc")),
                                  ours="cb"),
         "df"),
        (lambda: rp.fig_tbt_normalised(pf.drop(columns=["batch"])), "df"),
        (lambda: rp.fig_tbt_normalised(pf, batch=7), "batch"),
        (lambda: rp.fig_tbt_normalised(pf, strategies=["zz"]), "strategies"),
        (lambda: rp.fig_tbt_normalised(pf[pf.strategy != "tp"]), "df"),
        (lambda: rp.fig_decomposition(pd.concat([pf, pf])), "df"),
        (lambda: rp.fig_solver(pd.DataFrame()), "layer_table"),
        (lambda: rp.fig_node_load({}), "evals"),
        (lambda: rp.fig_node_load(evs, layer=-1), "layer"),
        (lambda: rp.fig_link_load(evs, mesh, phase="x"), "phase"),
        (lambda: rp.fig_link_load(evs, hm.Mesh(2, 2)), "mesh"),
        (lambda: rp.fig_placement_map(tp, hm.Mesh(1, 2)), "mesh"),
        (lambda: rp.fig_placement_map(tp, mesh, layer=99), "layer"),
        (lambda: rp.save_figure(Figure(), "figure"), "path"),
        (lambda: rp.save_figure(Figure(), "figure.pgf"), "path"),  # needs LaTeX: refused, not a traceback
        (lambda: rp.fig_online({}), "replays"),
        (lambda: rp.fig_online({"greedy": pd.DataFrame({"batch": [0, 1, 0], "latency_us": [1.0, 2, 3],
                                                        "actions": [0, 0, 0]})}), "replays['greedy']"),
        (lambda: rp.fig_solver(pd.DataFrame({"layer": [0, 1, 0, 1], "gap": 0.01, "time_s": 1.0})), "layer_table"),
        (lambda: rp.fig_bound_trace([(1,)]), "trace"),
        (lambda: rp.fig_bound_trace([(float("nan"), 1.0, 0.5, "x")]), "trace"),
    ]
    for call, field in cases:
        with pytest.raises(hm.InputError) as exc:
            call()
        assert exc.value.field == field
    for fig in (rp.fig_tbt_normalised(pf), rp.fig_decomposition(pf), rp.fig_node_load(evs, layer=1),
                rp.fig_link_load(evs, mesh, layer=1), rp.fig_placement_map(tp, mesh, layer=1)):
        assert isinstance(fig, Figure)


def _online_frame(actions: list[int]) -> pd.DataFrame:
    n = len(actions)
    return pd.DataFrame({"batch": range(n), "latency_us": np.linspace(900.0, 1100.0, n), "actions": actions})


def test_fig_online_tells_every_policy_apart_in_colour_and_in_greyscale():
    """The online lines were all grey, and with five policies two shared a dash: in print they could
    not be told apart. Each policy now has its own dash, marker and colour-blind-safe colour, the
    same whichever other policies are drawn, with a legend naming each one."""
    import matplotlib.colors as mcolors
    from matplotlib.lines import Line2D

    names = list(hm.pipeline.POLICIES)  # static, greedy, hdmoe-prebroadcast, eplb-periodic, oracle
    fig = rp.fig_online({n: _online_frame([0, 1, 0, 0]) for n in names}, settings="x")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == names
    # pairwise distinct: greyscale keeps dash and marker (the dash as drawn: get_linestyle() says "--" for any
    # custom pattern)
    for what, of in (("dash", lambda ln: ln._unscaled_dash_pattern), ("marker", Line2D.get_marker),
                     ("colour", Line2D.get_color)):
        seen = [str(of(lines[n])) for n in names]
        assert len(set(seen)) == len(names), (what, seen)
    rgb = [mcolors.to_rgb(lines[n].get_color()) for n in names]
    assert sum(max(c) - min(c) < 0.05 for c in rgb) <= 1  # at most one achromatic line (black): not greys
    assert {mcolors.to_hex(c).upper() for c in rgb} <= set(rp.OKABE_ITO)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:len(names)] == names and "weights moved" in legend[-1]
    # a policy keeps its style when drawn with others, or in another order
    alone = rp.fig_online({"greedy": _online_frame([0, 0])}).axes[0].get_lines()[0]
    assert (alone.get_linestyle(), alone.get_marker(), alone.get_color()) == (
        lines["greedy"].get_linestyle(), lines["greedy"].get_marker(), lines["greedy"].get_color())


def _solver_texts(fig: Figure) -> str:
    return " | ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def _hlines(ax) -> list[tuple[float, str]]:
    return [(float(ln.get_ydata()[0]), ln.get_label()) for ln in ax.get_lines()
            if len(set(map(float, ln.get_ydata()))) == 1]


def test_fig_solver_says_the_time_is_wall_and_what_the_limit_counted():
    """The time panel read "solve time (s)" and did not say what the limit counted: bench's limit is
    CP-SAT deterministic work, so a 0.05 s limit next to 0.7 s bars looked overrun. The axis now says
    wall time; a wall limit is drawn at its height, a deterministic one stated (not drawn: another unit)."""
    lt = pd.DataFrame({"layer": range(3), "gap": [0.0, 0.02, 0.01], "time_s": [0.7, 0.8, 0.75]})
    det = rp.fig_solver(lt.assign(time_limit_s=0.05, time_mode="deterministic"), settings="x")
    time_ax = det.axes[1]
    assert "wall time" in time_ax.get_ylabel() and "wall time" in det.axes[0].get_title()
    assert _hlines(time_ax) == []  # 0.05 work units are no height on a wall-seconds axis
    note = _solver_texts(det)
    assert "0.05 CP-SAT deterministic s" in note and "not wall time" in note

    wall = rp.fig_solver(lt, time_limit_s=2, time_mode="wall")
    assert _hlines(wall.axes[1]) == [(2.0, "wall-clock limit: 2 s per layer")]
    assert wall.axes[1].get_ylim()[1] > 2.0 and _solver_texts(wall) == ""
    # CBC under --deterministic counts wall time (its layers say so) while CP-SAT layers count work
    mixed = rp.fig_solver(lt.assign(time_mode=["deterministic", "wall (cbc has no deterministic limit)", "wall"]),
                          time_limit_s=1.0)
    assert _hlines(mixed.axes[1]) == [] and "wall time for some layers" in _solver_texts(mixed)
    assert "not recorded" in _solver_texts(rp.fig_solver(lt))
    for kw, field in (({"time_mode": "work"}, "time_mode"), ({"time_limit_s": -1.0}, "time_limit_s")):
        with pytest.raises(hm.InputError) as exc:
            rp.fig_solver(lt, **kw)
        assert exc.value.field == field


def test_fig_solver_marks_a_missing_gap_instead_of_a_zero_bar():
    lt = pd.DataFrame({"layer": range(3), "gap": [0.03, None, 0.01], "time_s": [0.7, 0.2, 0.75]})
    fig = rp.fig_solver(lt)
    bars = fig.axes[0].patches
    assert sorted(round(b.get_x() + b.get_width() / 2) for b in bars) == [0, 2]  # no bar at layer 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["n/a"]


def test_bench_solver_csv_records_the_deterministic_limit(bench, tmp_path):
    """solver.csv's time_s is wall time while bench's limit counts CP-SAT work: the table carries the
    limit and what it counted, and the solver figure drawn from it says so."""
    out, p = bench
    solver = pd.read_csv(out / "solver.csv")
    assert (solver["time_limit_s"] == 0.02).all() and (solver["time_mode"] == "deterministic").all()
    fig = cli_report._csv_figure("solver", solver, out / "solver.csv", p.parse_args(["plot", "solver", "x.csv"]))
    assert "0.02 CP-SAT deterministic s" in _solver_texts(fig) and _hlines(fig.axes[1]) == []
    bad = solver.assign(time_mode="work")
    with pytest.raises(hm.InputError, match="column time_mode") as exc:
        cli_report._csv_figure("solver", bad, out / "solver.csv", p.parse_args(["plot", "solver", "x.csv"]))
    assert exc.value.field == "file"


def test_a_paper_mode_bench_saves_plans_that_score_as_its_table(tmp_path, capsys):
    """The bench re-scores its plans in paper mode; the saved plan recorded the solve's mesh scoring,
    so ``evaluate --plan`` gave 175,690 µs against the table's 90,519 µs."""
    import json

    from hdmoe_milp.cli import main

    spec = grid.GridSpec(models=("mixtral-8x7b",), hws=("5/50",), meshes=("2x2",), batches=(128,),
                         solve_batch=128, time_limit_s=0.05, policies=(), mode="paper", online_batches=0)
    g = grid.run(spec, str(tmp_path), jobs=1, progress=False)
    r = g.results
    ours = float(r[(r.part == "static") & (r.strategy == "ours")]["tbt_us"].iloc[0])
    plan = next((tmp_path / "plans").glob("*_ours.json"))
    assert json.loads(plan.read_text())["meta"]["problem"]["mode"] == "paper"
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tbt_us"] == pytest.approx(ours, rel=1e-9)


@pytest.mark.parametrize("value, want", [("1e3", 1000), ("3.0", 3), ("0", 0)])
def test_bench_reads_online_batches_in_any_whole_number_notation(value, want):
    p = argparse.ArgumentParser()
    cli_report.add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", "--quick", "--out", "x", "--online-batches", value])
    spec = grid.check_spec(cli_report._bench_spec(args))
    assert spec.online_batches == want and type(spec.online_batches) is int
    assert (spec.policies == ()) == (want == 0)


def test_decomposition_legend_covers_no_bar_and_solver_gap_axis_starts_at_zero(small):
    """The decomposition's legend sits above the bars (on a 2x2 mesh it hid the tallest one), and
    the solver figure's gap axis never goes below 0 (with every gap 0 it read -0.05 to 0.05 %)."""
    _, cmp = small
    df = rp.plan_frame(cmp)
    for frame in (df, df.assign(non_moe_us=df["non_moe_us"] * 20)):  # a tall non-MoE part as well
        fig = rp.fig_decomposition(frame)
        FigureCanvasAgg(fig)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        box = ax.get_legend().get_window_extent(renderer)
        for bar in ax.patches:
            assert not box.overlaps(bar.get_window_extent(renderer))
    lt = pd.DataFrame({"layer": range(4), "gap": [0.0, 0.0, None, 0.0], "time_s": [1.0, 2.0, 1.0, 1.0]})
    ax = rp.fig_solver(lt, settings="x").axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 0
    assert any("gap 0" in t.get_text() for t in ax.texts)
    lt = lt.assign(gap=[0.0, 0.02, None, 0.01])
    ax = rp.fig_solver(lt, settings="x").axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 2.0
    assert not any("gap 0" in t.get_text() for t in ax.texts)
