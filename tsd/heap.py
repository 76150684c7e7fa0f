"""The daemon's heap: big bursts of allocation must not leave its RSS at their peak.

Loading 100,000 jobs at start or listing them all makes many short-lived objects
and buffers. Two glibc habits would keep what they freed in the daemon's RSS
for as long as it runs: its mmap threshold grows to the size of the largest
block ever freed (so later big buffers come from the heap and stay there), and
free heap pages are kept for reuse. `steady` pins the threshold at glibc's
default (128 KiB: big buffers are mapped and unmapped, a few syscalls per big
listing), and `give_back` returns free pages once after the load (about a
millisecond: never per request). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import contextlib

BIG = 10_000  # jobs loaded at start from which trimming afterwards pays
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept from growing


def steady() -> None:
    """Keep big blocks out of the heap: mapped when allocated, unmapped when freed."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def give_back() -> None:
    """Return the heap's free pages to the system."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
