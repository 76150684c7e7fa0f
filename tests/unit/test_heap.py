"""tsd.heap: big blocks stay out of glibc's heap, freed heap pages go back, and the cyclic
collector runs less often but still reclaims cycles."""

from __future__ import annotations

import subprocess
import sys

from tsd import heap

PROBE = r"""
import ctypes, sys
from tsd import heap
if sys.argv[1] == "steady":
    heap.steady()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
# Freeing a mapped 1 MiB block makes glibc raise its mmap threshold to 1 MiB...
libc.free(libc.malloc(1 << 20))
p = libc.malloc(512 << 10)
# ...so a 512 KiB block would come from the heap. glibc marks a mapped chunk in the
# size word just before it (bit 1, IS_MMAPPED).
print(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2 != 0)
"""

TRIM = r"""
import ctypes
from tsd import heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
blocks = [libc.malloc(4096) for _ in range(16384)]  # 64 MiB of small heap blocks
for b in blocks:
    libc.memset(b, 1, 4096)
for b in blocks[:-1]:
    libc.free(b)  # the last one stays: the heap's top cannot simply shrink
before = rss()
heap.give_back()
print(before - rss())
"""


def probe(code: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_steady_keeps_big_blocks_mapped_after_a_bigger_one_was_freed() -> None:
    assert probe(PROBE, "steady") == "True"
    assert probe(PROBE, "glibc") == "False"  # what steady prevents


def test_give_back_returns_freed_heap_pages_to_the_system() -> None:
    assert int(probe(TRIM)) >= 32  # MiB of the 64 freed


CYCLES = r"""
import gc, sys, weakref
from tsd import heap
if sys.argv[1] == "fewer":
    heap.fewer_collections()
older = gc.get_threshold()[1:]
collections = []
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info))
class Node:
    pass
freed = []
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a  # freed only by the cyclic collector
    weakref.finalize(a, freed.append, 1)
for _ in range(30_000):
    cycle()
print(gc.get_threshold()[0], gc.get_threshold()[1:] == older, len(collections), len(freed))
"""


def test_fewer_collections_collects_young_objects_less_often_and_still_frees_cycles() -> None:
    threshold, older_kept, runs, freed = probe(CYCLES, "fewer").split()
    assert (int(threshold), older_kept) == (heap.GC_YOUNG, "True")
    default_runs = int(probe(CYCLES, "default").split()[2])
    assert 0 < int(runs) < default_runs / 10  # a few collections rather than hundreds
    assert int(freed) >= 30_000 - heap.GC_YOUNG  # what they found was freed, unasked
