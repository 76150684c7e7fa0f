"""The passwd entries and group lists of job owners, read through a cache of a second.

Each launch needs its owner's entry (group, name, home for mail) and, where the
job drops root's privileges, the owner's supplementary groups; a lookup goes
through NSS every time: the files opened and parsed (or a directory service,
systemd's userdb among them, asked) once per job, a burst of jobs of one user
asking the same thing hundreds of times a second. An answer is kept for TTL
seconds: a change to the user or group database reaches the jobs started after
that, a user removed meanwhile is not kept alive longer, and an unknown uid is
never cached (it is asked each time, as that job ends at once).
"""

from __future__ import annotations

import os
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
        grouplist: Callable[[str, int], list[int]] = os.getgrouplist,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._grouplist = grouplist
        self._entries: dict[int, tuple[float, pwd.struct_passwd]] = {}
        self._groups: dict[tuple[str, int], tuple[float, tuple[int, ...]]] = {}

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

    def groups(self, user: str, gid: int) -> tuple[int, ...]:
        """`user`'s groups, primary `gid` included: what initgroups(user, gid) would set
        (os.getgrouplist); OSError when the group database cannot say."""
        now = self._clock()
        cached = self._groups.get((user, gid))
        if cached is not None and now - cached[0] < TTL:
            return cached[1]
        found = tuple(self._grouplist(user, gid))
        if len(self._groups) >= MAX_ENTRIES:
            self._groups.clear()
        self._groups[(user, gid)] = (now, found)
        return found
