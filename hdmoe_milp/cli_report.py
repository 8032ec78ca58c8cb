"""``hdmoe-milp bench`` and ``hdmoe-milp plot``: argument parsing and handlers.

``cli.py`` registers them with :func:`add_commands` and hands their parsed arguments to :func:`run`.

- ``bench [--quick] --out DIR [--mode paper|mesh] [--executor local|ray] [--jobs N]``: run the
  benchmark grid (:mod:`hdmoe_milp.grid`) and write its report into DIR.
- ``plot KIND FILE [--out PATH]``: draw one figure from a saved file: ``tbt``, ``decomposition`` and
  ``ablation`` from a ``results.csv``; ``solver`` from a ``solver.csv``; ``online`` from an
  ``online.csv``; ``placement``, ``node-load`` and ``link-load`` from a plan file (the latter two
  score the plan with EP and hdmoe on the problem the plan records); ``bound-trace`` from a plan
  file's record of layer ``--layer`` (``meta.layers[i].trace``, written by ``solve``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import grid
from . import pipeline as pl
from . import report as rp
from .errors import (
    DRAM_BW_GBPS_RANGE,
    MAX_BATCH,
    MAX_CONTEXT_LEN,
    MAX_HOP_LATENCY_NS,
    InputError,
    as_written,
    check_choice,
    check_file,
    check_real,
    shown,
)
from .evaluator import COALESCE, DELIVERIES, HOMES, MODES
from .hardware import MAX_DRAM_CAPACITY_BYTES, Mesh, parse_point, point_name
from .moe import MODEL_PRESETS
from .placement import Placement
from .problem import RECORD_HARDWARE_KEYS, RECORD_KEYS, RECORD_MODEL_KEYS
from .workload import BATCHING

__all__ = ["COMMANDS", "PLOT_KINDS", "add_commands", "run"]

COMMANDS = ("bench", "plot")
PLOT_KINDS = ("tbt", "decomposition", "ablation", "node-load", "link-load", "placement", "solver", "online",
              "bound-trace")


def _csv_list(text: str) -> tuple[str, ...]:
    """The comma-separated items (empty ones kept, so that ``_bench`` can refuse ``"a,"``)."""
    items = tuple(s.strip() for s in text.split(","))
    return () if not any(items) else items


def check_items(flag: str, given: tuple[str, ...]) -> None:
    """Refuse a list from :func:`_csv_list` that names nothing or has an empty item, naming ``flag``."""
    if not given:
        raise InputError(flag, "lists nothing", "give at least one value, or leave the flag out")
    if "" in given:
        raise InputError(flag, f"has an empty item: {','.join(given)!r}",
                         "separate the values by single commas, with none at either end")


def csv_items(flag: str, text: str) -> list[str]:
    """The comma-separated names of ``text``, spaces around them dropped, checked by :func:`check_items`."""
    given = _csv_list(text)
    check_items(flag, given)
    return list(given)


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` and ``plot`` on an argparse subparsers object."""
    b = subparsers.add_parser("bench", help="run the benchmark grid: results.csv, results.md, figures, index.md")
    b.add_argument("--quick", action="store_true",
                   help="one model (mixtral-8x7b), one mesh (4x4), two hardware points, short solves (<= 2 min)")
    b.add_argument("--out", required=True, help="output folder (plans are cached in OUT/cache)")
    b.add_argument("--mode", choices=("mesh", "paper"), default="mesh", help="evaluator unit mode (default mesh)")
    b.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the per-layer solves run (ray: pip install '.[ray]'; RAY_ADDRESS for a cluster)")
    b.add_argument("--jobs", type=int, default=1, help="layers solved in parallel (local process pool)")
    b.add_argument("--models", type=_csv_list, help="override the grid's models (comma-separated)")
    b.add_argument("--hws", type=_csv_list, help="override the hardware points, e.g. 5/50,10/25")
    b.add_argument("--meshes", type=_csv_list, help="override the meshes, e.g. 4x4,4x8")
    b.add_argument("--batches", type=_csv_list, help="override the batches, e.g. 16,64,128")
    b.add_argument("--time-limit", type=float, help="override the solver's limit per layer (deterministic s)")
    b.add_argument("--solve-batch", help="the batch plans are solved at (default 128), or 'each': one solve per "
                   "batch of the grid, every batch scored with plans made for it")
    b.add_argument("--online-batches", type=float, help="override the number of replayed batches (0: no online part)")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")

    p = subparsers.add_parser("plot", help="draw one report figure from a saved results/solver/online csv or plan")
    p.add_argument("kind", choices=PLOT_KINDS)
    p.add_argument("file", help="results.csv (tbt, decomposition, ablation), solver.csv, online.csv, or a plan "
                   ".json (placement, node-load, link-load, bound-trace)")
    p.add_argument("--out", help="image to write (.png, .svg, .pdf or another format matplotlib writes; default: "
                   "FILE's folder, KIND.png)")
    p.add_argument("--force", action="store_true", help="overwrite the image if it exists")
    p.add_argument("--model", help="which model's rows (csv files)")
    p.add_argument("--hw", help="which hardware point's rows (csv files)")
    p.add_argument("--mesh", help="which mesh's rows (csv files)")
    p.add_argument("--batch", type=float, help="which batch (tbt, decomposition; default the largest)")
    p.add_argument("--layer", type=int, help="MoE layer (node-load, link-load, placement, bound-trace; default 0)")
    p.add_argument("--trace", help="the routing trace to score a plan on (node-load, link-load, placement; default "
                   "the one the plan records, which must still be there and unchanged)")


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``bench`` or ``plot`` command; returns the exit status."""
    check_choice("command", args.command, COMMANDS)
    return _bench(args) if args.command == "bench" else _plot(args)


def _solve_batch(text: str) -> int | None:
    if text.strip().lower() == "each":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0 or value > MAX_BATCH:
        raise InputError("--solve-batch", f"must be a whole number of tokens in 1..{MAX_BATCH:g}, got {text!r}",
                         "or 'each' for one solve per batch")
    return value


# fields the grid and the solvers name in their errors, and the bench flag each comes from
_BENCH_FLAGS = {"model": "--models", "models": "--models", "hw": "--hws", "--hw": "--hws", "hws": "--hws",
                "mesh": "--meshes", "--mesh": "--meshes", "meshes": "--meshes", "batch": "--batches",
                "batches": "--batches", "jobs": "--jobs", "time_limit_s": "--time-limit", "executor": "--executor",
                "online_batches": "--online-batches", "mode": "--mode"}


def _bench(args: argparse.Namespace) -> int:
    # --time-limit, --online-batches and --jobs are checked with the spec below (grid.check_spec,
    # check_jobs), before any work; the batches here first, since the spec takes them as integers
    for b in args.batches or ():
        if not b:  # an empty item: refused below, as in the other lists
            continue
        try:
            if not b.isascii():  # float() reads full-width digits; 0-9 only, as everywhere else
                raise ValueError(b)
            v = float(b)
        except ValueError:
            raise InputError("--batches", f"must be whole numbers, got {b!r}", "e.g. --batches 16,64,128 (digits "
                             "0-9)") from None
        check_real("--batches", v, minimum=1, maximum=MAX_BATCH, integer=True)
    for name in ("models", "hws", "meshes", "batches"):
        given = getattr(args, name)
        if given is None:
            continue
        check_items(f"--{name}", given)
        seen = [float(v) for v in given] if name == "batches" else list(given)
        if len(set(seen)) != len(seen):
            raise InputError(f"--{name}", f"lists a value twice: {','.join(given)}", "name each value once")
    if not str(args.out).strip():
        raise InputError("--out", "is empty", "give the folder to write the report into")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError("--out", f"{args.out} is not a folder", "give a folder; a missing one is created")
    if (above := _file_in_the_way(Path(args.out).absolute().parent)) is not None:
        raise InputError("--out", f"{above} is a file, not a folder", "write into a folder; a missing one is created")
    try:
        spec = grid.check_spec(_bench_spec(args))  # every flag checked before the folder is made or any work
        pl.check_jobs(args.jobs, args.executor)
        _check_writable_folder("--out", Path(args.out) / "cache")
        return _run_bench(args, spec)
    except InputError as exc:  # name the flag the user wrote, not the field it became
        raise as_written(exc, _BENCH_FLAGS) from None


def _check_writable_folder(flag: str, folder: Path) -> None:
    """Create ``folder`` (and its parents) and write a file there, before any work: permissions, a
    read-only file system or a file in the way are found now, not after the solves."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InputError(flag, f"cannot write into {folder}: {exc.strerror or exc}", "write elsewhere") from None


