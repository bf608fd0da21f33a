"""CPU threading that degrades gracefully when other processes share the cores.

torch runs its CPU kernels on an OpenMP thread pool, one thread per core by default. Beside other
CPU-bound processes that goes badly: every parallel region waits for all of its threads, a thread
that the kernel has descheduled keeps the others spinning at the barrier (OpenMP's default wait
policy busy-waits), and a tiny-model step that takes 0.7 s on an idle 2-core machine took 10-50 s
beside two busy processes. Two defaults fix that:

- `configure_cpu_env` sets `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spin)
  unless the user set it. OpenMP reads it once, when torch loads, so the CLI calls this first.
- `default_threads` gives torch one thread per core that other processes leave free, judged by the
  1-minute load average at start (at least 1, at most torch's default). `--threads N` or an
  explicit `OMP_NUM_THREADS` always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}  # GNU (torch's Linux wheels) and Intel OpenMP read it
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a user's explicit choice, never overridden


def configure_cpu_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the passive OpenMP wait policy unless the user chose one; returns what was set. Call it
    before torch is imported (the thread pool reads the policy once)."""
    env = os.environ if environ is None else environ
    done = {}
    for key, value in WAIT_POLICY.items():
        if key not in env:
            env[key] = value
            done[key] = value
    return done


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average: runnable processes, ours not yet among them at start."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def default_threads(cores: int, load: float | None, torch_default: int) -> int:
    """One torch thread per core the other processes leave free, at least 1 and at most torch's
    own default (its count of physical cores)."""
    free = cores if load is None else cores - load
    return max(1, min(torch_default, cores, round(free)))


def choose_threads(requested: int | None, torch_default: int,
                   environ: MutableMapping[str, str] | None = None) -> tuple[int | None, str]:
    """(threads to give torch, or None to keep its setting; a line saying why for the console)."""
    env = os.environ if environ is None else environ
    if requested is not None:
        return max(requested, 1), f"CPU: {max(requested, 1)} torch thread(s) (--threads)"
    if any(env.get(k) for k in THREAD_VARIABLES):  # the user's choice, already torch's
        return None, ""
    cores, load = available_cores(), load_average()
    chosen = default_threads(cores, load, torch_default)
    if chosen >= torch_default:
        return None, ""
    return chosen, (f"CPU: load {load:.1f} on {cores} core(s): torch uses {chosen} thread(s) instead of "
                    f"{torch_default} (--threads N to choose)")
