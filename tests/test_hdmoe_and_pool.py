"""HD-MoE re-implementation, whole-model solves (process pool, Ray) and determinism."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from hdmoe_milp import EvalOptions, Hardware, Mesh, MoEModel, expected_workload
from hdmoe_milp.evaluator import evaluate
from hdmoe_milp.strategies import build
from hdmoe_milp.strategies.block_milp import SolveParams, solve_model
from hdmoe_milp.strategies.hdmoe import hdmoe_layer, hdmoe_placement, link_balance, node_balance, wrap_shares
from hdmoe_milp.synthetic import synthetic_trace

M = MoEModel("t8", num_experts=8, top_k=2, hidden=512, expert_intermediate=1024, moe_layers=3)
HW = Hardware(Mesh(2, 4), compute_flops=2e10, link_bw_bytes_per_s=2e9)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(M, 600, seed=4)


def test_hdmoe_stage1_beats_or_equals_its_starts(trace):
    """With a solver budget, stage 1 runs CP-SAT from the better of EP-LPT and wrap and returns a
    plan whose stage-1 objective is no worse than that start's."""
    f = trace.frequencies()[0]
    start, info0 = node_balance(M, HW, f, trace.coactivation(0), 64, backend="cpsat", work_limit=0.0, seed=0)
    assert info0["status"] in ("start (no solver budget)", "start-within-gap") and info0["source"] in ("ep-lpt", "wrap")
    shares, info = node_balance(M, HW, f, trace.coactivation(0), 64, backend="cpsat", work_limit=1.0, gap=0.0, seed=0)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert info["binaries"] > 0 and info["status"] in ("optimal", "feasible")  # the solver ran
    assert info["objective_us"] <= info0["objective_us"] + 1e-9
    assert info["gamma"] > 0 and info["bound_us"] <= info["objective_us"] + 1e-9


def test_link_balance_never_increases_comm(trace):
    shares = build("ep", M, HW, trace.frequencies(), seed=2).layers[0].shares
    ids, fg = trace.coactivation(0)
    w = fg * 64 * M.hidden * M.activation_bytes
    perm = link_balance(HW, shares, ids, w, seed=0, evals=100)
    assert sorted(perm.tolist()) == list(range(8))
    mapped = np.zeros_like(shares)
    mapped[:, perm] = shares
    from hdmoe_milp import Placement

    wl = expected_workload(trace, 64)
    before = evaluate(Placement.from_shares([shares] * 3), M, HW, wl)
    after = evaluate(Placement.from_shares([mapped] * 3), M, HW, wl)
    assert after.comm_s[0] <= before.comm_s[0] + 1e-15


def test_hdmoe_strategy_is_deterministic(trace):
    f = trace.frequencies()
    groups = [trace.coactivation(li) for li in range(3)]
    a = build("hdmoe", M, HW, f, coactivation=groups, batch=64, time_limit_s=1)
    b = build("hdmoe", M, HW, f, coactivation=groups, batch=64, time_limit_s=1)
    assert a.strategy == "hdmoe" and a.num_layers == 3
    wl = expected_workload(trace, 64)
    assert evaluate(a, M, HW, wl).tbt_s == pytest.approx(evaluate(b, M, HW, wl).tbt_s, rel=1e-9)


def test_hdmoe_default_is_load_insensitive(trace):
    """The default budget reads no clock: wall-time limits and the backend do not change the answer."""
    f = trace.frequencies()
    groups = [trace.coactivation(li) for li in range(3)]
    a = hdmoe_placement(M, HW, f, coactivation=groups, batch=64)
    b = hdmoe_placement(M, HW, f, coactivation=groups, batch=64, time_limit_s=1e-3, backend="cbc")
    for x, y in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(x.shares, y.shares)


def test_hdmoe_solver_path_never_worse_than_start(trace):
    f = trace.frequencies()[1]
    g = trace.coactivation(1)
    start, s0 = node_balance(M, HW, f, g, 64)
    shares, s1 = node_balance(M, HW, f, g, 64, work_limit=0.2, gap=0.0)
    assert s1["status"] not in ("start-within-gap", "start (no solver budget)")
    assert s1["objective_us"] <= s0["objective_us"] + 1e-12
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)


