"""The queue's order: where new jobs go, and how a user's queued jobs move or are held.

A part of the job table (tsd.jobtable.JobTable builds on `QueueOrder`): the
order keys of queued jobs, which `--priority` (at submit), `ts -u` and `ts -U`
hand around among one user's jobs only (the set of keys a user holds, and with
it the order between users, never changes), and `--hold`/`--release`, which
keep a job's place. Every change is written to the store before it is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

from tsd.eligibility import priority_keys
from tsd.errors import StorageFull, WrongState
from tsd.model import Job, JobSpec, JobState


class JobStore(Protocol):
    """The part of tsd.store.Store the table writes through."""

    def add_jobs(
        self,
        uid: int,
        user: str,
        specs: list[tuple[JobSpec, int]],
        enqueue_time: float,
        state: JobState = JobState.QUEUED,
        reorder: Mapping[int, int] | None = None,
        array: bool = False,
    ) -> list[Job]: ...

    def save(self, *jobs: Job) -> None: ...

    def save_run(self, job: Job, slot_seconds: float, gpu_seconds: float) -> None: ...

    def delete(self, ids: Iterable[int]) -> None: ...

    def load_all(self) -> list[Job]: ...

    def set_slurm_id(self, job_id: int, slurm_id: int, output: str | None) -> None: ...

    def set_slurm_ids(self, rows: Iterable[tuple[int, int, int | None, str | None]]) -> None: ...

    def deferred(self) -> AbstractContextManager[None]: ...

    @property
    def pending(self) -> bool: ...

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None: ...

    def on_rollback(self, undo: Callable[[], None]) -> None: ...


class QueueOrder:
    """Queue order keys and holds over the table's jobs (see the module docstring)."""

    store: JobStore
    jobs: dict[int, Job]
    pending: list[int]  # ids of pending jobs, in queue order
    _orders: tuple[int, int]  # lowest and highest queue order keys handed out

    def queue(self) -> Iterator[Job]:
        """Pending jobs in queue order."""
        return (self.jobs[i] for i in self.pending)

    def place(self, uid: int, priority: int, count: int) -> tuple[list[int], dict[int, int]]:
        """Keys for `count` new jobs of `priority` of user `uid`, and the changed keys of
        the user's queued jobs that make room (tsd.eligibility.priority_keys)."""
        own = [(j.id, j.order, j.spec.priority) for j in self.queue() if j.uid == uid]
        return priority_keys(own, priority, count, self._orders[1] + 1)

    def reorder(self, moved: Mapping[int, int]) -> None:
        """Apply stored key changes (job id -> key) in memory."""
        for job_id, key in moved.items():
            self.jobs[job_id] = replace(self.jobs[job_id], order=key)
        self._sort_pending()

    def set_held(self, job: Job, held: bool) -> Job:
        """ts --hold (held) / ts --release: a queued job is held or queued, at its place."""
        if (job.state is JobState.HELD) is held:
            return job
        job = replace(job, state=JobState.HELD if held else JobState.QUEUED, wait_reason="")
        self.store.save(job)
        self.jobs[job.id] = job
        return job

    def move_front(self, job: Job) -> Job:
        """ts -u: put a pending job before every other pending job of its owner.

        The owner's jobs pass their order keys along (the job takes its owner's
        first key, each job before it the next one), so the set of keys a user
        holds, and with it the order between users, does not change.
        """
        own = [j for j in self.queue() if j.uid == job.uid]
        ahead = own[: [j.id for j in own].index(job.id) + 1]
        keys = [j.order for j in ahead]
        moved = [replace(job, order=keys[0])]
        moved += [replace(j, order=k) for j, k in zip(ahead[:-1], keys[1:], strict=True)]
        self.store.save(*moved)
        for j in moved:
            self.jobs[j.id] = j
        self._sort_pending()
        return moved[0]

    def swap(self, a: Job, b: Job) -> None:
        """ts -U: two pending jobs of one user trade places (keys stay with the user)."""
        if a.uid != b.uid:
            raise WrongState(
                f"jobs {a.id} and {b.id} belong to different users: "
                "-U reorders one user's own queue only"
            )
        a, b = replace(a, order=b.order), replace(b, order=a.order)
        self.store.save(a, b)
        self.jobs[a.id], self.jobs[b.id] = a, b
        ia, ib = self.pending.index(a.id), self.pending.index(b.id)
        self.pending[ia], self.pending[ib] = b.id, a.id

    def _sort_pending(self) -> None:
        self.pending.sort(key=lambda i: self.jobs[i].order)
