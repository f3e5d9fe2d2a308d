"""Policy server, CPU threads: size the engine's torch thread team to the cores other processes leave free.

Why a fixed team collapses on a shared CPU: torch splits each op of a forward pass over an OpenMP team and
ends it at a barrier, so an op lasts as long as its slowest thread. When another CPU-bound process holds a
core, the team's thread on that core runs only in the scheduler's time slices (milliseconds) while its
partner waits at the barrier, spinning, so the free core looks busy and the straggler is not moved there.
A decode step is some hundreds of ops, each of them now waiting for a slice: on the 2-core machine this
took the server from ~200 to ~6 tokens/s. A team no larger than the free cores never waits for a thread
that is not running; on that machine, one thread with one core busy keeps most of the quiet throughput.

So the engine's worker thread calls `adjust()` before every step. At most once a `interval` it reads the
machine's busy CPU time (/proc/stat) less this process's own (/proc/self/stat): the CPUs other processes
used meanwhile (after an idle gap, over a fresh 0.1 s instead: see STALE_INTERVALS). The team is then the
CPUs left (at least 1, at most `max_threads`). OpenMP team sizes are per calling thread, so this resizes the
engine's own ops; a trainer thread that set its own size keeps it.
Off Linux (no /proc) the team stays at `max_threads`.

One team per process. Each thread that starts a torch parallel op gets its own OpenMP team (libgomp keeps a
pool of threads per starting thread), and when libgomp manages more threads than there are CPUs, its idle
team threads spin only 100 times before they sleep (GOMP_SPINCOUNT in the libgomp manual), so every op of a
decode step then waits for a sleeping thread to be woken. A process whose main thread loads the model with
the full team and whose engine worker then decodes with its own has two teams: on the 2-core machine a
bf16 decode step of 16 rows (SmolLM2-135M) took 77-101 ms on the worker, 50-67 ms on a worker whose main
thread had kept to one thread, and 47-53 ms on the main thread. So a process that only serves (`gymnb serve`)
calls `single_team_for_engine()` before loading: its own ops stay on one thread and the engine's worker
holds the only team. In-process users (a trainer beside its server) keep two teams.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

# How much of a core others may use before the team gives that core up: a light neighbour (an HTTP client,
# a logger) costs a fixed team little, a CPU-bound one costs it almost everything (see the module docstring).
SPARE_CORE_SLACK = 0.3
# A reading spanning more than this many intervals in which this process used under IDLE_CPUS covers a gap in
# which it did not compute (an idle server). It says what others did then: in `gymnb bench server`, another
# server's whole measurement (others 1.1-1.8 CPUs over 37-66 s), and the team started each of gymnb's
# measurements on one thread for its first second. Such a reading is replaced by a fresh one (`settle`, 0.1 s:
# the first step after an idle gap waits that long). A long span in which the caller computed (a trainer's
# micro-batch) is a reading like any other: what others took while it ran.
STALE_INTERVALS = 2
IDLE_CPUS = 0.5


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_cpu_ticks() -> tuple[float, int, int] | None:
    """(monotonic time, busy ticks of all CPUs, ticks of this process), or None without /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return time.monotonic(), user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])


def single_team_for_engine(threads: int | None = None) -> int:
    """Keep the calling thread's torch ops on one thread, so that the engine's worker holds the process's only
    OpenMP team (see the module docstring); returns the size that team should have: `threads`, or torch's
    default. Call it before the model is loaded, in a process that only serves."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def threads_for(others_cpus: float, cpus: int, max_threads: int) -> int:
    """The team size that leaves other processes the cores they use (see SPARE_CORE_SLACK)."""
    return max(1, min(max_threads, math.floor(cpus - others_cpus + SPARE_CORE_SLACK)))


class ThreadBudget:
    """Keeps the calling thread's torch team at the CPUs other processes leave free (see module docstring)."""

    def __init__(self, max_threads: int | None = None, *, interval: float = 1.0):
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        self.cpus = usable_cpus()
        self.threads: int | None = None  # the team size last set; None until the first adjust()
        self.others_cpus: float | None = None  # CPUs other processes used over the last interval
        self._last = read_cpu_ticks()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def adjust(self, *, due: bool = False) -> int:
        """Resize the calling thread's team if the free cores changed; returns its size. Cheap when not due
        (`due`: measure now, whatever the time since the last reading)."""
        if self.threads is None:
            self._set(self.max_threads)
        now = read_cpu_ticks()
        if now is None or self._last is None or (now[0] - self._last[0] < self.interval and not due):
            return self.threads
        seconds, own_ticks = now[0] - self._last[0], now[2] - self._last[2]
        if seconds > STALE_INTERVALS * self.interval and own_ticks / self._hz / seconds < IDLE_CPUS:
            return self.settle()  # the reading would average the idle gap: what others did then, not now
        others_ticks = (now[1] - self._last[1]) - own_ticks
        self._last = now
        self.others_cpus = max(others_ticks, 0) / self._hz / seconds
        self._set(threads_for(self.others_cpus, self.cpus, self.max_threads))
        return self.threads

    def settle(self, window: float = 0.1) -> int:
        """Size the team from a `window`-second reading taken now, for work that starts at once (a trainer's
        first forward), where `adjust` would keep the full team for its first interval; returns the size."""
        self._last = read_cpu_ticks()
        if self._last is not None:
            time.sleep(window)
        return self.adjust(due=True)

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads


@contextlib.contextmanager
def adaptive_team(max_threads: int | None = None):
    """The calling thread's team follows the free cores for a trainer's loop: yields a settled ThreadBudget
    (call its `adjust()` before each forward/backward) and restores the thread's team size afterwards.

    A trainer's ops split over a fixed team collapse as the engine's did (module docstring): `make validate`
    with one core taken by a CPU-bound process spent 86-96 s in layer 05's four forward/backward passes,
    against 9 s on a quiet machine; with one thread they take 9 s there too.
    """
    before = torch.get_num_threads()
    budget = ThreadBudget(max_threads or before)
    budget.settle()
    try:
        yield budget
    finally:
        torch.set_num_threads(before)
