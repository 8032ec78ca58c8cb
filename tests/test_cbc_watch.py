"""CBC runs under our own wall-clock watch: SIGINT shortly before the deadline, kill after it."""

from __future__ import annotations

import os
import sys
import time

import pytest

from hdmoe_milp.solvers.backends.cbc import STOP_RESERVE_S, STOP_WAIT_S, kill_wait_s, run_until, stop_reserve_s

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
    assert kill_wait_s(limit) == pytest.approx(max(reserve, STOP_WAIT_S))
    assert limit + kill_wait_s(limit) <= 1.2 * limit + 1  # the layer's time rule, before its own work


def test_sigterm_to_the_caller_ends_the_child_too(tmp_path):
    """A process pool stops its workers with SIGTERM: the solver process must not outlive them."""
    import signal
    import subprocess

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    caller = ("import sys, time; from hdmoe_milp.solvers.backends.cbc import run_until; "
              f"t = time.perf_counter(); run_until([sys.executable, '-c', {child!r}], t + 50, t + 55, False)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", caller], env={**os.environ, "PYTHONPATH": root})
    t0 = time.perf_counter()
    while not (pid_file.exists() and pid_file.read_text()) and time.perf_counter() - t0 < 30:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM  # the default action still ends the caller
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_small_cbc_solves_never_hang():
    """``-threads 1`` made CBC start a tree thread that now and then deadlocked in
    ``waitForThreadsInTree`` (about one solve in 30 of this size hung until killed): fifty small
    solves must all finish on their own, well before the wall cap (4 s) that kills a hung one."""
    import numpy as np

    from hdmoe_milp.solvers import SolveParams, Termination
    from hdmoe_milp.solvers.backends.cbc import CbcBackend
    from hdmoe_milp.strategies.cb import balance_model

    rng = np.random.default_rng(0)
    for _ in range(50):
        loads = rng.random(12) + 0.1
        t0 = time.perf_counter()
        out = CbcBackend().solve(balance_model(loads, 4), SolveParams(time_limit_s=2.0, gap=0.05, deterministic=True))
        assert out.termination in (Termination.OPTIMAL, Termination.FEASIBLE) and "killed" not in out.message
        assert time.perf_counter() - t0 < 3.0


def test_sigterm_while_a_wait_holds_popens_lock_does_not_hang():
    """SIGTERM can land while ``run_until``'s ``proc.wait(timeout)`` holds Popen's waitpid lock (a
    plain Lock, CPython internals); a handler that waited on the process through Popen then hung
    the worker for good (seen once in CI). The handler is called here with that lock held; a
    watchdog frees it after 5 s, so the old handler shows up as a 5 s stall, not a hung test."""
    import signal
    import subprocess
    import threading

    from hdmoe_milp.solvers.backends.cbc import _kill_on_sigterm

    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        restore = _kill_on_sigterm(proc)
        handler = signal.getsignal(signal.SIGTERM)
        lock = proc._waitpid_lock
        lock.acquire()
        watchdog = threading.Timer(5.0, lambda: lock.locked() and lock.release())
        watchdog.start()
        t0 = time.perf_counter()
        handler(signal.SIGTERM, None)
        took = time.perf_counter() - t0
        watchdog.cancel()
        if lock.locked():
            lock.release()
        restore()
        assert took < 2.0
        deadline = time.perf_counter() + 5
        while not seen and time.perf_counter() < deadline:  # re-delivered to the handler it replaced
            time.sleep(0.01)
        assert seen == [signal.SIGTERM]
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(proc.pid, 0)
    finally:
        signal.signal(signal.SIGTERM, before)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("deterministic", [True, False])
def test_cbc_stopped_by_the_wall_clock_in_deterministic_mode_says_so(monkeypatch, deterministic):
    """--deterministic CBC stops on its CPU seconds; where the wall cap (twice the limit) stops it
    instead, the machine's load chose the answer, and the outcome says so (``wall_capped``, which
    solve notes), as CP-SAT's safety net does. In wall mode a stop at the limit is the rule."""
    import numpy as np

    from hdmoe_milp.solvers import SolveParams
    from hdmoe_milp.solvers.backends import cbc
    from hdmoe_milp.strategies.cb import balance_model

    def stopped(*a, **k):  # CBC ran to the end, but as if the watch had to stop it
        run_until(*a, **k)
        return "stopped"

    monkeypatch.setattr(cbc, "run_until", stopped)
    loads = np.random.default_rng(1).random(8) + 0.1
    out = cbc.CbcBackend().solve(balance_model(loads, 3), SolveParams(time_limit_s=2.0, deterministic=deterministic))
    assert out.x is not None and out.wall_capped is deterministic
