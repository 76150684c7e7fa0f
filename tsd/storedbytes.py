"""Per user: the bytes of text their jobs keep in the store, what `max_stored_bytes` caps.

A part of the job table (tsd.jobtable, tsd.rollbacks keep it current).
"""

from __future__ import annotations

from collections import defaultdict

from tsd.model import Job


class StoredBytes:
    """Per user: JobSpec.stored_bytes summed over their jobs in the table (what the
    `max_stored_bytes` cap counts). After a load the sums are made when first asked,
    as only that cap asks: summing 100,000 jobs would add ~80 ms to every start."""

    def __init__(self, jobs: dict[int, Job]) -> None:
        self._jobs = jobs
        self._totals: dict[int, int] | None = defaultdict(int)

    def recount(self) -> None:
        """The table was filled wholesale: sum it again when asked."""
        self._totals = None

    def add(self, uid: int, delta: int) -> None:
        """A job of `uid` came (delta > 0) or went; its table change is made first."""
        if self._totals is not None:  # else counted when first asked
            self._totals[uid] += delta

    def of(self, uid: int) -> int:
        """`uid`'s total."""
        if self._totals is None:
            totals: dict[int, int] = defaultdict(int)
            for job in self._jobs.values():
                totals[job.uid] += job.spec.stored_bytes
            self._totals = totals
        return self._totals[uid]
