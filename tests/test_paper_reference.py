"""Paper mode reproduces the TP latencies of HD-MoE's result file (copy in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hdmoe_milp import EvalOptions, expected_workload, get_model, make_hardware
from hdmoe_milp.evaluator import evaluate
from hdmoe_milp.strategies import build
from hdmoe_milp.synthetic import synthetic_trace

REF = json.loads((Path(__file__).parent / "data" / "paper_tp_reference.json").read_text())


@pytest.fixture(scope="module")
def traces(ds_trace, mixtral_trace):
    return {
        "deepseek-v2-lite": ds_trace,
        "mixtral-8x7b": mixtral_trace,
        "qwen2-57b-a14b": synthetic_trace(get_model("qwen2-57b-a14b"), 512, seed=0),
    }


def _tp(traces, model_name, hw_point, mesh, batch):
    model = get_model(model_name)
    hw = make_hardware(hw_point, mesh)
    tr = traces[model_name]
    placement = build("tp", model, hw, tr.frequencies())
    return evaluate(placement, model, hw, expected_workload(tr, batch), EvalOptions(mode="paper"))


@pytest.mark.parametrize("entry", REF["consistent"], ids=lambda e: f"{e['model']}-{e['mesh']}-{e['hw']}-B{e['batch']}")
def test_paper_mode_reproduces_tp(traces, entry):
    ev = _tp(traces, entry["model"], entry["hw"], entry["mesh"], entry["batch"])
    assert ev.tbt_us == pytest.approx(entry["tp_latency_us"], rel=1e-3)
    assert ev.moe_comm_s * 1e6 == pytest.approx(entry["tp_communication_us"], rel=1e-3)
    assert ev.moe_compute_s * 1e6 == pytest.approx(entry["tp_computation_us"], rel=1e-3)


def test_mislabelled_qwen_entry_matches_other_hardware_point(traces):
    """The Qwen 4x4 B=128 entry labelled 5/50 is the 2.5/75 value: documented, not fitted."""
    e = next(x for x in REF["inconsistent"] if x["hw_reproduces"])
    as_labelled = _tp(traces, e["model"], e["hw_label"], e["mesh"], e["batch"])
    actual = _tp(traces, e["model"], e["hw_reproduces"], e["mesh"], e["batch"])
    assert actual.tbt_us == pytest.approx(e["tp_latency_us"], rel=1e-3)
    assert abs(as_labelled.tbt_us / e["tp_latency_us"] - 1) > 0.1


def test_scaled_qwen_entry_is_not_reproduced(traces):
    """Qwen entries below B=128 are scaled copies in the paper's file; our formula does not bend to them."""
    e = next(x for x in REF["inconsistent"] if not x["hw_reproduces"])
    ev = _tp(traces, e["model"], e["hw_label"], e["mesh"], e["batch"])
    assert abs(ev.tbt_us / e["tp_latency_us"] - 1) > 0.1
