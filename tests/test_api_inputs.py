"""The public Python API refuses bad input with one InputError naming the argument as written
(found by an audit of every entry point; the CLI's cases are in test_hardening.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hdmoe_milp as hm
from hdmoe_milp.errors import InputError
from hdmoe_milp.placement import LayerPlacement, Placement

from .conftest import ROOT

INSTANCE = ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml"


@pytest.fixture(scope="module")
def P():
    return hm.load_instance(INSTANCE)


@pytest.fixture(scope="module")
def ep(P):
    return hm.place(P, "ep")


def _field(exc: pytest.ExceptionInfo) -> str:
    return exc.value.field


def test_a_plan_named_tp_must_be_tensor_parallel(P, ep):
    """'tp' is every speedup's reference: a plan under that name that is not TP would relabel it."""
    with pytest.raises(InputError, match="not tensor") as exc:
        hm.compare(P, [], plans={"tp": ep})
    assert _field(exc) == "plans"
    cmp = hm.compare(P, ["ep"], plans={"tp": hm.place(P, "tp")})  # TP's own layout is welcome
    df = cmp.table().set_index("strategy")
    assert df.loc["tp", "speedup_vs_tp"] == pytest.approx(1.0)
    assert df.loc["ep", "speedup_vs_tp"] == pytest.approx(df.loc["tp", "tbt_us"] / df.loc["ep", "tbt_us"])
    for bad, field in ((123, "strategies"), ({"x": 1}, "strategies")):
        with pytest.raises(InputError) as exc:
            hm.compare(P, bad)
        assert _field(exc) == field
    with pytest.raises(InputError) as exc:
        hm.compare(P, [], plans={5: ep})
    assert _field(exc) == "plans"
    # each error names the argument as the caller wrote it: strategies (not "strategy"), plans['x']
    for bad in (["tp", "nope"], ["ep", "ep"]):
        with pytest.raises(InputError) as exc:
            hm.compare(P, bad)
        assert _field(exc) == "strategies"
    other = hm.Placement(ep.layers, "ep", {"problem": {**P.describe(), "mesh": "2x8"}})
    with pytest.raises(InputError, match="was made for mesh '2x8'") as exc:
        hm.compare(P, [], plans={"mine": other})
    assert _field(exc) == "plans['mine']"


def test_hw_point_must_be_the_hardwares(P):
    with pytest.raises(InputError, match="10/25") as exc:
        hm.Problem(P.model, P.hardware, P.trace, hw_point="10/25")
    assert _field(exc) == "hw_point"
    ok = hm.Problem(P.model, hm.make_hardware("10/25", "4x4"), P.trace, hw_point="10/25")
    assert ok.describe()["hw_point"] == "10/25"


def test_evaluate_refuses_build_arguments_with_a_ready_plan(P, ep):
    for kw, field in (({"seed": 3}, "seed"), ({"budget": hm.Budget(time_limit_s=1)}, "budget")):
        with pytest.raises(InputError) as exc:
            hm.evaluate(P, ep, **kw)
        assert _field(exc) == field
    assert hm.evaluate(P, "ep", seed=P.seed).tbt_us == pytest.approx(hm.evaluate(P, ep).tbt_us)


def test_solve_without_a_trace_is_refused_before_any_layer(P):
    no_trace = hm.Problem(P.model, P.hardware, frequencies=P.frequencies)
    with pytest.raises(InputError, match="trace") as exc:
        hm.solve(no_trace, time_limit_s=30, layers=[0])
    assert _field(exc) == "trace"


def test_numpy_numbers_are_stored_as_plain_numbers(P, tmp_path):
    b = hm.Budget(time_limit_s=np.float32(0.5), threads=np.int64(1), gap=np.float64(0.01), work_limit=np.float32(0))
    assert type(b.time_limit_s) is float and type(b.threads) is int and type(b.gap) is float
    assert type(b.work_limit) is float
    hm.place(P, "tp", budget=b).save(tmp_path / "tp.json")
    res = hm.solve(P, time_limit_s=np.float32(0.5), threads=np.int64(1), layers=[np.int64(0)], baselines=["tp"],
                   lns_patience=np.int64(2), jobs=np.int64(1))
    json.dumps(res.to_dict())
    res.save(tmp_path / "plan.json")
    assert hm.load_plan(tmp_path / "plan.json", P).num_layers == P.num_layers


