"""Tables and figures of benchmark results (pandas, matplotlib, tabulate).

Every figure is one pure function: it takes a DataFrame or a result object and returns a
:class:`matplotlib.figure.Figure` built directly (no pyplot state, never ``show()``). Figures stay
readable in greyscale: strategies differ by hatch or marker as well as colour, loads are drawn with
a monotone-luminance colour map and a matching line width. Every figure carries its units and the
settings it was made for (model, mesh, hardware point, batch, mode) in its title.

Tables: :func:`plan_frame` (one row per strategy of a solve), :func:`speedup_table` (ours against
each baseline, mean/min/max per model and hardware point) and :func:`markdown`.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrow, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .errors import InputError, check_choice, check_real, expect_instance, expect_int, expect_path, expect_str, shown
from .evaluator import Evaluation
from .hardware import Mesh
from .placement import Placement, write_atomic

__all__ = [
    "FIGURES", "HATCHES", "MARKERS", "OKABE_ITO", "POLICY_STYLES", "caption", "fig_ablation", "fig_bound_trace",
    "fig_decomposition", "fig_link_load", "fig_node_load", "fig_online", "fig_placement_map", "fig_solver",
    "fig_tbt_normalised", "markdown", "plan_frame", "speedup_table", "strategy_order",
]

HATCHES = ("", "//", "\\\\", "xx", "..", "oo", "--", "++", "**", "||")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "h")
GREYS = ("0.15", "0.45", "0.7", "0.9", "0.3", "0.6", "0.8", "0.05", "0.55", "0.95")
# stable order of strategies in every figure and table: ours first, then the baselines
_ORDER = ("ours", "plan", "milp", "hdmoe", "cb", "eplb", "ep-lpt", "ep", "tp")
# Okabe & Ito's colour-blind-safe palette (black, blue, orange, bluish green, reddish purple,
# vermillion, sky blue); lines also differ by dash and marker, so they stay apart in greyscale
OKABE_ITO = ("#000000", "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (1, 3)), (0, (8, 3)))
_LINE_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# one fixed style per online policy (colour, dash, marker), the same in every figure whatever the
# other policies drawn; other names take the styles left over, in order
POLICY_STYLES = {
    name: {"color": OKABE_ITO[i], "linestyle": _DASHES[i], "marker": _LINE_MARKERS[i]}
    for i, name in enumerate(("static", "greedy", "hdmoe-prebroadcast", "eplb-periodic", "oracle"))
}
_LOAD_CMAP = "viridis"  # luminance rises monotonically: readable in greyscale


def save_figure(fig: Figure, path: str | Path, *, field: str = "path") -> None:
    """Write ``fig`` to ``path`` atomically (:func:`placement.write_atomic`) in the format its suffix
    names, at 110 dpi; SVGs carry no date, so the same figure gives the same bytes."""
    p = expect_path(field, path)
    fmt = p.suffix.lstrip(".").lower()
    # pgf needs a LaTeX installation, which a plotting run cannot assume
    kinds = {k: v for k, v in fig.canvas.get_supported_filetypes().items() if k != "pgf"}
    if fmt not in kinds:
        raise InputError(field, f"{p.name} has no suffix" if not fmt else f"{p.name}: .{fmt} is no figure format",
                         "end the name in one of " + ", ".join(f".{k}" for k in sorted(kinds)))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    write_atomic(p, buf.getvalue(), field=field)


def strategy_order(names: Sequence[str]) -> list[str]:
    """``names`` in the report's order (ours first, TP last, unknown names after in given order)."""
    known = [n for n in _ORDER if n in names]
    return known + [n for n in names if n not in known]


def _fit(text: str, width_in: float, fontsize: float) -> str:
    """``text`` with each line wrapped at spaces to ``width_in`` inches (about 0.6 em per character),
    so that a caption on a narrow figure (a 2x2 mesh) is not cut at both edges; lines that fit are
    left as they are."""
    width = max(20, int(width_in * 72 / (0.6 * fontsize)))
    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        out += textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(out)


def caption(**settings: Any) -> str:
    """``model=..., mesh=..., hw=... TFLOP/s/GB/s, batch=..., mode=...`` from the given settings
    (None values left out)."""
    parts = []
    for k, v in settings.items():
        if v is None:
            continue
        if k == "hw":
            v = f"{v} (TFLOP/s per node / GB/s per link)"
        if isinstance(v, float) and float(v).is_integer():
            v = int(v)
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def _wrap(text: str, width: int = 95) -> str:
    """``text`` broken at commas into lines of at most about ``width`` characters (figure titles)."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + len(part) + 2 <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def _style(i: int) -> dict[str, Any]:
    return {"color": GREYS[i % len(GREYS)], "hatch": HATCHES[i % len(HATCHES)], "edgecolor": "black",
            "linewidth": 0.6}


def _one(df: pd.DataFrame, col: str) -> Any:
    """The single value of ``col`` in ``df`` (None if the column is missing or not constant)."""
    if col not in df.columns:
        return None
    vals = df[col].dropna().unique()
    return vals[0] if len(vals) == 1 else None


def _table(field: str, df: Any, columns: Sequence[str],
           source: str = "results.csv as read by pandas, or PlanResult.to_frame()") -> pd.DataFrame:
    """``df`` if it is a non-empty DataFrame with ``columns``, else one InputError naming ``field``."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(field, f"must be a pandas DataFrame, got {type(df).__name__}",
                         f"pass {source}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(field, f"lacks the column(s) {missing}", f"pass {source}")
    if df.empty:
        raise InputError(field, "has no rows", "pass a table with at least one row")
    return df


