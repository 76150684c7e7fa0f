"""The Slurm engine: every accepted job goes to Slurm, as its owner; one squeue follows all.

With `cluster.engine: slurm` the system daemon is a front end to a Slurm
cluster. A submit is recorded (tsd keeps its own id), handed to sbatch run
with the owner's uid, groups and captured environment, and the Slurm id is
committed before the client hears "ok"; when Slurm refuses, the record is
removed again and the client gets Slurm's reason in one line.

One poll follows every forwarded job that is not over: a single
`squeue --json --states=all --jobs=...` per interval, `poll_seconds` while
something changes, doubling up to `max_poll_seconds` while nothing does.
Jobs Slurm no longer lists (a daemon down past MinJobAge) are looked up
once in sacct (accounting or the jobcomp file). Every Slurm command runs in
the daemon's worker threads, never on the event loop.

After a restart, the forwarded jobs are followed again from their stored
Slurm ids; a job recorded but not yet forwarded (a crash mid-submit, or one
queued under the local engine) is found by its sbatch comment or forwarded now.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from tsd.config import ClusterConfig
from tsd.errors import BadRequest, ClusterRefused, NoSuchJob, StorageFull, WrongState
from tsd.jobtable import JobTable
from tsd.launch import OUTPUT_PREFIX
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState
from tsd.slurmcmd import Owner
from tsd.slurmjson import SlurmJob, Snapshot
from tsd.slurmmap import (
    COMMENT_PREFIX,
    CancelSkipped,
    Ended,
    Started,
    Submission,
    Unsupported,
    Verdict,
    Waiting,
    check_spec,
    job_env,
    sbatch_args,
    verdict,
)

log = logging.getLogger("tsd")

_T = TypeVar("_T")
# Seconds after its submit when a job that neither squeue nor sacct knows counts as lost.
FORGOTTEN_AFTER = 60.0


class SlurmJobTable(JobTable):
    """The job table with the one transition only Slurm makes: queued -> running elsewhere."""

    def slurm_started(self, job_id: int, start: float, gpu_ids: tuple[int, ...]) -> Job:
        """A pending job runs in Slurm since `start`: out of the queue, durably first."""
        job = replace(self.jobs[job_id], state=JobState.RUNNING, start_time=start,
                      gpu_ids=gpu_ids, wait_reason="")
        self.store.save(job)
        self._unindex_pending(job)
        self.jobs[job_id] = self.running[job_id] = job
        self.last_run[job.uid] = max(self.last_run.get(job.uid, 0), job.id)
        self.events.room()
        self.events.started(job_id)
        return job


def record_forwarded(table: JobTable, job_id: int, slurm_id: int, output: str | None) -> Job:
    """A pending job is now Slurm job `slurm_id`, writing to `output`; durable first."""
    job = replace(table.jobs[job_id], slurm_id=slurm_id, output_path=output)
    table.store.set_slurm_id(job_id, slurm_id, output)
    table.jobs[job_id] = job
    return job


class Commands(Protocol):
    """Slurm's client commands (tsd.slurmcmd.SlurmCommands); blocking calls."""

    def submit(self, args: Sequence[str], owner: Owner, env: Mapping[str, str]) -> int: ...

    def cancel(self, slurm_id: int, owner: Owner | None) -> None: ...

    def hold(self, slurm_id: int, held: bool, owner: Owner | None) -> None: ...

    def squeue(self, slurm_ids: Sequence[int] | None) -> Snapshot: ...

    def sacct(self, slurm_ids: Sequence[int]) -> dict[int, SlurmJob]: ...


class JobData(Protocol):
    """Where a job's environment and its owner's settings are kept (tsd.store.Store)."""

    def env_of(self, job_id: int) -> tuple[tuple[str, str], ...]: ...

    def user_settings(self, uid: int) -> dict[str, str]: ...


