"""Replay a trace batch by batch under an online policy and score every batch with the evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..errors import MAX_BATCHES, InputError, check_choice, check_seed, expect_instance, expect_int, freeze_arrays
from ..evaluator import EvalOptions, evaluate
from ..hardware import Hardware
from ..moe import MoEModel
from ..placement import Placement
from ..workload import Trace, check_window, iter_batches
from .policies import make_policy


@dataclass(frozen=True)
class ReplayResult:
    """Per batch: ``latency_s`` (TBT under the policy's placement plus the weight-move time charged
    to it), ``migration_s``, ``bytes_moved``, ``actions``, ``decide_s_per_layer``, ``tokens``."""

    policy: str
    latency_s: np.ndarray
    migration_s: np.ndarray
    bytes_moved: np.ndarray
    actions: np.ndarray
    decide_s_per_layer: np.ndarray
    tokens: np.ndarray

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def __repr__(self) -> str:
        return (f"ReplayResult({self.policy!r}: {len(self.latency_s)} batches, mean "
                f"{float(np.mean(self.latency_s)) * 1e6:.1f} us per step; .summary(), .to_frame())")

    def to_frame(self) -> pd.DataFrame:
        """One row per batch, in replay order: ``batch`` (index), ``tokens``, ``latency_us`` (TBT plus
        the move time charged), ``migration_us``, ``bytes_moved``, ``actions``,
        ``decide_us_per_layer``; ``policy`` repeated on every row."""
        return pd.DataFrame({
            "policy": self.policy,
            "batch": np.arange(len(self.latency_s)),
            "tokens": self.tokens.astype(int),
            "latency_us": self.latency_s * 1e6,
            "migration_us": self.migration_s * 1e6,
            "bytes_moved": self.bytes_moved,
            "actions": self.actions.astype(int),
            "decide_us_per_layer": self.decide_s_per_layer * 1e6,
        })

    def summary(self) -> dict[str, Any]:
        """Per-token latency statistics (every token of a batch sees that batch's TBT), in us;
        ``migration_us``, ``bytes_moved`` and ``actions`` are totals over the batches."""
        lat = self.latency_s * 1e6
        w = self.tokens / self.tokens.sum()
        return {
            "policy": self.policy,
            "batches": int(len(lat)),
            "tokens": int(self.tokens.sum()),
            "mean_us": float(lat @ w),
            "p50_us": float(np.percentile(np.repeat(lat, self.tokens.astype(int)), 50)),
            "p99_us": float(np.percentile(np.repeat(lat, self.tokens.astype(int)), 99)),
            "migration_us": float(self.migration_s.sum() * 1e6),
            "bytes_moved": float(self.bytes_moved.sum()),
            "actions": int(self.actions.sum()),
            "decide_us_per_layer_mean": float(self.decide_s_per_layer.mean() * 1e6),
            "decide_us_per_layer_max": float(self.decide_s_per_layer.max(initial=0.0) * 1e6),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`summary` plus ``per_batch``, the columns of :meth:`to_frame` as lists."""
        per_batch = {k: v.tolist() for k, v in self.to_frame().drop(columns="policy").items()}
        return {**self.summary(), "per_batch": per_batch}


def replay(plan: Placement, model: MoEModel, hw: Hardware, trace: Trace, batch: int, policy: str,
           *, batches: int = 50, batching: str = "contiguous", seed: int = 0,
           options: EvalOptions | None = None, progress: bool | None = False, **policy_kw) -> ReplayResult:
    """Stream ``batches`` batches of ``batch`` tokens from ``trace``; before each, the policy decides
    from what it observed so far; the batch is scored by the evaluator on its observed tokens.
    Default options: the evaluator's defaults with the online stage's ``balanced`` dispatch.
    ``progress``: a bar over batches on stderr (None: on in a terminal). ``policy_kw``: the policy's
    settings (see :func:`make_policy`). Everything is checked before the first batch."""
    expect_instance("trace", trace, Trace, "use hm.load_trace(path, num_experts, top_k)")
    expect_instance("model", model, MoEModel, "use hm.get_model(name)")
    expect_instance("plan", plan, Placement, "use hm.place(problem, name) or hm.load_plan(path, problem)")
    if trace.num_experts != model.num_experts or trace.top_k != model.top_k:
        raise InputError("trace", f"routes each token to top-{trace.top_k} of {trace.num_experts} experts, "
                         f"{model.name} to top-{model.top_k} of {model.num_experts}",
                         f"give a trace of {model.name}: hm.load_trace(path, {model.num_experts}, {model.top_k})")
    if trace.num_layers != plan.num_layers:
        raise InputError("trace", f"has {trace.num_layers} layers, the plan {plan.num_layers}",
                         f"give a trace of {model.name} with every MoE layer")
    batch = expect_int("batch", batch, minimum=1, why="tokens per batch")
    batches = expect_int("batches", batches, minimum=1, maximum=MAX_BATCHES, why="batches to replay")
    check_choice("batching", batching, ("random", "contiguous"))
    check_window("batch", batch, batching, trace, "lower batch or use batching='random'")
    seed = check_seed(seed)
    expect_instance("options", options, EvalOptions, "give hm.EvalOptions(...) or leave it out", optional=True)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise InputError("progress", f"must be True, False or None, got {progress!r:.60}",
                         "None shows the bar in a terminal only")
    opts = options or EvalOptions(replica_rule="balanced")
    pol = make_policy(policy, plan, model, hw, batch, opts, **policy_kw)
    lat, mig, byt, act, dec, tok = [], [], [], [], [], []
    batches_iter = iter_batches(trace, batch, batching, seed, count=batches)
    bar = tqdm(batches_iter, total=batches, desc=policy, unit="batch", leave=False,
               disable=None if progress is None else not progress)
    for j, wl in enumerate(bar):
        if hasattr(pol, "peek"):
            pol.peek(wl)
        d = pol.decide(j)
        ev = evaluate(d.placement, model, hw, wl, opts)
        lat.append(ev.tbt_s + d.migration_s)
        mig.append(d.migration_s)
        byt.append(d.bytes_moved)
        act.append(d.actions)
        dec.append(d.decide_s_per_layer)
        tok.append(wl.batch_size)
        pol.observe(wl.expert_loads(), wl)
    return ReplayResult(policy, *(np.asarray(x, dtype=float) for x in (lat, mig, byt, act, dec, tok)))