def _bench_spec(args: argparse.Namespace) -> grid.GridSpec:
    spec = grid.PRESETS["quick" if args.quick else "full"]
    changes: dict[str, Any] = {"mode": args.mode}
    for name in ("models", "hws", "meshes"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    if args.batches:
        try:
            changes["batches"] = tuple(int(float(b)) for b in args.batches)
        except ValueError:
            raise InputError("--batches", f"must be whole numbers, got {args.batches}",
                             "e.g. --batches 16,64,128") from None
    if args.time_limit is not None:
        changes["time_limit_s"] = args.time_limit
    if args.solve_batch is not None:
        changes["solve_batch"] = _solve_batch(args.solve_batch)
    if args.online_batches is not None:  # a float so that 1e3 reads; check_spec refuses 2.5, nan and inf
        v = args.online_batches
        changes["online_batches"] = int(v) if float(v).is_integer() else v
        if v == 0:
            changes["policies"] = ()
    return replace(spec, **changes)


def _run_bench(args: argparse.Namespace, spec: grid.GridSpec) -> int:
    g = grid.run(spec, args.out, jobs=args.jobs, executor=args.executor, progress=args.progress)
    solves = len(spec.models) * len(spec.hws) * len(spec.meshes) * len(grid.solve_batches(spec))
    print(f"wrote {Path(args.out) / 'index.md'} ({len(g.results)} rows, {g.computed} plans solved, "
          f"{solves - g.computed} from the cache)")
    return 0


# the columns each figure drawn from a csv reads, and the file of bench's that has them
_CSV_NEEDS = {
    "tbt": ("results.csv", ("model", "hw", "mesh", "batch", "strategy", "tbt_us")),
    "decomposition": ("results.csv", ("model", "hw", "mesh", "batch", "strategy", "moe_compute_us", "dispatch_us",
                                      "combine_us", "non_moe_us")),
    "ablation": ("results.csv", ("model", "hw", "mesh", "batch", "part", "strategy", "tbt_us", "moe_compute_us",
                                 "dispatch_us", "combine_us", "non_moe_us")),
    "solver": ("solver.csv", ("layer", "gap", "time_s")),
    "online": ("online.csv", ("policy", "batch", "latency_us", "actions")),
}


def _read_csv(path: Path, kind: str) -> pd.DataFrame:
    """The table ``path`` with the columns the ``kind`` figure reads; an InputError naming the file
    and the first bad row otherwise: a missing column, a blank name, a value that is not a finite
    number (or not > 0, or negative, where the column cannot be), a row that repeats another's key."""
    name, needs = _CSV_NEEDS[kind]
    fix = f"give the {name} that bench wrote"
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError("file", f"{path} is not a CSV table ({type(exc).__name__})", fix) from None
    missing = [c for c in needs if c not in df.columns]
    if missing:
        raise InputError("file", f"{path} has no column {', '.join(missing)}, which the {kind} figure needs", fix)

    def bad_row(mask: pd.Series, c: str, need: str) -> None:
        if mask.any():
            row = int(np.flatnonzero(mask.to_numpy())[0])
            raise InputError("file", f"{path} row {row + 2}: column {c} is '{df[c].iloc[row]}', not {need}", fix)

    for c in (*needs, "part"):
        if c in df.columns and c not in _NUMERIC:  # names: every row has one
            bad_row(df[c].isna() | (df[c].astype(str).str.strip() == ""), c, "a name")
    positive = _POSITIVE | ({"batch"} if name == "results.csv" else set())  # online.csv's batch is an index
    for c in needs:
        if c not in _NUMERIC:
            continue
        v = pd.to_numeric(df[c], errors="coerce")
        bad = (v.isna() & df[c].notna()) | (~np.isfinite(v) & v.notna())
        if c in _REQUIRED:  # some rows have no decomposition or gap (NaN); every row has these
            bad |= v.isna()
        bad_row(bad, c, "a finite number")
        if c in positive:
            bad_row(v <= 0, c, "a number > 0")
        else:
            bad_row(v < 0, c, "a number >= 0")
        df[c] = v
    if name == "results.csv":  # names bench writes; another one would be drawn as if it were one of them
        for c, allowed in (("part", _PARTS), ("strategy", _STRATEGY_NAMES)):
            if c in df.columns:
                bad_row(~df[c].astype(str).isin(allowed), c, "one of " + ", ".join(allowed))
        if "part" not in df.columns and df["strategy"].astype(str).str.contains("+", regex=False).any():
            raise InputError("file", f"{path} has online rows (ours+...) but no column part, which tells them "
                             "from the static rows", fix)
    if "layer" in needs:
        bad_row(df["layer"] != np.floor(df["layer"]), "layer", "a whole layer number")
    if name == "online.csv":
        bad_row(df["batch"] != np.floor(df["batch"]), "batch", "a whole batch index")
    if "gap" in needs:
        bad_row(df["gap"] > 1, "gap", "a relative gap <= 1")
        if {"objective_us", "bound_us"} <= set(df.columns):  # a lower bound never exceeds its plan's time
            obj, low = (pd.to_numeric(df[c], errors="coerce") for c in ("objective_us", "bound_us"))
            bad_row(low > obj * (1 + 1e-9), "bound_us", "a bound <= objective_us")
    key = [c for c in _KEYS if c in df.columns]
    dup = df.duplicated(subset=key, keep="first")
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputError("file", f"{path} row {row + 2} repeats the {', '.join(key)} of an earlier row", fix)
    return df


_NUMERIC = {"batch", "tbt_us", "moe_compute_us", "dispatch_us", "combine_us", "non_moe_us", "layer", "gap", "time_s",
            "latency_us", "actions"}
_REQUIRED = {"batch", "tbt_us", "latency_us", "layer", "time_s"}  # (online.csv's batch is the batch's index, from 0)
_POSITIVE = {"tbt_us", "latency_us"}
_PARTS = ("static", "ablation", "online")
_STRATEGY_NAMES = (*pl.STRATEGIES, "ours", *(f"ours+{p}" for p in pl.POLICIES))
# what makes a row of bench's tables unique (those of these columns the table has)
_KEYS = ("model", "hw", "mesh", "mode", "batch", "part", "strategy", "policy", "layer", "solve_batch")


def _filter(df: pd.DataFrame, args: argparse.Namespace, path: str = "file") -> pd.DataFrame:
    """The rows matching every one of --model, --hw and --mesh given (``path``: the table's, for errors)."""
    given = {c: getattr(args, c) for c in ("model", "hw", "mesh") if getattr(args, c, None) is not None}
    for c, v in given.items():
        if c in df.columns:
            df = df[df[c].astype(str) == str(v)]
    if df.empty and not given:
        raise InputError(path, "has no rows (only a header)", "give a table that bench wrote")
    if df.empty:
        raise InputError("/".join(f"--{c}" for c in given), "no rows match "
                         + ", ".join(f"{c}={v}" for c, v in given.items()), "give values that appear in the file")
    return df


def _at_batch(df: pd.DataFrame, batch: float | None) -> float:
    """``batch`` if some row has it (default: the largest batch); an InputError naming --batch."""
    have = sorted(float(b) for b in df["batch"].unique())
    if batch is None:
        return have[-1]
    check_real("--batch", batch, positive=True)
    if float(batch) not in have:
        raise InputError("--batch", f"no rows at batch {batch:g}", "give one of " + ", ".join(f"{b:g}" for b in have))
    return float(batch)


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (or ``folder`` itself) if it is a file, not a
    folder: writing there fails with only "Not a directory"."""
    above = next((a for a in (folder, *folder.parents) if a.exists()), None)
    return above if above is not None and not above.is_dir() else None


def check_out(flag: str, path: str | None, force: bool = False) -> None:
    """Fail before any work if ``path`` cannot be written, or exists and ``--force`` is not given."""
    flag = flag if flag.startswith("--") else f"--{flag}"
    if path is None:
        if force:  # it would do nothing: say so rather than ignore it
            raise InputError("--force", f"only applies with {flag} (nothing is written without it)",
                             f"give {flag} FILE, or leave --force out")
        return
    if not path.strip():
        raise InputError(flag, "is empty", "give a file name")
    if path.endswith(("/", os.sep)):
        raise InputError(flag, f"{path} names a folder", "give a file name")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        if (above := _file_in_the_way(parent)) is not None:
            raise InputError(flag, f"{above} is a file, not a folder", "write into a folder")
        raise InputError(flag, f"folder {parent} does not exist", "create it or write elsewhere")
    if Path(path).is_dir():
        raise InputError(flag, f"{path} is a directory", "give a file name")
    if Path(path).exists() and not Path(path).is_file():
        raise InputError(flag, f"{path} is not a regular file", "give the path of a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(flag, f"folder {parent} is not writable", "write elsewhere")
    if not force and (Path(path).exists() or Path(path).is_symlink()):
        raise InputError(flag, f"{path} already exists", "pass --force to overwrite it, or write elsewhere")


def check_plan_out(flag: str, path: str | None, force: bool = False) -> None:
    """:func:`check_out` for a plan file, which is JSON: a name ending in anything but ``.json`` (say
    ``plan.png``, meant for ``plot``) is refused."""
    if path is not None and (not path.strip() or Path(path).is_dir()):
        raise InputError(flag, f"{path!r} is {'a folder' if path.strip() else 'empty'}, not a file name",
                         "give the plan file's path, e.g. plan.json")
    if path is not None and Path(path).name.lower() == ".json":  # a hidden file with no name: no suffix
        raise InputError(flag, f"{Path(path).name!r} has no name before .json", "give a name, e.g. plan.json")
    if path is not None and Path(path).suffix.lower() != ".json":
        raise InputError(flag, f"{Path(path).name}: a plan file is JSON", "end the name in .json; draw figures with "
                         "hdmoe-milp plot")
    check_out(flag, path, force)


def _check_figure_out(out: Path, force: bool = False) -> None:
    """Before any work: matplotlib writes the suffix's format, and :func:`check_out` passes."""
    formats = Figure().canvas.get_supported_filetypes()
    if out.is_dir():  # as check_out says it, before the suffix (a folder has none)
        raise InputError("--out", f"{out} is a directory", "give a file name, e.g. --out fig.png")
    if out.suffix.lstrip(".").lower() not in formats:
        raise InputError("--out", f"{out.name}: unknown image format {out.suffix or '(no suffix)'!r}",
                         "end the name in " + ", ".join(f".{f}" for f in ("png", "svg", "pdf")))
    check_out("--out", str(out), force)


def _first(df: pd.DataFrame, col: str) -> Any:
    return df[col].iloc[0] if col in df.columns else None


def plan_defaults(path: str, trace_flag: str | None, *, given: tuple[str, ...] = ()) -> dict[str, Any]:
    """Settings a plan file records about what it was made for (empty for older plan files). The
    recorded trace must still be there and unchanged unless ``--trace`` replaces it. ``given``:
    the settings (``"model"``, ``"mesh"``) a flag overrides, whose record is then not checked."""
    plan = Placement.load(path)  # once: its record here, its shape in _check_own_shape
    made = plan.meta.get("problem") if isinstance(plan.meta.get("problem"), dict) else {}
    where = f"plan {Path(path).name} meta.problem"

    def num(key: str, v: Any) -> float:
        ok = not isinstance(v, bool) and isinstance(v, (int, float))
        try:
            x = float(v) if ok else float("nan")
        except OverflowError:  # an int of hundreds of digits
            x = float("inf")
        if x != x or x in (float("inf"), -float("inf")):
            raise InputError(f"{where}.{key}", f"must be a finite number, got {shown(v)}", "save the plan again")
        return x

    _check_record_keys(where, made)
    out: dict[str, Any] = {}
    choices = {"model": tuple(MODEL_PRESETS), "batching": BATCHING,
               "mode": MODES, "delivery": DELIVERIES, "home": HOMES}
    for key, field in (("model", "model"), ("mesh", "mesh"), ("hw_point", "hw"), ("batch", "batch"),
                       ("batching", "batching"), ("mode", "mode"), ("delivery", "delivery"), ("home", "home")):
        if made.get(key) is not None:
            v = made[key]
            if key == "batch":
                check_real(f"{where}.batch", num(key, v), minimum=1, maximum=MAX_BATCH)
            elif not isinstance(v, str):
                raise InputError(f"{where}.{key}", f"must be a string, got {v!r}", "save the plan again")
            elif key == "model" and v not in MODEL_PRESETS:  # a plan of a model built in Python
                raise InputError(f"{where}.model", f"is {v!r}, not one of the preset models ("
                                 f"{', '.join(sorted(MODEL_PRESETS))}), which are all the CLI knows",
                                 "score it in Python with the model it was made for: "
                                 "hm.evaluate(problem, hm.load_plan(path, problem))")
            elif key in choices:  # checked here, so that the error names the plan, not a flag
                check_choice(f"{where}.{key}", v, choices[key])
            elif key == "hw_point":
                v = parse_point(v, f"{where}.hw_point")[0]
            elif key == "mesh":
                try:
                    v = Mesh.parse(v).name  # canonical: a plan made for "4X8" is one for 4x8
                except InputError as exc:
                    raise InputError(f"{where}.mesh", exc.problem, "save the plan again") from None
            out[field] = v
    hw = made.get("hardware") or {}
    if not isinstance(hw, dict):
        raise InputError(f"{where}.hardware", f"must be an object, got {hw!r}", "save the plan again")
    # a recorded 0 is a value, not a missing key (a capacity of 0 was read as "no capacity")
    if hw.get("dram_capacity_bytes") is not None:
        out["dram_capacity_gb"] = check_real(f"{where}.hardware.dram_capacity_bytes", num(
            "hardware.dram_capacity_bytes", hw["dram_capacity_bytes"]), positive=True,
            maximum=MAX_DRAM_CAPACITY_BYTES) / 1e9  # checked here in bytes, as the key says
    if hw.get("hop_latency_s") is not None:
        out["hop_latency_ns"] = check_real(f"{where}.hardware.hop_latency_s", num("hardware.hop_latency_s",
                                           hw["hop_latency_s"]), minimum=0, maximum=MAX_HOP_LATENCY_NS * 1e-9) * 1e9
    if hw.get("dram_bw_bytes_per_s") is not None:
        lo, hi = DRAM_BW_GBPS_RANGE
        out["dram_bw_gbps"] = check_real(f"{where}.hardware.dram_bw_bytes_per_s", num(
            "hardware.dram_bw_bytes_per_s", hw["dram_bw_bytes_per_s"]), minimum=lo * 1e9, maximum=hi * 1e9) / 1e9
    for key in ("seed", "synthetic_tokens"):
        v = made.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1)):
            raise InputError(f"{where}.{key}", f"must be a whole number >= {0 if key == 'seed' else 1}, got {v!r}",
                             "save the plan again")
    if made.get("seed") is not None:
        out["seed"] = made["seed"]
    v = made.get("context_len")
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CONTEXT_LEN:
            raise InputError(f"{where}.context_len", f"must be a whole number of tokens in 0 .. {MAX_CONTEXT_LEN:.0e}, "
                             f"got {v!r}", "save the plan again")
        out["context_len"] = v
    plan_rules(path, made)  # checked here too, so that every command refuses a bad record alike
    _check_own_shape(path, plan, {k: v for k, v in out.items() if k not in given})
    recorded = made.get("trace_path")
    for key in ("trace_path", "trace_sha256"):
        if made.get(key) is not None and not isinstance(made[key], str):
            raise InputError(f"{where}.{key}", f"must be a string, got {made[key]!r}", "save the plan again")
    name = made.get("trace")
    if not recorded and trace_flag is None and isinstance(name, str) and not name.startswith("synthetic-"):
        raise InputError("plan", f"was made for the trace {name!r}, which was read from no file",
                         "give the trace with --trace")
    if not recorded and made.get("synthetic_tokens") is not None:
        out["synthetic_tokens"] = made["synthetic_tokens"]  # with the seed, the same synthetic trace
    if recorded and trace_flag is None:
        # a relative path (an edited plan) is read like an instance file's: against the plan's folder
        recorded = str(Path(path).parent / recorded) if not Path(recorded).is_absolute() else recorded
        if not Path(recorded).is_file():
            raise InputError("plan", f"was made for the trace {recorded}, which is not there",
                             "give the trace with --trace")
        if made.get("trace_sha256") and pl.file_sha256(recorded) != made["trace_sha256"]:
            raise InputError("plan", f"was made for the trace {recorded}, which has changed since (sha256 differs)",
                             "give the trace to score on with --trace")
        out["trace"] = recorded
    return out


