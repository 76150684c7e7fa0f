"""The job table's side of group commit: waiting for the disk, and undoing a rolled-back group.

The table (tsd.jobtable.JobTable builds on `Rollbacks`) changes memory as soon as
a grouped write is made (tsd.store); if that group's commit fails, the undos
registered here put memory back to what the disk holds, so nothing anyone is
told, and nothing the daemon does next, rests on a change that was never stored.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping

from tsd.errors import StorageFull
from tsd.model import Job, replace
from tsd.queueorder import JobStore
from tsd.storedbytes import StoredBytes


class Rollbacks:
    """`after_commit`/`durable` for the table's users, and the undos of its grouped writes."""

    store: JobStore
    jobs: dict[int, Job]
    pending: list[int]
    running: dict[int, Job]
    launching: dict[int, Job]
    _launch_times: dict[int, float]
    last_added: dict[int, int]
    last_run: dict[int, int]
    finished_by_user: dict[int, deque[int]]
    stored: StoredBytes

    def _unindex_pending(self, job: Job) -> None:
        raise NotImplementedError

    def _forget(self, job_id: int) -> None:
        raise NotImplementedError

    def reorder(self, moved: Mapping[int, int]) -> None:
        raise NotImplementedError

    def _index_pending(self, job: Job) -> None:
        raise NotImplementedError

    def _sort_pending(self) -> None:
        raise NotImplementedError

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None:
        """Run `ok` once every change made so far is on disk (now, when it is), or
        `failed` if the group holding them is rolled back (their undos ran first).
        `lazy`: nobody outside waits for it (tsd.groupcommit)."""
        self.store.after_commit(ok, failed, lazy)

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None:
        """Run `ok` once every change made so far is committed, before its fsync (safe
        against a crash of the daemon, not of the machine: tsd.groupcommit), or `failed`
        if the group holding them is rolled back."""
        self.store.after_write(ok, failed)

    def before_commit(self, fn: Callable[[], None]) -> bool:
        """Run `fn` just before the open group is committed, so that what it writes
        joins that group; False (not kept) when no group is open (tsd.groupcommit)."""
        return self.store.before_commit(fn)

    async def durable(self) -> None:
        """Until every change made so far is on disk; StorageFull when it never will be."""
        if not self.store.pending:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ok() -> None:
            if not fut.done():
                fut.set_result(None)

        def failed(exc: StorageFull) -> None:
            if not fut.done():
                fut.set_exception(exc)

        self.store.after_commit(ok, failed)
        await fut

    def _unadd(self, jobs: list[Job], before: dict[int, int], last: int | None) -> None:
        """Undo `add_many` (its group was rolled back): as if never queued."""
        for job in jobs:
            if job.id not in self.jobs:
                continue
            if job.id in self.launching:  # a launch began meanwhile (its own undo ran first)
                del self.launching[job.id]
                self._launch_times.pop(job.id, None)
            elif job.id in self.pending:
                self._unindex_pending(job)
            self._forget(job.id)
        self.reorder({i: k for i, k in before.items() if i in self.jobs})
        uid = jobs[0].uid
        if last is None:
            self.last_added.pop(uid, None)
        else:
            self.last_added[uid] = last

    def _unlaunched(self, launching: Job, began: float | None, last: int | None) -> None:
        """Undo `launched` (its group was rolled back): the launch is under way again."""
        job_id = launching.id
        if self.running.pop(job_id, None) is None:
            return
        self.jobs[job_id] = self.launching[job_id] = launching
        if began is not None:
            self._launch_times[job_id] = began
        if last is None:
            self.last_run.pop(launching.uid, None)
        else:
            self.last_run[launching.uid] = last

    def _unfinish(self, ran: Job) -> None:
        """Undo `finish` (its group was rolled back): the job runs again, to be retried."""
        done = self.finished_by_user.get(ran.uid)
        if done is not None and ran.id in done:
            done.remove(ran.id)
        if ran.id not in self.jobs:  # forgotten meanwhile (a -nf job)
            self.stored.add(ran.uid, ran.spec.stored_bytes)
        self.jobs[ran.id] = self.running[ran.id] = ran

    def unlaunch(self, job_id: int) -> Job | None:
        """A launch abandoned before it was recorded (`launched` failed): back to the queue,
        in memory only, like `begin_run` (the store still holds the job as pending).
        None when the job itself was undone meanwhile (its submit was rolled back)."""
        launching = self.launching.pop(job_id, None)
        if launching is None:
            return None
        job = replace(launching, gpu_ids=(), gpu_uuids=())
        self._launch_times.pop(job_id, None)
        self.jobs[job_id] = job
        self._index_pending(job)
        self._sort_pending()
        return job
