"""Loaders fuzzed (issue 13): random and mutated TOML, JSON, gzip and npz inputs fed to the instance,
trace and plan loaders. The only outcomes allowed: a valid object or :class:`InputError`."""

from __future__ import annotations

import gzip
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hdmoe_milp.errors import InputError
from hdmoe_milp.instance import load_instance, read_settings
from hdmoe_milp.placement import Placement
from hdmoe_milp.problem import Problem
from hdmoe_milp.workload import Trace, load_trace

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
E, K, L = 8, 2, 4  # traces: 8 experts, top-2, any layer count

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8) | st.sampled_from([0, 1, 2, 7, 8, -1, 0.5, 1.0, "0", "mixtral-8x7b", "2x2", "5/50"]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=4), c,
                                                                                          max_size=4), max_leaves=30)


_FILES = tempfile.TemporaryDirectory(prefix="hdmoe-fuzz-")  # every example's file, removed with the module


@pytest.fixture(scope="module", autouse=True)
def _remove_files():
    yield
    _FILES.cleanup()


def _tmp(name: str, data: bytes) -> Path:
    """``data`` written to ``name`` in a fresh folder (hypothesis examples cannot use tmp_path)."""
    d = Path(tempfile.mkdtemp(prefix="ex", dir=_FILES.name))
    p = d / name
    p.write_bytes(data)
    return p


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 = replace, 1 = insert, 2 = delete, 3 = truncate."""
    b = bytearray(data)
    for kind, pos, byte in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == 0:
            b[i] = byte
        elif kind == 1:
            b.insert(i, byte)
        elif kind == 2:
            del b[i]
        else:
            del b[i:]
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


# --- instance files ------------------------------------------------------------------------------------

VALID_TOML = """name = "fuzz"
[model]
preset = "mixtral-8x7b"
[hardware]
preset = "5/50"
mesh = "2x2"
dram_bw_gbps = 625
hop_latency_ns = 0
[workload]
batch = 16
batching = "expected"
seed = 0
synthetic_tokens = 64
[evaluator]
mode = "mesh"
context_len = 8
"""

toml_scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=6)
                | st.sampled_from(["mixtral-8x7b", "5/50", "2x2", "1x1", "random", "paper", "tree", 16, 64, 0.5]))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a TOML basic string is a JSON string


@st.composite
def toml_docs(draw) -> str:
    """Instance-shaped TOML: the known sections and keys (and some unknown ones) with random values."""
    keys = {"model": ["preset"], "hardware": ["preset", "mesh", "dram_capacity_gb", "hop_latency_ns", "dram_bw_gbps"],
            "workload": ["batch", "batching", "seed", "synthetic_tokens"],
            "evaluator": ["mode", "delivery", "home", "context_len"], "extra": ["x"]}
    lines = []
    if draw(st.booleans()):
        lines.append(f"name = {_toml_value(draw(toml_scalars))}")
    for sec, names in keys.items():
        if sec == "extra" and not draw(st.booleans()):
            continue
        if sec in ("model", "hardware") and draw(st.integers(0, 9)) == 0:
            continue
        lines.append(f"[{sec}]")
        for n in names:
            if draw(st.integers(0, 2)) > 0:
                lines.append(f"{n} = {_toml_value(draw(toml_scalars))}")
    return "\n".join(lines) + "\n"


def _load_instance_ok(text: bytes) -> None:
    p = _tmp("inst.toml", text)
    try:
        s = read_settings(p)
    except InputError:
        return
    if s.synthetic_tokens > 4096 or (s.batching != "expected" and s.batch > 4096):
        return  # valid but slow to build: read_settings' answer is the outcome checked
    try:
        assert isinstance(load_instance(p), Problem)
    except InputError:
        pass


@FAST
@given(toml_docs())
def test_fuzz_instance_random(doc):
    _load_instance_ok(doc.encode())


@FAST
@given(edits)
def test_fuzz_instance_mutated(ed):
    _load_instance_ok(_mutate(VALID_TOML.encode(), ed))


# --- traces --------------------------------------------------------------------------------------------


def _trace_ok(name: str, data: bytes) -> None:
    p = _tmp(name, data)
    try:
        t = load_trace(p, E, K)
    except InputError:
        return
    assert isinstance(t, Trace) and all(a.dtype == np.int64 and a.shape[1] == K for a in t.layers)


def _valid_trace(rng_seed: int) -> dict:
    rng = np.random.default_rng(rng_seed)
    return {str(li): [rng.choice(E, K, replace=False).tolist() for _ in range(6)] for li in range(L)}


@FAST
@given(json_values, st.booleans())
def test_fuzz_trace_random_json(value, gz):
    data = json.dumps(value).encode()
    _trace_ok("t.json.gz" if gz else "t.json", gzip.compress(data) if gz else data)


@FAST
@given(st.integers(0, 3), st.integers(0, 5), json_values, st.booleans())
def test_fuzz_trace_one_value_replaced(layer, row, value, whole_row):
    d = _valid_trace(layer)
    if whole_row:
        d[str(layer)][row] = value
    else:
        d[str(layer)][row][0] = value
    _trace_ok("t.json", json.dumps(d).encode())


@FAST
@given(edits, st.sampled_from(["json", "gz-inner", "gz-outer"]))
def test_fuzz_trace_mutated_bytes(ed, where):
    raw = json.dumps(_valid_trace(0)).encode()
    if where == "json":
        _trace_ok("t.json", _mutate(raw, ed))
    elif where == "gz-inner":
        _trace_ok("t.json.gz", gzip.compress(_mutate(raw, ed)))
    else:
        _trace_ok("t.json.gz", _mutate(gzip.compress(raw), ed))


npz_arrays = st.one_of(
    st.tuples(st.sampled_from(["int64", "int8", "uint64", "float64", "bool", "int32"]),
              st.lists(st.integers(0, 5), min_size=0, max_size=4)),
)


@FAST
@given(npz_arrays, st.sampled_from(["topk_ids", "ids"]), st.integers(-(2**40), 2**40), st.booleans())
def test_fuzz_trace_random_npz(spec, key, fill, compressed):
    dtype, shape = spec
    rng = np.random.default_rng(abs(fill) % 1000)
    a = rng.integers(-1, E + 1, size=shape).astype(dtype) if shape else np.asarray(fill % 100).astype(dtype)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **{key: a})
    _trace_ok("t.npz", buf.getvalue())


@FAST
@given(edits, st.booleans())
def test_fuzz_trace_mutated_npz(ed, compressed):
    ids = np.stack([np.stack([np.random.default_rng(t).choice(E, K, replace=False) for _ in range(L)])
                    for t in range(6)])
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, topk_ids=ids)
    _trace_ok("t.npz", _mutate(buf.getvalue(), ed))


@FAST
@given(st.binary(max_size=200), st.sampled_from(["t.npz", "t.json", "t.json.gz"]))
def test_fuzz_trace_random_bytes(data, name):
    _trace_ok(name, data)


# --- plan files ----------------------------------------------------------------------------------------


def _valid_plan() -> dict:
    rng = np.random.default_rng(0)
    s = rng.random((3, E, 4))
    return Placement.from_shares(s / s.sum(axis=2, keepdims=True), "fuzz").to_dict()


def _plan_ok(data: bytes) -> None:
    p = _tmp("plan.json", data)
    try:
        plan = Placement.load(p)
    except InputError:
        return
    assert isinstance(plan, Placement) and plan.num_layers >= 1


@FAST
@given(json_values)
def test_fuzz_plan_random_json(value):
    _plan_ok(json.dumps(value).encode())


@FAST
@given(st.sampled_from(["shares", "expert_of", "token_fraction"]), st.integers(0, 2), st.integers(0, 7),
       json_values, st.booleans())
def test_fuzz_plan_one_value_replaced(key, layer, row, value, whole_row):
    d = _valid_plan()
    target = d["layers"][layer][key]
    if key == "shares" and not whole_row:
        target[row][0] = value
    else:
        target[row] = value
    _plan_ok(json.dumps(d).encode())


@FAST
@given(st.sampled_from(["num_experts", "num_nodes", "strategy", "meta", "layers", "format"]), json_values)
def test_fuzz_plan_top_level_replaced(key, value):
    d = _valid_plan()
    d[key] = value
    _plan_ok(json.dumps(d).encode())


@FAST
@given(edits)
def test_fuzz_plan_mutated_bytes(ed):
    _plan_ok(_mutate(json.dumps(_valid_plan()).encode(), ed))


@pytest.mark.parametrize("flag", [0x1, 0x40])
def test_npz_with_encryption_flag_is_one_input_error(flag):
    """A zip member flagged as encrypted (zipfile raises RuntimeError / NotImplementedError) is one
    InputError naming the trace (found by the fuzzer above)."""
    ids = np.zeros((4, L, K), dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, topk_ids=ids)
    data = bytearray(buf.getvalue())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general-purpose flags of both headers
        at = data.find(sig)
        data[at + off] |= flag
    _trace_ok("t.npz", bytes(data))
    with pytest.raises(InputError, match="trace"):
        load_trace(_tmp("t.npz", bytes(data)), E, K)


@FAST
@given(st.lists(st.lists(st.integers(-(2**1100), 2**1100) | st.floats(allow_nan=True, allow_infinity=True)
                         | st.booleans() | st.text(max_size=2), min_size=2, max_size=2), min_size=1, max_size=4))
def test_real_matrix_takes_exactly_the_finite_numbers_it_took_one_by_one(rows):
    """Its fast path (plain ints and floats converted at once; plan files of DeepSeek-V3 read 10x
    faster) accepts and refuses the same rows as the check of every entry, with the same values."""
    from hdmoe_milp.errors import real_matrix

    def finite(x) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        try:
            return math.isfinite(float(x))
        except OverflowError:
            return False

    ok = all(finite(x) for row in rows for x in row)
    if ok:
        assert np.array_equal(real_matrix("m", rows), np.array([[float(x) for x in row] for row in rows]))
    else:
        bad = next(i for i, row in enumerate(rows) if not all(finite(x) for x in row))
        with pytest.raises(InputError, match=f"row {bad} holds"):
            real_matrix("m", rows)