def _check_record_keys(where: str, made: dict[str, Any]) -> None:
    """Refuse keys a plan's ``meta.problem`` (``where``) cannot hold: a misspelt one would otherwise
    be ignored and its default used in its place."""
    for record, known, at in ((made, RECORD_KEYS, where),
                              (made.get("hardware"), RECORD_HARDWARE_KEYS, f"{where}.hardware"),
                              (made.get("model_dims"), RECORD_MODEL_KEYS, f"{where}.model_dims")):
        if not isinstance(record, dict):
            continue
        unknown = sorted(str(k) for k in record if k not in known)
        if unknown:
            raise InputError(at, f"has unknown key(s) {', '.join(map(repr, unknown))}",
                             f"correct or remove them (allowed: {', '.join(sorted(known))})")


def plan_rules(path: str, made: dict[str, Any] | None = None) -> dict[str, str]:
    """The evaluator rules a plan file records beyond the settings (``coalesce``, ``replica_rule``),
    checked; empty for plan files older than 0.7.9, which did not record them. ``made``: the
    record's ``meta.problem``, if already read."""
    if made is None:
        made = pl.plan_settings(path) or {}
    out = {}
    for key, choices in (("coalesce", COALESCE), ("replica_rule", pl.REPLICA_RULES)):
        if made.get(key) is not None:
            check_choice(f"plan {Path(path).name} meta.problem.{key}", made[key], choices)
            out[key] = made[key]
    return out