def _layer(layer: Any, num_layers: int) -> int:
    return expect_int("layer", layer, minimum=0, maximum=num_layers - 1, why="MoE layers")


def _evals(evals: Any) -> list[str]:
    if not isinstance(evals, Mapping) or not evals or not all(isinstance(e, Evaluation) for e in evals.values()):
        raise InputError("evals", "must be a non-empty mapping of names to Evaluations",
                         "e.g. {'tp': hm.evaluate(problem, 'tp')}")
    return list(evals)


# --- tables -------------------------------------------------------------------------------------


def plan_frame(result: Any, **keys: Any) -> pd.DataFrame:
    """Tidy rows of a :class:`~hdmoe_milp.pipeline.PlanResult` (or anything with ``evaluations``
    ``{name: Evaluation}`` and a ``problem``): one row per strategy with the settings, the TBT and
    its decomposition in us, and TBT normalised to TP. ``keys``: extra constant columns."""
    prob = getattr(result, "problem", None)
    desc = prob.describe() if prob is not None else {}
    evs: Mapping[str, Evaluation] = result.evaluations
    tp = evs["tp"].tbt_s if "tp" in evs else np.nan
    rows = []
    for name in strategy_order(list(evs)):
        ev = evs[name]
        rows.append({
            "model": desc.get("model"), "mesh": desc.get("mesh"), "hw": desc.get("hw_point"),
            "mode": ev.mode, "batch": float(ev.batch_size), **keys, "strategy": name,
            "tbt_us": ev.tbt_us, "moe_compute_us": ev.moe_compute_s * 1e6,
            "dispatch_us": float(ev.dispatch_s.sum() * 1e6), "combine_us": float(ev.combine_s.sum() * 1e6),
            "non_moe_us": ev.non_moe_s * 1e6, "tbt_norm_tp": ev.tbt_s / tp,
        })
    return pd.DataFrame(rows)


def speedup_table(df: pd.DataFrame, ours: str = "plan", by: Sequence[str] = ("model", "hw"),
                  part: str | None = "static") -> pd.DataFrame:
    """Speedup of ``ours`` over each baseline (baseline TBT / our TBT at the same point), with
    mean, min and max over the points (meshes, batches) of every ``by`` group. ``df``: tidy rows
    with ``strategy`` and ``tbt_us``; points are told apart by every other settings column."""
    _table("df", df, ("strategy", "tbt_us"))
    d = df if part is None or "part" not in df.columns else df[df["part"] == part]
    tbt = pd.to_numeric(d["tbt_us"], errors="coerce")
    # a speedup over 0 or inf us means nothing; a blank or text TBT left its points out silently (or a TypeError)
    bad = ~(np.isfinite(tbt) & (tbt > 0))
    if bad.any():
        i = bad.to_numpy().nonzero()[0][0]
        v = d["tbt_us"].iloc[i]
        said = f"{float(tbt.iloc[i]):g}" if pd.notna(tbt.iloc[i]) else "blank" if pd.isna(v) else f"{str(v)!r:.60}"
        raise InputError("df", f"tbt_us of the {d['strategy'].iloc[i]} row {d.index[i]} is {said}",
                         "give finite TBTs > 0 (us)")
    point_cols = [c for c in ("model", "mesh", "hw", "mode", "batch") if c in d.columns]
    wide = d.pivot_table(index=point_cols, columns="strategy", values="tbt_us", aggfunc="first")
    if ours not in wide.columns:
        raise InputError("ours", f"no rows with a TBT for strategy {ours!r}",
                         "name a strategy of the table: " + ", ".join(map(str, wide.columns)))
    bases = strategy_order([c for c in wide.columns if c != ours])
    sp = wide[bases].div(wide[ours], axis=0).reset_index()
    rows = []
    for key, g in sp.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for base in bases:
            s = g[base].dropna()
            rows.append({**dict(zip(by, key, strict=True)), "baseline": base, "points": int(s.count()),
                         "mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table (tabulate), without the index."""
    return df.to_markdown(index=False, floatfmt=floatfmt)


# --- (a) TBT normalised to TP ---------------------------------------------------------------------


def fig_tbt_normalised(df: pd.DataFrame, *, batch: float | None = None, mesh: str | None = None,
                       strategies: Sequence[str] | None = None) -> Figure:
    """Grouped bars: TBT / TBT(TP) per strategy (one bar each) for every model x hardware point
    (one group each). ``df``: tidy rows (``model, hw, mesh, batch, strategy, tbt_us``). ``batch``,
    ``mesh``: which slice (default: the largest batch, the first mesh). Lower is better."""
    _table("df", df, ("model", "hw", "batch", "strategy", "tbt_us"))
    d = df[df["part"] == "static"] if "part" in df.columns else df
    if mesh is None and "mesh" in d.columns:
        mesh = sorted(d["mesh"].unique())[0]
    if mesh is not None:
        d = d[d["mesh"] == mesh]
    batch = float(d["batch"].max()) if batch is None else float(batch)
    d = d[d["batch"] == batch]
    if d.empty:
        raise InputError("batch", f"no rows at mesh {mesh}, batch {batch:g}",
                         "choose a mesh and batch the table holds")
    wide = d.pivot_table(index=["model", "hw"], columns="strategy", values="tbt_us", aggfunc="first")
    names = strategy_order(list(strategies) if strategies is not None else list(wide.columns))
    unknown = [n for n in ["tp", *names] if n not in wide.columns]
    if unknown:
        raise InputError("strategies" if strategies is not None and "tp" not in unknown else "df",
                         f"no rows for {unknown} at this slice (TP is the reference)",
                         "pass a table with tp's rows, and strategies it holds")
    norm = wide[names].div(wide["tp"], axis=0)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(names) * len(norm)), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(norm))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * w, norm[n].to_numpy(), w, label=n, **_style(i))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, float(np.nanmax(norm.to_numpy())) * 1.3)  # room for the legend above the bars
    ax.set_xticks(x, [f"{m}\n{h}" for m, h in norm.index], fontsize=8)
    ax.set_ylabel("TBT / TBT(TP)  (lower is better)")
    ax.set_title("TBT normalised to TP\n" + caption(mesh=mesh, batch=batch, mode=_one(d, "mode")), fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(names), 4))
    fig.tight_layout()
    return fig


