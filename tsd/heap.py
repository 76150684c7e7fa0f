"""The daemon's heap: big bursts of allocation must not leave its RSS at their peak.

Loading 100,000 jobs at start or listing them all makes many short-lived objects
and buffers. Two glibc habits would keep what they freed in the daemon's RSS
for as long as it runs: its mmap threshold grows to the size of the largest
block ever freed (so later big buffers come from the heap and stay there), and
free heap pages are kept for reuse. `steady` pins the threshold at glibc's
default (128 KiB: big buffers are mapped and unmapped, a few syscalls per big
listing), and `give_back` returns free pages once after the load (about a
millisecond: never per request). Elsewhere than glibc both do nothing.

`fewer_collections` is the cyclic collector's side: the daemon makes a few dozen
objects per job that outlive a loop turn (records, timers, futures), so CPython's
default (a young collection every 700 such objects) walked the young objects every
~20 jobs of a burst, ~150 us each on these machines: 15-25 ms a second at 16 slots,
the daemon's one thread stopped meanwhile and every slot waiting on it.
"""

from __future__ import annotations

import contextlib
import gc

BIG = 10_000  # jobs loaded at start from which trimming afterwards pays
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept from growing
# Objects the cyclic collector tracks, made and not yet freed, between two collections
# of the youngest generation (CPython's default is 700). At most this many objects of
# cyclic garbage wait for a collection: a few MiB.
GC_YOUNG = 20_000


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


def fewer_collections() -> None:
    """Collect the youngest generation every GC_YOUNG new objects rather than 700; the
    older generations keep their thresholds (collected every so many young
    collections, as before): cyclic garbage is still reclaimed, in fewer, longer
    pauses (~5 ms each, every thousand or so jobs of a burst)."""
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