def _check_own_shape(path: str, plan: Placement, out: dict[str, Any]) -> None:
    """Refuse a plan (read from ``path``) whose record contradicts the plan itself: a model whose
    experts or layer count differ from the plan's rows, or a mesh with another number of nodes
    (before any trace is read, which would otherwise be blamed)."""
    where = f"plan {Path(path).name} meta.problem"
    if "model" in out:
        m = MODEL_PRESETS[out["model"]]
        if (m.num_experts, m.moe_layers) != (plan.num_experts, plan.num_layers):
            fits = [n for n, p in MODEL_PRESETS.items()
                    if (p.num_experts, p.moe_layers) == (plan.num_experts, plan.num_layers)]
            raise InputError(f"{where}.model", f"says {out['model']} ({m.moe_layers} MoE layers of {m.num_experts} "
                             f"experts), but the plan has {plan.num_layers} layers of {plan.num_experts}",
                             "save the plan again from the problem it was made for" + (
                                 f"; {' or '.join(fits)} fits its shape" if fits else ""))
    if "mesh" in out:
        mesh = Mesh.parse(out["mesh"])
        if mesh.rows * mesh.cols != plan.num_nodes:
            raise InputError(f"{where}.mesh", f"says {out['mesh']} ({mesh.rows * mesh.cols} nodes), but the plan "
                             f"places experts on {plan.num_nodes}", "save the plan again from the problem it was "
                             "made for")


