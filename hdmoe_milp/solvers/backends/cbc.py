"""CBC through PuLP's model writer and bundled binary, run under our own wall-clock watch.

PuLP builds the model and writes the MPS file, the MIP start and reads the solution back; the
``cbc`` process itself is started here, because CBC's ``-sec`` limit counts CPU seconds unless told
``-timeMode elapsed`` and is not checked during its root processing, so on a loaded machine a layer
overran its limit by 40 %. Here the limit is elapsed time (CBC's CPU seconds under
``SolveParams.deterministic``, with a wall cap at twice the limit), and a process still running shortly
before the deadline (:func:`stop_reserve_s`) is sent SIGINT, on which CBC stops its search and
writes its best solution (measured: 0.9-2 s later on 4x8 layers); one still running
:func:`kill_wait_s` after the deadline is killed (no solution: the caller keeps its own
incumbent). Ctrl-C reaches CBC as well (same process group), and the process never outlives the
call.

PuLP reports no bound: the caller supplies one (the LP relaxation). There is no callback: the
outcome's ``trace`` holds the final point only (wall seconds since ``solve`` began, primal, None)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from ..linear_model import LinearModel
from .base import Backend, SolveOutcome, SolveParams, Termination, make_outcome, solver_seed

STOP_RESERVE_S = 1.0  # at most this many wall seconds before the deadline CBC is asked to stop
STOP_WAIT_S = 0.25  # at least this many wall seconds past the deadline before a CBC still running is killed


def stop_reserve_s(time_limit_s: float) -> float:
    """Wall seconds before the deadline at which CBC's own limit ends and SIGINT is sent: 10 % of
    the limit, at most :data:`STOP_RESERVE_S`."""
    return min(STOP_RESERVE_S, 0.1 * time_limit_s)


def kill_wait_s(time_limit_s: float) -> float:
    """Wall seconds after the deadline at which a CBC that has not stopped on SIGINT is killed: as
    long as it had before the deadline (:func:`stop_reserve_s`), at least :data:`STOP_WAIT_S`."""
    return max(STOP_WAIT_S, stop_reserve_s(time_limit_s))


def _build(model: LinearModel):  # noqa: ANN202 (a pulp problem and its variables)
    import pulp

    prob = pulp.LpProblem("layer", pulp.LpMinimize)
    xs = []
    for j, name in enumerate(model.names):
        cat = pulp.LpInteger if model.integer[j] else pulp.LpContinuous
        if model.integer[j] and model.lb[j] >= 0 and model.ub[j] <= 1:
            cat = pulp.LpBinary
        xs.append(pulp.LpVariable(name, lowBound=model.lb[j], upBound=model.ub[j], cat=cat))
    prob += pulp.LpAffineExpression([(xs[j], c) for j, c in enumerate(model.c) if c != 0]) + model.obj_const
    A = model.A
    for r in range(model.num_rows):
        lo, hi = model.row_lo[r], model.row_hi[r]
        sl = slice(A.indptr[r], A.indptr[r + 1])
        expr = pulp.LpAffineExpression(list(zip((xs[j] for j in A.indices[sl]), A.data[sl], strict=True)))
        if lo == hi:
            prob += expr == lo
        else:
            if np.isfinite(lo):
                prob += expr >= lo
            if np.isfinite(hi):
                prob += expr <= hi
    return prob, xs


def run_until(args: list[str], stop_at: float, kill_at: float, verbose: bool) -> str:
    """Run ``args``; at ``stop_at`` (``time.perf_counter()`` seconds) send it SIGINT, at ``kill_at``
    kill it. Returns ``"exited"``, ``"stopped"`` (exited after SIGINT) or ``"killed"``. The process
    never outlives the call: Ctrl-C kills it too, and so does SIGTERM to this process (how a process
    pool stops its workers), which then takes its usual course."""
    out = None if verbose else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    restore = _kill_on_sigterm(proc)
    try:
        try:
            proc.wait(timeout=max(stop_at - time.perf_counter(), 0.0))
            return "exited"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
        try:
            proc.wait(timeout=max(kill_at - time.perf_counter(), 0.0))
            return "stopped"
        except subprocess.TimeoutExpired:
            return "killed"
    finally:
        restore()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_on_sigterm(proc: subprocess.Popen) -> Callable[[], None]:
    """While ``proc`` runs, SIGTERM to this process kills ``proc`` first and is then re-delivered
    to the handler it replaced. Returns the function that puts that handler back. Only in the main
    thread of a POSIX process (elsewhere Python cannot set handlers): a no-op there."""
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # set outside Python: the default is the best we can put back
        previous = signal.SIG_DFL

    def on_term(signum: int, frame: object) -> None:
        # not proc.poll()/wait(): the signal may land while the interrupted proc.wait(timeout) holds
        # Popen's (non-reentrant) waitpid lock, and waiting on it here would hang this process forever
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                os.waitpid(proc.pid, 0)  # reap it: a container's pid 1 may not
            except (ProcessLookupError, ChildProcessError):
                pass
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


class CbcBackend(Backend):
    name = "cbc"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pulp") is not None

    def solve(self, model: LinearModel, params: SolveParams) -> SolveOutcome:
        import pulp

        t_start = time.perf_counter()
        deadline = t_start + params.time_limit_s  # wall s, translation included
        prob, xs = _build(model)
        cmd = pulp.PULP_CBC_CMD(msg=params.verbose)
        with tempfile.TemporaryDirectory(prefix="hdmoe-cbc-") as tmp:
            mps, mst, sol = (os.path.join(tmp, f"layer.{ext}") for ext in ("mps", "mst", "sol"))
            vs, vnames, cnames, _ = prob.writeMPS(mps, rename=1)
            args = [cmd.path, mps]
            if params.hint is not None:
                hint = np.clip(params.hint, model.lb, model.ub)
                for j, v in enumerate(hint):
                    xs[j].setInitialValue(float(round(v)) if model.integer[j] else float(v))
                cmd.writesol(mst, prob, vs, vnames, cnames)
                args += ["-mips", mst]
            if params.deterministic:
                # CBC's own CPU seconds: machine load does not change the answer; the wall clock
                # only caps the run, at twice the limit (as CP-SAT's deterministic mode)
                stop_at = t_start + 2.0 * params.time_limit_s
                sec, mode, kill_at = params.time_limit_s, "cpu", stop_at + kill_wait_s(params.time_limit_s)
            else:
                stop_at = deadline - stop_reserve_s(params.time_limit_s)
                sec, mode = max(stop_at - time.perf_counter(), 0.01), "elapsed"
                kill_at = deadline + kill_wait_s(params.time_limit_s)
            seed = str(solver_seed(params.seed) + 1)
            args += ["-sec", f"{sec:.3f}", "-timeMode", mode, "-ratio", repr(params.gap)]
            if params.threads > 1:  # "-threads 1" still starts a tree thread, which now and then deadlocks
                args += ["-threads", str(params.threads)]
            args += ["-randomSeed", seed, "-randomCbcSeed", seed, "-solve", "-printingOptions", "all",
                     "-solution", sol]
            try:
                how = run_until(args, stop_at, kill_at, params.verbose)
            except OSError as exc:
                return make_outcome(self.name, model, Termination.ERROR, None, None, f"CBC: {exc}", started=t_start)
            # deterministic: CBC stops on its CPU seconds; the wall clock stopping it instead means the
            # machine's load decided this answer (say so, as CP-SAT's safety net does)
            capped = bool(params.deterministic and how != "exited")
            if how == "killed" or not os.path.exists(sol):  # stopped before writing one: the time limit
                msg = {"killed": "CBC: killed at the time limit", "stopped": "CBC: stopped at the time limit before "
                       "writing a solution"}.get(how, "CBC wrote no solution")
                term = Termination.ERROR if how == "exited" else Termination.NO_SOLUTION
                return make_outcome(self.name, model, term, None, None, msg, started=t_start, wall_capped=capped)
            _, values, _, _, _, ss = cmd.readsol_MPS(sol, prob, vs, vnames, cnames)
        msg = f"CBC {how}, sol_status {ss}"
        if ss in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            x = np.array([float(values.get(v.name, 0.0) or 0.0) for v in xs])
            optimal = ss == pulp.LpSolutionOptimal and how == "exited"
            st = Termination.OPTIMAL if optimal else Termination.FEASIBLE
            return make_outcome(self.name, model, st, x, None, msg, started=t_start, wall_capped=capped)
        if ss == pulp.LpSolutionInfeasible:
            return make_outcome(self.name, model, Termination.INFEASIBLE, None, None, "CBC: infeasible",
                                started=t_start)
        if ss == pulp.LpSolutionNoSolutionFound:
            return make_outcome(self.name, model, Termination.NO_SOLUTION, None, None,
                                "CBC: no solution within the limits", started=t_start)
        return make_outcome(self.name, model, Termination.ERROR, None, None, f"CBC: sol_status {ss}", started=t_start)