# --- (b) decomposition --------------------------------------------------------------------------

_PARTS = (("moe_compute_us", "MoE compute"), ("dispatch_us", "dispatch"), ("combine_us", "combine"),
          ("non_moe_us", "non-MoE"))


def fig_decomposition(df: pd.DataFrame, *, title: str = "") -> Figure:
    """Stacked bars per strategy (rows of ``df``, in the report's order): MoE compute, dispatch,
    combine and non-MoE time in us, summed over layers. ``df``: one point (e.g. :func:`plan_frame`
    or a slice of ``results.csv``); the ablation is the same picture over ``tp, ep, hdmoe, plan``."""
    _table("df", df, ("strategy", "moe_compute_us", "dispatch_us", "combine_us", "non_moe_us"))
    if df["strategy"].duplicated().any():
        raise InputError("df", "holds a strategy twice", "pass one point (one row per strategy)")
    d = df.set_index("strategy")
    names = strategy_order(list(d.index))
    fig = Figure(figsize=(max(5.0, 0.8 * len(names) + 2), 4.2))
    ax = fig.add_subplot()
    bottom = np.zeros(len(names))
    for i, (col, label) in enumerate(_PARTS):
        v = d.loc[names, col].to_numpy(dtype=float) / 1e3
        ax.bar(names, v, 0.6, bottom=bottom, label=label, **_style(i))
        bottom += v
    ax.set_ylabel("time per decode step (ms)")
    head = title or "TBT decomposition"
    ax.set_title(_fit(head + "\n" + caption(model=_one(df, "model"), mesh=_one(df, "mesh"), hw=_one(df, "hw"),
                                            batch=_one(df, "batch"), mode=_one(df, "mode")),
                      fig.get_figwidth() * 0.85, 9), fontsize=9)
    # the legend in a band above the tallest bar, one row: inside the bars it hid the shortest parts
    ax.set_ylim(0, float(np.nanmax(bottom, initial=0.0)) * 1.18 or 1.0)
    ax.legend(fontsize=7, loc="upper center", ncol=len(_PARTS), frameon=False, columnspacing=1.0,
              handlelength=1.5)
    fig.tight_layout()
    return fig


# --- (c) per-node load ----------------------------------------------------------------------------


