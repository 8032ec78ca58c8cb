"""Bad input to the online stage (policy settings, replay) and to the workload helpers (Trace,
sample_batch, expected_workload, iter_batches): one InputError naming the field as written, nothing
else escaping; and the good inputs (numpy integers included) still working, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hdmoe_milp as hm
from hdmoe_milp import InputError, Trace, expected_workload, sample_batch
from hdmoe_milp.errors import MAX_BATCHES, MAX_EXPERTS
from hdmoe_milp.online import RebalancerConfig, make_policy
from hdmoe_milp.online import replay as online_replay
from hdmoe_milp.workload import iter_batches, load_trace

INSTANCE = Path(__file__).resolve().parents[1] / "instances" / "mixtral-8x7b_5-50_4x4.toml"
FAST = dict(batches=2, batch=64, progress=False)


@pytest.fixture(scope="module")
def case():
    P = hm.load_instance(INSTANCE)
    return P, hm.place(P, "cb")


def _trace(E: int, k: int, layers: int = 32, tokens: int = 100) -> Trace:
    rng = np.random.default_rng(0)
    rows = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)])
    return Trace(tuple(rows for _ in range(layers)), E, k)


# --- policy settings ------------------------------------------------------------------------------

BAD_POLICY_SETTINGS = [
    ("eplb-periodic", {"period": 0}, "period"),
    ("eplb-periodic", {"period": -1}, "period"),
    ("eplb-periodic", {"period": 1.5}, "period"),
    ("eplb-periodic", {"period": "2"}, "period"),
    ("eplb-periodic", {"period": True}, "period"),
    ("eplb-periodic", {"period": None}, "period"),
    ("eplb-periodic", {"window": 0}, "window"),
    ("eplb-periodic", {"window": 2.5}, "window"),
    ("eplb-periodic", {"extra_replicas": -3}, "extra_replicas"),
    ("eplb-periodic", {"extra_replicas": 10**9}, "extra_replicas"),
    ("eplb-periodic", {"extra_replicas": 113}, "extra_replicas"),  # 8 experts x 16 nodes - 16 slots = 112
    ("eplb-periodic", {"extra_replicas": 1.0}, "extra_replicas"),
    ("hdmoe-prebroadcast", {"k": -1}, "k"),
    ("hdmoe-prebroadcast", {"k": 1.5}, "k"),
    ("hdmoe-prebroadcast", {"k": "2"}, "k"),
    ("hdmoe-prebroadcast", {"k": 9}, "k"),  # mixtral has 8 experts
    ("hdmoe-prebroadcast", {"k": 10**9}, "k"),
    ("hdmoe-prebroadcast", {"k": np.bool_(True)}, "k"),
    ("greedy", {"config": "x"}, "config"),
    ("greedy", {"config": 1}, "config"),
    ("greedy", {"foo": 1}, "foo"),
    ("greedy", {"name": "x"}, "name"),
    ("static", {"config": 1}, "config"),
    ("oracle", {"time_limit_s": 0}, "time_limit_s"),
    ("oracle", {"time_limit_s": "1"}, "time_limit_s"),
    ("oracle", {"time_limit_s": float("inf")}, "time_limit_s"),
    ("oracle", {"backend": "x"}, "backend"),
    ("oracle", {"backend": None}, "backend"),
]


@pytest.mark.parametrize("policy,kw,field", BAD_POLICY_SETTINGS)
def test_bad_policy_setting_is_one_input_error(case, policy, kw, field):
    P, cb = case
    with pytest.raises(InputError) as exc:
        hm.replay(P, cb, policy=policy, **FAST, **kw)
    assert exc.value.field == field
    assert exc.value.fix


BAD_REBALANCER = [
    ({"window": 0}, "window"), ({"window": 1.5}, "window"), ({"candidates": 0}, "candidates"),
    ({"targets": 0}, "targets"), ({"targets": "4"}, "targets"), ({"max_actions": -1}, "max_actions"),
    ({"max_actions": 1.5}, "max_actions"), ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": "x"}, "ema_decay"),
    ({"horizon": 0}, "horizon"), ({"hysteresis": -0.1}, "hysteresis"), ({"extra_slots": -1}, "extra_slots"),
    ({"drop_tokens": float("nan")}, "drop_tokens"), ({"noise_z": True}, "noise_z"),
    ({"estimate_z": None}, "estimate_z"), ({"estimator": None}, "estimator"), ({"estimator": "mean"}, "estimator"),
]


@pytest.mark.parametrize("kw,field", BAD_REBALANCER)
def test_bad_rebalancer_config(kw, field):
    with pytest.raises(InputError) as exc:
        RebalancerConfig(**kw)
    assert exc.value.field == field


def test_good_policy_settings_still_work_with_numpy_integers(case):
    P, cb = case
    ep = hm.replay(P, cb, policy="eplb-periodic", period=np.int64(1), window=np.int32(2),
                   extra_replicas=np.int64(112), **FAST)
    assert len(ep.latency_s) == 2 and np.isfinite(ep.latency_s).all()
    assert ep.actions[1] > 0  # re-planned before the second batch
    for k in (np.int64(2), 0, None):
        r = hm.replay(P, cb, policy="hdmoe-prebroadcast", k=k, **FAST)
        assert np.isfinite(r.latency_s).all()
        assert r.actions.max() <= 32 * (2 if k is not None else 8)  # broadcasts really made, at most k per layer
    cfg = RebalancerConfig(estimator="window", window=np.int64(3), candidates=np.int64(2), max_actions=np.int8(1))
    assert type(cfg.window) is int and type(cfg.max_actions) is int
    g = hm.replay(P, cb, policy="greedy", config=cfg, **FAST)
    assert np.isfinite(g.latency_s).all()
    assert make_policy("oracle", cb, P.model, P.hardware, 64, time_limit_s=np.float64(0.1)).time_limit_s == 0.1
    assert make_policy("eplb-periodic", cb, P.model, P.hardware, np.int64(64)).extra == 16  # default: one per node


# --- replay and make_policy -----------------------------------------------------------------------

@pytest.mark.parametrize("trace", [_trace(16, 2), _trace(8, 3), _trace(4, 2)], ids=["E16", "top3", "E4"])
def test_replay_names_a_trace_of_another_model(case, trace):
    P, cb = case
    with pytest.raises(InputError) as exc:
        hm.replay(P, cb, trace, **FAST)
    assert exc.value.field == "trace" and "mixtral-8x7b" in exc.value.fix


@pytest.mark.parametrize("kw,field", [
    ({"batches": 0}, "batches"), ({"batches": 2.0}, "batches"), ({"batch": True}, "batch"), ({"seed": None}, "seed"),
    ({"seed": -1}, "seed"), ({"batching": "expected"}, "batching"), ({"batching": None}, "batching"),
    ({"batch": 8192, "batching": "contiguous"}, "batch"), ({"progress": "x"}, "progress"),
    ({"options": "mesh"}, "options"), ({"policy": None}, "policy"), ({"batches": MAX_BATCHES + 1}, "batches"),
    ({"batching": ["random"]}, "batching"),
])
def test_online_replay_checks_its_arguments(case, kw, field):
    P, cb = case
    args = {"batch": 64, "policy": "static", "batches": 2, "progress": False, **kw}
    batch, policy = args.pop("batch"), args.pop("policy")
    with pytest.raises(InputError) as exc:
        online_replay(cb, P.model, P.hardware, P.trace, batch, policy, **args)
    assert exc.value.field == field


@pytest.mark.parametrize("which,value,field", [
    ("plan", None, "plan"), ("model", "mixtral", "model"), ("hw", None, "hw"), ("batch", 0, "batch"),
    ("batch", "64", "batch"), ("options", "x", "options"), ("name", "Greedy", "policy"),
])
def test_make_policy_checks_its_arguments(case, which, value, field):
    P, cb = case
    args = {"name": "static", "plan": cb, "model": P.model, "hw": P.hardware, "batch": 64, "options": None,
            which: value}
    with pytest.raises(InputError) as exc:
        make_policy(args["name"], args["plan"], args["model"], args["hw"], args["batch"], args["options"])
    assert exc.value.field == field


# --- workload helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    ({"batch": 8192, "mode": "contiguous"}, "batch"),  # the trace has 4096 tokens
    ({"batch": "8"}, "batch"), ({"batch": 10**30}, "batch"), ({"batch": [1, 2]}, "batch"),
    ({"batch": np.array([5.0])}, "batch"), ({"batch": True}, "batch"), ({"batch": 2.5}, "batch"),
    ({"batch": 0}, "batch"),
    ({"batch": None}, "batch"), ({"seed": True}, "seed"), ({"seed": None}, "seed"), ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"), ({"seed": "3"}, "seed"), ({"mode": "expected"}, "mode"), ({"mode": None}, "mode"),
    ({"trace": None}, "trace"), ({"trace": "x.json"}, "trace"),
])
def test_bad_sample_batch(case, kw, field):
    P, _ = case
    args = {"trace": P.trace, "batch": 8, "mode": "random", "seed": 0, **kw}
    with pytest.raises(InputError) as exc:
        sample_batch(args["trace"], args["batch"], args["mode"], args["seed"])
    assert exc.value.field == field
    if kw.get("mode") == "contiguous":
        assert "4096" in exc.value.fix


@pytest.mark.parametrize("trace_given,batch,field", [
    (True, "3", "batch"), (True, None, "batch"), (True, [1, 2], "batch"), (True, np.array([5.0]), "batch"),
    (True, True, "batch"), (True, float("nan"), "batch"), (True, 0, "batch"), (True, 1e308, "batch"),
    (False, 8, "trace"),
])
def test_bad_expected_workload(case, trace_given, batch, field):
    P, _ = case
    with pytest.raises(InputError) as exc:
        expected_workload(P.trace if trace_given else None, batch)
    assert exc.value.field == field


@pytest.mark.parametrize("kw,field", [
    ({"count": -1}, "count"), ({"count": 1.5}, "count"), ({"seed": None}, "seed"), ({"mode": "x"}, "mode"),
    ({"batch": 8192, "mode": "contiguous"}, "batch"), ({"batch": 0}, "batch"),
])
def test_bad_iter_batches_refused_on_the_call(case, kw, field):
    P, _ = case
    args = {"batch": 8, "mode": "random", "seed": 0, "count": 2, **kw}
    with pytest.raises(InputError) as exc:
        iter_batches(P.trace, args["batch"], args["mode"], args["seed"], args["count"])  # not iterated
    assert exc.value.field == field


@pytest.mark.parametrize("layers,field,words", [
    (None, "trace", "tuple"), (np.array([[0, 1]]), "trace", "tuple"),
    ((np.array([0, 1]),), "trace layer 0", "2-D"), ((np.zeros((2, 2, 2), dtype=np.int64),), "trace layer 0", "2-D"),
    ((np.zeros((0, 2), dtype=np.int64),), "trace layer 0", "empty"),
])
def test_bad_trace_layers(layers, field, words):
    with pytest.raises(InputError) as exc:
        Trace(layers, 8, 2)
    assert exc.value.field == field and words in exc.value.problem


_IDS = (np.array([[0, 1], [2, 3]]),)


@pytest.mark.parametrize("kw,field", [
    ({"num_experts": 0}, "trace.num_experts"), ({"num_experts": 8.0}, "trace.num_experts"),
    ({"num_experts": True}, "trace.num_experts"), ({"num_experts": MAX_EXPERTS + 1}, "trace.num_experts"),
    ({"num_experts": 10**9}, "trace.num_experts"), ({"top_k": 0}, "trace.top_k"), ({"top_k": "2"}, "trace.top_k"),
    ({"top_k": 9}, "trace.top_k"),  # more than num_experts
    ({"name": None}, "trace.name"), ({"name": ""}, "trace.name"), ({"name": 3}, "trace.name"),
    ({"path": 5}, "trace.path"), ({"sha256": b"ab"}, "trace.sha256"),
])
def test_bad_trace_fields(kw, field):
    args = {"layers": _IDS, "num_experts": 8, "top_k": 2, **kw}
    with pytest.raises(InputError) as exc:
        Trace(**args)
    assert exc.value.field == field and exc.value.fix


def test_trace_stores_plain_ints():
    tr = Trace(_IDS, np.int64(8), np.int32(2), "t")
    assert type(tr.num_experts) is int and type(tr.top_k) is int
    assert tr.frequencies().shape == (1, 8)


def test_load_trace_refuses_an_expert_count_above_the_limit(tmp_path):
    import gzip
    import json
    f = tmp_path / "t.json.gz"
    f.write_bytes(gzip.compress(json.dumps({"0": [[0, 1]]}).encode()))
    with pytest.raises(InputError) as exc:
        load_trace(f, 10**9, 2)
    assert exc.value.field == "num_experts"


def test_good_workload_calls(case):
    P, _ = case
    tr = P.trace
    a = sample_batch(tr, np.int64(64), "random", np.int64(7))
    b = sample_batch(tr, 64, "random", 7)
    c = sample_batch(tr, 64, "random", np.uint64(8))
    np.testing.assert_array_equal(a.layers[3].experts, b.layers[3].experts)
    assert not np.array_equal(a.layers[3].experts, c.layers[3].experts)
    w = sample_batch(tr, np.int32(tr.num_tokens()), "contiguous", 5)  # exactly the whole trace
    np.testing.assert_array_equal(w.layers[0].experts, tr.layers[0][: tr.num_tokens()])
    assert sample_batch(tr, 64, "contiguous", 1).batch_size == 64.0
    default = sample_batch(tr, 64)  # the default seed is 0: deterministic
    np.testing.assert_array_equal(default.layers[0].experts, sample_batch(tr, 64, seed=0).layers[0].experts)
    assert expected_workload(tr, np.int64(64)).batch_size == 64.0
    assert expected_workload(tr, np.float32(64.0)).batch_size == 64.0
    batches = list(iter_batches(tr, np.int64(32), "contiguous", count=np.int64(2)))
    np.testing.assert_array_equal(batches[1].layers[0].experts, tr.layers[0][32:64])
    one = np.array([[0, 1], [2, 3]])
    t3 = Trace(np.stack([one, one]), 8, 2)
    assert isinstance(t3.layers, tuple) and t3.num_layers == 2
    assert Trace([one], 8, 2).layers[0] is one


@pytest.mark.parametrize("kw", [{"mode": ["mesh"]}, {"mode": np.array(["mesh", "paper"])}, {"coalesce": 1},
                                {"replica_rule": None}])
def test_a_choice_that_is_not_a_string_is_one_input_error(kw):
    with pytest.raises(InputError) as exc:
        hm.EvalOptions(**kw)
    (name,) = kw
    assert exc.value.field == name and "must be a string" in exc.value.problem and "allowed:" in exc.value.fix


# --- observed counts and the parts a policy runs on (found by an API review) ----------------------

BAD_COUNTS = [
    ("nan", lambda good: np.where(good == good.max(), np.nan, good), "finite and non-negative"),
    ("inf", lambda good: np.where(good == good.max(), np.inf, good), "finite and non-negative"),
    ("negative", lambda good: -good, "finite and non-negative"),
    ("text", lambda good: np.full(good.shape, "a"), "must be numbers"),
    ("two layers", lambda good: good[:2], "expected shape"),
    ("four experts", lambda good: good[:, :4], "expected shape"),
    ("a layer without tokens", lambda good: np.vstack([np.zeros((1, good.shape[1])), good[1:]]), "layer 0"),
    ("no tokens", lambda good: np.zeros_like(good), "routes no tokens"),
]


@pytest.mark.parametrize("policy", ["static", "greedy", "hdmoe-prebroadcast", "eplb-periodic", "oracle"])
@pytest.mark.parametrize("name,make,says", BAD_COUNTS, ids=[c[0] for c in BAD_COUNTS])
def test_every_policy_refuses_counts_that_are_no_batch(case, policy, name, make, says):
    """A NaN used to switch the greedy rebalancer off for good (it never left its average), counts
    of the wrong shape reached numpy inside hdmoe-prebroadcast's decision, and eplb-periodic
    re-planned from a batch of no tokens."""
    P, plan = case
    good = np.tile(np.array([40, 30, 20, 10, 10, 5, 5, 8.0]), (P.model.moe_layers, 1))
    pol = make_policy(policy, plan, P.model, P.hardware, 64)
    with pytest.raises(InputError, match=says) as exc:
        pol.observe(make(good))
    assert exc.value.field == "counts"
    pol.observe(good)  # the policy still takes a real batch
    assert pol.decide(1).placement.num_layers == P.model.moe_layers


def test_the_rebalancer_and_prebroadcast_count_check_their_parts(case):
    P, plan = case
    small = hm.make_hardware("5/50", "2x2")
    for args, field in (((None, P.model, P.hardware, 64), "plan"), ((plan, "mixtral", P.hardware, 64), "model"),
                        ((plan, P.model, None, 64), "hw"), ((plan, P.model, small, 64), "plan")):
        with pytest.raises(InputError) as exc:
            hm.online.GreedyRebalancer(*args)
        assert exc.value.field == field
    opts = hm.EvalOptions()
    for args, field in ((("m", P.hardware, 8, opts), "model"), ((P.model, None, 8, opts), "hw")):
        with pytest.raises(InputError) as exc:
            hm.online.prebroadcast_count(*args)
        assert exc.value.field == field


def test_replay_of_another_models_trace_names_both_and_the_fix(case):
    P, plan = case
    ds = load_trace(Path(__file__).resolve().parents[1] / "instances" / "traces" / "deepseek_v2_lite_law_4k.npz", 64, 6)
    for tr in (ds, Trace(P.trace.layers[:1], 8, 2)):
        with pytest.raises(InputError, match="give a trace of mixtral-8x7b") as exc:
            hm.replay(P, plan, tr, batches=1, batch=8, progress=False)
        assert exc.value.field == "trace" and f"in {tr.num_layers} layers" in str(exc.value)