def _point_name(text: Any) -> Any:
    """The canonical name of the design point ``text`` ("5.0/50" is "5/50"); ``text`` itself if it is
    not one (the checks that read it report that)."""
    name = point_name(text)
    return text if name is None else name


def check_plan_record(path: str, problem: pl.Problem, *, model_given: bool = False, hw_given: bool = False,
                      flags: bool = True) -> None:
    """Refuse a plan file whose record of what it was made for disagrees with the problem rebuilt
    from that record: the model's shape (``num_experts``, ``moe_layers``, ``top_k``; unless
    ``model_given``) and the hardware point's numbers (``hardware.compute_flops``,
    ``link_bw_bytes_per_s``; unless ``hw_given``). Such a plan was edited or made by other code, and
    scoring it on the preset's numbers would answer a question nobody asked. ``flags``: the fix
    may offer ``--model``/``--hw`` (False where the command reads no such flag)."""
    made = pl.plan_settings(path) or {}
    here = problem.describe()
    checks: list[tuple[str, Any, Any]] = []
    if not model_given and made.get("model") == here["model"]:
        checks += [(k, made.get(k), here[k]) for k in ("num_experts", "moe_layers", "top_k")]
        dims = made.get("model_dims")  # plans since 0.8.4: a variant of a preset keeps the preset's name
        if dims is not None and not isinstance(dims, dict):
            raise InputError(f"plan {Path(path).name} meta.problem.model_dims", f"must be an object, got {dims!r}",
                             "save the plan again from the problem it was made for")
        for k, v in (dims or {}).items():
            if here["model_dims"].get(k) is None and v is not None:  # the preset leaves it unset
                raise _variant(path, f"model_dims.{k}", v, here["model"], "sets none")
        checks += [(f"model_dims.{k}", v, here["model_dims"][k]) for k, v in (dims or {}).items()
                   if here["model_dims"].get(k) is not None]
    hw = made.get("hardware") if isinstance(made.get("hardware"), dict) else {}
    if not hw_given and made.get("hw_point") is not None and _point_name(made["hw_point"]) == here["hw_point"]:
        checks += [(f"hardware.{k}", hw.get(k), here["hardware"][k]) for k in ("compute_flops", "link_bw_bytes_per_s")]
    for key, recorded, actual in checks:
        if recorded is None:
            continue
        if isinstance(recorded, (str, bool, dict)):  # not a number: say so, not "differs"
            raise InputError(f"plan {Path(path).name} meta.problem.{key}", f"must be a number, got {recorded!r}",
                             "save the plan again from the problem it was made for")
        same = isinstance(recorded, (int, float, list))
        if same:
            try:
                a = np.asarray(recorded, dtype=float)
            except OverflowError:  # an int of hundreds of digits
                raise InputError(f"plan {Path(path).name} meta.problem.{key}", f"must be a finite number, got "
                                 f"{shown(recorded)}", "save the plan again from the problem it was made for") from None
            except (TypeError, ValueError):  # a list of text, or of uneven lists
                raise InputError(f"plan {Path(path).name} meta.problem.{key}",
                                 f"must be a number or a flat list of numbers, got {recorded!r}",
                                 "save the plan again from the problem it was made for") from None
            b = np.asarray(actual, dtype=float)
            same = a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))
        if not same:
            of_model = not key.startswith("hardware.")
            what = here["model"] if of_model else f"hardware point {here['hw_point']}"
            flag = "--model" if of_model else "--hw"
            fix = "save the plan again from the problem it was made for"
            if key.startswith("model_dims."):  # made in Python for a variant the command line cannot rebuild
                raise _variant(path, key, recorded, what, f"has {actual!r}")
            raise InputError(f"plan {Path(path).name} meta.problem.{key}", f"records {recorded!r} but {what} has "
                             f"{actual!r}", fix + (f", or give {flag} to score it on another one" if flags else ""))


