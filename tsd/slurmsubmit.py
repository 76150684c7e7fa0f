"""Handing jobs to Slurm: sbatch as the owner, the Slurm id durable before the answer.

The submitting half of the Slurm engine (tsd.slurm.SlurmEngine follows what
was submitted): a recorded job, or the recorded elements of one --array, go to
sbatch run with the owner's uid, groups and captured environment; the Slurm id
(an array's id and each element's task index) is committed in one transaction
before the client hears "ok". When Slurm refuses, every record is removed
again and the client gets Slurm's reason in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from tsd.config import ClusterConfig
from tsd.errors import BadRequest, ClusterRefused, NoSuchJob, StorageFull, WrongState
from tsd.joboutput import OUTPUT_PREFIX
from tsd.jobtable import JobTable
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState
from tsd.slurmcmd import Owner
from tsd.slurmjson import SlurmJob, Snapshot
from tsd.slurmmap import (
    ArrayPart,
    Submission,
    Unsupported,
    check_spec,
    job_env,
    sbatch_args,
    slurm_ref,
)

log = logging.getLogger("tsd")

_T = TypeVar("_T")


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
    return record_forwarded_many(table, [(job_id, slurm_id, None, output)])[0]


def record_forwarded_many(
    table: JobTable, rows: Sequence[tuple[int, int, int | None, str | None]]
) -> list[Job]:
    """Pending jobs are now Slurm jobs (id, array task or None), writing to their
    outputs; all durable in one commit before any is changed in memory."""
    table.store.set_slurm_ids(rows)
    jobs = []
    for job_id, slurm_id, task, output in rows:
        job = replace(table.jobs[job_id], slurm_id=slurm_id, slurm_task=task, output_path=output)
        table.jobs[job_id] = job
        jobs.append(job)
    return jobs


def ref_of(job: Job) -> str:
    """How Slurm's commands name a forwarded job: "123", or "123_4" for an array's task."""
    assert job.slurm_id is not None
    return slurm_ref(job.slurm_id, job.slurm_task)


class Commands(Protocol):
    """Slurm's client commands (tsd.slurmcmd.SlurmCommands); blocking calls."""

    def submit(self, args: Sequence[str], owner: Owner, env: Mapping[str, str]) -> int: ...

    def cancel(self, ref: str, owner: Owner | None) -> None: ...

    def hold(self, ref: str, held: bool, owner: Owner | None) -> None: ...

    def squeue(self, slurm_ids: Sequence[int] | None) -> Snapshot: ...

    def sacct(self, slurm_ids: Sequence[int]) -> dict[int, SlurmJob]: ...


class JobData(Protocol):
    """Where a job's environment and its owner's settings are kept (tsd.store.Store)."""

    def env_of(self, job_id: int) -> tuple[tuple[str, str], ...]: ...

    def user_settings(self, uid: int) -> dict[str, str]: ...


class SlurmSubmitter:
    """Forwards recorded jobs to Slurm (the engine's submitting half)."""

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
                await self._offload(self.commands.cancel, str(slurm_id), owner)
            self._drop(job)
            raise
        log.info("job %d forwarded to Slurm as job %d", job.id, slurm_id)
        self.nudge()
        return job

    async def forward_array(self, jobs: Sequence[Job]) -> list[Job]:
        """sbatch the recorded elements of one --array as ONE Slurm job array, as their
        owner: element with TS_ARRAY_TASK_ID i is Slurm task <array id>_i. All elements
        are durable with their Slurm ids before we return; on refusal none stays."""
        ids = {j.id for j in jobs}
        self._forwarding |= ids
        try:
            return await self._forward_array(jobs)
        finally:
            self._forwarding -= ids

    async def _forward_array(self, jobs: Sequence[Job]) -> list[Job]:
        first = jobs[0]
        try:
            owner = Owner.of(first.uid)
            depend_on, skip = self._dependencies(first)  # the elements share their spec's
        except (KeyError, NoSuchJob, WrongState) as exc:
            self._drop(*jobs)
            if isinstance(exc, KeyError):
                raise ClusterRefused(f"user {first.uid} does not exist here") from None
            raise
        if skip is not None:
            return [self.table.end_pending(j, JobState.SKIPPED, ExitInfo(note=skip),
                                           wait_reason=skip) for j in jobs]  # fmt: skip
        array_job = first.spec.array_job or first.id
        prefix = self._output_path(first, f"{OUTPUT_PREFIX}{array_job}_")
        part = ArrayPart(
            tuple((j.spec.array_task if j.spec.array_task is not None else n, j.id)
                  for n, j in enumerate(jobs)),
            first.spec.array_throttle, f".{secrets.token_hex(3)}",
        )  # fmt: skip
        settings = self._data.user_settings(first.uid)
        env = job_env(self._data.env_of(first.id), settings, first.id, first.spec.gpus,
                      array_job)  # fmt: skip
        mail = (env.get("TS_MAILTO") or owner.name) if first.spec.mail else None
        held = first.state is JobState.HELD
        sub = Submission(array_job, first.spec, prefix, depend_on, mail, held, part)
        args = sbatch_args(sub, self._config())
        try:
            slurm_id = await self._offload(self.commands.submit, args, owner, env)
        except ClusterRefused:
            self._drop(*jobs)
            raise
        rows = [(job_id, slurm_id, index, part.output_of(prefix, index))
                for index, job_id in part.elements]  # fmt: skip
        try:
            recorded = record_forwarded_many(self.table, rows)
        except StorageFull:
            with contextlib.suppress(ClusterRefused):
                await self._offload(self.commands.cancel, str(slurm_id), owner)
            self._drop(*jobs)
            raise
        log.info("jobs %d-%d (array) forwarded to Slurm as job array %d", jobs[0].id,
                 jobs[-1].id, slurm_id)  # fmt: skip
        self.nudge()
        return recorded

    def _drop(self, *jobs: Job) -> None:
        """Undo records that were never forwarded: nothing half-recorded stays."""
        for job in jobs:
            current = self.table.get(job.id)
            if current is not None and current.state.pending:
                with contextlib.suppress(StorageFull):
                    self.table.remove(current)

    def _dependencies(self, job: Job) -> tuple[tuple[str, ...], str | None]:
        """The Slurm ids to wait on, or why the job is skipped at once (-W, failed dep)."""
        ids: list[str] = []
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
            ids.append(ref_of(dep))
        return tuple(ids), None

    def _output_path(self, job: Job, name: str | None = None) -> str:
        """Where the job writes: -O's name, else ts-out.<id>.<random>, in a shared directory.

        The directory: the user's --set_logdir, else cluster.output_dir, else the
        job's working directory (on a cluster /tmp is the node's own).
        """
        directory = (
            self._data.user_settings(job.uid).get("logdir")
            or self._config().output_dir
            or job.spec.cwd
        )
        name = name or job.spec.output_name or f"{OUTPUT_PREFIX}{job.id}.{secrets.token_hex(3)}"
        return os.path.join(directory, name)