@pytest.mark.parametrize("kwargs, field", [
    ({"strategy": None}, "placement.strategy"), ({"strategy": ""}, "placement.strategy"),
    ({"strategy": 5}, "placement.strategy"), ({"meta": None}, "placement.meta"), ({"meta": [1]}, "placement.meta"),
])
def test_placement_fields(ep, kwargs, field):
    with pytest.raises(InputError) as exc:
        Placement(ep.layers, **kwargs)
    assert _field(exc) == field


@pytest.mark.parametrize("layers", ["abc", (np.eye(2),), [1, 2], None])
def test_placement_layers(layers):
    with pytest.raises(InputError) as exc:
        Placement(layers)
    assert _field(exc) == "placement.layers"


@pytest.mark.parametrize("args, field", [
    ((["0.5", "0.5"], [0], [1.0], 1), "placement.shares"),
    (([[0.5, 0.5], [1.0]], [0, 1], [1.0, 1.0], 2), "placement.shares"),
    (([[1.0, 0.0]], ["0"], [1.0], 1), "placement.expert_of"),
    (([[1.0, 0.0]], [0], ["1"], 1), "placement.token_fraction"),
    (([[1.0, 0.0]], [0], [1.0], "1"), "placement.num_experts"),
    (([[1.0, 0.0]], [0], [1.0], True), "placement.num_experts"),
    (([[1.0, 0.0]], [0], [1.0], 1.0), "placement.num_experts"),
    (([[1.0, 0.0]], [0], [1.0], None), "placement.num_experts"),
])
def test_layer_placement_fields(args, field):
    with pytest.raises(InputError) as exc:
        LayerPlacement(*args)
    assert _field(exc) == field


def test_layer_placement_takes_numpy_and_lists_alike():
    a = LayerPlacement([[0.5, 0.5], [0, 1]], np.array([0, 1]), [1, 1], np.int64(2))
    b = LayerPlacement.from_shares(np.array([[0.5, 0.5], [0.0, 1.0]]))
    np.testing.assert_array_equal(a.shares, b.shares)
    assert type(a.num_experts) is int


def test_check_plan_argument_types(P, ep):
    with pytest.raises(InputError) as exc:
        hm.check_plan("x", P)
    assert _field(exc) == "plan"
    with pytest.raises(InputError) as exc:
        hm.check_plan(ep, None)
    assert _field(exc) == "problem"


