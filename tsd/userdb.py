"""The passwd entries and group lists of job owners and callers, read through a cache
of a second.

Each launch needs its owner's entry (group, name, home for mail) and, where the
job drops root's privileges, the owner's supplementary groups; each request its
caller's name, groups and their names (tsd.auth.make_peer); a lookup goes
through NSS every time: the files opened and parsed (or a directory service,
systemd's userdb among them, asked) once per job, a burst of jobs of one user
asking the same thing hundreds of times a second. An answer is kept for TTL
seconds: a change to the user or group database reaches the jobs started after
that, a user removed meanwhile is not kept alive longer, and an unknown uid is
never cached (it is asked each time, as that job ends at once).
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

_V = TypeVar("_V")

TTL = 1.0  # seconds an entry is used without asking NSS again
MAX_ENTRIES = 4096  # more owners than this at once: the cache starts afresh


class UserDb:
    """getpwuid and getgrouplist through a short-lived cache (see the module docstring)."""

    def __init__(
        self,
        lookup: Callable[[int], pwd.struct_passwd] = pwd.getpwuid,
        clock: Callable[[], float] = time.monotonic,
        grouplist: Callable[[str, int], list[int]] = os.getgrouplist,
        group: Callable[[int], grp.struct_group] = grp.getgrgid,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._grouplist = grouplist
        self._group = group
        self._entries: dict[Hashable, tuple[float, pwd.struct_passwd]] = {}
        self._groups: dict[Hashable, tuple[float, tuple[int, ...]]] = {}
        self._group_entries: dict[Hashable, tuple[float, grp.struct_group]] = {}

    def entry(self, uid: int) -> pwd.struct_passwd:
        """The passwd entry of `uid`; KeyError when there is none."""
        return self._cached(self._entries, uid, lambda: self._lookup(uid))

    def group(self, gid: int) -> grp.struct_group:
        """The group entry of `gid`; KeyError when there is none."""
        return self._cached(self._group_entries, gid, lambda: self._group(gid))

    def groups(self, user: str, gid: int) -> tuple[int, ...]:
        """`user`'s groups, primary `gid` included: what initgroups(user, gid) would set
        (os.getgrouplist); OSError when the group database cannot say."""
        return self._cached(self._groups, (user, gid),
                            lambda: tuple(self._grouplist(user, gid)))

    def _cached(
        self, table: dict[Hashable, tuple[float, _V]], key: Hashable, ask: Callable[[], _V]
    ) -> _V:
        """`table`'s answer for `key` while under TTL old, else `ask`'s (kept; an
        exception from it is not)."""
        now = self._clock()
        cached = table.get(key)
        if cached is not None and now - cached[0] < TTL:
            return cached[1]
        found = ask()
        if len(table) >= MAX_ENTRIES:
            table.clear()
        table[key] = (now, found)
        return found