class SlurmEngine:
    """Forwards jobs to Slurm and keeps tsd's records in step with Slurm's."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        config: Callable[[], ClusterConfig],
        table: SlurmJobTable,
        data: JobData,
        commands: Commands,
    ) -> None:
        self.loop = loop
        self._executor = executor
        self._config = config
        self.table = table
        self._data = data
        self.commands = commands
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._forwarding: set[int] = set()  # jobs between their record and their sbatch
        self.problem = ""  # why the last poll failed ("" when it worked)
        self.polls = 0  # squeue calls made (for tests and the log)

    async def _offload(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # ------------------------------------------------------------ Scheduling

    def schedule(self) -> None:
        """Slurm schedules: nothing starts here. Look at Slurm again soon."""
        self.nudge()

    def explain(self, job: Job) -> Job:
        """The wait reason is Slurm's, as the last poll saw it."""
        return job

    def wait_reason(self, job: Job) -> str:
        """Slurm's, as the last poll saw it."""
        return job.wait_reason

    def nudge(self) -> None:
        """Poll now and at the fast rate again (after a submit, a cancel, a start)."""
        self._wake.set()

    # ------------------------------------------------------------ submitting

    def check(self, spec: JobSpec, terminal: bool) -> None:
        """Refuse in one line what Slurm cannot run as asked (-n, -z, -g)."""
        try:
            check_spec(spec, terminal)
        except Unsupported as exc:
            raise BadRequest(str(exc)) from None

    async def forward(self, job: Job) -> Job:
        """sbatch the recorded job as its owner; its Slurm id is durable before we return."""
        self._forwarding.add(job.id)
        try:
            return await self._forward(job)
        finally:
            self._forwarding.discard(job.id)

    async def _forward(self, job: Job) -> Job:
        try:
            owner = Owner.of(job.uid)
            depend_on, skip = self._dependencies(job)
        except (KeyError, NoSuchJob, WrongState) as exc:
            self._drop(job)
            if isinstance(exc, KeyError):
                raise ClusterRefused(f"user {job.uid} does not exist here") from None
            raise
        if skip is not None:
            # A -W dependency already failed: the job is skipped, as the local engine does.
            return self.table.end_pending(
                job, JobState.SKIPPED, ExitInfo(note=skip), wait_reason=skip
            )
        output = self._output_path(job)
        settings = self._data.user_settings(job.uid)
        env = job_env(self._data.env_of(job.id), settings, job.id, job.spec.gpus)
        mail = (env.get("TS_MAILTO") or owner.name) if job.spec.mail else None
        sub = Submission(job.id, job.spec, output, depend_on, mail, job.state is JobState.HELD)
        args = sbatch_args(sub, self._config())
        try:
            slurm_id = await self._offload(self.commands.submit, args, owner, env)
        except ClusterRefused:
            self._drop(job)
            raise
        try:
            job = record_forwarded(self.table, job.id, slurm_id, output)
        except StorageFull:
            with contextlib.suppress(ClusterRefused):
                await self._offload(self.commands.cancel, slurm_id, owner)
            self._drop(job)
            raise
        log.info("job %d forwarded to Slurm as job %d", job.id, slurm_id)
        self.nudge()
        return job

    def _drop(self, job: Job) -> None:
        """Undo a record that was never forwarded: nothing half-recorded stays."""
        current = self.table.get(job.id)
        if current is not None and current.state.pending:
            with contextlib.suppress(StorageFull):
                self.table.remove(current)

    def _dependencies(self, job: Job) -> tuple[tuple[int, ...], str | None]:
        """The Slurm ids to wait on, or why the job is skipped at once (-W, failed dep)."""
        ids: list[int] = []
        for dep_id in job.spec.depends:
            dep = self.table.get(dep_id)
            if dep is None:
                raise NoSuchJob(f"job {dep_id} does not exist (cannot depend on it)")
            if dep.state.done:
                succeeded = dep.state is JobState.FINISHED and dep.exit is not None \
                    and dep.exit.success
                if job.spec.depend_mode is DependMode.SUCCESS and not succeeded:
                    return (), f"job {dep.id} did not succeed"
                continue  # over already: nothing to wait for
            if dep.slurm_id is None:
                raise WrongState(
                    f"job {dep_id} is not on Slurm (yet): it cannot be a Slurm job's dependency"
                )
            ids.append(dep.slurm_id)
        return tuple(ids), None

    def _output_path(self, job: Job) -> str:
        """Where the job writes: -O's name, else ts-out.<id>.<random>, in a shared directory.

        The directory: the user's --set_logdir, else cluster.output_dir, else the
        job's working directory (on a cluster /tmp is the node's own).
        """
        directory = (
            self._data.user_settings(job.uid).get("logdir")
            or self._config().output_dir
            or job.spec.cwd
        )
        name = job.spec.output_name or f"{OUTPUT_PREFIX}{job.id}.{secrets.token_hex(3)}"
        return os.path.join(directory, name)

    # ------------------------------------------------------------ ending

    async def cancel(self, job: Job) -> None:
        """scancel as the job's owner: ts -k of a running job, ts -r of a queued one."""
        if job.slurm_id is None:
            raise WrongState(f"job {job.id} is still being handed to Slurm: try again")
        try:
            owner: Owner | None = Owner.of(job.uid)
        except KeyError:
            owner = None  # the user is gone: the daemon (root) cancels it
        await self._offload(self.commands.cancel, job.slurm_id, owner)
        log.info("job %d: cancelled Slurm job %d", job.id, job.slurm_id)
        self.nudge()

    async def hold(self, job: Job, held: bool) -> None:
        """ts --hold/--release of a forwarded job: scontrol hold/release as its owner."""
        if job.slurm_id is None:
            raise WrongState(f"job {job.id} is still being handed to Slurm: try again")
        await self._offload(self.commands.hold, job.slurm_id, held, Owner.of(job.uid))
        log.info("job %d: %s Slurm job %d", job.id, "held" if held else "released", job.slurm_id)
        self.nudge()

    # ------------------------------------------------------------ following

    def tracked(self) -> list[Job]:
        """Forwarded jobs that are not over: what each poll asks Slurm about."""
        jobs = [*self.table.queue(), *self.table.running.values()]
        return [j for j in jobs if j.slurm_id is not None]

    def start(self) -> None:
        """Begin following Slurm (after `recover`)."""
        self._task = self.loop.create_task(self._poll_loop())

    async def stop(self) -> None:
        """Stop following (at shutdown); forwarding under way finishes first."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_loop(self) -> None:
        interval = self._config().poll_seconds
        last = 0.0
        while True:
            # Never more than one squeue per poll_seconds, however many submits nudge us.
            gap = last + self._config().poll_seconds - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            last = time.monotonic()
            self._wake.clear()
            try:
                changed = await self.poll_once()
            except Exception:  # a bug must not stop following every job for good
                log.exception("Slurm poll failed")
                changed = False
            config = self._config()
            fast = changed or self._wake.is_set()
            interval = config.poll_seconds if fast else min(
                interval * 2, config.max_poll_seconds
            )
            if not self.tracked():
                await self._wake.wait()  # nothing to follow: sleep until a submit
                interval = self._config().poll_seconds
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def poll_once(self) -> bool:
        """One squeue for every followed job, applied; True when something changed."""
        jobs = self.tracked()
        if not jobs:
            return False
        ids = [j.slurm_id for j in jobs if j.slurm_id is not None]
        try:
            snapshot = await self._offload(self.commands.squeue, ids)
        except ClusterRefused as exc:
            if self.problem != str(exc):  # one line per new problem, not one per poll
                log.warning("cannot follow Slurm jobs: %s", exc)
            self.problem = str(exc)
            return False
        self.polls += 1
        if self.problem:
            log.info("Slurm answers again")
            self.problem = ""
        changed = False
        missing: list[Job] = []
        for job in jobs:
            current = self.table.get(job.id)
            if current is None or current.state.done or current.slurm_id is None:
                continue
            sj = snapshot.jobs.get(current.slurm_id)
            if sj is None:
                missing.append(current)
                continue
            changed |= self._apply(current, verdict(current, sj))
        if missing:
            changed |= await self._look_up_gone(missing)
        return changed

    async def _look_up_gone(self, jobs: Sequence[Job]) -> bool:
        """Jobs squeue no longer lists: their end from sacct, or lost once long gone."""
        ids = [j.slurm_id for j in jobs if j.slurm_id is not None]
        try:
            records = await self._offload(self.commands.sacct, ids)
        except ClusterRefused as exc:
            log.warning("Slurm jobs %s are gone from squeue and sacct failed: %s", ids, exc)
            records = {}
        changed = False
        for job in jobs:
            assert job.slurm_id is not None
            record = records.get(job.slurm_id)
            if record is not None and record.end_time is not None:
                changed |= self._apply(job, verdict(job, record))
            elif time.time() - job.enqueue_time > FORGOTTEN_AFTER:
                note = f"Slurm no longer knows job {job.slurm_id}"
                changed |= self._apply(
                    job, Ended(JobState.FINISHED, ExitInfo(lost=True, note=note), None, None)
                )
        return changed

    def _apply(self, job: Job, v: Verdict | None) -> bool:
        """Record one verdict; False when there was nothing to record (or no disk)."""
        if v is None:
            return False
        try:
            match v:
                case Waiting(reason):
                    if job.state.pending:
                        self.table.set_waiting([(job.id, job.state, reason)])
                case Started(start, gpus):
                    if job.state.pending:
                        self.table.slurm_started(job.id, start, gpus)
                        log.info("job %d started in Slurm (job %s)", job.id, job.slurm_id)
                case CancelSkipped(reason):
                    self._spawn(self._cancel_quietly(job))
                    self.table.end_pending(job, JobState.SKIPPED, ExitInfo(note=reason), reason)
                    log.info("job %d skipped: %s", job.id, reason)
                case Ended():
                    self._record_end(job, v)
        except StorageFull as exc:
            log.warning("job %d: not recorded yet, retrying at the next poll: %s", job.id, exc)
            return False
        return True

    def _record_end(self, job: Job, v: Ended) -> None:
        if v.state is JobState.SKIPPED:
            if job.state.pending:
                self.table.end_pending(job, JobState.SKIPPED, v.exit, v.exit.note)
                log.info("job %d skipped: %s", job.id, v.exit.note)
            return
        if job.state.pending:
            # Over before a poll saw it run (or cancelled while pending).
            self.table.slurm_started(job.id, v.start or v.end or time.time(), ())
        ended = self.table.finish(job.id, v.exit, v.end, None)
        if ended is not None and ended.exit is not None:
            log.info("job %d finished in Slurm (job %s): %s", job.id, job.slurm_id,
                     ended.exit.summary())
            self.table.drop_transparent(ended)

    async def _cancel_quietly(self, job: Job) -> None:
        with contextlib.suppress(ClusterRefused, KeyError):
            assert job.slurm_id is not None
            await self._offload(self.commands.cancel, job.slurm_id, Owner.of(job.uid))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ restart

    def recover(self) -> None:
        """After a restart: follow forwarded jobs again; settle records never forwarded."""
        orphans = [j for j in self.table.queue() if j.slurm_id is None]
        if orphans:
            self._spawn(self._adopt_or_forward(orphans))
        self.nudge()

    async def _adopt_or_forward(self, jobs: Sequence[Job]) -> None:
        """Find each job by its sbatch comment (a crash came after sbatch), else sbatch it."""
        try:
            snapshot = await self._offload(self.commands.squeue, None)
        except ClusterRefused as exc:
            log.warning("jobs %s not forwarded to Slurm yet: %s", [j.id for j in jobs], exc)
            return
        by_comment = {
            (sj.comment, sj.user): sj for sj in snapshot.jobs.values()
            if sj.comment.startswith(COMMENT_PREFIX)
        }
        for job in jobs:
            sj = by_comment.get((f"{COMMENT_PREFIX}{job.id}", job.user))
            if sj is not None:
                output = sj.output.replace("%%", "%") or job.output_path
                with contextlib.suppress(StorageFull):
                    record_forwarded(self.table, job.id, sj.job_id, output)
                    log.info("job %d: found as Slurm job %d", job.id, sj.job_id)
                continue
            try:
                await self.forward(job)
            except (ClusterRefused, NoSuchJob, WrongState, StorageFull) as exc:
                log.error("job %d could not be forwarded to Slurm: %s", job.id, exc)
        self.nudge()
