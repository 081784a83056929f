"""What the machine itself gives, measured in the same run as a benchmark,
so that a speed-up can be read against it.

Shared virtual machines give less than their vCPU count: two CPU-bound
processes on this 2-vCPU machine ran 1.3 to 1.6x as fast as one, not 2x.
A benchmark whose target is a parallel speed-up prints this ceiling beside
its figure."""
from __future__ import annotations

import os
import subprocess
import sys

# Fixed pure-Python work: no I/O, no memory traffic to speak of.
SPIN = ("import time\nt = time.perf_counter()\nx = 0\nfor i in range(25_000_000): x += i * i\n"
        "print(time.perf_counter() - t)")


def machine_ceiling(processes: int) -> float:
    """The speed-up this machine gives ``processes`` CPU-bound processes,
    process i pinned to core i mod cores (as the benchmarks pin theirs),
    against one alone: processes x (time alone / slowest time together)."""
    cores = os.cpu_count() or 1

    def spin(n: int) -> float:
        procs = [subprocess.Popen(["taskset", "-c", str(i % cores), sys.executable, "-c", SPIN],
                                  stdout=subprocess.PIPE, text=True) for i in range(n)]
        return max(float(p.communicate()[0]) for p in procs)
    alone = spin(1)
    return processes * alone / spin(processes)


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle, not waiting for
    I/O), from /proc/stat: other work on the machine counts too."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