def fig_node_load(evals: Mapping[str, Evaluation], layer: int = 0, *, settings: str = "") -> Figure:
    """Per-node MoE compute time (us) of one layer: grouped bars (one per placement) per node; a
    dotted line marks each placement's maximum (the layer's compute time)."""
    names = _evals(evals)
    D = next(iter(evals.values())).node_time_s.shape[1]
    layer = _layer(layer, next(iter(evals.values())).node_time_s.shape[0])
    fig = Figure(figsize=(min(12.0, max(6.0, 0.25 * D * len(names) + 1.5)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(D)
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        t = evals[n].node_time_s[layer] * 1e6
        ax.bar(x + (i - (len(names) - 1) / 2) * w, t, w, label=f"{n} (max {t.max():.0f} us)", **_style(i))
        ax.axhline(t.max(), color=GREYS[i % len(GREYS)], linestyle=":", linewidth=0.8)
    ax.set_xticks(x, [str(v) for v in x], fontsize=7)
    ax.set_xlabel("node (row-major)")
    ax.set_ylabel("node compute time (us)")
    ev0 = next(iter(evals.values()))
    ax.set_title(_fit(f"Per-node load, MoE layer {layer}\n"  # over the axes: about 0.8 of the figure
                      + (settings or caption(batch=ev0.batch_size, mode=ev0.mode)), 0.8 * fig.get_figwidth(), 9),
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- (d) link-load map ----------------------------------------------------------------------------


def _draw_mesh(ax: Any, mesh: Mesh) -> None:
    for n in range(mesh.num_nodes):
        r, c = mesh.coords(n)
        ax.add_patch(Rectangle((c - 0.12, -r - 0.12), 0.24, 0.24, facecolor="white", edgecolor="black",
                               linewidth=0.6, zorder=3))
        ax.text(c, -r, str(n), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_xlim(-0.5, mesh.cols - 0.5)
    ax.set_ylim(-mesh.rows + 0.5, 0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def fig_link_load(evals: Mapping[str, Evaluation], mesh: Mesh, layer: int = 0, *, phase: str = "both",
                  settings: str = "") -> Figure:
    """Link-load map of one layer, one panel per placement: every directed link is an arrow between
    its nodes (the two directions offset to either side), coloured and thickened by the bytes it
    carries (``phase``: ``dispatch``, ``combine`` or ``both``), on one colour scale for all panels."""
    import matplotlib as mpl

    names = _evals(evals)
    expect_instance("mesh", mesh, Mesh, "give hm.Mesh(rows, cols), the mesh the evaluations were made on")
    check_choice("phase", phase, ("dispatch", "combine", "both"))
    first = next(iter(evals.values()))
    if first.link_bytes_dispatch.shape[-1] != mesh.num_links:
        raise InputError("mesh", f"{mesh.name} has {mesh.num_links} links, the evaluations "
                         f"{first.link_bytes_dispatch.shape[-1]}", "give the mesh the evaluations were made on")
    layer = _layer(layer, first.link_bytes_dispatch.shape[0])

    def load(ev: Evaluation) -> np.ndarray:
        parts = {"dispatch": (ev.link_bytes_dispatch,), "combine": (ev.link_bytes_combine,),
                 "both": (ev.link_bytes_dispatch, ev.link_bytes_combine)}[phase]
        return sum(p[layer] for p in parts) / 1e6  # MB

    loads = {n: load(evals[n]) for n in names}
    vmax = max(float(v.max(initial=0.0)) for v in loads.values()) or 1.0
    norm = mpl.colors.Normalize(0.0, vmax)
    cmap = mpl.colormaps[_LOAD_CMAP]
    ends = mesh.link_endpoints
    cell = 0.65  # inches per node, so that arrows and labels stay legible on wide meshes
    if mesh.cols > mesh.rows:  # wide meshes: panels one above the other
        fig = Figure(figsize=(cell * mesh.cols + 2.2, len(names) * (cell * mesh.rows + 0.7) + 1.0))
        axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    else:
        fig = Figure(figsize=(len(names) * (cell * mesh.cols + 0.5) + 1.6, cell * mesh.rows + 1.7))
        axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, n in zip(axes, names, strict=True):
        _draw_mesh(ax, mesh)
        for li, (a, b) in enumerate(ends):
            (ra, ca), (rb, cb) = mesh.coords(int(a)), mesh.coords(int(b))
            x0, y0, dx, dy = ca, -ra, cb - ca, -(rb - ra)
            ox, oy = 0.09 * dy, -0.09 * dx  # perpendicular offset: the two directions sit apart
            v = float(loads[n][li])
            ax.add_patch(FancyArrow(x0 + 0.17 * dx + ox, y0 + 0.17 * dy + oy, 0.66 * dx, 0.66 * dy,
                                    width=0.015 + 0.05 * v / vmax, head_width=0.09, head_length=0.08,
                                    length_includes_head=True, color=cmap(norm(v)), zorder=2))
        ax.set_title(f"{n}: max {loads[n].max(initial=0.0):.2f} MB", fontsize=8)
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    what = "dispatch + combine" if phase == "both" else phase
    label = f"{what} bytes per link (MB)"
    if fig.get_figheight() < 4.0:  # a short figure (a 2-row mesh): the label would overrun the bar
        label = f"{what}\nbytes per link (MB)"
    fig.colorbar(sm, ax=list(axes), shrink=0.8, label=label)
    ev0 = evals[names[0]]
    fig.suptitle(_fit(f"Link load, MoE layer {layer}\n"
                      + (settings or caption(batch=ev0.batch_size, mode=ev0.mode)), fig.get_figwidth(), 9), fontsize=9)
    return fig


# --- (e) placement map ------------------------------------------------------------------------------


def fig_placement_map(placement: Placement, mesh: Mesh, layer: int = 0, *, settings: str = "",
                      min_share: float = 0.005) -> Figure:
    """Which expert (or shard of it) sits on which node in one layer: one cell per node, listing
    ``e<id>`` (whole expert on this node) or ``e<id>:<share %>`` (a shard; replicated copies are
    listed once per copy); cells are shaded by the weight volume they hold (in experts)."""
    import matplotlib as mpl

    expect_instance("placement", placement, Placement, "give a Placement, e.g. hm.place(problem, 'cb')")
    expect_instance("mesh", mesh, Mesh, "give hm.Mesh(rows, cols), the mesh the placement was made for")
    if placement.num_nodes != mesh.num_nodes:
        raise InputError("mesh", f"{mesh.name} has {mesh.num_nodes} nodes, the placement {placement.num_nodes}",
                         "give the mesh the placement was made for")
    lp = placement.layers[_layer(layer, placement.num_layers)]
    vol = lp.weight_copies_per_node()
    cmap = mpl.colormaps["Greys"]
    norm = mpl.colors.Normalize(0.0, max(float(vol.max()), 1e-9) * 2.5)  # keep text readable on dark cells
    fig = Figure(figsize=(1.5 * mesh.cols + 1.5, 1.2 * mesh.rows + 1.2))
    ax = fig.add_subplot()
    for n in range(mesh.num_nodes):
        r, c = mesh.coords(n)
        ax.add_patch(Rectangle((c - 0.48, -r - 0.48), 0.96, 0.96, facecolor=cmap(norm(vol[n])), edgecolor="black",
                               linewidth=0.6))
        items = []
        for copy in np.flatnonzero(lp.shares[:, n] > min_share):
            e, s = int(lp.expert_of[copy]), float(lp.shares[copy, n])
            items.append(f"e{e}" if s > 1 - 1e-6 else f"e{e}:{100 * s:.0f}%")
        lines = [" ".join(items[i:i + 3]) for i in range(0, len(items), 3)] or ["-"]
        if len(lines) > 4:
            lines = lines[:3] + [f"+{len(items) - 9} more"]
        ax.text(c, -r, f"node {n}  ({vol[n]:.2f} exp)\n" + "\n".join(lines), ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.5, mesh.cols - 0.5)
    ax.set_ylim(-mesh.rows + 0.5, 0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_fit(f"Placement map ({placement.strategy}), MoE layer {layer}: expert or shard:share per node\n"
                      + settings, fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    return fig


# --- (f) solver per layer ---------------------------------------------------------------------------


def _solver_limit(layer_table: pd.DataFrame, time_limit_s: Any, time_mode: Any) -> tuple[float | None, str | None]:
    """The limit per layer and what it counted: ``wall``, ``deterministic``, ``mixed`` (the layers
    differ: CBC and HiGHS count wall time even when CP-SAT would count work) or None (not known);
    from the arguments, else from the table's ``time_limit_s`` and ``time_mode`` columns."""
    if time_limit_s is None and "time_limit_s" in layer_table.columns:
        vals = pd.to_numeric(layer_table["time_limit_s"], errors="coerce").dropna().unique()
        time_limit_s = float(vals[0]) if len(vals) == 1 else None
    if time_limit_s is not None:
        time_limit_s = check_real("time_limit_s", time_limit_s, positive=True)
    given = [expect_str("time_mode", time_mode, "'wall'")] if time_mode is not None else (
        [str(m) for m in layer_table["time_mode"].dropna()] if "time_mode" in layer_table.columns else [])
    modes = {m.split(" ", 1)[0] for m in given}  # a layer's may read "wall (cbc has no deterministic limit)"
    for m in modes:
        check_choice("time_mode", m, ("wall", "deterministic"))
    return time_limit_s, (modes.pop() if len(modes) == 1 else "mixed" if modes else None)


def _once(field: str, df: pd.DataFrame, column: str, fix: str) -> None:
    """An InputError naming ``field`` if a value of ``column`` repeats (rows of several runs)."""
    dup = df[column][df[column].duplicated()]
    if len(dup):
        raise InputError(field, f"holds {column} {shown(dup.iloc[0])} more than once", fix)


def fig_solver(layer_table: pd.DataFrame, *, settings: str = "", time_limit_s: float | None = None,
               time_mode: str | None = None) -> Figure:
    """The MILP per layer: relative gap (%) and the wall time the layer took (s: everything it did,
    whatever the limit counted), as bars on two panels sharing the layer axis. ``layer_table``:
    :meth:`PlanResult.layer_table` (``layer, gap, time_s``) or bench's ``solver.csv``.

    ``time_limit_s`` and ``time_mode`` (``PlanResult.solver``'s; default: the table's columns of those
    names, as bench writes them): the limit per layer and what it counted. A ``wall`` limit is drawn
    on the time panel as a dashed line; a ``deterministic`` one (CP-SAT work, bench's and
    ``solve --deterministic``'s) is not a wall time, so it is stated in the panel, not drawn."""
    _table("layer_table", layer_table, ("layer", "gap", "time_s"), "PlanResult.layer_table() or solver.csv")
    _once("layer_table", layer_table, "layer", "pass one solve: bench's solver.csv holds one per model, hardware "
                                                "point, mesh and batch; keep the rows of one")
    limit, mode = _solver_limit(layer_table, time_limit_s, time_mode)
    fig = Figure(figsize=(max(6.0, 0.2 * len(layer_table) + 2), 4.6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = layer_table["layer"].to_numpy()
    gap = layer_table["gap"].astype(float).to_numpy() * 100
    known = np.isfinite(gap)
    ax1.bar(x[known], gap[known], 0.7, **_style(1))
    for xi in x[~known]:  # no bound (a layer left out, or interrupted before one): not a 0 % bar
        ax1.text(xi, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax1.set_ylabel("gap (%)")
    top = float(np.max(gap[known], initial=0.0))  # gaps are >= 0: no negative axis, even when all are 0
    low = float(np.min(gap[known], initial=0.0))  # (a hand-made table may hold negative ones)
    ax1.set_ylim(low * 1.15, top * 1.15 if top > 0 else 1.0)
    if known.any() and top == 0 and low == 0:
        ax1.text(0.5, 0.5, "gap 0 on every layer with a bound", transform=ax1.transAxes, ha="center",
                 va="center", fontsize=8)
    wall = layer_table["time_s"].to_numpy(dtype=float)
    ax2.bar(x, wall, 0.7, **_style(2))
    ax2.set_ylabel("wall time per layer (s)")
    ax2.set_xlabel("MoE layer")
    if mode == "wall" and limit is not None:
        ax2.axhline(limit, color="black", linestyle="--", linewidth=1.0,
                    label=f"wall-clock limit: {limit:g} s per layer")
        ax2.set_ylim(0, max(float(np.nanmax(wall, initial=0.0)), limit) * 1.35)  # room for the legend
        ax2.legend(fontsize=7, loc="upper right")
    else:
        if mode == "deterministic":
            note = ("limit: " + (f"{limit:g} " if limit is not None else "")
                    + "CP-SAT deterministic s (work units, not wall time) per layer: not drawn")
        elif mode == "mixed":
            note = ("limit: " + (f"{limit:g} " if limit is not None else "")
                    + "s per layer, wall time for some layers, CP-SAT deterministic work for others: not drawn")
        elif limit is not None:
            note = f"limit: {limit:g} s per layer, wall or deterministic not recorded: not drawn"
        else:
            note = "limit per layer not recorded"
        ax2.set_ylim(0, float(np.nanmax(wall, initial=0.0)) * 1.35 or 1.0)  # room for the note
        ax2.text(0.99, 0.96, note, transform=ax2.transAxes, ha="right", va="top", fontsize=7,
                 bbox={"facecolor": "white", "edgecolor": "0.6", "pad": 2.0})
    ax1.set_title("MILP per layer: certified gap and wall time\n" + settings, fontsize=9)
    fig.tight_layout()
    return fig


# --- (g) online ---------------------------------------------------------------------------------------


def _policy_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Colour, dash and marker of each policy in ``names``: its own in :data:`POLICY_STYLES`, else
    the first style no other policy drawn uses (cycling if there are more names than styles)."""
    out = {n: dict(POLICY_STYLES[n]) for n in names if n in POLICY_STYLES}
    used = {s["marker"] for s in out.values()}
    free = [i for i, m in enumerate(_LINE_MARKERS) if m not in used] or list(range(len(_LINE_MARKERS)))
    for k, n in enumerate(n for n in names if n not in out):
        i = free[k % len(free)]
        out[n] = {"color": OKABE_ITO[i], "linestyle": _DASHES[i], "marker": _LINE_MARKERS[i]}
    return out


def fig_online(replays: Mapping[str, Any], *, settings: str = "") -> Figure:
    """Per-batch latency (ms, including the weight-move time charged to the batch) of several online
    policies over one replay; one line per policy, each with its own colour (colour-blind safe), dash
    and marker, the same in every figure (:data:`POLICY_STYLES`), so the lines stay apart in
    greyscale; the batches where a policy moved weights are marked with a large hollow marker.
    ``replays``: ``{policy: ReplayResult}`` or ``{policy: DataFrame}`` with ``batch, latency_us, actions``."""
    if not isinstance(replays, Mapping) or not replays:
        raise InputError("replays", "must be a non-empty mapping of policy names to replays",
                         "e.g. {'greedy': hm.replay(problem, plan, policy='greedy')}")
    for name, r in replays.items():
        if not isinstance(r, pd.DataFrame) and not hasattr(r, "to_frame"):
            raise InputError(f"replays[{name!r}]", f"must be a ReplayResult or a DataFrame, got {type(r).__name__}",
                             "give hm.replay(...)'s result")
        _table(f"replays[{name!r}]", r if isinstance(r, pd.DataFrame) else r.to_frame(),
               ("batch", "latency_us", "actions"), "hm.replay(...)'s result or online.csv's rows of one policy")
        if isinstance(r, pd.DataFrame):
            _once(f"replays[{name!r}]", r, "batch", "pass one replay per policy: online.csv holds one per model, "
                                                     "hardware point, mesh and batch; keep the rows of one")
    fig = Figure(figsize=(9.0, 4.2))
    ax = fig.add_subplot()
    styles = _policy_styles(list(replays))
    any_moved = False
    for i, (name, r) in enumerate(replays.items()):
        f = r if isinstance(r, pd.DataFrame) else r.to_frame()
        y = f["latency_us"].to_numpy() / 1e3
        x = f["batch"].to_numpy()
        st = styles[name]
        # policies often coincide (static and a policy that has not moved yet): markers drawn later are
        # smaller, so those drawn under them still show around them
        size = 7.5 - 3.5 * i / max(len(replays) - 1, 1)
        ax.plot(x, y, linewidth=1.4, markersize=size, markeredgecolor="white", markeredgewidth=0.5, label=name,
                **st)
        moved = f["actions"].to_numpy() > 0
        if moved.any():
            any_moved = True
            ax.scatter(x[moved], y[moved], s=90, facecolors="none", edgecolors=st["color"], linewidths=1.2,
                       marker=st["marker"], zorder=3)
    handles, _ = ax.get_legend_handles_labels()
    if any_moved:  # a legend entry for the hollow markers, in the policy's marker and colour on the plot
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=9, markerfacecolor="none",
                              markeredgecolor="black", label="hollow marker: weights moved"))
    ax.set_xlabel("batch (in replay order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # batches are whole: no 0.25 ticks
    ax.set_ylabel("latency per decode step (ms)")
    ax.set_title("Online: per-batch latency, hollow markers = weights moved\n" + settings, fontsize=9)
    # right of the axes: inside, it hid a line wherever it sat
    ax.legend(handles=handles, fontsize=7, title="policy", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


# --- (i) ablation ---------------------------------------------------------------------------------------

ABLATION = (("cb", "node balance\n(cb)"), ("ours", "+ link balance\n(ours)"),
            ("ours+greedy", "+ online\n(ours+greedy)"))


def fig_ablation(results: pd.DataFrame, *, model: str | None = None, hw: str | None = None,
                 mesh: str | None = None) -> Figure:
    """The ablation at one model x hardware point x mesh (default: the first of each in ``results``):
    three bars, each step adding one ingredient.

    - node balance: ``cb``, the compute-balanced hybrid (each expert on one sub-region, split evenly
      over its nodes, sub-regions chosen to balance compute); it balances node load, and link load is
      not in its objective. ``ep-lpt`` also balances only node load but places whole experts; ``cb`` is the closer
      ancestor of ours (split experts over regions of the mesh), so it is the honest first step.
    - + link balance: ``ours``, the static plan (block MILP, which also balances link load).
    - + online: ``ours+greedy``, ours served under the greedy online policy.

    The first two are stacked (MoE compute, dispatch, combine, non-MoE; the evaluator on the
    expected workload) at the online batch: ``results`` must hold their rows there (the grid writes
    them as ``part == "ablation"``; otherwise static rows at that batch are used, and failing that
    the largest static batch, which the title then states). The online bar is a plain total: the
    mean latency per decode step of the replayed drift trace, weight moves included (its decomposition is
    not recorded); a dashed tick on it marks ``ours+static`` in the same replay, the like-for-like
    reference for the online gain, and the bar sits on a shaded band: the replay is another workload
    (the drift trace, batch by batch) than the static bars' (the expected workload of the trace the
    plan was solved on), so heights compare within a side, not across it. Times in ms per decode step.
    """
    d = results
    for col, v in (("model", model), ("hw", hw), ("mesh", mesh)):
        if col in d.columns:
            v = d[col].iloc[0] if v is None else v
            d = d[d[col] == v]
    if d.empty:
        raise ValueError(f"no rows for model={model}, hw={hw}, mesh={mesh}")
    part = d["part"] if "part" in d.columns else pd.Series("static", index=d.index)
    online = d[part == "online"].set_index("strategy")
    batch_on = float(online["batch"].iloc[0]) if len(online) else None
    static = pd.DataFrame()
    for want in ("ablation", "static"):
        cand = d[part == want]
        if batch_on is not None:
            cand = cand[cand["batch"] == batch_on]
        elif len(cand):  # no online rows: one batch, the largest
            cand = cand[cand["batch"] == cand["batch"].max()]
        if len(cand):
            static = cand
            break
    same_batch = len(static) > 0 or batch_on is None
    if static.empty:  # no static rows at the online batch: the largest static batch, said so in the title
        st = d[part == "static"]
        static = st[st["batch"] == st["batch"].max()]
    static = static.set_index("strategy")
    missing = [k for k, _ in ABLATION if "+" not in k and k not in static.index]
    if len(online) and "ours+greedy" not in online.index:
        missing.append("ours+greedy (part online)")
    if missing:  # a step left out would make the next one look like the first
        raise InputError("results", f"has no {', '.join(missing)} row at model={d['model'].iloc[0]}, "
                         f"hw={d['hw'].iloc[0]}, mesh={d['mesh'].iloc[0]}" if {"model", "hw", "mesh"} <= set(d.columns)
                         else f"has no {', '.join(missing)} row", "give the results.csv that bench wrote, with the "
                         "rows of cb and ours (and ours+greedy where there are online rows)")
    bars = [(k, lab) for k, lab in ABLATION if (k in static.index if "+" not in k else k in online.index)]
    fig = Figure(figsize=(7.4, 4.8))
    ax = fig.add_subplot()
    x = np.arange(len(bars))
    tops = []
    for i, (k, _lab) in enumerate(bars):
        if "+" in k:  # online: the mean latency, weight moves included
            if i:  # another workload than the static bars: shaded apart, not comparable in height
                ax.axvspan(x[i] - 0.45, x[i] + 0.45, color="0.92", zorder=0)
                ax.text(x[i], 0.02, "replay of the drift trace:\nnot the static bars' workload",
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=6.5,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0}, zorder=4)
            v = float(online.loc[k, "tbt_us"]) / 1e3
            ax.bar(x[i], v, 0.6, label="online: replay mean, weight moves incl.", **_style(5))
            ref = f"{k.split('+')[0]}+static"
            if ref in online.index:
                r = float(online.loc[ref, "tbt_us"]) / 1e3
                ax.plot([x[i] - 0.38, x[i] + 0.38], [r, r], color="black", linestyle="--", linewidth=1.2,
                        label=f"{ref} (same replay)")
                ax.annotate(f"{r / v:.3f}x speedup over {ref}", (x[i], max(r, v)), xytext=(0, 14),
                            textcoords="offset points", ha="center", fontsize=7)
            total = v
            tops.append(max(v, r) if ref in online.index else v)
            label_y = tops[-1]  # above the dashed line, which would cross the label
        else:
            bottom = 0.0
            for j, (col, label) in enumerate(_PARTS):
                v = float(static.loc[k, col]) / 1e3
                ax.bar(x[i], v, 0.6, bottom=bottom, label=label if i == 0 else None, **_style(j))
                bottom += v
            total = label_y = bottom
            tops.append(bottom)
        ax.annotate(f"{total:.2f} ms", (x[i], label_y), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(x, [lab for _, lab in bars], fontsize=8)
    ax.set_ylim(0, max(tops) * 1.45)  # room for the legend
    ax.set_ylabel("time per decode step (ms)")
    st_b = float(static["batch"].iloc[0]) if len(static) else None
    where = (f"static bars: the evaluator on the expected workload of the solve trace at batch {st_b:g}"
             + ("" if same_batch else " (another batch)")
             + f"\nonline bar: replay of the drift trace at batch {batch_on:g}" if batch_on is not None else "")
    ax.set_title("Ablation: node balance, + link balance, + online\n"
                 + caption(model=_one(d, "model"), mesh=_one(d, "mesh"), hw=_one(d, "hw"), mode=_one(d, "mode"))
                 + ("\n" + where if where else ""), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.tight_layout()
    return fig


# --- (h) primal and bound against time, one layer --------------------------------------------------------


def fig_bound_trace(trace: Sequence[Sequence[Any]], *, layer: int | None = None, settings: str = "") -> Figure:
    """Primal and dual bound of one layer's solve against time: two step lines in the evaluator's
    terms (us) over wall seconds since the layer began (log scale), with the proven gap at the end
    annotated. ``trace``: :attr:`LayerSolveResult.trace` (or a plan file's ``meta.layers[i].trace``),
    points ``(time_s, primal_s, bound_s, what)``.

    - primal: the best evaluator score known so far (the warm start's when it was scored, each plan
      the polish, the branch and bound or LNS found when it was found, then the returned
      placement's at the end);
    - bound: the certified lower bound on the evaluator (LP, floors or branch and bound) from when it was computed,
      and at the end;
    - the solver's incumbents (``model:*`` points) are drawn as markers only: they are the block
      model's objective (an upper bound on the evaluator for the placement they decode to, up to the
      solver's rounding) and the solver's bound on that model objective, not the evaluator's numbers.
      Solver bounds far below the certified bound are left off the axis (their count is noted).
    """
    try:
        pts = [(float(p[0]), None if p[1] is None else float(p[1]), None if p[2] is None else float(p[2]),
                str(p[3])) for p in trace]
    except (TypeError, ValueError, IndexError):
        raise InputError("trace", "must be points (time_s, primal_s, bound_s, what)",
                         "give LayerSolveResult.trace or a plan file's meta.layers[i].trace") from None
    if not pts:
        raise InputError("trace", "is empty: the layer recorded no progress", "give a solved layer's trace")
    if not all(np.isfinite(p[0]) and p[0] >= 0 for p in pts):
        raise InputError("trace", "holds a time that is not a finite number >= 0", "give a solved layer's trace")
    evaluator = ("warm-start", "bound", "polish", "bnb", "lns", "final")  # the evaluator's numbers
    for i, p in enumerate(pts):
        for col, name in ((1, "primal_s"), (2, "bound_s")):
            if p[3].startswith(evaluator) and p[col] is not None and not (np.isfinite(p[col]) and p[col] > 0):
                raise InputError(f"trace[{i}]", f"{name} of a {p[3]!r} point must be a finite time > 0 or None, "
                                 f"got {p[col]!r}", "give a solved layer's trace")
    fin = pts[-1]
    if fin[1] is not None and fin[2] is not None and fin[2] > fin[1] * (1 + 1e-9):
        raise InputError("trace", f"ends with a bound ({fin[2] * 1e6:.6g} us) above its primal ({fin[1] * 1e6:.6g} "
                         "us): a lower bound cannot exceed a plan's time", "give the trace a solve recorded")
    t_min = max(min(p[0] for p in pts), 1e-4)

    def series(col: int, best: Any, keep: Any) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p in pts:
            v = p[col]
            if v is None or not np.isfinite(v) or not keep(p[3]):
                continue
            v *= 1e6
            xs.append(max(p[0], t_min))
            ys.append(v if not ys else best(ys[-1], v))
        return np.asarray(xs), np.asarray(ys)

    px, py = series(1, min, lambda w: w.startswith(evaluator))
    bx, by = series(2, max, lambda w: w.startswith(evaluator))
    if not len(px) and not len(bx):  # nothing to draw (and no axis limits to take)
        raise InputError("trace", f"has no evaluator primal or bound among its {len(pts)} point(s) (labels "
                         f"{sorted({p[3] for p in pts})})", "give the trace a solve recorded")
    t_end = pts[-1][0]
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    ax.step(px, py, where="post", color="0.0", linewidth=1.6, marker="o", markersize=4,
            label="primal: best evaluator layer time so far")
    ax.step(bx, by, where="post", color="0.45", linewidth=1.6, linestyle="--", marker="s", markersize=4,
            label="bound: certified lower bound on the evaluator")
    model = [p for p in pts if p[3].startswith("model:")]
    lo = float(min(by.min(initial=np.inf), py.min(initial=np.inf)))
    hi = float(max(py.max(initial=-np.inf), by.max(initial=-np.inf)))
    if model:
        mp = np.array([(p[0], p[1] * 1e6) for p in model if p[1] is not None]).reshape(-1, 2)
        mb = np.array([(p[0], p[2] * 1e6) for p in model if p[2] is not None]).reshape(-1, 2)
        solver = model[0][3].split(":", 1)[1]
        if len(mp):
            ax.scatter(np.maximum(mp[:, 0], t_min), mp[:, 1], s=18, marker="^", facecolors="none",
                       edgecolors="black", label=f"{solver} incumbents (block model objective)", zorder=3)
            hi = max(hi, float(mp[:, 1].max()))
            lo = min(lo, float(mp[:, 1].min()))
        notes = [] if len(mp) else [f"{solver}: no incumbent within its limit"]
        if len(mb):
            floor = lo - 0.5 * max(hi - lo, 1e-3 * abs(hi))
            shown = mb[mb[:, 1] >= floor]
            hidden = len(mb) - len(shown)
            if len(shown):
                ax.scatter(np.maximum(shown[:, 0], t_min), shown[:, 1], s=18, marker="x", color="0.3",
                           label=f"{solver} bound on the block model objective"
                           + (f" ({hidden} lower, off the axis)" if hidden else ""), zorder=3)
                lo = min(lo, float(shown[:, 1].min()))
            else:
                notes.append(f"{solver}'s bound on the block model objective: {mb[:, 1].max():.0f} us at best "
                             "(below the axis)")
        if notes:
            ax.text(0.01, 0.02, "; ".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")
    pad = 0.15 * max(hi - lo, 1e-3 * abs(hi), 1e-9)
    ax.set_ylim(lo - pad, hi + 2.5 * pad)  # room for the legend
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, 0.5, 1, 2 s: plain numbers
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlapped on short solves
    ax.set_xlim(t_min * 0.8, max(t_end, t_min) * 3.0)  # room for the gap's label right of its arrow
    if fin[1] is not None and fin[2] is not None:
        p_us, b_us = fin[1] * 1e6, fin[2] * 1e6
        gap = (p_us - b_us) / p_us if p_us > 0 else float("nan")
        x_ann = max(t_end, t_min) * 1.15
        ax.annotate("", xy=(x_ann, b_us), xytext=(x_ann, p_us),
                    arrowprops={"arrowstyle": "<->", "color": "black", "linewidth": 0.8})
        ax.annotate(f"proven gap\n{100 * gap:.2f} %", xy=(x_ann, (p_us + b_us) / 2), xytext=(6, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=7)
    ax.set_xlabel("wall time since the layer began (s, log scale)")
    ax.set_ylabel("layer time (us)")
    head = "Primal and bound against time" + ("" if layer is None else f", MoE layer {layer}")
    ax.set_title(head + "\n" + _wrap(settings), fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


FIGURES = {
    "tbt": fig_tbt_normalised, "decomposition": fig_decomposition, "node-load": fig_node_load,
    "link-load": fig_link_load, "placement": fig_placement_map, "solver": fig_solver, "online": fig_online,
    "bound-trace": fig_bound_trace, "ablation": fig_ablation,
}