def test_instance_value_errors_name_the_files_key(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text('[model]\npreset = "deepseek-v2-lite"\n[hardware]\npreset = "5/50"\nmesh = "4x8"\n'
                 'dram_capacity_gb = 0.001\n')
    with pytest.raises(InputError, match="GB") as exc:
        hm.load_instance(p)
    assert _field(exc) == "instance small.toml [hardware].dram_capacity_gb"


@pytest.mark.parametrize("key", ["model", "hw", "options"])
def test_replay_refuses_problem_settings_as_policy_settings(P, ep, key):
    with pytest.raises(InputError) as exc:
        hm.replay(P, ep, batches=1, batch=64, policy="static", **{key: 1})
    assert _field(exc) == key


def test_array_likes_and_int_fractions_as_before():
    """Per-link bandwidths as any array-like (a pandas Series, a range) and integer token
    fractions were accepted before the checks; they still are, stored as floats."""
    import pandas as pd

    hw = hm.Hardware(hm.Mesh(2, 2), 5e12, pd.Series([5e10] * 8))
    assert hw.min_link_bw == 5e10 and hw.link_bw.dtype == float
    assert hm.Hardware(hm.Mesh(2, 2), 5e12, range(10**9, 10**9 + 8)).min_link_bw == 1e9
    lp = LayerPlacement([[1, 0], [0, 1]], [0, 1], [1, 1], 2)
    assert lp.token_fraction.dtype == float and lp.shares.dtype == float


def test_a_layer_left_out_takes_a_plan_of_the_stated_family(P):
    """Without patterns the family is the aligned blocks only: a layer left out of the solve must
    take the best baseline the blocks express, not a baseline outside the family."""
    from hdmoe_milp.solvers import SolveParams
    from hdmoe_milp.strategies.block_milp import solve as S
    from hdmoe_milp.strategies.block_milp.formulation import MilpOptions

    opts = MilpOptions(patterns=False, delivery=P.options.resolved_delivery)
    tasks = S.layer_tasks(P.model, P.hardware, P.frequencies, P.batch, backend="cpsat",
                          params=SolveParams(time_limit_s=1), options=opts, coactivation=P.coactivation)
    r = S.not_solved_task(tasks[0])
    base, _ = S.layer_baselines(P.model, P.hardware, P.frequencies[0], P.batch, backend="cpsat",
                                params=SolveParams(time_limit_s=1), layer=0, freqs_all=P.frequencies,
                                coactivation=P.coactivation[0])
    bm = S.family_model(P.model, P.hardware, P.frequencies[0], P.batch, opts, P.coactivation[0], base)
    inside = {k for k, a in S._baseline_assigns(bm, base).items() if bm.in_family(a)}
    assert r.warm_start_source in inside


def test_frequencies_above_one_are_no_routing(P):
    """Top-k ids are distinct, so no expert gets more than every token: a row like (2, 0, ...) sums
    to top_k = 2 but is refused, naming the layer and the expert."""
    f = np.tile(np.r_[2.0, np.zeros(P.model.num_experts - 1)], (P.model.moe_layers, 1))
    with pytest.raises(InputError, match="layer 0 expert 0") as exc:
        hm.Problem(P.model, P.hardware, frequencies=f)
    assert exc.value.field == "frequencies"
    ok = np.full((P.model.moe_layers, P.model.num_experts), P.model.top_k / P.model.num_experts)
    assert hm.Problem(P.model, P.hardware, frequencies=ok).frequencies.shape == ok.shape


@pytest.mark.parametrize("progress", ["no", 5, 0.0])
def test_progress_is_true_false_or_none(P, progress):
    for call in (lambda: hm.solve(P, time_limit_s=0.1, layers=[0], baselines=["tp"], progress=progress),
                 lambda: hm.compare(P, ["tp"], progress=progress)):
        with pytest.raises(InputError) as exc:
            call()
        assert exc.value.field == "progress"


@pytest.mark.parametrize("name", sorted(hm.STRATEGIES))
def test_registry_entries_check_their_arguments_when_called_directly(P, name):
    """``hm.STRATEGIES[name](...)`` is public: a seed of None drew unseeded randomness in ``ep``,
    and a bad seed, budget or problem reached numpy or an AttributeError."""
    run = hm.STRATEGIES[name]
    for kw, field in (({"seed": None}, "seed"), ({"seed": -1}, "seed"), ({"seed": 0, "budget": {}}, "budget")):
        with pytest.raises(InputError) as exc:
            run(P, **kw)
        assert exc.value.field == field
    with pytest.raises(InputError) as exc:
        run(None, seed=0)
    assert exc.value.field == "problem"


def test_trace_methods_name_their_arguments(P):
    tr = P.trace
    for call, field in ((lambda: tr.coactivation(99), "layer"), (lambda: tr.coactivation("a"), "layer"),
                        (lambda: tr.slice_tokens(1.5, 3), "start"), (lambda: tr.slice_tokens("a", 2), "start"),
                        (lambda: tr.slice_tokens(5, 2), "stop"), (lambda: tr.slice_tokens(0, 10**9), "stop")):
        with pytest.raises(InputError) as exc:
            call()
        assert exc.value.field == field
    part = tr.slice_tokens(2, 5)
    assert part.num_tokens() == 3 and np.array_equal(part.layers[0], tr.layers[0][2:5])
    ids, fg = tr.coactivation(np.int64(1))
    assert fg.sum() == pytest.approx(1.0) and ids.shape[1] == P.model.top_k


def test_a_hand_built_workload_is_checked():
    """``hm.Workload`` is public: a negative flow weight used to give a number, an id past the
    model's a numpy error deep in the evaluator."""
    from hdmoe_milp.workload import LayerRouting
    ok = LayerRouting(np.array([[0, 1]]), np.array([3.0]))
    for args, field in ((((), -1, 0, float("nan"), "foo"), "workload.num_experts"),
                        (((ok,), 8, 2, 1.0, "seen"), "workload.kind"),
                        (((ok,), 8, 9, 1.0, "observed"), "workload.top_k"),
                        (((ok,), 8, 2, float("nan"), "observed"), "workload.batch_size"),
                        (((LayerRouting(np.array([[0, 99]]), np.array([3.0])),), 8, 2, 1.0, "observed"),
                         "workload.layers[0].experts"),
                        (((LayerRouting(np.array([[0, 1]]), np.array([-5.0])),), 8, 2, 1.0, "observed"),
                         "workload.layers[0].weight"),
                        ((([ok],), 8, 2, 1.0, "observed"), "workload.layers")):
        with pytest.raises(InputError) as exc:
            hm.Workload(*args)
        assert exc.value.field == field
    assert hm.Workload((ok,), 8, 2, 3.0, "observed").expert_loads()[0, :2].tolist() == [3.0, 3.0]


def test_compare_all_is_the_baselines_and_load_trace_refuses_an_impossible_top_k():
    """hm.compare(problem, "all") builds the baselines, as the CLI's --strategy all; a top-k above
    the expert count is refused as such (it was blamed on the trace's routing)."""
    p = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    assert list(hm.compare(p, "all").evaluations) == list(hm.compare(p).evaluations) == list(hm.BASELINES)
    with pytest.raises(hm.InputError, match=r"top_k: must be <= 8, got 9"):
        hm.load_trace(ROOT / "instances" / "traces" / "mixtral_writing_4k.json.gz", 8, 9)


def test_saving_a_plan_over_a_folder_says_it_is_a_folder(tmp_path):
    """A folder named without .json was refused for its suffix ("a plan file is JSON"); a folder
    named .json too reached the writer. Both say what the CLI says: it is a directory."""
    p = hm.load_instance(ROOT / "instances" / "mixtral-8x7b_5-50_4x4.toml")
    plan = hm.place(p, "ep")
    for name in ("plans", "plans.json"):
        (tmp_path / name).mkdir()
        with pytest.raises(hm.InputError, match="is a directory"):
            plan.save(tmp_path / name)


@pytest.mark.parametrize("value,says", [(-1.0, "must be >= 0"), (float("nan"), "finite"), ("5", "number of bytes"),
                                        (True, "number of bytes"), (None, "number of bytes")])
def test_memory_bytes_per_node_checks_its_argument(value, says):
    """It returned negative or NaN bytes, or raised a raw TypeError for the model object."""
    m = hm.get_model("mixtral-8x7b")
    plan = hm.place(hm.Problem(m, hm.make_hardware("5/50", "2x2"), frequencies=np.full((m.moe_layers, 8), 0.25)), "ep")
    with pytest.raises(hm.InputError, match=says) as e:
        plan.memory_bytes_per_node(value)
    assert e.value.field == "expert_bytes"
    with pytest.raises(hm.InputError, match="give model.expert_weight_bytes()"):
        plan.memory_bytes_per_node(m)
    assert plan.memory_bytes_per_node(m.expert_weight_bytes()).sum() == pytest.approx(
        m.moe_layers * 8 * m.expert_weight_bytes())