def _variant(path: str, key: str, recorded: Any, preset: str, preset_value: str) -> InputError:
    """A plan whose ``meta.problem.{key}`` (a size in ``model_dims``) differs from the preset it names
    (``preset_value``: what the preset "has 2.0" or "sets none"): it was made in Python for a variant
    the command line cannot rebuild."""
    return InputError(f"plan {Path(path).name} meta.problem.{key}", f"records {recorded!r} but the preset {preset} "
                      f"{preset_value}: the plan was made for a variant of it", "score it from Python with the model "
                      "it was made for: hm.evaluate(hm.Problem(model, hardware, trace), hm.load_plan(path))")


def _plan_problem(path: Path, trace_flag: str | None = None) -> tuple[pl.Problem, Any, Mesh]:
    made = pl.plan_settings(path)
    if made is None or not made.get("model") or not made.get("mesh") or not made.get("hw_point"):
        raise InputError("plot", f"{path} does not record the model, mesh and hardware point it was made for",
                         "save it again with the problem it was made for, on a named hardware point (make_hardware "
                         "or an instance file): hm.place(problem, name) records it; a Placement built by hand takes "
                         "it as Placement(plan.layers, plan.strategy, {'problem': problem.describe()})")
    s = replace(pl.Settings(path.stem, "deepseek-v2-lite", "5/50", "4x8"), **plan_defaults(str(path), trace_flag))
    if trace_flag is not None:
        s = replace(s, trace=trace_flag)
    try:  # the values come from the plan file: name its keys, and no flag plot lacks (--model)
        problem = s.to_problem(model_field=f"the model of plan {path.name} (meta.problem.model)",
                               model_source="plan")
    except InputError as exc:
        key = {"batch": "batch", "trace": "trace_path"}.get(exc.field)
        if exc.field == "trace" and trace_flag is not None:
            raise InputError("--trace", exc.problem, exc.fix) from None
        if key is None:
            raise
        raise InputError(f"plan {path.name} meta.problem.{key}", exc.problem,
                         exc.fix or "save the plan again") from None
    check_plan_record(str(path), problem, flags=False)
    rules = plan_rules(str(path))  # the replica rule and coalescing the plan was scored with
    if rules:
        problem = problem.with_(options=replace(problem.options, **rules))
    return problem, pl.load_plan(path, problem), Mesh.parse(s.mesh)


