"""Instance files (TOML) and the settings behind a :class:`~hdmoe_milp.problem.Problem`.

``load_instance(path)`` reads a file into a validated Problem. The CLI reads the same file into
:class:`Settings` with :func:`read_settings`, overrides fields from its flags, then calls
:meth:`Settings.to_problem`.

Example::

    name = "deepseek-v2-lite-5-50-4x8"
    [model]
    preset = "deepseek-v2-lite"
    [hardware]
    preset = "5/50"          # TFLOP/s per node / GB/s per link (any pair, e.g. "4/40")
    mesh = "4x8"
    dram_capacity_gb = 8     # optional, per node
    hop_latency_ns = 0       # optional
    [workload]
    trace = "traces/deepseek_v2_lite_law_4k.npz"   # relative to this file; omit for a synthetic trace
    batch = 128
    batching = "expected"    # expected | random | contiguous
    seed = 0
    [evaluator]
    mode = "mesh"            # mesh | paper
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import (
    DRAM_BW_GBPS_RANGE,
    MAX_BATCH,
    MAX_CONTEXT_LEN,
    MAX_HOP_LATENCY_NS,
    InputError,
    check_choice,
    check_file,
    check_real,
    check_seed,
    expect_str,
    shown,
)
from .evaluator import DELIVERIES, HOMES, MODES, EvalOptions
from .hardware import MAX_DRAM_CAPACITY_BYTES, Mesh, make_hardware, parse_point
from .moe import MODEL_PRESETS, MoEModel, get_model
from .problem import Problem, check_memory, check_mesh_memory
from .synthetic import synthetic_trace
from .workload import BATCHING, Trace, TraceShapeError, load_trace

_SECTIONS = {
    "model": {"preset"},
    "hardware": {"preset", "mesh", "dram_capacity_gb", "hop_latency_ns", "dram_bw_gbps"},
    "workload": {"trace", "batch", "batching", "seed", "synthetic_tokens"},
    "evaluator": {"mode", "delivery", "home", "context_len"},
}


@dataclass(frozen=True)
class Settings:
    """Plain settings of a problem, as read from an instance file or given as CLI flags (paths
    resolved against the instance file's folder). Units as written: GB, GB/s, ns."""

    name: str
    model: str
    hw: str
    mesh: str
    trace: str | None = None
    batch: float = 128
    batching: str = "expected"
    seed: int = 0
    synthetic_tokens: int = 4096
    mode: str = "mesh"
    delivery: str | None = None
    home: str | None = None
    context_len: int = 1024
    dram_capacity_gb: float | None = None
    dram_bw_gbps: float = 625.0
    hop_latency_ns: float = 0.0
    # keys the instance file wrote, as "[section].key" (a default and a written value look alike)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_problem(self, model_field: str = "--model", *, model_source: str = "setting") -> Problem:
        """The validated Problem of these settings (the trace is read here). ``model_field``: how an
        error about a trace of another model names the model setting; ``model_source``: where the
        model came from, which decides the fix that error offers: ``"setting"`` (a flag or a file's
        key: change it), ``"default"`` (nobody chose it: choose one) or ``"plan"`` (a plan file's
        record: its rows are that model's, so the trace must change)."""
        check_choice("--model", self.model, tuple(MODEL_PRESETS))
        parse_point(self.hw, "--hw")
        if self.delivery is not None:
            check_choice("--delivery", self.delivery, DELIVERIES)
        if self.home is not None:
            check_choice("--home", self.home, HOMES)
        check_choice("--mode", self.mode, MODES)
        check_choice("--batching", self.batching, BATCHING)
        check_real("--batch", self.batch, minimum=1, maximum=MAX_BATCH, integer=self.batching != "expected")
        check_seed(self.seed, "--seed")
        check_real("synthetic_tokens", self.synthetic_tokens, positive=True, integer=True)
        if not self.trace:
            check_memory("synthetic_tokens", get_model(self.model), self.synthetic_tokens)
        check_real("context_len", self.context_len, minimum=0, integer=True, maximum=MAX_CONTEXT_LEN)
        check_real("--hop-latency-ns", self.hop_latency_ns, minimum=0, maximum=MAX_HOP_LATENCY_NS)
        check_real("dram_bw_gbps", self.dram_bw_gbps, minimum=DRAM_BW_GBPS_RANGE[0], maximum=DRAM_BW_GBPS_RANGE[1])
        cap = None
        if self.dram_capacity_gb is not None:
            cap = check_real("--capacity-gb", self.dram_capacity_gb, positive=True,
                             maximum=MAX_DRAM_CAPACITY_BYTES / 1e9) * 1e9
        try:
            mesh = Mesh.parse(self.mesh)
        except InputError as exc:
            raise InputError("--mesh", exc.problem, exc.fix) from None
        check_mesh_memory("--mesh", get_model(self.model), mesh.rows, mesh.cols)
        model = get_model(self.model)
        if self.batching != "expected":
            check_memory("--batch", model, self.batch)
        hw = make_hardware(self.hw, mesh, dram_bw_bytes_per_s=float(self.dram_bw_gbps) * 1e9,
                           dram_capacity_bytes=cap, hop_latency_s=float(self.hop_latency_ns) * 1e-9)
        if self.trace:
            trace = load_model_trace(self.trace, model, model_field, model_source=model_source)
        else:
            trace = synthetic_trace(model, int(self.synthetic_tokens), seed=int(self.seed))
        opts = EvalOptions(mode=self.mode, delivery=self.delivery, home=self.home, seed=int(self.seed),
                           context_len=int(self.context_len))
        return Problem(model, hw, trace, batch=self.batch, options=opts, batching=self.batching,
                       seed=int(self.seed), name=self.name, hw_point=self.hw)


def load_model_trace(path: str | Path, model: MoEModel, model_field: str = "--model", *,
                     model_source: str = "setting") -> Trace:
    """:func:`~hdmoe_milp.workload.load_trace` for ``model``; a trace of another model (another
    top-k, expert ids beyond the model's, or another number of MoE layers) is refused naming both
    the trace and ``model_field``, with the presets it would fit."""
    try:
        trace = load_trace(path, model.num_experts, model.top_k)
    except TraceShapeError as exc:
        fits = [n for n, m in MODEL_PRESETS.items() if m.top_k == exc.top_k and m.num_experts > exc.max_id
                and exc.num_layers in (None, m.moe_layers)]
        raise _other_model(exc.field, exc.what, model, model_field, fits, model_source) from None
    if trace.num_layers != model.moe_layers:
        fits = [n for n, m in MODEL_PRESETS.items() if m.moe_layers == trace.num_layers and m.top_k == model.top_k
                and m.num_experts == model.num_experts]
        raise _other_model(f"trace {Path(path).name}", f"has {trace.num_layers} MoE layers", model, model_field, fits,
                           model_source)
    return trace


def _other_model(field: str, what: str, model: MoEModel, model_field: str, fits: list[str],
                 model_source: str = "setting") -> InputError:
    shape = f"top_k={model.top_k} of {model.num_experts} experts in {model.moe_layers} MoE layers"
    fit = f": {', '.join(fits)} fit{'s' if len(fits) == 1 else ''} it" if fits else ""
    if model_source == "default":  # nobody chose it: the fix is to choose
        return InputError(field, f"{what}, but the default model {model.name} (no {model_field} was given) routes "
                          f"{shape}", f"give {model_field} with the trace's model{fit}")
    if model_source == "plan":  # a plan's model: its rows are that model's, so the trace must change
        return InputError(field, f"{what}, but the model {model.name} ({model_field}) routes {shape}",
                          f"give a trace recorded from {model.name}, the model the plan was made for")
    return InputError(field, f"{what}, but the model {model.name} ({model_field}) routes {shape}",
                      f"give a trace recorded from {model.name}, or set {model_field} to the trace's model{fit}")


# the field a Settings or Problem check names -> the instance file's key that gave the value
INSTANCE_KEYS = {
    "--batch": "[workload].batch", "batch": "[workload].batch", "--batching": "[workload].batching",
    "--seed": "[workload].seed", "synthetic_tokens": "[workload].synthetic_tokens",
    "--capacity-gb": "[hardware].dram_capacity_gb", "hardware.dram_capacity_bytes": "[hardware].dram_capacity_gb",
    "--hop-latency-ns": "[hardware].hop_latency_ns", "dram_bw_gbps": "[hardware].dram_bw_gbps",
    "--mesh": "[hardware].mesh", "--hw": "[hardware].preset", "--model": "[model].preset",
    "--mode": "[evaluator].mode", "--delivery": "[evaluator].delivery", "--home": "[evaluator].home",
    "context_len": "[evaluator].context_len", "--trace": "[workload].trace",
}


def _key_at(text: str, start: int) -> str:
    """``[section].key`` for the key that the line of ``text`` beginning at offset ``start`` sets (a
    dotted or quoted key too), or ``line N`` where the line sets none (a line of a multi-line array)."""
    end = text.find("\n", start)
    line = text[start:end if end >= 0 else None]
    key = re.match(r"\s*((?:[A-Za-z0-9_-]+|\"[^\"\n]*\"|'[^'\n]*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"\n]*\""
                   r"|'[^'\n]*'))*)\s*=", line)  # the key this line sets (in an array or inline table too)
    head = [m.group(1) for m in re.finditer(r"^\s*\[([^\]]+)\]", text[:start], flags=re.M)]
    if key is None:
        table = re.match(r"\s*\[+([^\]]+)\]", line)  # a table's header line
        return f"[{table.group(1).strip()}]" if table else f"line {text.count(chr(10), 0, start) + 1}"
    return f"[{head[-1].strip()}].{key.group(1)}" if head else key.group(1)


