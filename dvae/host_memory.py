"""Freed host memory kept in the process, for training on the CPU.

PyTorch's CPU allocator is plain ``malloc``/``free``. With glibc's defaults, a block above the
mmap threshold (128 KiB, raised as such blocks are freed, up to 32 MiB) is a fresh ``mmap`` and
goes back to the kernel when freed, and the heap is trimmed whenever 128 KiB lie free at its
top. A training step allocates and frees the same large tensors every step (the MNIST step:
dozens of 2-16 MiB activations, logits and gradients), so every step faults in and zeroes those
pages again. On the 2-core development machines that cost a quarter of the MNIST step (about
420 against 310 ms per step, measured alternately in one process).

:func:`keep_freed_memory` asks glibc (``mallopt``) to serve blocks up to 32 MiB (glibc's
limit) from its heap and not to trim it below 2 GiB free: freed memory is reused by the next
step, as a GPU caching allocator reuses device memory. The process keeps its peak heap (what
the step needs at its largest) for its lifetime. The trainer and
:func:`dvae.bench_api.make_step` call it when they run on the CPU (through
:class:`dvae.train_step.TrainStep`); ``DVAE_KEEP_FREED_MEMORY=0`` turns it off. It does nothing
off glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
#: free memory at the heap's top kept before trimming (mallopt takes an int): 2 GiB
TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Keep freed host memory in the process (see the module docstring). Idempotent; returns
    whether the setting is in effect (False off glibc or with ``DVAE_KEEP_FREED_MEMORY=0``)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DVAE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success, 0 on error
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok
