"""CBC runs under our own wall-clock watch: SIGINT shortly before the deadline, kill after it."""

from __future__ import annotations

import os
import sys
import time

import pytest

from hdmoe_milp.solvers.backends.cbc import STOP_RESERVE_S, run_until, stop_reserve_s

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGINT semantics are POSIX")

TRAP = "import signal, sys, time; signal.signal(signal.SIGINT, {handler}); time.sleep(60)"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_process_that_finishes_is_left_alone():
    t0 = time.perf_counter()
    assert run_until(_py("pass"), t0 + 30, t0 + 31, False) == "exited"
    assert time.perf_counter() - t0 < 10


def test_sigint_at_the_stop_time_lets_the_process_finish():
    t0 = time.perf_counter()
    how = run_until(_py(TRAP.format(handler="lambda *a: sys.exit(0)")), t0 + 1.0, t0 + 20, False)
    took = time.perf_counter() - t0
    assert how == "stopped" and 1.0 <= took < 10


def test_a_process_deaf_to_sigint_is_killed_at_the_kill_time():
    t0 = time.perf_counter()
    # 2 s: time for the interpreter to start and install its handler, even on a loaded machine
    how = run_until(_py(TRAP.format(handler="signal.SIG_IGN")), t0 + 2.0, t0 + 3.0, False)
    took = time.perf_counter() - t0
    assert how == "killed" and 3.0 <= took < 10


@pytest.mark.parametrize(("limit", "reserve"), [(0.5, 0.05), (5.0, 0.5), (10.0, 1.0), (600.0, STOP_RESERVE_S)])
def test_stop_reserve_is_a_tenth_of_the_limit_capped(limit, reserve):
    assert stop_reserve_s(limit) == pytest.approx(reserve)
