"""The CPU allocator setting: what it changes, that a user's own setting wins, and that it takes effect.

Each case runs in a fresh interpreter, since the setting is made once per process before torch loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is Linux only")

# Reports what tune_cpu_allocator changed and where glibc put a 16 MB block (mmap'd bytes from mallinfo2).
PROBE = r"""
import ctypes, json, os, sys
from lorafleet.cpu_memory import tune_cpu_allocator

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

changed = tune_cpu_allocator()
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(ctypes.c_void_p(block))
print(json.dumps({"changed": changed, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                  "torch": "torch" in sys.modules, "mmapped": mmapped}))
"""


def _probe(**env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_")
        and k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LORAFLEET_CPU_ALLOCATOR")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_keeps_large_blocks_on_the_heap_and_leaves_huge_pages_alone():
    got = _probe()
    assert got["changed"] == ["mallopt"]
    assert got["thp"] is None and not got["torch"]  # huge pages measured slower here: the user's choice
    assert got["mmapped"] == 0  # a 16 MB block now comes from the heap


def test_default_opts_out_of_both():
    got = _probe(LORAFLEET_CPU_ALLOCATOR="default")
    assert got["changed"] == [] and got["thp"] is None
    assert got["mmapped"] >= 16 << 20  # glibc's own threshold: a fresh mapping


def test_a_users_settings_win():
    got = _probe(THP_MEM_ALLOC_ENABLE="1", MALLOC_MMAP_THRESHOLD_="1048576")
    assert got["changed"] == [] and got["thp"] == "1"
    assert got["mmapped"] >= 16 << 20  # the user's 1 MB threshold, untouched


def test_glibc_left_alone_when_tunables_are_set():
    got = _probe(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert got["changed"] == [] and got["thp"] is None
    assert got["mmapped"] >= 16 << 20
