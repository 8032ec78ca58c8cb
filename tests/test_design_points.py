"""Design points beyond the paper's three: ``--hw 4/40`` is 4 TFLOP/s per node and 40 GB/s per link,
everywhere a point is read (flags, instance files, plan files, the bench grid, the Python API)."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pytest

import hdmoe_milp as hm
from hdmoe_milp.cli import main
from hdmoe_milp.grid import GridSpec, check_spec
from hdmoe_milp.hardware import HARDWARE_PRESETS, Hardware, Mesh, parse_point, point_name

from .conftest import ROOT, TRACES

MX = str(TRACES / "mixtral_reasoning_4k.json.gz")


def test_parse_point_reads_presets_and_any_pair():
    for name, p in HARDWARE_PRESETS.items():
        assert parse_point(name) == (name, p)
    assert parse_point("5.0/50.00") == ("5/50", HARDWARE_PRESETS["5/50"])  # one point, one name
    name, p = parse_point(" 4/40 ")
    assert name == "4/40" and (p.compute_flops, p.link_bw_bytes_per_s) == (4e12, 40e9)
    name, p = parse_point(".5/12.5")
    assert name == "0.5/12.5" and (p.compute_flops, p.link_bw_bytes_per_s) == (0.5e12, 12.5e9)


@pytest.mark.parametrize("text", ["4/", "/40", "x/y", "4/40/1", "4-40", "0/25", "4/0", "nan/25", "4/inf",
                                  "１０/25", "-4/40", "1e/25", "1e40/25", ""])
def test_parse_point_refuses_what_is_not_a_point(text):
    with pytest.raises(hm.InputError) as ei:
        parse_point(text, "--hw")
    assert ei.value.field == "--hw" and "4/40" in ei.value.fix and repr(text) in str(ei.value)


@pytest.mark.parametrize("tflops", [1e-12, 1e-6, 0.1, 2.01, 2.5, 3.0, 4.1, 7.25, 1234.5, 1e14, 1e15, 1e18])
@pytest.mark.parametrize("gbps", [1e-9, 1e-3, 0.7, 25.0, 1e6, 1e21])
def test_a_points_name_reads_back_as_the_same_point(tflops, gbps):
    name, p = parse_point(f"{tflops!r}/{gbps!r}")
    # the float nearest the decimal value (4.1 * 1e12 would be 4099999999999.9995)
    assert (p.compute_flops, p.link_bw_bytes_per_s) == (float(Decimal(repr(tflops)).scaleb(12)),
                                                        float(Decimal(repr(gbps)).scaleb(9)))
    assert parse_point(name) == (name, p)  # plan files and Problem.hw_point hold the name


def test_parse_point_refuses_a_number():
    with pytest.raises(hm.InputError, match="must be a string"):
        parse_point(5.0, "hw")


def test_a_custom_point_scores_as_hardware_built_by_hand():
    hw = hm.make_hardware("3/60", "2x2")
    assert hw.name == "3/60@2x2" and hw.compute_flops == 3e12 and np.all(hw.link_bw == 60e9)
    by_hand = Hardware(Mesh(2, 2), 3e12, 60e9)
    model = hm.get_model("mixtral-8x7b")
    trace = hm.load_trace(MX, model.num_experts, model.top_k)
    a = hm.Problem(model, hw, trace)
    b = hm.Problem(model, by_hand, trace)
    assert a.describe()["hw_point"] == "3/60" and "3/60" in repr(a) and b.describe()["hw_point"] is None
    for name in ("tp", "ep", "cb"):
        assert hm.evaluate(a, hm.place(a, name)).tbt_s == hm.evaluate(b, hm.place(b, name)).tbt_s
    # a recorded point must be the hardware's
    with pytest.raises(hm.InputError) as ei:
        hm.Problem(model, hw, trace, hw_point="4/40")
    assert ei.value.field == "hw_point" and "'4/40'" in str(ei.value)
    assert hm.Problem(model, hw, trace, hw_point="3.0/60").hw_point == "3/60"
    # one-decimal points are the numbers a user means: a Problem built by hand with 4.1e12 FLOP/s is 4.1/50
    assert hm.make_hardware("4.1/50", "2x2").compute_flops == 4.1e12
    by_hand = hm.Problem(model, Hardware(Mesh(2, 2), 4.1e12, 50e9), trace, hw_point="4.10/50")
    assert by_hand.hw_point == "4.1/50"


def test_cli_takes_a_custom_point_and_the_plan_remembers_it(tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "3/60", "--trace", MX,
                 "--strategy", "cb", "--save-plan", str(plan), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["hw"] == "3/60"
    assert json.loads(plan.read_text())["meta"]["problem"]["hw_point"] == "3/60"
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0  # no --hw: the plan says 3/60
    back = json.loads(capsys.readouterr().out)
    assert back["hw"] == "3/60" and back["tbt_us"] == pytest.approx(made["tbt_us"], rel=1e-12)
    # a faster point is faster: compute at 6 TFLOP/s takes half the time of 3
    assert main(["evaluate", "--plan", str(plan), "--hw", "6/60", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["hw"] == "6/60" and fast["tbt_us"] < back["tbt_us"]
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "4/40/1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hw" in err[0] and "'4/40/1'" in err[0] and "4/40" in err[0]


def test_instance_files_and_the_grid_take_custom_points(tmp_path):
    src = (ROOT / "instances" / "mixtral-8x7b_5-50_4x8.toml").read_text()
    trace = str((ROOT / "instances" / "traces" / "mixtral_reasoning_4k.json.gz").resolve())
    src = src.replace('"traces/mixtral_reasoning_4k.json.gz"', json.dumps(trace))
    good = tmp_path / "good.toml"
    good.write_text(src.replace('preset = "5/50"', 'preset = "7.5/30"'))
    p = hm.load_instance(good)
    assert p.hw_point == "7.5/30" and p.hardware.compute_flops == 7.5e12
    bad = tmp_path / "bad.toml"
    bad.write_text(src.replace('preset = "5/50"', 'preset = "7.5/"'))
    with pytest.raises(hm.InputError) as ei:
        hm.load_instance(bad)
    assert ei.value.field == "instance bad.toml [hardware].preset"
    spec = check_spec(GridSpec(models=("mixtral-8x7b",), hws=("4/40", "5.0/50"), meshes=("4x4",)))
    assert spec.hws == ("4/40", "5/50")
    with pytest.raises(hm.InputError, match="'5/50' and '5.0/50' are one design point"):
        check_spec(GridSpec(models=("mixtral-8x7b",), hws=("5/50", "5.0/50"), meshes=("4x4",)))
    with pytest.raises(hm.InputError, match="twice"):
        check_spec(GridSpec(models=("mixtral-8x7b",), hws=("5/50", "5/50"), meshes=("4x4",)))
    with pytest.raises(hm.InputError) as ei:
        check_spec(GridSpec(models=("mixtral-8x7b",), hws=("4/x",), meshes=("4x4",)))
    assert ei.value.field == "hw"
    # a mesh the MILP cannot solve is refused before the first point is solved (it was refused after)
    with pytest.raises(hm.InputError, match="17x17 has 289 nodes") as ei:
        check_spec(GridSpec(models=("mixtral-8x7b",), hws=("5/50",), meshes=("2x2", "17x17")))
    assert ei.value.field == "mesh"


def test_a_plan_whose_point_is_spelt_otherwise_is_still_checked(tmp_path, capsys):
    plan = tmp_path / "cb.json"
    assert main(["evaluate", "--model", "mixtral-8x7b", "--mesh", "2x2", "--hw", "5/50", "--trace", MX,
                 "--strategy", "cb", "--save-plan", str(plan)]) == 0
    capsys.readouterr()
    d = json.loads(plan.read_text())
    d["meta"]["problem"]["hw_point"] = "5.0/50"
    plan.write_text(json.dumps(d))
    assert main(["evaluate", "--plan", str(plan), "--json"]) == 0  # the same point, spelt otherwise
    assert json.loads(capsys.readouterr().out)["hw"] == "5/50"
    d["meta"]["problem"]["hardware"]["compute_flops"] = 1e13  # a record that contradicts the point
    plan.write_text(json.dumps(d))
    assert main(["evaluate", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "meta.problem.hardware.compute_flops" in err and "5/50" in err


@pytest.mark.parametrize(("text", "name"), [("5.0/50", "5/50"), ("4/40", "4/40"), (" 2.5/75 ", "2.5/75"),
                                            ("custom", None), ("4/", None), (None, None), (5, None)])
def test_point_name_is_the_canonical_name_or_none(text, name):
    assert point_name(text) == name
