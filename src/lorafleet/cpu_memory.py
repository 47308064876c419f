"""How lorafleet's processes take memory from the operating system on Linux, set once at their start.

A training step on the CPU allocates and frees the same large activations every micro-batch ([tokens,
MLP width] float32 tensors of 10-30 MB). With glibc's defaults each one is a fresh ``mmap`` handed back on
free, so every micro-batch pays the kernel to zero and map its pages again, one 4 KiB page fault at a time
(about 0.8M faults and 6-9 s of system time in the 23 s training loop of ``benchmarks/realistic.py``'s
issue workload on a 2-core Xeon). ``tune_cpu_allocator`` sets glibc's ``mallopt`` before torch is imported:
blocks under 32 MB come from the heap (``M_MMAP_THRESHOLD``) and freed memory stays with the process
(``M_TRIM_THRESHOLD``), so the next micro-batch reuses pages already mapped and only the first micro-batch
of a shape touches new memory.

Transparent huge pages for torch's tensors (``THP_MEM_ALLOC_ENABLE=1``) were set here too until measured on
their own, with ``mallopt`` in both arms: on a 2-core Xeon VM (THP ``madvise``), 6-step issue workload, five
alternating pairs, they cut page faults 580k -> 160k and peak RSS 2.45 -> 2.1 GB but tripled system time
(2.0-2.6 s -> 5.7-8.7 s: zeroing whole 2 MB pages on first touch), the first step 4.8-6.8 s -> 6.3-10.9 s
and the loop's median 28.5 s -> 31.3 s; no step after the first was faster with them. They are left to the
user (``THP_MEM_ALLOC_ENABLE=1`` in the environment, read by torch).

The cost of ``mallopt``: a process keeps its peak heap until it exits, as a caching allocator does. A setting
the user gave wins: nothing is changed when glibc's ``MALLOC_*`` / ``GLIBC_TUNABLES`` variables are set, and
``LORAFLEET_CPU_ALLOCATOR=default`` leaves the allocator as the system has it. GPU memory is not affected
(CUDA has its own caching allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: trimming only past 2 GiB of free heap top
_GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_cpu_allocator() -> list[str]:
    """Set the allocator as the module says, before torch is first imported; the settings changed."""
    changed: list[str] = []
    if os.environ.get("LORAFLEET_CPU_ALLOCATOR", "") == "default" or not sys.platform.startswith("linux"):
        return changed
    if not any(v in os.environ for v in _GLIBC_VARS):
        name = ctypes.util.find_library("c")
        try:
            mallopt = ctypes.CDLL(name).mallopt if name else None
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1:
            mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
            changed.append("mallopt")
    return changed
