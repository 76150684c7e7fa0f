"""The queue's order: where new jobs go, and how a user's queued jobs move or are held.

A part of the job table (tsd.jobtable.JobTable builds on `QueueOrder`): the
order keys of queued jobs, which `--priority` (at submit), `ts -u` and `ts -U`
hand around among one user's jobs only (the set of keys a user holds, and with
it the order between users, never changes), and `--hold`/`--release`, which
keep a job's place. Every change is written to the store before it is visible.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from tsd.eligibility import priority_keys
from tsd.errors import StorageFull, WrongState
from tsd.model import Job, JobSpec, JobState, replace


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
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None: ...

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None: ...

    def on_rollback(self, undo: Callable[[], None]) -> None: ...

    def before_commit(self, fn: Callable[[], None]) -> bool: ...


class QueueOrder:
    """Queue order keys and holds over the table's jobs (see the module docstring)."""

    store: JobStore
    jobs: dict[int, Job]
    pending: list[int]  # ids of pending jobs, in queue order: by (order key, id)
    pending_prios: dict[int, Counter[int]]  # uid -> {--priority: pending jobs with it}
    pending_count: dict[int, int]
    pending_gpu_jobs: int
    dependents: dict[int, set[int]]
    # Pending jobs waiting on a dependency that has not ended: left out of `offered`
    # until it ends (`_release`), so a scheduling pass never reads them.
    dep_blocked: set[int]
    offered: list[int]  # `pending` without `dep_blocked`, in the same order
    _orders: tuple[int, int]  # lowest and highest queue order keys handed out

    def queue(self) -> Iterator[Job]:
        """Pending jobs in queue order."""
        return map(self.jobs.__getitem__, self.pending)

    def offered_queue(self) -> Iterator[Job]:
        """Pending jobs in queue order but those waiting on a dependency not ended yet:
        what the scheduler reads (their wait reason is worked out when shown)."""
        # A map, not a generator: the scheduler stops reading early, and closing a
        # generator early raises GeneratorExit in it.
        return map(self.jobs.__getitem__, self.offered)

    def waits_on_dependency(self, job: Job) -> bool:
        """Whether a dependency of the job has not ended (the scheduler's PENDING)."""
        jobs = self.jobs
        return any(
            (dep := jobs.get(i)) is not None and not dep.state.done for i in job.spec.depends
        )

    def take_dependents(self, job_id: int) -> list[int]:
        """The pending jobs waiting on a job that just ended, once (the entry goes);
        those it was the last unended dependency of are offered to the scheduler again."""
        waiting = sorted(self.dependents.pop(job_id, ()))
        self._release(waiting)
        return waiting

    def _release(self, ids: Iterable[int]) -> None:
        """Jobs whose dependency ended or went: offered again once none is left waiting."""
        for job_id in ids:
            job = self.jobs.get(job_id)
            if job_id in self.dep_blocked and (job is None or not self.waits_on_dependency(job)):
                self.dep_blocked.discard(job_id)
                if job is not None and self._is_pending(job_id):
                    _insert(self.offered, job, self._pending_key)

    def place(self, uid: int, priority: int, count: int) -> tuple[list[int], dict[int, int]]:
        """Keys for `count` new jobs of `priority` of user `uid`, and the changed keys of
        the user's queued jobs that make room (tsd.eligibility.priority_keys)."""
        next_key = self._orders[1] + 1
        prios = self.pending_prios.get(uid)
        if not prios or min(prios) >= priority:
            # Behind all the user's queued jobs: at the end of the queue, nobody moves
            # (what priority_keys gives then, without reading the queue).
            return list(range(next_key, next_key + count)), {}
        own = [(j.id, j.order, j.spec.priority) for j in self.queue() if j.uid == uid]
        return priority_keys(own, priority, count, next_key)

    def reorder(self, moved: Mapping[int, int]) -> None:
        """Apply stored key changes (job id -> key) in memory."""
        self._rekey({i: replace(self.jobs[i], order=key) for i, key in moved.items()})

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
        self._rekey({j.id: j for j in moved})
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
        self._rekey({a.id: a, b.id: b})

    def _index_loaded(self, jobs: list[Job]) -> None:
        """After a load (every job read): its pending jobs join the queue together.

        The same indexes as `_index_pending` one job at a time, with one sort instead
        of a bisection each; a dependency stored after its dependent (ids are handed
        out in order, so only in a store written otherwise) blocks it all the same.
        """
        blocked = self.dep_blocked
        counts = self.pending_count
        prios = self.pending_prios
        last = None
        in_order = not self.pending  # then `jobs` (in id order) is the queue unless...
        for job in jobs:
            if last is not None and job.order < last:
                in_order = False  # ... -u/-U or a priority put a job before an older one
            last = job.order
            spec = job.spec
            if spec.depends:
                if self.waits_on_dependency(job):
                    blocked.add(job.id)
                for dep in spec.depends:
                    self.dependents.setdefault(dep, set()).add(job.id)
            counts[job.uid] += 1
            prios[job.uid][spec.priority] += 1
            if spec.gpus_wanted:
                self.pending_gpu_jobs += 1
        ids = [j.id for j in jobs]
        # Sorted only when out of order: a sort holds a key per job at once (6 MiB of
        # them at 100,000 jobs, freed after it but not all given back to the system).
        self.pending = ids if in_order else sorted([*self.pending, *ids], key=self._pending_key)
        self.offered = [i for i in self.pending if i not in blocked]

    def _index_pending(self, job: Job) -> None:
        """A job joins the queue: its place, its user's counts, its dependencies."""
        if job.spec.depends and self.waits_on_dependency(job):
            self.dep_blocked.add(job.id)
        self._place_pending(job)
        self.pending_count[job.uid] += 1
        prios = self.pending_prios[job.uid]
        prios[job.spec.priority] += 1
        if job.spec.gpus_wanted:
            self.pending_gpu_jobs += 1
        for dep in job.spec.depends:
            self.dependents.setdefault(dep, set()).add(job.id)

    def _unindex_pending(self, job: Job) -> None:
        """A job leaves the queue (it starts, ends or goes)."""
        self._unplace_pending(job)
        self.dep_blocked.discard(job.id)
        self.pending_count[job.uid] -= 1
        prios = self.pending_prios[job.uid]
        prios[job.spec.priority] -= 1
        if prios[job.spec.priority] <= 0:
            del prios[job.spec.priority]
            if not prios:
                del self.pending_prios[job.uid]
        if job.spec.gpus_wanted:
            self.pending_gpu_jobs -= 1
        for dep in job.spec.depends:
            waiting = self.dependents.get(dep)
            if waiting is not None:
                waiting.discard(job.id)
                if not waiting:
                    del self.dependents[dep]

    # -- the `pending` list, kept sorted by (order key, id): a job goes in or out by
    # bisection, not by sorting or scanning the whole queue.

    def _pending_key(self, job_id: int) -> tuple[int, int]:
        return (self.jobs[job_id].order, job_id)

    def _place_pending(self, job: Job) -> None:
        """Put a pending job (already in `jobs`) at its place in `pending` (and `offered`)."""
        _insert(self.pending, job, self._pending_key)
        if job.id not in self.dep_blocked:
            _insert(self.offered, job, self._pending_key)

    def _unplace_pending(self, job: Job) -> None:
        """Take a job out of `pending` (its key as `jobs` holds it while it is listed)."""
        _remove(self.pending, job, self._pending_key)
        if job.id not in self.dep_blocked:
            _remove(self.offered, job, self._pending_key)

    def _rekey(self, changed: Mapping[int, Job]) -> None:
        """Records with new order keys replace theirs, moving in `pending` as needed."""
        queued = [i for i in changed if i in self.jobs and self._is_pending(i)]
        for job_id in queued:
            self._unplace_pending(self.jobs[job_id])
        for job_id, job in changed.items():
            self.jobs[job_id] = job
        for job_id in queued:
            self._place_pending(changed[job_id])

    def _is_pending(self, job_id: int) -> bool:
        pending = self.pending
        at = bisect_left(pending, self._pending_key(job_id), key=self._pending_key)
        return at < len(pending) and pending[at] == job_id

    def _sort_pending(self) -> None:
        """`pending` is kept in order as jobs come and go: nothing left to sort."""


def _insert(ids: list[int], job: Job, key: Callable[[int], tuple[int, int]]) -> None:
    """Put a job's id at its place in a list of ids kept sorted by `key`."""
    at = (job.order, job.id)
    if not ids or key(ids[-1]) < at:
        ids.append(job.id)  # a new job: last
    else:
        ids.insert(bisect_left(ids, at, key=key), job.id)


def _remove(ids: list[int], job: Job, key: Callable[[int], tuple[int, int]]) -> None:
    """Take a job's id out of a list kept sorted by `key` (its key as `jobs` holds it)."""
    if ids and ids[0] == job.id:
        del ids[0]  # the queue's head, the job that starts most often: no bisection
        return
    at = bisect_left(ids, key(job.id), key=key)
    if at < len(ids) and ids[at] == job.id:
        del ids[at]
    else:
        ids.remove(job.id)
