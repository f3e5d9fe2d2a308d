"""Policy server, CPU memory: keep the memory a decode step frees for the next step, instead of refaulting it.

torch's CPU tensors come from the C library's malloc, with no cache of its own. glibc returns freed memory to
the kernel early: a block above its (adaptive) mmap threshold is unmapped on free; the top of a heap is
trimmed once more than the trim threshold lies free there; and each thread that allocates gets an arena of
64 MiB heaps that are shrunk or unmapped as they empty. The next step then touches fresh pages, one minor
fault per 4 KiB, and each fault is kernel time on the step's path. In a 16-row bf16 decode step of
SmolLM2-135M (2 cores, AVX-512 and AMX, `gymnb serve` under `gymnb bench server`), the state of glibc's heuristics
decided the step: stretches of seconds ran 2,000-2,600 minor faults per step at 95-160 ms, with up to a third of
the CPU time in the kernel and the rest idle, between stretches of 0-200 faults at 37-45 ms.

`keep_freed_memory()` pins three of glibc's settings (mallopt(3)), so freed memory stays with the process:
  - M_MMAP_THRESHOLD at 32 MiB, the largest glibc takes on 64-bit (fixing it also ends its adaptation): a
    step's buffers (16 rows of vocabulary logits, 3 MiB in float32; a prefill's activations) come from the
    heap and are reused;
  - M_TRIM_THRESHOLD at 1 GiB: the heap keeps up to that much free memory on top instead of trimming it;
  - M_ARENA_MAX at 1: every thread allocates from the main heap, which the trim threshold governs, instead of
    per-thread heaps that glibc shrinks on its own terms. Must run before the process's threads allocate.
Measured there (3 rounds of 64 requests, 372 full-batch steps): with these settings a median of 6 minor
faults per step (mean 73, 12 steps above 80 ms). An alternating A/B of two servers, 6 rounds of 16 clients,
gave 1.10x the tokens/s in bf16 (rounds 0.97-1.37) and 1.04x in float32 (1.00-1.12): the gain comes and goes
with the stretches of faulting.
The cost is resident memory: up to the trim threshold of freed memory stays mapped.

Only for a process that serves (`gymnb serve`, the bench's in-process engine); off glibc (macOS, musl) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_ARENA_MAX: 1}


def keep_freed_memory() -> bool:
    """Pin glibc's malloc so freed memory is reused, not returned (module docstring); whether it took."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    failed = [param for param, value in SETTINGS.items() if mallopt(param, value) != 1]
    if failed:
        log.info("mallopt refused %s: glibc keeps its defaults for them", failed)
    return not failed
