"""Running independent solves (one per layer, say) serially, in a local process pool or on Ray.

Results come back in task order; the progress bar advances as each task finishes. Ctrl-C cancels
the tasks not yet started, stops the pool without waiting for the rest and raises
:class:`TasksInterrupted` (a KeyboardInterrupt) carrying the finished results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from ..errors import InputError, check_choice, expect_int, shown

EXECUTORS = ("local", "ray")


def local_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_jobs(jobs: object, executor: str = "local") -> int:
    """``jobs`` as an int: a whole number >= 1 and, in a local pool, at most this machine's CPUs
    (at least 2). Layers have wall-clock limits, so processes beyond the cores would each search
    less, and every process holds its own model in memory; Ray places tasks by their CPUs."""
    jobs = expect_int("jobs", jobs, minimum=1, why="processes")
    most = max(2, local_cpus())
    if executor == "local" and jobs > most:
        raise InputError("jobs", f"is {shown(jobs)}, more than the {local_cpus()} CPU(s) of this machine: every "
                         "layer has a wall-clock limit, so more processes than cores would each search less, and "
                         "each holds its own model in memory", f"use at most {most}, or the ray executor for a cluster")
    return jobs


class TasksInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_tasks`: ``results`` holds the finished tasks' results (None for the
    others), in task order."""

    def __init__(self, results: list[Any]) -> None:
        super().__init__("interrupted")
        self.results = results


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, jobs: int = 1, executor: str = "local",
              bar: Any = None, num_cpus: int = 1) -> list[Any]:
    """``[fn(t) for t in tasks]``, with ``jobs`` worker processes (``executor="local"``) or as Ray
    tasks of ``num_cpus`` CPUs each (``executor="ray"``: a local Ray instance, or the cluster named by
    ``RAY_ADDRESS``). ``fn`` must be a module-level function and the tasks picklable. ``bar``: a tqdm
    bar (or None)."""
    check_choice("executor", executor, EXECUTORS)
    jobs = check_jobs(jobs, executor)
    if not tasks:  # nothing to start a pool or Ray for
        return []
    if executor == "ray":
        return _run_ray(fn, tasks, bar, num_cpus)
    if jobs == 1 or len(tasks) <= 1:
        out: list[Any] = []
        try:
            for t in tasks:
                out.append(fn(t))
                if bar is not None:
                    bar.update()
        except KeyboardInterrupt:
            raise TasksInterrupted(out + [None] * (len(tasks) - len(out))) from None
        return out
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)))
    results: list[Any] = [None] * len(tasks)
    try:
        futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                results[futures[f]] = f.result()
                if bar is not None:
                    bar.update()
        pool.shutdown(wait=True)
        return results
    except KeyboardInterrupt:
        _stop(pool)
        raise TasksInterrupted(results) from None
    except BaseException:
        _stop(pool)
        raise


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: end the workers (their tasks are abandoned; the pool then fails every task
    not finished, which nobody waits for). ``shutdown(cancel_futures=True)`` alone leaves the
    interpreter waiting at exit for the tasks already handed to the workers."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("executor", "ray is not installed", "pip install '.[ray]' or use --executor local") from None
    return ray


_SESSION = {"ray": 0}  # open executor sessions: Ray stays up between run_tasks calls while one is


@contextmanager
def executor_session(executor: str) -> Iterator[None]:
    """Keep the Ray instance that a :func:`run_tasks` inside starts up until the end of the block
    (``executor="ray"``; the local pool needs nothing). Each call started and stopped its own, 5 s
    or more a time, and a solve makes two calls, a bench grid two per point. Ray is started by the
    first call, as before (a Ctrl-C while it starts is that call's), and a Ray that was already
    running is left as it is."""
    check_choice("executor", executor, EXECUTORS)
    if executor != "ray":
        yield
        return
    try:
        import ray
    except ImportError:  # run_tasks says so
        yield
        return
    running = ray.is_initialized()
    _SESSION["ray"] += 1
    try:
        yield
    finally:
        _SESSION["ray"] -= 1
        if not running and not _SESSION["ray"] and ray.is_initialized():
            ray.shutdown()


def _run_ray(fn: Callable[[Any], Any], tasks: Sequence[Any], bar: Any, num_cpus: int) -> list[Any]:
    ray = _ray()
    started = not ray.is_initialized()
    results: list[Any] = [None] * len(tasks)
    try:
        try:
            if started:  # inside the try: a Ctrl-C while Ray starts still shuts down what it started
                ray.init(ignore_reinit_error=True, log_to_driver=False)  # RAY_ADDRESS, if set, names the cluster
            remote = ray.remote(num_cpus=max(1, int(num_cpus)))(fn)
            refs = [remote.remote(t) for t in tasks]
        except KeyboardInterrupt:
            raise TasksInterrupted(results) from None
        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    results[index[r]] = ray.get(r)
                    if bar is not None:
                        bar.update()
        except KeyboardInterrupt:  # as the local pool: the finished tasks' results come back with it
            for r in pending:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001 - Ray's own processes may have had the Ctrl-C too
                    pass
            raise TasksInterrupted(results) from None
        return results
    finally:
        if started and not _SESSION["ray"]:  # inside a session, the session shuts it down
            ray.shutdown()