def load_instance(path: str | Path) -> Problem:
    """Read an instance TOML file into a validated :class:`Problem`; an error about one of its
    values names the file's key (``instance x.toml [workload].batch``)."""
    s = read_settings(path)
    try:
        return s.to_problem(model_field="[model].preset")
    except InputError as exc:
        key = INSTANCE_KEYS.get(exc.field)
        if key is None:
            raise
        raise InputError(f"instance {Path(path).name} {key}", exc.problem, exc.fix) from None


# (key, kind, positive): how each numeric key of an instance file is checked; "int" keys are whole numbers
_NUMBERS = {
    ("workload", "batch"): ("real", True), ("workload", "seed"): ("int", False),
    ("workload", "synthetic_tokens"): ("int", True), ("evaluator", "context_len"): ("int", False),
    ("hardware", "dram_capacity_gb"): ("real", True), ("hardware", "dram_bw_gbps"): ("real", True),
    ("hardware", "hop_latency_ns"): ("real", False),
}
_MAXIMA = {("workload", "batch"): MAX_BATCH, ("evaluator", "context_len"): MAX_CONTEXT_LEN,
           ("hardware", "hop_latency_ns"): MAX_HOP_LATENCY_NS, ("hardware", "dram_bw_gbps"): DRAM_BW_GBPS_RANGE[1],
           ("hardware", "dram_capacity_gb"): MAX_DRAM_CAPACITY_BYTES / 1e9}