def _bound_trace(path: Path, layer: int) -> Any:
    """The primal/bound figure of ``layer`` from a plan file's ``meta.layers`` (no re-solve)."""
    meta = Placement.load(path).meta
    layers = meta.get("layers") if isinstance(meta.get("layers"), list) else []
    idx = next((i for i, r in enumerate(layers) if isinstance(r, dict) and r.get("layer") == layer), None)
    rec = None if idx is None else layers[idx]
    if rec is None:
        if layers:
            raise InputError("--layer", f"{path} records no layer {layer}", f"give one of 0..{len(layers) - 1}")
        raise InputError("plot", f"{path} records no per-layer solve", "use a plan written by solve or bench")
    trace = rec.get("trace")
    if not isinstance(trace, list) or not trace:
        if rec.get("status") == "not-solved":
            raise InputError("--layer", f"layer {layer} of {path} was left out of the solve (--layers)",
                             "give a solved layer, or solve this one")
        if rec.get("status") == "interrupted":
            raise InputError("--layer", f"layer {layer} of {path} was interrupted (Ctrl-C) before it finished",
                             "give a finished layer, or solve this one again")
        raise InputError("plot", f"layer {layer} of {path} has no progress trace "
                         f"(status {rec.get('status')!r})", "solve it again with this version")
    try:
        points = [(float(t), None if p is None else float(p), None if b is None else float(b), str(w))
                  for t, p, b, w in trace]
    except (TypeError, ValueError):
        raise InputError("plot", f"layer {layer} of {path}: the trace is not a list of "
                         "[time_s, primal_s, bound_s, what] points") from None
    where = f"plan {path.name} meta.layers[{idx}]"
    gap = rec.get("gap")
    if gap is not None and (isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 <= gap <= 1):
        raise InputError(f"{where}.gap", f"must be a number in [0, 1] or null, got {gap!r}",
                         "give the plan file that solve or bench wrote")
    for key in ("problem", "solver"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise InputError(f"plan {path.name} meta.{key}", f"must be a table of settings, got {meta[key]!r}",
                             "give the plan file that solve or bench wrote")
    made = meta.get("problem") or {}
    solver = meta.get("solver") or {}
    cap = rp.caption(model=made.get("model"), mesh=made.get("mesh"), hw=_point_name(made.get("hw_point")),
                     batch=made.get("batch"), mode=made.get("mode"), backend=solver.get("backend"),
                     limit_s=solver.get("time_limit_s"), time_mode=solver.get("time_mode"))
    try:
        return rp.fig_bound_trace(points, layer=layer, settings=cap + " (times: wall)")
    except InputError as exc:  # named as the file holds it
        raise InputError(f"{where}.{exc.field}", exc.problem, "give the plan file that solve or bench wrote") from None


def _say_what_was_picked(kind: str, df: pd.DataFrame, path: Path, args: argparse.Namespace) -> None:
    """On stderr, the model, hardware point and mesh a one-point figure drew when the table holds
    several and no flag chose (the first row's; the first mesh by name for ``tbt``)."""
    cols = ("mesh",) if kind == "tbt" else ("model", "hw", "mesh")
    picked = []
    for c in cols:
        if c not in df.columns or getattr(args, c, None) is not None or df[c].nunique() < 2:
            continue
        values = df[c].astype(str).unique()
        drawn = sorted(values)[0] if kind == "tbt" else str(df[c].iloc[0])
        picked.append(f"{c} {drawn} (of {', '.join(values)}; --{c} picks)")
    if picked:
        print(f"plot {kind}: {path.name} holds several; drew " + ", ".join(picked), file=sys.stderr)


def _csv_figure(kind: str, df: pd.DataFrame, path: Path, args: argparse.Namespace) -> Figure:
    """The ``kind`` figure of a checked bench table ``df`` (read from ``path``)."""
    if kind == "ablation":
        if "part" not in df.columns or not (df["part"] == "online").any():
            raise InputError("file", f"{path} has no online rows (a bench run with --online-batches 0?), and the "
                             "ablation figure's third bar is ours with the online policy",
                             "give the results.csv of a bench run with online batches")
        try:
            return rp.fig_ablation(df, model=args.model, hw=args.hw, mesh=args.mesh)
        except InputError as exc:
            raise InputError("file", f"{path} {exc.problem}", exc.fix) from None
        except ValueError as exc:  # the table lacks the rows the figure compares
            raise InputError("file", f"{path}: {exc}", "give the results.csv that bench wrote") from None
    if kind in ("tbt", "decomposition"):
        df = df[df["part"] == "static"] if "part" in df.columns else df
        if kind == "tbt":
            if args.mesh is None:  # the figure shows one mesh: the first, unless --mesh says which
                df = df[df["mesh"] == sorted(df["mesh"].astype(str).unique())[0]]
            b = _at_batch(df, args.batch)
            if "tp" not in set(df.loc[df["batch"] == b, "strategy"]):
                raise InputError("file", f"{path} has no tp rows at batch {b:g}, and the tbt figure is normalised "
                                 "to TP", "give the results.csv that bench wrote")
            return rp.fig_tbt_normalised(df, batch=b, mesh=args.mesh)
        b = _at_batch(df, args.batch)
        d = df[(df["batch"] == b) & (df["model"] == _first(df, "model")) & (df["hw"] == _first(df, "hw"))
               & (df["mesh"] == _first(df, "mesh"))]
        parts = ["moe_compute_us", "dispatch_us", "combine_us", "non_moe_us"]
        gone = d[parts].isna().any(axis=1)
        if gone.any():
            row = d.index[int(np.flatnonzero(gone.to_numpy())[0])]
            raise InputError("file", f"{path} row {row + 2}: the {d.loc[row, 'strategy']} row has no time "
                             "decomposition (" + ", ".join(parts) + ")", "give the results.csv that bench wrote")
        return rp.fig_decomposition(d)
    if kind == "solver":
        d = df[(df["model"] == _first(df, "model")) & (df["hw"] == _first(df, "hw"))
               & (df["mesh"] == _first(df, "mesh"))] if "model" in df.columns else df
        sb = None
        if "solve_batch" in d.columns:  # bench --solve-batch each: one solve per batch; draw the first
            sb = _first(d, "solve_batch")
            d = d[d["solve_batch"] == sb]
        try:  # the limit per layer and what it counted: the table's time_limit_s and time_mode columns
            return rp.fig_solver(d, settings=rp.caption(model=_first(d, "model"), mesh=_first(d, "mesh"),
                                                        hw=_first(d, "hw"), mode=_first(d, "mode"), batch=sb))
        except InputError as exc:
            raise InputError("file", f"{path}: column {exc.field} {exc.problem}", "give the solver.csv that bench wrote"
                             ) from None
    if kind == "online":
        key = {c: _first(df, c) for c in ("model", "hw", "mesh")}
        d = df[(df[list(key)] == pd.Series(key)).all(axis=1)] if "model" in df.columns else df
        return rp.fig_online({p: g for p, g in d.groupby("policy", sort=False)},
                             settings=rp.caption(**key, mode=_first(d, "mode")))
    raise ValueError(f"not a table figure: {kind}")


def _plot(args: argparse.Namespace) -> int:
    path = check_file("file", args.file, "give the path of a results/solver/online csv or a plan file")
    kind = args.kind
    if args.out is not None and not args.out.strip():
        raise InputError("--out", "is empty", "give the image's file name, or leave --out out")
    out = Path(args.out) if args.out else path.with_name(f"{kind}.png")
    _check_figure_out(out, args.force)
    # flags a kind does not read are refused, not ignored: the figure would not show what they ask for
    reads = {"tbt": {"model", "hw", "mesh", "batch"}, "decomposition": {"model", "hw", "mesh", "batch"},
             "ablation": {"model", "hw", "mesh"}, "solver": {"model", "hw", "mesh"},
             "online": {"model", "hw", "mesh"}}.get(kind, {"layer"} if kind == "bound-trace" else {"layer", "trace"})
    for attr in ("model", "hw", "mesh", "batch", "layer", "trace"):
        if getattr(args, attr, None) is not None and attr not in reads:
            why = (", which draws the solve the plan file records" if kind == "bound-trace"
                   else ", which reads the problem the plan file records" if kind not in _CSV_NEEDS
                   else f" (that figure does not select its rows by {attr})")
            raise InputError(f"--{attr}", f"does not apply to plot {kind}{why}", f"leave --{attr} out")
    if args.hw is not None:  # tables hold a point's one name: --hw 5.0/50 picks the rows of 5/50
        args.hw = parse_point(args.hw, "--hw")[0]
    if args.layer is None:
        args.layer = 0
    if kind in _CSV_NEEDS and path.suffix.lower() == ".json":
        hint = ("; a plan's layers: plot bound-trace PLAN --layer N draws one layer's primal and bound, and "
                "solve prints every layer's gap and time") if kind == "solver" else ""
        raise InputError("file", f"{path.name} is a plan file, and plot {kind} draws bench's {_CSV_NEEDS[kind][0]}",
                         f"give the {_CSV_NEEDS[kind][0]} that bench wrote{hint}")
    if kind in _CSV_NEEDS:
        df = _filter(_read_csv(path, kind), args, str(path))
        if kind in ("tbt", "decomposition", "ablation") and "part" in df.columns:
            if not (df["part"] == "static").any():
                raise InputError("file", f"{path} has no rows with part 'static', which the {kind} figure draws",
                                 "give the results.csv that bench wrote")
        try:
            fig = _csv_figure(kind, df, path, args)
        except InputError:
            raise
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # a table edited into a shape no figure has
            raise InputError("file", f"{path}: cannot draw the {kind} figure from this table "
                             f"({type(exc).__name__}: {exc})",
                             f"give the {_CSV_NEEDS[kind][0]} that bench wrote") from None
        rp.save_figure(fig, out, field="--out")
        print(f"wrote {out}", file=sys.stdout)
        _say_what_was_picked(kind, df, path, args)
        return 0
    if kind == "bound-trace":
        fig = _bound_trace(path, args.layer)
    else:
        if args.trace is not None:
            check_file("--trace", args.trace, "give the path of a routing trace of the plan's model")
        problem, plan, mesh = _plan_problem(path, args.trace)
        desc = problem.describe()
        cap = rp.caption(model=desc["model"], mesh=desc["mesh"], hw=desc["hw_point"], batch=desc["batch"],
                         mode=desc["mode"])
        if not 0 <= args.layer < plan.num_layers:
            raise InputError("--layer", f"must be in 0..{plan.num_layers - 1}, got {args.layer}",
                             f"the plan has {plan.num_layers} MoE layers, numbered from 0")
        if kind == "placement":
            fig = rp.fig_placement_map(plan, mesh, args.layer, settings=cap)
        else:
            cmp = pl.compare(problem, ["ep", "hdmoe"], plans={"plan": plan}, progress=False)
            evs = {n: cmp.evaluations[n] for n in ("ep", "hdmoe", "plan") if n in cmp.evaluations}
            fig = (rp.fig_node_load(evs, args.layer, settings=cap) if kind == "node-load"
                   else rp.fig_link_load(evs, mesh, args.layer, settings=cap))
    rp.save_figure(fig, out, field="--out")
    print(f"wrote {out}", file=sys.stdout)
    return 0