def test_hdmoe_layer_matches_strategy(trace):
    f = trace.frequencies()
    groups = [trace.coactivation(li) for li in range(3)]
    whole = hdmoe_placement(M, HW, f, seed=3, coactivation=groups, batch=64)
    for li in range(3):
        lp, info = hdmoe_layer(M, HW, f[li], groups[li], 64, seed=3, layer=li)
        np.testing.assert_array_equal(lp.shares, whole.layers[li].shares)
        assert info == whole.meta["stage1"][li]


def test_wrap_shares_balance():
    rng = np.random.default_rng(0)
    for E, D in ((8, 32), (64, 32), (16, 4)):
        f = rng.pareto(1.2, E) + 0.01
        f[0] = 0.0
        s = wrap_shares(f, D)
        np.testing.assert_allclose(s.sum(axis=1), 1.0)
        np.testing.assert_allclose(f @ s, f.sum() / D, rtol=1e-9)
        assert (s > 0).sum() <= E + D - 1


M4 = MoEModel("t4", num_experts=4, top_k=2, hidden=512, expert_intermediate=1024, moe_layers=3)
HW4 = Hardware(Mesh(2, 2), compute_flops=2e10, link_bw_bytes_per_s=2e9)


def test_pool_matches_serial():
    tr = synthetic_trace(M4, 400, seed=1)
    f = tr.frequencies()
    groups = [tr.coactivation(li) for li in range(3)]
    params = SolveParams(time_limit_s=10, gap=1e-6)
    serial = solve_model(M4, HW4, f, 64, backend="cpsat", params=params, coactivation=groups)
    pooled = solve_model(M4, HW4, f, 64, backend="cpsat", params=params, coactivation=groups, jobs=2)
    for a, b in zip(serial.layers, pooled.layers, strict=True):
        assert a.objective_s == pytest.approx(b.objective_s, rel=1e-9)
        assert a.status == b.status and a.gap == pytest.approx(b.gap, abs=1e-12)
    wl = expected_workload(tr, 64)
    # objective_s is the evaluator's (default options), model_objective_s the block MILP's (coalesce="block")
    ev = evaluate(serial.placement, M4, HW4, wl, EvalOptions())
    np.testing.assert_allclose(ev.layer_s, [r.objective_s for r in serial.layers], rtol=1e-9)
    ev = evaluate(serial.placement, M4, HW4, wl, EvalOptions(coalesce="block"))
    np.testing.assert_allclose(ev.layer_s, [r.model_objective_s for r in serial.layers], rtol=1e-9)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (pip install '.[ray]')")
def test_ray_executor():
    f = synthetic_trace(M4, 400, seed=1).frequencies()
    params = SolveParams(time_limit_s=10, gap=1e-6)
    local = solve_model(M4, HW4, f, 64, backend="cpsat", params=params)
    remote = solve_model(M4, HW4, f, 64, backend="cpsat", params=params, executor="ray")
    for a, b in zip(local.layers, remote.layers, strict=True):
        assert a.objective_s == pytest.approx(b.objective_s, rel=1e-9)


