"""The runner's last step for a job: its end recorded from its exit report, then acted on.

A part of the runner (tsd.runner.Runner builds on `EndRecorder`). The end joins
the store's group commit (tsd.store); only once it is on disk is the exit
report removed and the end acted on (dependents, the next launch). On a full
disk the job stays running in memory and on disk, with its exit report kept,
and recording is tried again every STORE_RETRY seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tsd import exitreport
from tsd.eligibility import should_retry
from tsd.errors import StorageFull
from tsd.model import ExitInfo, Job


class EndTable(Protocol):
    """The job table as recording an end uses it (tsd.jobtable.JobTable)."""

    running: dict[int, Job]

    def requeue(
        self, job_id: int, failed: ExitInfo | None = None, notice: str | None = None
    ) -> Job: ...

    def move_front(self, job: Job) -> Job: ...

    def finish(
        self, job_id: int, exit: ExitInfo, end: float | None, output: str | None,
        lazy: bool = False,
    ) -> Job | None: ...

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None: ...

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None: ...


class ExitsDir(Protocol):
    """Where supervisors leave exit reports (tsd.runner.RunnerSettings)."""

    @property
    def exits_dir(self) -> Path: ...

log = logging.getLogger("tsd")

STORE_RETRY = 2.0  # seconds between tries to record a job's end while the state dir is full


@dataclass(frozen=True)
class EndReason:
    """Why the daemon itself ends a running job (its GPUs sat idle), for the job's record."""

    note: str  # added to its exit note, or the requeued job's notice
    requeue: bool = False  # queue it again (front of its owner's queue) instead of finishing


class EndRecorder:
    """Records ended jobs for the runner (see the module docstring)."""

    loop: asyncio.AbstractEventLoop
    settings: ExitsDir
    table: EndTable
    _store_retries: dict[int, asyncio.TimerHandle]
    _killed: set[int]
    _reasons: dict[int, EndReason]
    _ended: Callable[[Job], None]
    _requeued: Callable[[], None]
    _waited: Callable[[int], bool]  # whether a client waits for this job's end
    _early: dict[int, exitreport.ExitReport]  # reports that came on the report pipe

    def _discard_report(self, job_id: int) -> None:
        """The job's end is stored: its exit report may go (tsd.reportpipe)."""
        raise NotImplementedError

    def _end_written(self, job_id: int) -> None:
        """The job's end is committed, not yet synced: ACK it (tsd.reportpipe)."""
        raise NotImplementedError

    def _record_end(self, job_id: int) -> None:
        """Record the ended job from its exit report; on a full disk keep both and retry.

        The report stays in exits/ until the store holds the job's end, so neither a
        full disk now nor a restart before space returns loses the exit code.
        """
        first_try = self._store_retries.pop(job_id, None) is None
        if job_id not in self.table.running:
            return
        exits = self.settings.exits_dir
        report = self._early.get(job_id) or exitreport.read(exits, job_id)
        job, killed = self.table.running[job_id], job_id in self._killed
        pid, start = job.supervisor_pid, job.supervisor_start
        if report is None and pid is not None and exitreport.has_idle_mark(exits, pid, start):
            # Its supervisor held no job when the daemon that stored this one as started
            # died: the job was never sent to it (tsd.supervisorpool). Queued again, as
            # a job told to run nothing is; the mark goes once that is stored.
            report = exitreport.ABORTED
            self.table.after_write(
                functools.partial(exitreport.clear_idle_marks, exits, {(pid, start)}))
        waited = self._waited(job_id)
        why = self._reasons.get(job_id)  # ended by the daemon (idle GPUs): no --retry
        retry = bool(report and not report.aborted and not why and should_retry(
            job, report.exit, killed))
        ended: Job | None = None
        try:
            if report is not None and report.aborted:
                self.table.requeue(job_id)
            elif why is not None and why.requeue:
                self.table.move_front(self.table.requeue(job_id, notice=why.note))
            elif retry and report is not None:
                self.table.requeue(job_id, failed=report.exit)
            elif report is None:
                note = "its supervisor vanished (killed, or host reboot)"
                ended = self.table.finish(
                    job_id, ExitInfo(lost=True, note=note), None, None, lazy=not waited)
            else:
                ex = report.exit if why is None else _noted(report.exit, why.note)
                ended = self.table.finish(job_id, ex, report.end, report.output, lazy=not waited)
        except StorageFull as exc:
            self._not_recorded(job_id, first_try, exc)
            return
        # Nobody waits for this end: act on it now, so that the next launch joins the
        # same commit (one fsync for both; its go still waits for the commit). A waiter
        # hears first, and the next launch follows (see _recorded).
        early = ended is not None and not waited
        # The ACK is queued before the go of a next job launched here, which may go to
        # this same supervisor (tsd.supervisorpool): it then reads them in the order it
        # acts on them (it keeps a go that comes first all the same).
        self.table.after_write(functools.partial(self._end_written, job_id))
        if early and ended is not None:
            self._ended(ended)
        self.table.after_commit(
            functools.partial(
                self._recorded, job_id, _queued_again(report, why, retry), ended, early
            ),
            functools.partial(self._not_recorded, job_id, first_try),
            lazy=early,  # only the log line and the report file wait on it then
        )

    def _not_recorded(self, job_id: int, first_try: bool, exc: StorageFull) -> None:
        if first_try:  # one line per job, not one per retry
            log.warning("job %d ended; recording it once space returns: %s", job_id, exc)
        self._store_retries[job_id] = self.loop.call_later(STORE_RETRY, self._record_end, job_id)

    def _recorded(self, job_id: int, again: str, ended: Job | None, acted: bool) -> None:
        """The job's end (or its return to the queue) is on disk: act on it. When a
        client waits for the end, it hears first (its wake-up is queued already)."""
        if ended is not None and not acted:
            self.loop.call_soon(self._act_on_end, job_id, again, ended, True)
        else:
            self._act_on_end(job_id, again, ended, False)

    def _act_on_end(self, job_id: int, again: str, ended: Job | None, dispatch: bool) -> None:
        self._discard_report(job_id)
        self._killed.discard(job_id)
        self._reasons.pop(job_id, None)
        if again:
            log.info("job %d: %s, queued again", job_id, again)
            self._requeued()
            return
        if ended is not None:
            # For people reading the journal: "job 1 finished: exit 0 after 3.2s".
            if log.isEnabledFor(logging.INFO):
                took = ""
                if ended.start_time is not None and ended.end_time is not None:
                    took = f" after {max(0.0, ended.end_time - ended.start_time):.1f}s"
                summary = ended.exit.summary() if ended.exit else "ended"
                log.info("job %d finished: %s%s", job_id, summary, took)
            if dispatch:
                self._ended(ended)

def _queued_again(report: exitreport.ExitReport | None, why: EndReason | None, retry: bool) -> str:
    """Why an ended job went back to the queue, for the log; "" when it did not."""
    if report is not None and report.aborted:
        return "never started"
    if why is not None and why.requeue:
        return why.note
    return f"{report.exit.summary()} (--retry)" if retry and report is not None else ""


def _noted(ex: ExitInfo, note: str) -> ExitInfo:
    return dataclasses.replace(ex, note="; ".join(n for n in (note, ex.note) if n))
