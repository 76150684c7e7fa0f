"""The passwd entries of job owners, read through a cache of a second.

Each launch needs its owner's entry (group, name, home for mail), and a lookup
goes through NSS every time: the files opened and parsed (or a directory
service asked) once per job, a burst of jobs of one user asking the same
thing hundreds of times a second. An entry is kept for TTL seconds: a change to
the user database reaches the jobs started after that, a user removed meanwhile
is not kept alive longer, and an unknown uid is never cached (it is asked each
time, as that job ends at once).
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable

TTL = 1.0  # seconds an entry is used without asking NSS again
MAX_ENTRIES = 4096  # more owners than this at once: the cache starts afresh


class UserDb:
    """getpwuid through a short-lived cache (see the module docstring)."""

    def __init__(
        self,
        lookup: Callable[[int], pwd.struct_passwd] = pwd.getpwuid,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._entries: dict[int, tuple[float, pwd.struct_passwd]] = {}

    def entry(self, uid: int) -> pwd.struct_passwd:
        """The passwd entry of `uid`; KeyError when there is none."""
        now = self._clock()
        cached = self._entries.get(uid)
        if cached is not None and now - cached[0] < TTL:
            return cached[1]
        entry = self._lookup(uid)  # KeyError: not cached
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[uid] = (now, entry)
        return entry
