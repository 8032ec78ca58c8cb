"""Report figures and tables, the benchmark grid, and the bench/plot commands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrow

import hdmoe_milp as hm
from hdmoe_milp import cli_report, grid
from hdmoe_milp import report as rp

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
    assert [_bars(ax) for ax in fig.axes] == [5, 5]
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
    assert len(pngs) == 7 and len(list((out / "figures").glob("*.svg"))) == 7
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    index = (out / "index.md").read_text()
    assert all(f"figures/{p.name}" in index for p in pngs)
    assert "over the best baseline of each point averages" in index
    res = pd.read_csv(out / "results.csv")
    assert set(res["strategy"]) >= {"ours", "tp", "ep", "cb", "eplb", "hdmoe", "milp", "ours+greedy"}
    assert not any("wall" in c or "time_s" in c for c in res.columns)


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


def test_plot_command(bench, tmp_path):
    out, p = bench
    plan = next((out / "plans").glob("*.json"))
    for kind, src in (("tbt", out / "results.csv"), ("decomposition", out / "results.csv"),
                      ("solver", out / "solver.csv"), ("online", out / "online.csv"), ("placement", plan),
                      ("link-load", plan)):
        target = tmp_path / f"{kind}.png"
        assert cli_report.run(p.parse_args(["plot", kind, str(src), "--out", str(target)])) == 0
        assert target.read_bytes()[:8] == PNG_MAGIC


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
