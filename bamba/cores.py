"""How many threads to use when other processes already keep the cores busy.

OpenMP threads spin while they wait at a barrier. When other processes hold the cores, a
spinning thread burns the time slice its partner needs, and fine-grained parallel code (torch's
intra-op pool and the native kernels share one libgomp) runs several times slower. So a verb:

1. calls ``prepare()`` before torch is imported: it samples /proc/stat briefly and, if the cores
   our process may run on are busy, sets ``OMP_WAIT_POLICY=passive`` (libgomp reads it once,
   when torch loads it; later changes have no effect);
2. calls ``choose_threads(requested)`` once it knows the thread count it was asked for, and
   uses the answer; an oversubscribed machine is reported in one log line.

``plan_threads`` is the decision as a pure function. ``BAMBA_ADAPT_THREADS=0`` turns it all off.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

ADAPT_ENV = "BAMBA_ADAPT_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SLACK = 0.5  # cores of load we tolerate beyond an exact fit (measurement noise, our own start-up)
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class CoreLoad:
    busy: float  # cores' worth of time other processes used while we slept
    cores: int  # the cores this process may run on


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    passive: bool  # wait passively (no spinning) at OpenMP barriers
    oversubscribed: bool


def plan_threads(busy: float, cores: int, requested: int) -> ThreadPlan:
    """Threads and wait policy for ``requested`` threads on ``cores`` of which ``busy`` are
    taken: unchanged when they fit, else as many threads as cores are free (at least one),
    waiting passively."""
    if cores < 1 or requested < 1:
        raise ValueError(f"cores and requested threads must be >= 1, got {cores}, {requested}")
    free = cores - max(0.0, busy)
    if requested <= free + SLACK:
        return ThreadPlan(requested, passive=False, oversubscribed=False)
    return ThreadPlan(max(1, min(requested, int(free + SLACK))), passive=True, oversubscribed=True)


def read_cpu_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """CPU index -> (busy, total) jiffies since boot (iowait counts as idle)."""
    times = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_cores(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               cpus: set[int]) -> float:
    """Cores' worth of busy time on ``cpus`` between two ``read_cpu_times`` samples."""
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        spent, total = (a - b for a, b in zip(after[cpu], before[cpu]))
        busy += spent / total if total > 0 else 0.0
    return busy


def measure_load(seconds: float = SAMPLE_SECONDS) -> CoreLoad | None:
    """Busy cores among those we may run on, sampled over ``seconds`` (None off Linux)."""
    try:
        cpus = set(os.sched_getaffinity(0))
        before = read_cpu_times()
        time.sleep(seconds)
        after = read_cpu_times()
    except (OSError, AttributeError, ValueError):
        return None
    return CoreLoad(busy=busy_cores(before, after, cpus), cores=len(cpus))


_load: CoreLoad | None = None


def prepare() -> CoreLoad | None:
    """Measure the load and choose passive OpenMP waiting if our cores are taken; call before
    torch is imported (else the wait policy cannot change and only the thread count adapts)."""
    global _load
    if os.environ.get(ADAPT_ENV, "1") == "0":
        return None
    _load = measure_load()
    if _load is None or WAIT_POLICY_ENV in os.environ:
        return _load
    if plan_threads(_load.busy, _load.cores, _load.cores).passive and "torch" not in sys.modules:
        os.environ[WAIT_POLICY_ENV] = "passive"
    return _load


def choose_threads(requested: int | None) -> int | None:
    """The thread count to use for ``requested`` (None: torch's default, one per core) under
    the load ``prepare`` measured (measured now if it did not run): ``requested`` itself unless
    the cores are oversubscribed, which is logged in one line."""
    load = None if os.environ.get(ADAPT_ENV, "1") == "0" else _load or prepare()
    if load is None:
        return requested
    want = requested or load.cores
    plan = plan_threads(load.busy, load.cores, want)
    if not plan.oversubscribed:
        return requested
    waiting = os.environ.get(WAIT_POLICY_ENV, "active (spinning)")
    log.warning("other processes keep %.1f of the %d cores busy: using %d thread%s instead of %d, "
                "OpenMP waiting %s (%s=0 keeps the requested count)", load.busy, load.cores,
                plan.threads, "" if plan.threads == 1 else "s", want, waiting, ADAPT_ENV)
    return plan.threads


def in_passing_thread(work: Callable[[], T]) -> T:
    """``work()`` run in a thread that ends when it returns (its result or exception comes back).

    For loading a model that another thread will run. Measured: a request decoded on the
    engine's thread took 1.25 s with the model built on the main thread and 0.82 s with it built
    on a thread that had ended (the native decode step itself 15 vs 9.5 ms). The likely cause:
    libgomp keeps a thread's OpenMP pool for as long as that thread lives, and with more pooled
    threads than cores it stops spinning at barriers and sleeps instead; a thread that ends takes
    its pool with it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = exc

    thread = threading.Thread(target=run, name="bamba-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
