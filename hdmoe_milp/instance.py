"""Instance files (TOML): a model, hardware and workload in one place.

Example::

    name = "deepseek-v2-lite-5-50-4x8"
    [model]
    preset = "deepseek-v2-lite"
    [hardware]
    preset = "5/50"          # TFLOP/s per node / GB/s per link
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

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

_SECTIONS = {
    "model": {"preset"},
    "hardware": {"preset", "mesh", "dram_capacity_gb", "hop_latency_ns", "dram_bw_gbps"},
    "workload": {"trace", "batch", "batching", "seed", "synthetic_tokens"},
    "evaluator": {"mode", "delivery", "home", "context_len"},
}


@dataclass(frozen=True)
class Instance:
    """Settings read from an instance file (paths resolved against the file's folder)."""

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


def load_instance(path: str | Path) -> Instance:
    """Read and check an instance TOML file."""
    p = Path(path)
    if not p.exists():
        raise InputError("instance", f"file not found: {p}", "give the path of an instance .toml file")
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError("instance", f"{p} is not valid TOML: {exc}") from None
    unknown = set(data) - set(_SECTIONS) - {"name", "description"}
    if unknown:
        raise InputError("instance", f"unknown section(s) {sorted(unknown)}", "allowed: " + ", ".join(_SECTIONS))
    for sec, keys in _SECTIONS.items():
        bad = set(data.get(sec, {})) - keys
        if bad:
            raise InputError(
                f"instance [{sec}]", f"unknown key(s) {sorted(bad)}", "allowed: " + ", ".join(sorted(keys))
            )
    m, hw, wl, ev = (data.get(s, {}) for s in ("model", "hardware", "workload", "evaluator"))
    for sec, key, d in (("model", "preset", m), ("hardware", "preset", hw), ("hardware", "mesh", hw)):
        if key not in d:
            raise InputError(f"instance [{sec}].{key}", "is missing")
    trace = wl.get("trace")
    if trace is not None:
        trace = str((p.parent / trace).resolve())
    return Instance(
        name=str(data.get("name", p.stem)),
        model=m["preset"], hw=str(hw["preset"]), mesh=str(hw["mesh"]), trace=trace,
        batch=wl.get("batch", 128), batching=wl.get("batching", "expected"), seed=int(wl.get("seed", 0)),
        synthetic_tokens=int(wl.get("synthetic_tokens", 4096)), mode=ev.get("mode", "mesh"),
        delivery=ev.get("delivery"), home=ev.get("home"), context_len=int(ev.get("context_len", 1024)),
        dram_capacity_gb=hw.get("dram_capacity_gb"), dram_bw_gbps=float(hw.get("dram_bw_gbps", 625.0)),
        hop_latency_ns=float(hw.get("hop_latency_ns", 0.0)),
    )
