"""The job table: every job the daemon knows, its indexes, and the transitions between states.

It owns the in-memory jobs and writes each change to the store before the
change is visible to anyone, so a client that hears "ok" can rely on it. The
hot transitions (a submit, a launch recorded, a supervisor's report, an end)
join the store's group commit (tsd.store): memory changes at once, an undo
is registered in case the group is rolled back, and whatever must wait for
the disk (waking waiters, a supervisor's go, a reply) runs `after_commit`.
Every state change goes through one method here, which keeps the indexes true:

* `pending`: ids of queued, allocating and held jobs, in queue order (a held
  job keeps its place; tsd.queueorder hands out the order keys);
  `pending_count` and `pending_gpu_jobs` count them per user and GPU-wanting;
* `running`: the running jobs by id;
* `launching`: jobs whose launch is under way (their supervisor and scope are
  being made): out of the queue, holding their slots and GPUs, still shown in
  their pending state until they run;
* `finished_by_user`: finished and skipped ids per user, oldest first, capped
  at `max_finished` (tsd.finishedcap: the oldest beyond the cap are forgotten);
* `dependents`: for a job, the pending jobs that depend on it. Only pending
  jobs are listed, and a job's own entry goes when it ends or is forgotten, so
  the index never outgrows the queue;
* `dep_blocked`: pending jobs waiting on a dependency that has not ended, and
  `offered`: the other pending jobs, in queue order, which is all a scheduling
  pass reads (`offered_queue`). A blocked job is offered again when its last
  unended dependency ends (`take_dependents`) or is forgotten, so a pass costs
  nothing per job that waits on a running or queued job.

It does no scheduling and starts no process: the dispatcher and the runner
decide, the table records. Hooks (`JobEvents`) tell waiters what happened.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Literal, Protocol

from tsd import auth
from tsd.errors import NoSuchJob, StorageFull
from tsd.finishedcap import FinishedCap
from tsd.model import ExitInfo, Job, JobSpec, JobState, Peer, replace, run_usage
from tsd.queueorder import JobStore as JobStore
from tsd.queueorder import QueueOrder
from tsd.rollbacks import Rollbacks
from tsd.scheduler import DepOutcome
from tsd.storedbytes import StoredBytes


class JobEvents(Protocol):
    """Who hears about transitions (tsd.waiters.Waiters)."""

    def started(self, job_id: int) -> None: ...

    def ended(self, job_id: int, final: Job | None = None) -> None: ...

    def room(self) -> None: ...


class JobTable(QueueOrder, FinishedCap, Rollbacks):
    """Jobs by id, the queue and its indexes; every transition, made durable first."""

    def __init__(
        self, store: JobStore, events: JobEvents, max_finished: Callable[[], int],
        save_end: Callable[[Job, Job | None], None] | None = None,
    ) -> None:
        self.store = store
        # Writes a job's end (finished, skipped, could not start); the ledger's adds its
        # accounting row and its user's usage in the same transaction.
        self._save_end_hook = save_end
        self.events = events
        self._max_finished = max_finished
        self.jobs: dict[int, Job] = {}
        self.pending: list[int] = []
        self.running: dict[int, Job] = {}
        self.launching: dict[int, Job] = {}
        # When each launch under way was decided: that is the job's start time, whatever
        # its scope takes to come up (fair share is judged by when jobs were started).
        self._launch_times: dict[int, float] = {}
        self.dependents: dict[int, set[int]] = {}
        self.dep_blocked: set[int] = set()
        self.offered: list[int] = []
        self.last_added: dict[int, int] = {}
        self.last_run: dict[int, int] = {}
        self.pending_count: dict[int, int] = defaultdict(int)
        # Per user: how many of their pending jobs have each --priority (tsd.queueorder).
        self.pending_prios: dict[int, Counter[int]] = defaultdict(Counter)
        self.pending_gpu_jobs = 0
        self.finished_by_user: dict[int, deque[int]] = defaultdict(deque)
        self._trimmed: list[int] = []  # forgotten beyond the cap, rows not deleted yet
        self.stored = StoredBytes(self.jobs)
        self._orders = (0, -1)  # lowest and highest queue order keys handed out

    # ------------------------------------------------------------ loading

    def load(self) -> list[Job]:
        """Fill the table from the store; return the jobs recorded as running."""
        ended_transparent = []
        jobs = self.jobs
        running: list[Job] = []
        done: list[Job] = []
        pending: list[Job] = []
        low = high = None
        for job in self.store.load_all():
            if job.spec.forget and job.state.done:
                ended_transparent.append(job.id)  # a crash came between its end and its drop
                continue
            jobs[job.id] = job
            state = job.state
            if state.pending:
                pending.append(job)
            elif state.done:
                done.append(job)
            elif state is JobState.RUNNING:
                running.append(job)
            if job.id > self.last_added.get(job.uid, 0):  # rows come in id order
                self.last_added[job.uid] = job.id
            if job.start_time is not None:
                self.last_run[job.uid] = max(self.last_run.get(job.uid, 0), job.id)
            if low is None or job.order < low:
                low = job.order
            if high is None or job.order > high:
                high = job.order
        self.stored.recount()
        self._index_loaded(pending)
        if ended_transparent:
            self.store.delete(ended_transparent)
        if low is not None and high is not None:
            self._orders = (low, high)
        done.sort(key=_end_key)
        for job in done:
            self.finished_by_user[job.uid].append(job.id)
        self._cap_loaded()
        for job in running:
            self.running[job.id] = job
        return running

    # ------------------------------------------------------------ reading

    def get(self, job_id: int) -> Job | None:
        """The job, or None when it does not exist (any more)."""
        return self.jobs.get(job_id)

    def pick(self, peer: Peer, job_id: int | None, default: Literal["added", "run"]) -> Job:
        """The job a request names, or the caller's last added (or last run) one; owner only."""
        if job_id is None:
            table = self.last_run if default == "run" else self.last_added
            job_id = table.get(peer.uid)
            if job_id is None or job_id not in self.jobs:
                what = "run" if default == "run" else "queued"
                raise NoSuchJob(f"you have no {what} job")
        job = self.jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"job {job_id} does not exist")
        auth.check_owner(peer, job)
        return job

    def listing(self) -> Iterator[Job]:
        """What ts -l shows, in GPU task-spooler's order: running (and starting) jobs,
        then the queue, each in queue order, then done jobs by end time."""
        yield from sorted(self.holding(), key=lambda j: (j.order, j.id))
        yield from self.queue()
        yield from sorted(self._done(), key=_end_key)

    def holding(self) -> list[Job]:
        """Jobs that hold slots and GPUs: the running ones and those being launched."""
        return [*self.running.values(), *self.launching.values()]

    def used_slots(self) -> int:
        """Slots held by running jobs (and jobs being launched)."""
        return sum(j.spec.slots for j in self.holding())

    def gpu_holders(self) -> tuple[dict[int, int], set[int]]:
        """GPU index -> the job holding it, and the pids of tsd's jobs."""
        held = {i: j.id for j in self.holding() for i in j.gpu_ids}
        pids = {p for j in self.running.values() for p in (j.pid, j.supervisor_pid) if p}
        return held, pids

    def is_queued(self, job: Job) -> bool:
        """Pending, in the queue (not being launched): it may be moved or removed."""
        return job.state.pending and job.id not in self.launching

    def dep_outcome(self, job_id: int) -> DepOutcome:
        """How a dependency stands, for the scheduler."""
        job = self.jobs.get(job_id)
        if job is None:
            return DepOutcome.GONE
        if job.state is JobState.SKIPPED:
            return DepOutcome.SKIPPED
        if job.state is JobState.FINISHED:
            assert job.exit is not None
            return DepOutcome.SUCCEEDED if job.exit.success else DepOutcome.FAILED
        return DepOutcome.PENDING

    # ------------------------------------------------------------ pending jobs

    def add(self, uid: int, user: str, spec: JobSpec) -> Job:
        """Queue a new job; durable before it is returned."""
        return self.add_many(uid, user, [spec])[0]

    def add_many(
        self, uid: int, user: str, specs: list[JobSpec], held: bool = False, array: bool = False
    ) -> list[Job]:
        """Queue new jobs (of one --priority; held with --hold) in one transaction (durable
        once `durable()` says so): after the owner's queued jobs of the same or a higher
        priority, on the owner's own queue positions (tsd.eligibility.priority_keys)."""
        low, high = self._orders
        keys, moved = self.place(uid, specs[0].priority, len(specs))
        state = JobState.HELD if held else JobState.QUEUED
        before = {i: self.jobs[i].order for i in moved}
        last = self.last_added.get(uid)
        try:
            with self.store.deferred():
                jobs = self.store.add_jobs(uid, user, list(zip(specs, keys, strict=True)),
                                           time.time(), state, moved, array)  # fmt: skip
        except StorageFull as exc:
            raise StorageFull(
                f"the server cannot store the job: no space left on {exc.where}", exc.where
            ) from None
        self._orders = (low, high + len(specs))
        self.reorder(moved)
        for job in jobs:
            self.jobs[job.id] = job
            self.stored.add(uid, job.spec.stored_bytes)
            self._index_pending(job)
        self._sort_pending()
        self.last_added[uid] = jobs[-1].id
        self.store.on_rollback(lambda: self._unadd(jobs, before, last))
        return jobs

    def set_waiting(self, updates: Iterable[tuple[int, JobState, str]]) -> None:
        """The scheduler's verdicts: queued or allocating, and why not running.

        Only a change of state is written: a reason is shown, never persisted.
        """
        changed: list[Job] = []
        for job_id, state, reason in updates:
            job = self.jobs.get(job_id)
            if job is None or not job.state.pending:
                continue
            if job.state is JobState.HELD:
                state = JobState.HELD  # only ts --release ends a hold
            if job.state is state and job.wait_reason == reason:
                continue  # the same verdict as last time: no new record
            updated = replace(job, state=state, wait_reason=reason)
            if updated.state is not job.state:
                changed.append(updated)
            self.jobs[job_id] = updated
        if changed:
            # Only the queued/allocating label: on a full disk it is written with the
            # job's next change instead of failing the dispatcher's pass.
            with suppress(StorageFull), self.store.deferred():
                self.store.save(*changed)

    def end_pending(
        self, job: Job, state: JobState, exit: ExitInfo, wait_reason: str | None = None
    ) -> Job:
        """A pending job ends without running (skipped, or it could not start)."""
        job = replace(
            job, state=state, end_time=time.time(), exit=exit,
            wait_reason=job.wait_reason if wait_reason is None else wait_reason,
        )
        self._save_end(job)
        self._unindex_pending(job)
        self.jobs[job.id] = job
        self._account_done(job)
        self.events.room()
        self.events.ended(job.id, job)
        return job

    # ------------------------------------------------------------ running jobs

    def begin_run(self, job: Job, gpu_ids: tuple[int, ...], uuids: tuple[str, ...]) -> Job:
        """A pending job's launch begins: it leaves the queue and holds its slots and GPUs.

        In memory only: a crash before `launched` leaves it queued.
        """
        job = replace(job, gpu_ids=gpu_ids, gpu_uuids=uuids)
        self._unindex_pending(job)
        self.jobs[job.id] = self.launching[job.id] = job
        self._launch_times[job.id] = time.time()
        self.events.room()
        return job

    def launched(
        self, job_id: int, supervisor_pid: int, supervisor_start: int | None, unit: str | None
    ) -> Job:
        """Its supervisor (and scope) exist: running (it may run once that is durable)."""
        launching, began = self.launching[job_id], self._launch_times.get(job_id)
        job = replace(
            launching, state=JobState.RUNNING, start_time=began or time.time(),
            supervisor_pid=supervisor_pid, supervisor_start=supervisor_start, unit=unit,
            wait_reason="", attempts=launching.attempts + 1,
        )
        with self.store.deferred():
            self.store.save(job)  # first: on StorageFull the job is still launching, unchanged
        last = self.last_run.get(job.uid)
        del self.launching[job_id]
        self._launch_times.pop(job_id, None)
        self.jobs[job_id] = self.running[job_id] = job
        self.last_run[job.uid] = max(last or 0, job.id)
        self.store.on_rollback(lambda: self._unlaunched(launching, began, last))
        return job

    def end_launch(self, job_id: int, exit: ExitInfo) -> Job:
        """A launch that failed for good (no scope): the job ends without having run."""
        job = replace(
            self.launching[job_id], state=JobState.FINISHED, end_time=time.time(), exit=exit
        )
        self._save_end(job)
        del self.launching[job_id]
        self._launch_times.pop(job_id, None)
        self.jobs[job_id] = job
        self._account_done(job)
        self.events.ended(job_id, job)
        return job

    def requeue(
        self, job_id: int, failed: ExitInfo | None = None, notice: str | None = None
    ) -> Job:
        """A launch that never ran its command: back to the queue at its old place.

        With `failed` (--retry): an attempt that failed, queued again under its id; with
        a `notice`: ended for idle GPUs. A run that did happen is charged to its user
        in the same transaction. No end is announced (waiters wait on, -W jobs too).
        """
        ran = job = self.running.get(job_id) or self.launching[job_id]
        job = replace(
            job, state=JobState.QUEUED, start_time=None, supervisor_pid=None,
            supervisor_start=None, gpu_ids=(), gpu_uuids=(), unit=None, pid=None,
            # A recorded launch counted an attempt that never ran its command.
            attempts=job.attempts - (failed is None and notice is None and job_id in self.running),
            gpu_idle_since=None, notice=job.notice if notice is None else notice,
        )
        if failed is not None:
            why = f"attempt {job.attempts} ended with {failed.summary()}"
            job = replace(job, end_time=None, exit=None, output_path=None, wait_reason=why)
        if failed is None and notice is None:  # first: on StorageFull nothing changed
            self.store.save(job)
        else:
            self._save_end(job, ran)
        self.running.pop(job_id, None)
        self.launching.pop(job_id, None)
        self._launch_times.pop(job_id, None)
        self.jobs[job_id] = job
        self._index_pending(job)
        self._sort_pending()
        return job

    def set_idle(self, job_id: int, since: float | None) -> None:
        """Flag a running job whose GPUs sit idle (None: clear it); in memory only."""
        if (job := self.running.get(job_id)) is not None and job.gpu_idle_since != since:
            self.jobs[job_id] = self.running[job_id] = replace(job, gpu_idle_since=since)

    def report(
        self, job_id: int, pid: int | None, output: str | None, out_seen: bool, save: bool = True
    ) -> None:
        """What a running job's supervisor reported: its command's pid, its output path.

        `out_seen`: the output line came (`output` None then means -n): the job has
        started for good, and -t/-c waiting for it may follow its output. `save`
        False: only in memory, as its end, recorded next, writes the whole row.
        """
        job = self.running.get(job_id)
        if job is None:
            return
        pid, output = pid or job.pid, output or job.output_path
        if pid != job.pid or output != job.output_path:
            updated = replace(job, pid=pid, output_path=output)
            self.jobs[job_id] = self.running[job_id] = updated
            if save:  # on a full disk the pid and output path are saved with the job's end
                with suppress(StorageFull), self.store.deferred():
                    self.store.save(updated)
        if out_seen:
            self.events.started(job_id)

    def finish(
        self, job_id: int, exit: ExitInfo, end: float | None, output: str | None, lazy: bool = False
    ) -> Job | None:
        """A running job ended thus; None when it was not running. lazy: nobody waits."""
        ran = self.running.get(job_id)
        if ran is None:
            return None
        job = replace(
            ran, state=JobState.FINISHED, end_time=end or time.time(), exit=exit,
            output_path=ran.output_path or output, gpu_idle_since=None,
        )
        with self.store.deferred():
            self._save_end(job)  # first: on StorageFull it is still running, to be retried
            del self.running[job_id]
            self.jobs[job_id] = job
            self.store.on_rollback(lambda: self._unfinish(ran))
            self._account_done(job)
        self.store.after_commit(lambda: self.events.ended(job_id, job), lazy=lazy)
        return job

    # ------------------------------------------------------------ forgetting

    def remove(self, job: Job) -> None:
        """ts -r: forget a job that is not running."""
        self.store.delete([job.id])
        if job.state.done:
            self.finished_by_user[job.uid].remove(job.id)
        if job.state.pending:
            self._unindex_pending(job)
            self.events.room()
        self._forget(job.id)
        self.events.ended(job.id)

    def drop_transparent(self, job: Job) -> None:
        """Forget a -nf job that ended, as task-spooler keeps no entry of it.

        Called once the end has been handled (waiters woken with the final record,
        -W dependents cascaded), so nothing still needs the record.
        """
        if job.spec.forget and job.state.done and job.id in self.jobs:
            with suppress(StorageFull), self.store.deferred():  # else `load` drops it
                self.store.delete([job.id])
            self._forget(job.id)

    def clear(self, uid: int) -> int:
        """ts -C: forget a user's finished and skipped jobs; how many."""
        gone = [j.id for j in self._done() if j.uid == uid]
        self.store.delete(gone)
        self.finished_by_user.pop(uid, None)
        for job_id in gone:
            self._forget(job_id)
        return len(gone)

    # ------------------------------------------------------------ indexes

    def _done(self) -> Iterator[Job]:
        return (j for j in self.jobs.values() if j.state.done)

    def _save_end(self, job: Job, ran: Job | None = None) -> None:
        """An end (or `ran`'s, `job` queued again) with its usage, via the ledger if any."""
        if self._save_end_hook is not None:
            return self._save_end_hook(job, ran)
        self.store.save_run(job, *run_usage(ran or job, job.end_time or time.time()))

    def _forget(self, job_id: int) -> None:
        job = self.jobs.pop(job_id)
        self.stored.add(job.uid, -job.spec.stored_bytes)
        self._release(self.dependents.pop(job_id, ()))  # it counts as ended well now
        self.dep_blocked.discard(job_id)


def _end_key(job: Job) -> tuple[float, int]:
    return (job.end_time or 0, job.id)

