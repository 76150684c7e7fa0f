"""The dispatcher: applies `scheduler.decide()` to the job table, and cascades -W skips.

`schedule()` runs after every change that may let a job start (a submit, an
end, a queue edit, a GPU poll). It hands the scheduler the queue, the running
jobs and the resources in force, then records the verdicts: which jobs wait
and why, which are skipped, which start (through the runner).

A job's end asks for its pass just before the open group is committed
(`schedule_before_commit`), not at once: the ends that one turn of the loop
reads (many, with many slots) are answered by one pass, and the starts it
makes join the ends' commit, as they would have with a pass per end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from itertools import islice
from typing import Protocol

from tsd.eligibility import apart_reason, may_go_ahead
from tsd.errors import StorageFull
from tsd.gpuusage import hold_reasons, outside_gpus
from tsd.model import DependMode, ExitInfo, Gpu, Job, JobState, UnmanagedUse, UserLimits
from tsd.scheduler import DepOutcome, GpuRoom, Resources, decide, dep_ready

log = logging.getLogger("tsd")


class Table(Protocol):
    """The job table as the dispatcher uses it (tsd.jobtable.JobTable)."""

    pending: list[int]
    pending_gpu_jobs: int
    pending_count: dict[int, int]
    dep_blocked: set[int]  # pending jobs waiting on a dependency not ended (not offered)

    def get(self, job_id: int) -> Job | None: ...

    def offered_queue(self) -> Iterable[Job]: ...

    def dep_outcome(self, job_id: int) -> DepOutcome: ...

    def gpu_holders(self) -> tuple[dict[int, int], set[int]]: ...

    def holding(self) -> list[Job]: ...

    def is_queued(self, job: Job) -> bool: ...

    def set_waiting(self, updates: list[tuple[int, JobState, str]]) -> None: ...

    def end_pending(
        self, job: Job, state: JobState, exit: ExitInfo, wait_reason: str | None = None
    ) -> Job: ...

    def take_dependents(self, job_id: int) -> list[int]: ...

    def drop_transparent(self, job: Job) -> None: ...

    def before_commit(self, fn: Callable[[], None]) -> bool: ...


class Limits(Protocol):
    """The policy as the dispatcher uses it (tsd.policy.Policy)."""

    def limits(self, uid: int) -> UserLimits: ...

    def total_slots(self) -> int: ...

    def free_threshold(self) -> float: ...

    def hold_unmanaged(self) -> bool: ...

    def share(self, uid: int) -> float: ...


class FairKeys(Protocol):
    """Fair-share keys (tsd.ledger.Ledger): usage now / share, per user."""

    def keys(
        self, holding: Iterable[Job], uids: Iterable[int], share: Callable[[int], float]
    ) -> dict[int, float]: ...


class Gpus(Protocol):
    """The GPU monitor as the dispatcher uses it (tsd.gpumonitor.GpuMonitor)."""

    def request(self, max_age: float) -> bool: ...

    def cached(self) -> tuple[tuple[Gpu, ...] | None, str]: ...

    def pool(self) -> tuple[int, ...] | None: ...

    def free(
        self, held: dict[int, int], tsd_pids: set[int], threshold: float
    ) -> tuple[int, ...] | None: ...

    def busy(
        self, held: dict[int, int], tsd_pids: set[int], threshold: float
    ) -> dict[int, str]: ...

    def rooms(self) -> dict[int, GpuRoom] | None: ...

    def unmanaged(self) -> tuple[UnmanagedUse, ...]: ...

    def arm_poll(self, seconds: float) -> None: ...

    def stop_poll(self) -> None: ...


GPU_MAX_AGE = 0.2  # seconds an NVML picture is reused within a burst of decisions
AHEAD_LOOK = 32  # queued jobs a pass looks at to send ahead: more than supervisors idle


class Dispatcher:
    """Starts what may start; skips what never will."""

    def __init__(
        self,
        table: Table,
        policy: Limits,
        gpus: Gpus,
        start: Callable[[Job, tuple[int, ...]], None],
        poll_seconds: Callable[[], float],
        fair: FairKeys | None = None,
        clock: Callable[[], float] = time.time,
        wake: Callable[[float | None], None] | None = None,
        ahead: Callable[[Callable[[int], list[Job]], int], None] | None = None,
        not_started: Callable[[], set[int]] | None = None,
    ) -> None:
        self.fair = fair
        # Sends queued jobs ahead, in order, to supervisors whose short jobs run
        # (tsd.ahead): the personal daemon's, given the slot count.
        self._ahead = ahead
        # Jobs recorded as running that hold no slot yet: sent ahead behind a job that
        # runs on (tsd.ahead); the decision counts that job's slot, not theirs.
        self._not_started = not_started
        self._clock = clock
        self.table = table
        self.policy = policy
        self.gpus = gpus
        self._start = start
        self._poll_seconds = poll_seconds
        # Arms (or with None disarms) one timer that schedules again at an epoch time:
        # when the earliest --begin a waiting job has comes.
        self._wake = wake
        # The scheduler stops reading the queue once the server is full; the jobs it
        # did not reach wait for this one reason.
        self.unvisited_reason = ""
        # The job the last decision reserved for: it keeps its reservation (see
        # tsd.scheduler) until it starts, also through decisions that read nothing.
        self.reserved: int | None = None
        self._pass_due = False  # a pass is asked for before the next commit

    def schedule(self) -> None:
        """Start whatever may start now. Cheap when nothing can: decide() stops early.

        Never raises: a pass is run after a change that is already made (a submit, a
        job's end, ts -S, a release), and a pass that fails (a launch that raised) must
        not turn that change's answer into an error. What it did not start waits for
        the next pass: any submit, end or timer."""
        self._pass_due = False
        try:
            self._pass()
        except Exception:
            log.exception("dispatch pass")

    def schedule_before_commit(self) -> None:
        """`schedule()` once, just before the open group is committed (now when none
        is open): the ends of one loop turn are answered by one pass, whose launches
        join their commit."""
        if not self._pass_due:
            self._pass_due = self.table.before_commit(self._due_pass)
            if not self._pass_due:
                self.schedule()

    def _due_pass(self) -> None:
        if self._pass_due:  # else a pass ran since it was asked for
            self.schedule()

    def _pass(self) -> None:
        table = self.table
        if not table.pending:
            self.gpus.stop_poll()
            if self._wake is not None:
                self._wake(None)
            return
        if table.pending_gpu_jobs:
            if not self.gpus.request(GPU_MAX_AGE):
                return  # NVML is being read off the loop; its result schedules again
            held, tsd_pids = table.gpu_holders()
            free = self.gpus.free(held, tsd_pids, self.policy.free_threshold())
            problem = self.gpus.cached()[1] if free is None else ""
            pool = self.gpus.pool()
            rooms = self.gpus.rooms()
            outside = self.gpus.unmanaged()
        else:
            free, problem, pool, rooms, outside = (), "", None, None, ()
        holding = table.holding()
        skip = self._not_started() if self._not_started is not None else None
        if skip:
            holding = [j for j in holding if j.id not in skip]
        keys: dict[int, float] = {}
        waiting = frozenset(uid for uid, n in table.pending_count.items() if n > 0)
        # Fair share orders users: with one user waiting (always, on a personal daemon)
        # their key is only ever compared with itself, and the floor is that same key.
        if self.fair is not None and len(waiting) > 1:
            keys = self.fair.keys(holding, waiting, self.policy.share)
        res = Resources(
            total_slots=self.policy.total_slots(),
            limits=self.policy.limits,
            free_gpus=free,
            gpu_problem=problem,
            visible_gpus=pool,
            gpu_memory=rooms,
            outside_gpus=outside_gpus(outside),
            gpu_holds=hold_reasons(outside) if self.policy.hold_unmanaged() else {},
            fair_key=lambda uid: keys.get(uid, 0.0),
            fair_floor=min(keys.values(), default=0.0),
            now=self._clock(),
            reserved_hint=self.reserved,
            pending_users=waiting,
        )
        decision = decide(table.offered_queue(), holding, table.dep_outcome, res)
        if decision.reserved is not None or not decision.unvisited_reason:
            self.reserved = decision.reserved
        self.unvisited_reason = decision.unvisited_reason
        if self._wake is not None:
            self._wake(decision.wake_at)
        allocating = set(decision.allocating)
        # A job read again that no longer waits for GPUs (it now waits for a slot or a
        # dependency) is back to plain queued.
        updates: list[tuple[int, JobState, str]] = []
        for job_id in allocating | decision.reasons.keys():
            job = table.get(job_id)
            if job is None or not job.state.pending:
                continue
            state = JobState.ALLOCATING if job_id in allocating else JobState.QUEUED
            updates.append((job_id, state, decision.reasons.get(job_id, job.wait_reason)))
        table.set_waiting(updates)
        for job_id in decision.skip:
            self.skip(job_id, decision.reasons.get(job_id, "a dependency failed"))
        for start in decision.start:
            job = table.get(start.job_id)
            if job is not None and table.is_queued(job):
                self._start(job, start.gpu_ids)
        if self._ahead is not None:
            self._ahead(self._next_ahead, self.policy.total_slots())
        if decision.allocating:
            self.gpus.arm_poll(self._poll_seconds())
        else:
            self.gpus.stop_poll()

    def _next_ahead(self, most: int) -> list[Job]:
        """The queue's next jobs that may go ahead (tsd.ahead), at most `most`, in queue
        order, up to the first that may not (no job goes ahead of one before it)."""
        now, table = self._clock(), self.table
        jobs: list[Job] = []
        for job in islice(table.offered_queue(), AHEAD_LOOK):
            if len(jobs) == most:
                break
            if table.is_queued(job):
                if not may_go_ahead(job, now):
                    break
                jobs.append(job)
        return jobs

    def skip(self, job_id: int, reason: str) -> None:
        """A pending job will never run (a -W dependency failed): record it, and cascade."""
        job = self.table.get(job_id)
        if job is None or not job.state.pending:
            return
        try:
            ended = self.table.end_pending(
                job, JobState.SKIPPED, ExitInfo(note=reason), wait_reason=reason
            )
        except StorageFull:
            return  # still pending: the next pass skips it, once it can be written
        log.info("job %d skipped: %s", job_id, reason)
        self.cascade(ended)
        self.table.drop_transparent(ended)

    def cascade(self, ended: Job) -> None:
        """A failed or skipped job skips every -W job that waits on it, transitively."""
        waiting = self.table.take_dependents(ended.id)
        if ended.state is JobState.FINISHED and ended.exit is not None and ended.exit.success:
            return
        for dep_id in waiting:
            dep = self.table.get(dep_id)
            if dep is not None and dep.state.pending and dep.spec.depend_mode is DependMode.SUCCESS:
                self.skip(dep_id, f"job {ended.id} did not succeed")

    def job_ended(self, job: Job) -> None:
        """After any end (finished, skipped, could not start): cascade, then fill the room."""
        self.cascade(job)
        self.table.drop_transparent(job)
        self.schedule_before_commit()

    def explain(self, job: Job) -> Job:
        """The job with the wait reason ts -i and -l show (the scheduler's, or the last pass's)."""
        reason = self.wait_reason(job)
        return job if reason == job.wait_reason else replace(job, wait_reason=reason)

    def wait_reason(self, job: Job) -> str:
        """explain()'s wait reason alone: a listing of 100,000 jobs copies none of them."""
        if not job.state.pending:
            return job.wait_reason
        apart = apart_reason(job, time.time())
        if apart is not None:  # held or not begun: whatever the last pass saw or missed
            return apart
        if job.id in self.table.dep_blocked:  # no pass reads it: the scheduler's words, now
            why = dep_ready(job.spec, self.table.dep_outcome)[1]
            if why:
                return why
        if not job.wait_reason and self.unvisited_reason:
            return self.unvisited_reason
        if job.state is JobState.ALLOCATING:
            held, tsd_pids = self.table.gpu_holders()
            busy = self.gpus.busy(held, tsd_pids, self.policy.free_threshold())
            outside = "; ".join(
                f"GPU {i} {why}" for i, why in sorted(busy.items()) if why.startswith("used by")
            )
            if outside:
                return f"{job.wait_reason}; {outside}"
        return job.wait_reason
