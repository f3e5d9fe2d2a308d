"""CPU memory: with keep_freed_memory, a thread's tensors reuse freed memory instead of faulting in new pages."""

from __future__ import annotations

import subprocess
import sys

# A worker thread allocates and frees buffers of a decode step's sizes (1-20 MiB, under the 32 MiB mmap
# threshold), warms up, then repeats the pattern; it prints the minor page faults of the repeats.
WORKLOAD = """
import resource, sys, threading, torch
if sys.argv[1] == "keep":
    from gymnb.policy.cpu_memory import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused the settings"
sizes = [1 << 20, 3 << 20, 8 << 20, 20 << 20, 2 << 20]
def steps(count):
    for _ in range(count):
        for size in sizes:
            a = torch.empty(size // 4).fill_(1.0)
            b = torch.empty(size // 8).fill_(2.0)
            del a
            c = b + 1
def work():
    steps(5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_not_faulted_in_again():
    default, kept = minor_faults("default"), minor_faults("keep")
    # 20 repeats of 46 MiB touched: about 235,000 pages if every buffer is fresh memory. glibc's defaults
    # fault in most of them (measured: 212,000); kept, the buffers come back from the heap (4,000-6,000).
    assert default > 50_000, f"glibc's defaults did not refault this workload ({default} faults)"
    assert kept < default / 10, f"{kept} minor faults with freed memory kept, {default} without"