_MINIMA = {("hardware", "dram_bw_gbps"): DRAM_BW_GBPS_RANGE[0], ("workload", "batch"): 1}
_CHOICES = {
    ("model", "preset"): tuple(MODEL_PRESETS),
    ("workload", "batching"): BATCHING, ("evaluator", "mode"): MODES,
    ("evaluator", "delivery"): DELIVERIES, ("evaluator", "home"): HOMES,
}


def read_settings(path: str | Path) -> Settings:
    """Read an instance TOML file and check every key and value (type, range, finiteness, known
    names) before any work; errors name the key as written, e.g. ``instance x.toml [workload].batch``."""
    p = check_file("instance", path, "give the path of an instance .toml file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is skipped
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("instance", f"cannot read {p}: {exc}", "give a UTF-8 instance .toml file") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to read (over 4,300 digits)
        for sec in _SECTIONS:
            if re.search(rf"^\s*{sec}\s*=", text, flags=re.M):
                raise InputError(f"instance {p.name} {sec}", f"is a [{sec}] table, not a top-level key",
                                 f"write [{sec}] on its own line, then its keys, e.g. [model] preset = "
                                 f'"deepseek-v2-lite"') from None
        long = re.search(r"[0-9][0-9_]{4000,}", text) if "digits" in str(exc) else None
        if long:  # Python refuses to read an integer this long; its message names no key and no line
            start = text.rfind("\n", 0, long.start()) + 1
            raise InputError(f"instance {p.name} {_key_at(text, start)}", "holds a number of over 4,000 digits",
                             "give a value in the key's range") from None
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        lines = text.splitlines()
        if at and 1 <= int(at.group(1)) <= len(lines):  # name the key the line sets, and show the line
            n = int(at.group(1))
            start = sum(len(ln) + 1 for ln in lines[:n - 1])
            why = str(exc)[:at.start()].strip()
            fixes = {"Cannot overwrite a value": "a key given twice in its table: keep one",
                     "Cannot declare": "a table given twice: merge its keys under one header",
                     "Invalid value": "write a number, a \"quoted string\" or true/false (lower case)"}
            fix = next((f for k, f in fixes.items() if why.startswith(k)), "fix the syntax at that line")
            raise InputError(f"instance {p.name} {_key_at(text, start)}",
                             f"is not valid TOML: {why} (line {n}: {shown(lines[n - 1].strip())})", fix) from None
        raise InputError("instance", f"{p} is not valid TOML: {exc}", "fix the syntax at that line") from None
    where = f"instance {p.name}"
    for sec in _SECTIONS:
        if sec in data and not isinstance(data[sec], dict):
            raise InputError(f"{where} {sec}", f"is a [{sec}] table, got the value {data[sec]!r}",
                             f'write [{sec}] with its keys, e.g. [model] preset = "deepseek-v2-lite"')
    unknown = set(data) - set(_SECTIONS) - {"name", "description"}
    if unknown:
        raise InputError(where, f"unknown key(s) or section(s) {sorted(unknown)}",
                         "allowed: name, description, " + ", ".join(f"[{s}]" for s in _SECTIONS))
    for key in ("name", "description"):
        if key in data:
            expect_str(f"{where} {key}", data[key], '"my-instance"')
    for sec, keys in _SECTIONS.items():
        bad = set(data.get(sec, {})) - keys
        if bad:
            raise InputError(f"{where} [{sec}]", f"unknown key(s) {sorted(bad)}", "allowed: " + ", ".join(sorted(keys)))
    m, hw, wl, ev = (data.get(s, {}) for s in ("model", "hardware", "workload", "evaluator"))
    for sec, key, d in (("model", "preset", m), ("hardware", "preset", hw), ("hardware", "mesh", hw)):
        if key not in d:
            raise InputError(f"{where} [{sec}].{key}", "is missing", f"add {key} = ... under [{sec}]")
    for (sec, key), allowed in _CHOICES.items():
        if key in data.get(sec, {}):
            check_choice(f"{where} [{sec}].{key}", expect_str(f"{where} [{sec}].{key}", data[sec][key],
                                                               repr(allowed[0]).replace("'", '"')), allowed)
    if "preset" in hw:
        parse_point(expect_str(f"{where} [hardware].preset", hw["preset"], '"5/50"'), f"{where} [hardware].preset")
    mesh = expect_str(f"{where} [hardware].mesh", hw["mesh"], '"4x8"')
    try:
        parsed = Mesh.parse(mesh)
    except InputError as exc:
        raise InputError(f"{where} [hardware].mesh", exc.problem, exc.fix) from None
    check_mesh_memory(f"{where} [hardware].mesh", MODEL_PRESETS[m["preset"]], parsed.rows, parsed.cols)
    for (sec, key), (kind, positive) in _NUMBERS.items():
        d = data.get(sec, {})
        if (sec, key) == ("workload", "seed") and key in d:
            check_seed(d[key], f"{where} [workload].seed")
        elif key in d:
            check_real(f"{where} [{sec}].{key}", d[key], integer=kind == "int", positive=positive,
                       minimum=_MINIMA.get((sec, key), 0), maximum=_MAXIMA.get((sec, key)))
    model = MODEL_PRESETS[m["preset"]]
    if "synthetic_tokens" in wl and "trace" in wl:
        raise InputError(f"{where} [workload].synthetic_tokens", "is given with a trace (it sizes the synthetic trace "
                         "used when there is none)", "give either trace or synthetic_tokens")
    if "synthetic_tokens" in wl and "trace" not in wl:
        check_memory(f"{where} [workload].synthetic_tokens", model, wl["synthetic_tokens"])
    if wl.get("batching", "expected") != "expected" and "batch" in wl:
        check_real(f"{where} [workload].batch", wl["batch"], integer=True)  # sampled batches are whole tokens
        check_memory(f"{where} [workload].batch", model, wl["batch"])
    trace = wl.get("trace")
    if trace is not None:
        expect_str(f"{where} [workload].trace", trace, '"traces/x.npz"')
        if not trace.strip():
            raise InputError(f"{where} [workload].trace", "is empty",
                             "give a trace path relative to the instance file, or omit the key for a synthetic trace")
        tp = check_file(f"{where} [workload].trace", p.parent / trace,
                        "give a trace path relative to the instance file, or omit it for a synthetic trace")
        trace = str(tp.resolve())
    return Settings(
        name=str(data.get("name", p.stem)),
        model=m["preset"], hw=hw["preset"], mesh=mesh, trace=trace,
        batch=wl.get("batch", 128), batching=wl.get("batching", "expected"), seed=wl.get("seed", 0),
        synthetic_tokens=wl.get("synthetic_tokens", 4096), mode=ev.get("mode", "mesh"),
        delivery=ev.get("delivery"), home=ev.get("home"), context_len=ev.get("context_len", 1024),
        dram_capacity_gb=hw.get("dram_capacity_gb"), dram_bw_gbps=hw.get("dram_bw_gbps", 625.0),
        hop_latency_ns=hw.get("hop_latency_ns", 0.0),
        given=frozenset(f"[{sec}].{key}" for sec in _SECTIONS for key in data.get(sec, {})),
    )
