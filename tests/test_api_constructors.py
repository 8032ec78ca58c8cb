"""Bad input to the public constructors (Mesh, Hardware, make_hardware, MoEModel) is one InputError
naming the field, never a raw numpy/TypeError or a value that later gives inf/nan/negative latency."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

import hdmoe_milp as hm
from hdmoe_milp.errors import DRAM_BW_GBPS_RANGE, MAX_EXPERTS, MAX_HOP_LATENCY_NS, MAX_LAYERS, InputError
from hdmoe_milp.hardware import (
    COMPUTE_FLOPS_PER_S_RANGE,
    HARDWARE_PRESETS,
    LINK_BW_BYTES_PER_S_RANGE,
    MAX_DRAM_CAPACITY_BYTES,
    MESH_PRESETS,
    Hardware,
    Mesh,
    make_hardware,
)
from hdmoe_milp.moe import BYTES_PER_ELEMENT_RANGE, MAX_MODEL_SIZE, MODEL_PRESETS, MoEModel

from .conftest import ROOT

M44 = Mesh(4, 4)
NL = M44.num_links  # 48
INF, NAN = float("inf"), float("nan")


def _mesh(*a: Any) -> Any:
    return lambda: Mesh(*a)


def _mh(**kw: Any) -> Any:
    return lambda: make_hardware("5/50", "4x4", **kw)


def _hw(**kw: Any) -> Any:
    args = {"mesh": M44, "compute_flops": 5e12, "link_bw_bytes_per_s": 50e9, **kw}
    return lambda: Hardware(**args)


def _model(**kw: Any) -> Any:
    args = {"name": "m", "num_experts": 8, "top_k": 2, "hidden": 64, "expert_intermediate": 64, "moe_layers": 2, **kw}
    return lambda: MoEModel(**args)


BAD: list[tuple[str, Any, str]] = [
    # Mesh: whole numbers >= 1, not bools, at most MAX_MESH_NODES nodes
    ("mesh-rows-true", _mesh(True, 16), "mesh.rows"),
    ("mesh-cols-npbool", _mesh(4, np.bool_(True)), "mesh.cols"),
    ("mesh-rows-float", _mesh(4.0, 4), "mesh.rows"),
    ("mesh-rows-str", _mesh("4", 4), "mesh.rows"),
    ("mesh-rows-none", _mesh(None, 4), "mesh.rows"),
    ("mesh-rows-0", _mesh(0, 4), "mesh.rows"),
    ("mesh-cols-neg", _mesh(4, -1), "mesh.cols"),
    ("mesh-cols-array", _mesh(4, np.array([4, 4])), "mesh.cols"),
    ("mesh-too-many-nodes", _mesh(2**31, 2), "mesh"),
    ("mesh-huge-side", _mesh(10**400, 1), "mesh"),
    ("mesh-giant-side", _mesh(10**5000, 1), "mesh"),
    ("mesh-parse-0x4", lambda: Mesh.parse("0x4"), "mesh"),
    ("mesh-parse-giant", lambda: Mesh.parse("9" * 5000 + "x1"), "mesh"),
    ("mesh-parse-too-many-nodes", lambda: Mesh.parse("65536x65536"), "mesh"),
    # make_hardware
    ("mh-point", lambda: make_hardware("5 /50", "4x4"), "hw"),
    ("mh-mesh", lambda: make_hardware("5/50", "4x4x4"), "mesh"),
    ("mh-hop-1e308", _mh(hop_latency_s=1e308), "hardware.hop_latency_s"),
    ("mh-hop-above-max", _mh(hop_latency_s=MAX_HOP_LATENCY_NS * 1e-9 * 1.001), "hardware.hop_latency_s"),
    ("mh-hop-neg", _mh(hop_latency_s=-1e-9), "hardware.hop_latency_s"),
    ("mh-hop-nan", _mh(hop_latency_s=NAN), "hardware.hop_latency_s"),
    ("mh-hop-str", _mh(hop_latency_s="1"), "hardware.hop_latency_s"),
    ("mh-hop-none", _mh(hop_latency_s=None), "hardware.hop_latency_s"),
    ("mh-hop-true", _mh(hop_latency_s=True), "hardware.hop_latency_s"),
    ("mh-dram-str", _mh(dram_bw_bytes_per_s="x"), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-none", _mh(dram_bw_bytes_per_s=None), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-true", _mh(dram_bw_bytes_per_s=True), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-tiny", _mh(dram_bw_bytes_per_s=1e-320), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-below", _mh(dram_bw_bytes_per_s=DRAM_BW_GBPS_RANGE[0] * 1e9 * 0.999), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-above", _mh(dram_bw_bytes_per_s=DRAM_BW_GBPS_RANGE[1] * 1e9 * 1.001), "hardware.dram_bw_bytes_per_s"),
    ("mh-dram-inf", _mh(dram_bw_bytes_per_s=INF), "hardware.dram_bw_bytes_per_s"),
    ("mh-cap-str", _mh(dram_capacity_bytes="8"), "hardware.dram_capacity_bytes"),
    ("mh-cap-true", _mh(dram_capacity_bytes=True), "hardware.dram_capacity_bytes"),
    ("mh-cap-nan", _mh(dram_capacity_bytes=NAN), "hardware.dram_capacity_bytes"),
    ("mh-cap-inf", _mh(dram_capacity_bytes=INF), "hardware.dram_capacity_bytes"),
    ("mh-cap-0", _mh(dram_capacity_bytes=0), "hardware.dram_capacity_bytes"),
    ("mh-cap-neg", _mh(dram_capacity_bytes=-8e9), "hardware.dram_capacity_bytes"),
    ("mh-cap-above", _mh(dram_capacity_bytes=MAX_DRAM_CAPACITY_BYTES * 10), "hardware.dram_capacity_bytes"),
    ("mh-cap-array", _mh(dram_capacity_bytes=np.array([8e9, 8e9])), "hardware.dram_capacity_bytes"),
    # Hardware
    ("hw-mesh-str", _hw(mesh="4x4"), "hardware.mesh"),
    ("hw-mesh-none", _hw(mesh=None), "hardware.mesh"),
    ("hw-mesh-tuple", _hw(mesh=(4, 4)), "hardware.mesh"),
    ("hw-name-int", _hw(name=5), "hardware.name"),
    ("hw-compute-str", _hw(compute_flops="5e12"), "hardware.compute_flops"),
    ("hw-compute-true", _hw(compute_flops=True), "hardware.compute_flops"),
    ("hw-compute-npbool", _hw(compute_flops=np.bool_(True)), "hardware.compute_flops"),
    ("hw-compute-none", _hw(compute_flops=None), "hardware.compute_flops"),
    ("hw-compute-array", _hw(compute_flops=np.array([1.0, 2.0])), "hardware.compute_flops"),
    ("hw-compute-tiny", _hw(compute_flops=1e-320), "hardware.compute_flops"),
    ("hw-compute-0", _hw(compute_flops=0), "hardware.compute_flops"),
    ("hw-compute-neg", _hw(compute_flops=-5e12), "hardware.compute_flops"),
    ("hw-compute-nan", _hw(compute_flops=NAN), "hardware.compute_flops"),
    ("hw-compute-inf", _hw(compute_flops=INF), "hardware.compute_flops"),
    ("hw-compute-above", _hw(compute_flops=COMPUTE_FLOPS_PER_S_RANGE[1] * 10), "hardware.compute_flops"),
    ("hw-compute-bigint", _hw(compute_flops=10**400), "hardware.compute_flops"),
    ("hw-compute-giant-int", _hw(compute_flops=10**5000), "hardware.compute_flops"),
    ("hw-bw-list-giant-int", _hw(link_bw_bytes_per_s=[10**5000] * NL), "hardware.link_bw_bytes_per_s"),
    ("hw-dram-tiny", _hw(dram_bw_bytes_per_s=1e-320), "hardware.dram_bw_bytes_per_s"),
    ("hw-bw-str", _hw(link_bw_bytes_per_s="x"), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-none", _hw(link_bw_bytes_per_s=None), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-true", _hw(link_bw_bytes_per_s=True), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-0d-bool", _hw(link_bw_bytes_per_s=np.array(True)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-tiny", _hw(link_bw_bytes_per_s=1e-320), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-0", _hw(link_bw_bytes_per_s=0.0), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-inf", _hw(link_bw_bytes_per_s=INF), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-above", _hw(link_bw_bytes_per_s=LINK_BW_BYTES_PER_S_RANGE[1] * 10), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-shape", _hw(link_bw_bytes_per_s=[1e9, 2e9]), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-2d", _hw(link_bw_bytes_per_s=np.full((NL, 1), 1e9)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-list-str", _hw(link_bw_bytes_per_s=["x"] * NL), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-list-bool", _hw(link_bw_bytes_per_s=[True] * NL), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-list-nested", _hw(link_bw_bytes_per_s=[[1e9]] * NL), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-list-one-0", _hw(link_bw_bytes_per_s=[5e10] * (NL - 1) + [0.0]), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-array-nan", _hw(link_bw_bytes_per_s=np.full(NL, NAN)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-array-tiny", _hw(link_bw_bytes_per_s=np.full(NL, 1e-320)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-array-str", _hw(link_bw_bytes_per_s=np.array(["1"] * NL)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-array-bool", _hw(link_bw_bytes_per_s=np.ones(NL, dtype=bool)), "hardware.link_bw_bytes_per_s"),
    ("hw-bw-array-object", _hw(link_bw_bytes_per_s=np.array([None] * NL)), "hardware.link_bw_bytes_per_s"),
    # MoEModel
    ("model-name-int", _model(name=123), "model.name"),
    ("model-name-empty", _model(name=""), "model.name"),
    ("model-topk-gt-experts", _model(top_k=9), "model.top_k"),
    ("model-hidden-1e400", _model(hidden=10**400), "model.hidden"),
    ("model-hidden-above", _model(hidden=MAX_MODEL_SIZE + 1), "model.hidden"),
    ("model-hidden-giant", _model(hidden=-(10**5000)), "model.hidden"),
    ("model-wb-giant-int", _model(weight_bytes=10**5000), "model.weight_bytes"),
    ("model-paper-neg", _model(paper_intermediate=-5), "model.paper_intermediate"),
    ("model-paper-0", _model(paper_intermediate=0), "model.paper_intermediate"),
    ("model-paper-str", _model(paper_intermediate="x"), "model.paper_intermediate"),
    ("model-paper-float", _model(paper_intermediate=2.5), "model.paper_intermediate"),
    ("model-paper-true", _model(paper_intermediate=True), "model.paper_intermediate"),
    ("model-wb-str", _model(weight_bytes="2"), "model.weight_bytes"),
    ("model-wb-inf", _model(weight_bytes=INF), "model.weight_bytes"),
    ("model-wb-nan", _model(weight_bytes=NAN), "model.weight_bytes"),
    ("model-wb-true", _model(weight_bytes=True), "model.weight_bytes"),
    ("model-wb-none", _model(weight_bytes=None), "model.weight_bytes"),
    ("model-wb-0", _model(weight_bytes=0), "model.weight_bytes"),
    ("model-wb-tiny", _model(weight_bytes=1e-320), "model.weight_bytes"),
    ("model-wb-above", _model(weight_bytes=BYTES_PER_ELEMENT_RANGE[1] * 2), "model.weight_bytes"),
    ("model-ab-inf", _model(activation_bytes=INF), "model.activation_bytes"),
    ("model-ab-neg", _model(activation_bytes=-2.0), "model.activation_bytes"),
    ("model-ab-array", _model(activation_bytes=np.array([2.0])), "model.activation_bytes"),
]
_POSITIVE = ("num_experts", "top_k", "hidden", "expert_intermediate", "moe_layers")
_NON_NEGATIVE = ("dense_layers", "dense_intermediate", "shared_experts", "shared_intermediate")
for _f in _POSITIVE + _NON_NEGATIVE:
    for _tag, _v in (("true", True), ("str", "2"), ("float", 2.0), ("none", None), ("neg", -1), ("big", 2**31)):
        BAD.append((f"model-{_f}-{_tag}", _model(**{_f: _v}), f"model.{_f}"))
    if _f in _POSITIVE:
        BAD.append((f"model-{_f}-0", _model(**{_f: 0}), f"model.{_f}"))


# sizes whose arrays or per-layer work would exhaust memory long before the 2**31 size limit
BAD += [("model-num_experts-above-max", _model(num_experts=MAX_EXPERTS + 1), "model.num_experts"),
        ("model-num_experts-1e9", _model(num_experts=10**9), "model.num_experts"),
        ("model-moe_layers-above-max", _model(moe_layers=MAX_LAYERS + 1), "model.moe_layers")]


@pytest.mark.parametrize(("make", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_input_error(make: Any, field: str) -> None:
    with pytest.raises(InputError) as exc:  # any other exception type escapes and fails the test
        make()
    assert type(exc.value) is InputError and isinstance(exc.value, ValueError)
    assert exc.value.field == field, str(exc.value)
    assert exc.value.problem and exc.value.fix, str(exc.value)  # says what is wrong and how to fix it


def test_numpy_scalars_are_stored_as_plain_numbers() -> None:
    m = Mesh(np.int64(4), np.int32(2))
    assert (m.rows, m.cols) == (4, 2) and type(m.rows) is int and type(m.cols) is int
    hw = Hardware(Mesh(np.int64(4), np.int64(4)), np.float64(5e12), np.float32(5e10),
                  dram_bw_bytes_per_s=np.int64(625 * 10**9), dram_capacity_bytes=np.int64(8 * 10**9),
                  hop_latency_s=np.float64(1e-9))
    for fld in ("compute_flops", "link_bw_bytes_per_s", "dram_bw_bytes_per_s", "dram_capacity_bytes",
                "hop_latency_s"):
        assert type(getattr(hw, fld)) is float, fld
    assert type(hw.mesh.rows) is int and hw.link_bw.shape == (NL,) and np.all(hw.link_bw == np.float32(5e10))
    assert type(Hardware(M44, 1e12, np.array(2e9)).link_bw_bytes_per_s) is float  # a 0-d array is one number
    d = {k: v for k, v in asdict(hw).items() if k != "link_bw_bytes_per_s"}
    json.dumps(d | {"link_bw_bytes_per_s": hw.link_bw_bytes_per_s}, allow_nan=False)
    mdl = MoEModel("np", np.int64(8), np.int32(2), np.int64(64), np.uint16(64), np.int64(2), dense_layers=np.int64(1),
                   dense_intermediate=np.int64(32), paper_intermediate=np.int64(48), weight_bytes=np.float32(1.0),
                   activation_bytes=np.int64(2))
    for k, v in asdict(mdl).items():
        if k != "name":
            assert type(v) in (int, float), (k, type(v))
    assert type(mdl.weight_bytes) is float and type(mdl.activation_bytes) is float
    json.dumps(asdict(mdl), allow_nan=False)


def test_per_link_bandwidths_and_ints_accepted() -> None:
    bw = np.linspace(1e9, 2e9, NL)
    for given in (bw, list(bw), tuple(int(x) for x in bw), bw.astype(np.float32), np.arange(1, NL + 1)):
        hw = Hardware(M44, 10**12, given)
        assert hw.link_bw.dtype == float and hw.link_bw.shape == (NL,) and not hw.link_bw.flags.writeable
    hw = Hardware(M44, 10**12, 5 * 10**10, dram_capacity_bytes=8 * 10**9)
    assert type(hw.compute_flops) is float and type(hw.dram_capacity_bytes) is float


@pytest.mark.parametrize("point", sorted(HARDWARE_PRESETS))
@pytest.mark.parametrize("mesh", MESH_PRESETS + ("1x1", "1x8"))
def test_every_hardware_preset_builds(point: str, mesh: str) -> None:
    hw = make_hardware(point, mesh)
    assert hw.compute_flops == HARDWARE_PRESETS[point].compute_flops and hw.name == f"{point}@{mesh}"
    assert np.all(hw.link_bw == HARDWARE_PRESETS[point].link_bw_bytes_per_s)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_model_preset_builds(name: str) -> None:
    m = MODEL_PRESETS[name]
    assert MoEModel(**asdict(m)) == m and hm.get_model(name) is m


def test_instance_loader_bounds_are_accepted() -> None:
    """The constructors take every value the instance loader accepts, converted as it converts them."""
    for gbps in DRAM_BW_GBPS_RANGE:
        assert make_hardware("5/50", "4x4", dram_bw_bytes_per_s=float(gbps) * 1e9).dram_bw_bytes_per_s > 0
    for ns in (0.0, MAX_HOP_LATENCY_NS):
        make_hardware("5/50", "4x4", hop_latency_s=float(ns) * 1e-9)
    lo, hi = BYTES_PER_ELEMENT_RANGE
    _model(weight_bytes=lo, activation_bytes=hi, hidden=MAX_MODEL_SIZE, paper_intermediate=MAX_MODEL_SIZE)()


@pytest.fixture(scope="module")
def mixtral() -> hm.Problem:
    return hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")


@pytest.mark.parametrize("mode", ["mesh", "paper"])
def test_extreme_accepted_values_give_finite_latency(mixtral: hm.Problem, mode: str) -> None:
    """At the edges of every range the costs stay finite and non-negative."""
    big = MoEModel("big", 8, 2, MAX_MODEL_SIZE, MAX_MODEL_SIZE, 32, dense_layers=MAX_MODEL_SIZE,
                   dense_intermediate=MAX_MODEL_SIZE, shared_experts=MAX_MODEL_SIZE,
                   shared_intermediate=MAX_MODEL_SIZE, weight_bytes=BYTES_PER_ELEMENT_RANGE[1],
                   activation_bytes=BYTES_PER_ELEMENT_RANGE[1], paper_intermediate=MAX_MODEL_SIZE)
    slow = Hardware(M44, COMPUTE_FLOPS_PER_S_RANGE[0], LINK_BW_BYTES_PER_S_RANGE[0],
                    dram_bw_bytes_per_s=DRAM_BW_GBPS_RANGE[0] * 1e9,
                    hop_latency_s=MAX_HOP_LATENCY_NS * 1e-9)
    fast = Hardware(M44, COMPUTE_FLOPS_PER_S_RANGE[1], LINK_BW_BYTES_PER_S_RANGE[1],
                    dram_bw_bytes_per_s=DRAM_BW_GBPS_RANGE[1] * 1e9,
                    dram_capacity_bytes=MAX_DRAM_CAPACITY_BYTES)
    opts = hm.EvalOptions(mode=mode, context_len=10**8)
    for model, hw in ((big, slow), (mixtral.model, fast), (mixtral.model, slow)):
        p = mixtral.with_(model=model, hardware=hw, batch=1e9, options=opts)
        e = hm.evaluate(p, "ep")
        for v in (e.tbt_us, e.moe_comm_s, e.moe_compute_s):
            assert math.isfinite(v) and v >= 0


def test_largest_sizes_accepted() -> None:
    m = MoEModel("huge", MAX_EXPERTS, 8, 64, 64, MAX_LAYERS)
    assert (m.num_experts, m.moe_layers) == (MAX_EXPERTS, MAX_LAYERS)


def test_reprs_say_what_the_object_is_in_one_line():
    """The public result and input types printed whole arrays (a Placement's repr ran to 26,000
    characters); each now says in one short line what it holds."""
    p = hm.Problem(hm.get_model("mixtral-8x7b"), hm.make_hardware("5/50", "2x2"),
                   trace=hm.synthetic.synthetic_trace(hm.get_model("mixtral-8x7b"), 200, seed=1), hw_point="5/50")
    plan = hm.place(p, "cb")
    wanted = {
        "Problem": (p, ["mixtral-8x7b", "5/50", "2x2", "batch 128"]),
        "Trace": (p.trace, ["32 layers", "200 tokens", "top-2 of 8"]),
        "Placement": (plan, ["'cb'", "32 layers", "8 experts", "4 nodes"]),
        "LayerPlacement": (plan.layers[0], ["8 experts", "4 nodes"]),
        "Evaluation": (hm.evaluate(p, plan), ["'cb'", "TBT", "us"]),
        "Workload": (hm.expected_workload(p.trace, 64), ["expected", "batch 64"]),
        "Comparison": (hm.compare(p, ["cb", "ep"], progress=False), ["['cb', 'ep']"]),
        "ReplayResult": (hm.replay(p, plan, policy="static", batches=2, batch=16), ["'static'", "2 batches"]),
        "PlanResult": (hm.solve(p, layers=[0], time_limit_s=0.3, baselines=False, progress=False),
                       ["TBT", "1 layer solved"]),
    }
    for name, (obj, parts) in wanted.items():
        r = repr(obj)
        assert r.startswith(name + "(") and "\n" not in r and len(r) < 300, (name, r[:400])
        assert all(part in r for part in parts), (name, r)


@pytest.mark.parametrize(("kw", "field"), [({"shared_experts": 2}, "model.shared_intermediate"),
                                           ({"dense_layers": 1}, "model.dense_intermediate")])
def test_shared_experts_or_dense_layers_without_a_size_are_refused(kw, field):
    """They were accepted and cost nothing (no time, no weights): a silently cheaper model."""
    with pytest.raises(InputError, match="would cost no time") as e:
        MoEModel("m", 8, 2, 64, 64, 2, **kw)
    assert e.value.field == field
    size = field.removeprefix("model.")
    assert MoEModel("m", 8, 2, 64, 64, 2, **kw, **{size: 32}).non_expert_weight_bytes() > \
        MoEModel("m", 8, 2, 64, 64, 2).non_expert_weight_bytes()


def test_placements_compare_and_hash_by_layout() -> None:
    """``==`` and ``hash`` on placements: equal layouts (and strategy name) are equal, whatever their
    meta; a layer is compared exactly. Both raised before (an array's ambiguous truth value)."""
    eye = np.eye(4)
    a = hm.Placement.from_shares([eye, eye], "x", note="a")
    b = hm.Placement.from_shares([eye.copy(), eye.copy()], "x")
    c = hm.Placement.from_shares([eye, eye[::-1]], "x")
    assert a == b and hash(a) == hash(b) and a in [b] and len({a, b, c}) == 2
    assert a != c and a.layers[0] == c.layers[0] and a.layers[1] != c.layers[1]
    assert a != hm.Placement.from_shares([eye, eye], "y") and a.layers == hm.Placement.from_shares([eye, eye]).layers
    assert (a == "x") is False


@pytest.mark.parametrize("shares", [None, 3, "abc", {"a": 1}])
def test_placement_from_shares_of_the_wrong_kind_is_one_input_error(shares: Any) -> None:
    with pytest.raises(InputError) as exc:
        hm.Placement.from_shares(shares)
    assert exc.value.field == "placement.shares"
