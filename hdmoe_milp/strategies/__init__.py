"""Placement strategies, one registry, one protocol: ``place(problem, *, seed, budget) -> Placement``.

Baselines: ``tp``, ``ep`` (seeded random, as in the paper), ``ep-lpt`` (load-balanced), ``cb``
(compute-balanced hybrid), ``eplb`` (DeepSeek EPLB-style greedy), ``hdmoe`` (HD-MoE
re-implementation). Also ``eplb-redundant``: EPLB with one redundant slot per node (replicas of the
hottest experts), not among the baselines that ``solve`` and ``bench`` compare, since one copy per
expert is the MILP's family. Ours: ``milp`` (the offline block MILP, per layer; the pipeline's ``solve``
combines it with the baselines and reports its gaps).

The domain functions behind them (``tensor_parallel(model, hw, freqs)`` and so on) take the
model, the hardware and per-layer frequencies ``[layers, E]``; :func:`build` calls a strategy by
name from those alone.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

from ..errors import check_choice, check_seed, expect_instance
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from ..problem import Budget, Problem
from ..solvers import SolveParams
from .block_milp import MilpOptions, solve_model
from .cb import compute_balanced
from .ep import expert_parallel, expert_parallel_lpt
from .eplb import eplb_placement, rebalance_experts
from .hdmoe import hdmoe_placement
from .tp import tensor_parallel


class Strategy(Protocol):
    """What every entry of :data:`STRATEGIES` is."""

    def __call__(self, problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement: ...


def _checked(fn: Strategy) -> Strategy:
    """The registry's entries check their arguments themselves, so a direct call
    (``STRATEGIES["ep"](problem, seed=...)``) is refused as :func:`place` would refuse it: a seed
    must be a whole number (``None`` would draw unseeded randomness)."""
    @functools.wraps(fn)
    def run(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
        expect_instance("problem", problem, Problem, "use hm.load_instance(path) or hm.Problem(...)")
        expect_instance("budget", budget, Budget, "use hm.Budget(...)", optional=True)
        return fn(problem, seed=check_seed(seed), budget=budget)
    return run


@_checked
def _tp(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    return tensor_parallel(problem.model, problem.hardware, problem.frequencies, seed=seed)


@_checked
def _ep(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    return expert_parallel(problem.model, problem.hardware, problem.frequencies, seed=seed)


@_checked
def _ep_lpt(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    return expert_parallel_lpt(problem.model, problem.hardware, problem.frequencies, seed=seed,
                               batch=problem.batch)


@_checked
def _cb(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    return compute_balanced(problem.model, problem.hardware, problem.frequencies, seed=seed)


@_checked
def _eplb(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    return eplb_placement(problem.model, problem.hardware, problem.frequencies, seed=seed)


@_checked
def _eplb_redundant(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    # one redundant slot per node, DeepSeek's deployed ratio (256 experts + 32 redundant on 32 GPUs)
    plan = eplb_placement(problem.model, problem.hardware, problem.frequencies, seed=seed,
                          extra_replicas=problem.hardware.num_nodes)
    return Placement(plan.layers, "eplb-redundant", plan.meta)


@_checked
def _hdmoe(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    b = budget or Budget()
    kw = {} if b.work_limit is None else {"work_limit": b.work_limit}
    return hdmoe_placement(problem.model, problem.hardware, problem.frequencies, seed=seed,
                           coactivation=problem.coactivation, batch=problem.batch, time_limit_s=b.time_limit_s,
                           backend=b.backend, **kw)


@_checked
def _milp(problem: Problem, *, seed: int = 0, budget: Budget | None = None) -> Placement:
    b = budget or Budget()
    params = SolveParams(time_limit_s=b.time_limit_s, threads=b.threads, seed=seed, gap=b.gap)
    return solve_model(problem.model, problem.hardware, problem.frequencies, problem.batch, backend=b.backend,
                       params=params, options=MilpOptions(delivery=problem.options.resolved_delivery),
                       coactivation=problem.coactivation).placement


STRATEGIES: dict[str, Strategy] = {
    "tp": _tp,
    "ep": _ep,
    "ep-lpt": _ep_lpt,
    "cb": _cb,
    "eplb": _eplb,
    "eplb-redundant": _eplb_redundant,
    "hdmoe": _hdmoe,
    "milp": _milp,
}
BASELINES: tuple[str, ...] = ("tp", "ep", "ep-lpt", "cb", "eplb", "hdmoe")
# per strategy that solves a MILP under a Budget, the Budget fields it reads (a plan records those only:
# hdmoe runs at its own gap and one thread; milp takes no work limit)
USES_BUDGET: dict[str, tuple[str, ...]] = {"hdmoe": ("backend", "time_limit_s", "work_limit"),
                                           "milp": ("backend", "time_limit_s", "threads", "gap")}


def place(problem: Problem, name: str, *, seed: int | None = None, budget: Budget | None = None) -> Placement:
    """Run the strategy called ``name`` on ``problem`` (seed: the problem's unless given). The
    placement's ``meta`` records the problem it was made for and the strategy's settings."""
    expect_instance("problem", problem, Problem, "use hm.load_instance(path) or hm.Problem(...)")  # seed reads it
    check_choice("strategy", name, tuple(STRATEGIES))
    seed = problem.seed if seed is None else seed
    plan = STRATEGIES[name](problem, seed=seed, budget=budget)  # the entry checks seed and budget
    settings = {"strategy": name, "seed": check_seed(seed)}
    if budget is not None:  # a plan records only the settings that made it
        settings.update({k: getattr(budget, k) for k in USES_BUDGET.get(name, ())})
    if problem.trace is None:
        return Placement(plan.layers, plan.strategy, {**plan.meta, "solver": settings})
    return Placement(plan.layers, plan.strategy, {**plan.meta, "problem": problem.describe(), "solver": settings})


def build(name: str, model: MoEModel, hw: Hardware, freqs: np.ndarray, *, seed: int = 0,
          coactivation: list | None = None, batch: float = 128, time_limit_s: float = 10.0,
          backend: str = "cpsat") -> Placement:
    """Run the strategy called ``name`` from per-layer frequencies ``[layers, E]`` alone.
    ``coactivation`` (per layer ``Trace.coactivation(l)``), ``batch``, ``time_limit_s`` (per layer) and
    ``backend`` reach the strategies that solve a MILP."""
    check_choice("strategy", name, tuple(STRATEGIES))
    if name == "hdmoe":
        return hdmoe_placement(model, hw, freqs, seed=seed, coactivation=coactivation, batch=batch,
                               time_limit_s=time_limit_s, backend=backend)
    if name == "milp":
        return solve_model(model, hw, freqs, batch, backend=backend, coactivation=coactivation,
                           params=SolveParams(time_limit_s=time_limit_s, seed=seed)).placement
    problem = Problem(model, hw, frequencies=freqs, batch=batch)
    return STRATEGIES[name](problem, seed=seed)


__all__ = [
    "BASELINES", "STRATEGIES", "USES_BUDGET", "Strategy", "build", "compute_balanced", "eplb_placement",
    "expert_parallel", "expert_parallel_lpt", "hdmoe_placement", "place", "rebalance_experts", "tensor_parallel",
]
