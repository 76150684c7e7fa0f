"""The Slurm engine: every accepted job goes to Slurm, as its owner; one squeue follows all.

With `cluster.engine: slurm` the system daemon is a front end to a Slurm
cluster. A submit is recorded (tsd keeps its own id), handed to sbatch run
with the owner's uid, groups and captured environment, and the Slurm id is
committed before the client hears "ok"; when Slurm refuses, the record is
removed again and the client gets Slurm's reason in one line (that half is
tsd.slurmsubmit). An --array is one Slurm job array; each element follows its
task ("<array id>_<index>").

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
import logging
import time
from collections.abc import Sequence
from typing import Any

from tsd.errors import ClusterRefused, NoSuchJob, StorageFull, WrongState
from tsd.model import ExitInfo, Job, JobState
from tsd.slurmcmd import Owner
from tsd.slurmjson import SlurmJob, by_ref
from tsd.slurmmap import COMMENT_PREFIX, CancelSkipped, Ended, Started, Verdict, Waiting, verdict
from tsd.slurmsubmit import (
    Commands,
    JobData,
    SlurmJobTable,
    SlurmSubmitter,
    record_forwarded,
    record_forwarded_many,
    ref_of,
)

__all__ = ["Commands", "JobData", "SlurmEngine", "SlurmJobTable"]

log = logging.getLogger("tsd")

# Seconds after its submit when a job that neither squeue nor sacct knows counts as lost.
FORGOTTEN_AFTER = 60.0


class SlurmEngine(SlurmSubmitter):
    """Forwards jobs to Slurm and keeps tsd's records in step with Slurm's."""

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

    # ------------------------------------------------------------ ending

    async def cancel(self, job: Job) -> None:
        """scancel as the job's owner: ts -k of a running job, ts -r of a queued one."""
        if job.slurm_id is None:
            raise WrongState(f"job {job.id} is still being handed to Slurm: try again")
        try:
            owner: Owner | None = Owner.of(job.uid)
        except KeyError:
            owner = None  # the user is gone: the daemon (root) cancels it
        await self._offload(self.commands.cancel, ref_of(job), owner)
        log.info("job %d: cancelled Slurm job %s", job.id, ref_of(job))
        self.nudge()

    async def hold(self, job: Job, held: bool) -> None:
        """ts --hold/--release of a forwarded job: scontrol hold/release as its owner."""
        if job.slurm_id is None:
            raise WrongState(f"job {job.id} is still being handed to Slurm: try again")
        await self._offload(self.commands.hold, ref_of(job), held, Owner.of(job.uid))
        log.info("job %d: %s Slurm job %s", job.id, "held" if held else "released", ref_of(job))
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
        # An array's id names all its tasks: one id for the whole array.
        ids = sorted({j.slurm_id for j in jobs if j.slurm_id is not None})
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
            sj = snapshot.find(current.slurm_id, current.slurm_task)
            if sj is None:
                missing.append(current)
                continue
            changed |= self._apply(current, verdict(current, sj))
        if missing:
            changed |= await self._look_up_gone(missing)
        return changed

    async def _look_up_gone(self, jobs: Sequence[Job]) -> bool:
        """Jobs squeue no longer lists: their end from sacct, or lost once long gone."""
        ids = sorted({j.slurm_id for j in jobs if j.slurm_id is not None})
        try:
            records = by_ref((await self._offload(self.commands.sacct, ids)).values())
        except ClusterRefused as exc:
            log.warning("Slurm jobs %s are gone from squeue and sacct failed: %s", ids, exc)
            records = {}
        changed = False
        for job in jobs:
            assert job.slurm_id is not None
            record = records.get((job.slurm_id, job.slurm_task))
            if record is not None and record.end_time is not None:
                changed |= self._apply(job, verdict(job, record))
            elif time.time() - job.enqueue_time > FORGOTTEN_AFTER:
                note = f"Slurm no longer knows job {ref_of(job)}"
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
                        log.info("job %d started in Slurm (job %s)", job.id, ref_of(job))
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
            log.info("job %d finished in Slurm (job %s): %s", job.id, ref_of(job),
                     ended.exit.summary())
            self.table.drop_transparent(ended)

    async def _cancel_quietly(self, job: Job) -> None:
        with contextlib.suppress(ClusterRefused, KeyError):
            await self._offload(self.commands.cancel, ref_of(job), Owner.of(job.uid))

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
        arrays: dict[int, list[Job]] = {}
        for job in jobs:
            if job.spec.array_job is not None:
                arrays.setdefault(job.spec.array_job, []).append(job)
                continue
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
        for array_job, elements in arrays.items():
            sj = by_comment.get((f"{COMMENT_PREFIX}{array_job}", elements[0].user))
            try:
                if sj is not None and sj.array_job_id is not None:
                    self._adopt_array(sj, elements)
                else:
                    await self.forward_array(elements)
            except (ClusterRefused, NoSuchJob, WrongState, StorageFull) as exc:
                log.error("jobs %s could not be forwarded to Slurm: %s",
                          [j.id for j in elements], exc)  # fmt: skip
        self.nudge()

    def _adopt_array(self, sj: SlurmJob, elements: Sequence[Job]) -> None:
        """An array sbatch took before a crash: its elements are its tasks, by index."""
        assert sj.array_job_id is not None
        pattern = sj.output.replace("%%", "\0")  # a NUL is in no path
        rows = []
        for n, job in enumerate(elements):
            index = job.spec.array_task if job.spec.array_task is not None else n
            output = pattern.replace("%a", str(index)).replace("\0", "%") or job.output_path
            rows.append((job.id, sj.array_job_id, index, output))
        record_forwarded_many(self.table, rows)
        log.info("jobs %s: found as Slurm job array %d", [j.id for j in elements],
                 sj.array_job_id)  # fmt: skip
