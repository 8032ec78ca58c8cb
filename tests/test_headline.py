"""The sentences bench's index.md opens with say what the numbers say, including where the MILP's own
plan (no best-of step) loses to the best baseline."""

from __future__ import annotations

import pandas as pd

from hdmoe_milp import grid
from hdmoe_milp import report as rp


def _results(milp_us: dict[int, float]) -> pd.DataFrame:
    """Two models at batches 16 and 128: tp 100 us, cb 90 us, ours = min(milp, cb), milp as given."""
    rows = []
    for model in ("a", "b"):
        for batch, milp in milp_us.items():
            for strategy, tbt in (("tp", 100.0), ("cb", 90.0), ("milp", milp), ("ours", min(milp, 90.0))):
                rows.append({"model": model, "mesh": "4x8", "hw": "5/50", "mode": "mesh", "batch": batch,
                             "part": "static", "strategy": strategy, "tbt_us": tbt, "tbt_norm_tp": tbt / 100})
    return pd.DataFrame(rows)


def _sentences(res: pd.DataFrame, solve_batch: int | None) -> list[str]:
    sp = rp.speedup_table(res, ours="ours").query("baseline != 'milp'")
    return grid.headline(res, sp, solve_batch=solve_batch)


def test_headline_says_where_the_milps_own_plan_loses():
    out = _sentences(_results({16: 120.0, 128: 80.0}), 128)
    own = [s for s in out if s.startswith("The MILP's own plan")]
    assert len(own) == 1
    assert "at 2 of the 4 points" in own[0] and "slower at 2 (down to 0.750x)" in own[0]
    assert "at batch 16, not at the batch 128 it was solved at" in own[0]
    assert "never slower" in out[0]  # ours keeps the best per layer


def test_headline_when_the_milps_own_plan_never_loses():
    own = [s for s in _sentences(_results({16: 85.0, 128: 80.0}), None) if s.startswith("The MILP's own plan")]
    assert own == ["The MILP's own plan (without the best-of step) is at least as fast as the best baseline at 4 "
                   "of the 4 points."]


def test_headline_does_not_blame_other_batches_when_the_solve_batch_loses():
    own = [s for s in _sentences(_results({16: 120.0, 128: 95.0}), 128) if s.startswith("The MILP's own plan")][0]
    assert "slower at 4" in own and "batches 16, 128" in own and "solved at" not in own


def test_headline_counts_only_the_points_where_the_milp_was_scored():
    res = _results({16: 120.0, 128: 80.0})
    res = res[~((res["strategy"] == "milp") & (res["batch"] == 16) & (res["model"] == "a"))]
    own = [s for s in _sentences(res, 128) if s.startswith("The MILP's own plan")][0]
    assert "at 2 of the 3 points where it was scored (of 4)" in own and "slower at 1" in own
    none = _results({16: 120.0, 128: 80.0})
    assert not [s for s in _sentences(none[none["strategy"] != "milp"], 128) if "MILP's own" in s]


def _online(res: pd.DataFrame, tbt: dict[str, float]) -> pd.DataFrame:
    rows = [{"model": "a", "mesh": "4x8", "hw": "5/50", "mode": "mesh", "batch": 128, "part": "online",
             "strategy": s, "tbt_us": t, "tbt_norm_tp": t / 100} for s, t in tbt.items()]
    return pd.concat([res, pd.DataFrame(rows)], ignore_index=True)


def test_headline_online_names_ours_greedy_even_where_another_policy_is_faster():
    res = _online(_results({16: 85.0, 128: 80.0}),
                  {"ours+static": 100.0, "ours+greedy": 105.0, "ours+eplb-periodic": 100.0})
    line = [s for s in _sentences(res, None) if s.startswith("Online")]
    assert line == ["Online on a drifted trace, ours+greedy averages 0.952x the speed of the static plan (mean "
                    "latency per decode step, weight moves included); the fastest policy there is "
                    "ours+eplb-periodic, at 1.000x."]
    res = _online(_results({16: 85.0, 128: 80.0}), {"ours+static": 100.0, "ours+greedy": 80.0})
    assert "ours+greedy averages 1.250x" in [s for s in _sentences(res, None) if s.startswith("Online")][0]


def test_headline_on_one_point_where_ours_is_no_faster():
    res = _results({128: 95.0})
    res = res[res["model"] == "a"]
    out = _sentences(res, 128)
    assert out[0].startswith("Over 1 grid point, ")
    assert "Ours is faster than the best baseline at no point (largest margin 1.000x)." in out
    assert not [s for s in out if "largest margin over" in s]