@pytest.mark.parametrize("when", ["init", "wait"])
def test_ctrl_c_under_the_ray_executor_returns_the_finished_tasks_and_shuts_ray_down(when, monkeypatch):
    """As the local pool: Ctrl-C comes back as TasksInterrupted with the finished results (so `solve`
    writes its partial plan), and the Ray instance the run started is shut down, also when the
    Ctrl-C lands while Ray starts (it was left running, and the process could crash at exit)."""
    import types

    from hdmoe_milp.solvers.tasks import TasksInterrupted, run_tasks

    calls = []

    class Ref:
        def __init__(self, v):
            self.v = v

    def init(**kw):
        calls.append("init")
        if when == "init":
            raise KeyboardInterrupt

    def wait(pending, num_returns=1):
        if len(pending) == 1:  # the first task finished, then Ctrl-C
            raise KeyboardInterrupt
        return pending[:1], pending[1:]

    fake = types.SimpleNamespace(
        is_initialized=lambda: False, init=init, shutdown=lambda: calls.append("shutdown"),
        remote=lambda **kw: (lambda fn: types.SimpleNamespace(remote=lambda t: Ref(fn(t)))),
        wait=wait, get=lambda r: r.v, cancel=lambda r, force=False: calls.append("cancel"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(TasksInterrupted) as e:
        run_tasks(abs, [-1, -2], executor="ray")
    assert e.value.results == ([None, None] if when == "init" else [1, None])
    assert calls == (["init", "shutdown"] if when == "init" else ["init", "cancel", "shutdown"])


def test_one_ray_instance_per_executor_session(monkeypatch):
    """A solve makes two run_tasks calls and a bench grid two per point: inside one
    executor_session Ray starts once and is shut down once, at the end (each call started and
    stopped its own, 5 s or more a time). No tasks start no Ray; a Ray already running is left up;
    a Ctrl-C while Ray starts inside a session still shuts it down."""
    import types

    from hdmoe_milp.solvers.tasks import TasksInterrupted, executor_session, run_tasks

    calls = []
    state = {"up": False, "fail_init": False}

    def init(**kw):
        calls.append("init")
        state["up"] = True
        if state["fail_init"]:
            raise KeyboardInterrupt

    def shutdown():
        calls.append("shutdown")
        state["up"] = False

    class Ref:
        def __init__(self, v):
            self.v = v

    fake = types.SimpleNamespace(
        is_initialized=lambda: state["up"], init=init, shutdown=shutdown,
        remote=lambda **kw: (lambda fn: types.SimpleNamespace(remote=lambda t: Ref(fn(t)))),
        wait=lambda pending, num_returns=1: (pending[:1], pending[1:]), get=lambda r: r.v,
        cancel=lambda r, force=False: None)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert run_tasks(abs, [], executor="ray") == [] and calls == []
    with executor_session("ray"):
        assert run_tasks(abs, [-1, -2], executor="ray") == [1, 2]
        assert run_tasks(abs, [], executor="ray") == []
        assert run_tasks(abs, [-3], executor="ray") == [3]
        assert calls == ["init"]
    assert calls == ["init", "shutdown"] and not state["up"]
    calls.clear()
    assert run_tasks(abs, [-1], executor="ray") == [1]  # outside a session: its own, as before
    assert calls == ["init", "shutdown"]
    calls.clear()
    state["up"] = True  # already running (ray.init by the user): left up
    with executor_session("ray"):
        run_tasks(abs, [-1], executor="ray")
    assert calls == [] and state["up"]
    state.update(up=False, fail_init=True)
    with pytest.raises(TasksInterrupted), executor_session("ray"):
        run_tasks(abs, [-1], executor="ray")
    assert calls == ["init", "shutdown"] and not state["up"]
    with executor_session("local"):  # nothing to keep
        assert run_tasks(abs, [-1, -2], jobs=1) == [1, 2]


def test_the_hdmoe_layer_inside_a_wall_mode_solve_gets_a_share_of_the_layers_limit(monkeypatch):
    """A layer's limit counts its hdmoe warm start too: with `--work-limit` its stage-1 CP-SAT solve ran
    on a cap of max(limit, 60 x work limit), and a 1 s layer took 3.85 s. In wall mode it now gets
    HDMOE_WALL_SHARE of the limit (a hard cap); in deterministic mode its work limit, as before."""
    import hdmoe_milp.strategies.block_milp.solve as sv
    from hdmoe_milp.strategies import hdmoe as hd_mod

    caps = []
    real = sv.hdmoe_layer

    def spy(*a, **kw):
        caps.append(kw.get("wall_cap_s"))
        return real(*a, **kw)

    monkeypatch.setattr(sv, "hdmoe_layer", spy)
    f = synthetic_trace(M4, 400, seed=2).frequencies()
    for det in (False, True):
        sv.layer_baselines(M4, HW4, f[0], 64, backend="cpsat", params=SolveParams(time_limit_s=2.0, deterministic=det),
                           freqs_all=f, hdmoe_work_limit=0.5)
    assert caps == [sv.HDMOE_WALL_SHARE * 2.0, None]

    # the cap binds: a large work limit under a short cap ends on the cap, and says the answer is the machine's
    calls = []
    real_solve = hd_mod.get_backend("cpsat").solve

    class Spy:
        def solve(self, lm, params):
            calls.append(params.time_limit_s)
            return real_solve(lm, params)

    monkeypatch.setattr(hd_mod, "get_backend", lambda name: Spy())
    import hdmoe_milp as hm

    m, hw = hm.get_model("deepseek-v2-lite"), hm.make_hardware("5/50", "4x4")
    tr = synthetic_trace(m, 1000, seed=2)
    _, info = node_balance(m, hw, tr.frequencies()[0], tr.coactivation(0), 128, work_limit=100.0, time_limit_s=1.0,
                           wall_cap_s=0.3, gap=0.0)
    assert calls == [0.3]  # the cap, not max(1 s, 6000 s)
    assert info["wall_capped"] and info["deterministic"] is False
