"""The cap on the finished jobs kept per user (`max_finished`, TS_MAXFINISHED).

A part of the job table (tsd.jobtable.JobTable builds on `FinishedCap`): each
user's finished and skipped ids, oldest first, and forgetting the oldest beyond
the cap. A job beyond it leaves memory (the listing, waiters, dependencies) at
once; its row leaves the store with TRIM_BATCH others, in one write, and a load
applies the cap to the rows left over (a stop before their batch, a full disk,
a cap lowered since), so a restart never brings back what was forgotten.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress

from tsd.errors import StorageFull
from tsd.model import Job
from tsd.queueorder import JobStore

# Once a user is at the cap every end forgets one job: deleting each row on its own
# cost every end a savepoint and four statements; a batch costs them once.
TRIM_BATCH = 32


class FinishedCap:
    """Finished ids per user, capped (see the module docstring)."""

    store: JobStore
    jobs: dict[int, Job]
    finished_by_user: dict[int, deque[int]]
    _max_finished: Callable[[], int]
    _trimmed: list[int]  # forgotten beyond the cap, rows not deleted yet

    def _forget(self, job_id: int) -> None:
        raise NotImplementedError

    def _account_done(self, job: Job) -> None:
        """A job just became finished or skipped; forget the oldest beyond the cap (their
        rows go once TRIM_BATCH are due, or at the next load)."""
        if job.spec.forget:
            return  # not kept: `drop_transparent` forgets it once its end is handled
        done = self.finished_by_user[job.uid]
        done.append(job.id)
        self._drop([i for i in self._over_cap(done) if i in self.jobs], TRIM_BATCH)

    def _cap_loaded(self) -> None:
        """After a load: forget, and delete, what lies beyond the cap."""
        self._drop([i for ids in self.finished_by_user.values() for i in self._over_cap(ids)], 1)

    def _drop(self, ids: list[int], batch: int) -> None:
        """Forget these jobs now; delete their rows, with those forgotten before, once
        `batch` of them are due."""
        for job_id in ids:
            self._forget(job_id)
        self._trimmed += ids
        if len(self._trimmed) >= batch:
            rows, self._trimmed = self._trimmed, []
            with suppress(StorageFull):  # stays stored on a full disk: the next load
                self.store.delete(rows)

    def _over_cap(self, done: deque[int]) -> list[int]:
        """Take the oldest ids beyond the cap off a user's finished list."""
        cap = self._max_finished()
        return [done.popleft() for _ in range(len(done) - cap)]
