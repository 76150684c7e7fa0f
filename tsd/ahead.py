"""Jobs sent ahead: the queue's next job given to a reused supervisor while its short job
runs, so that it starts at that job's end without waiting for the daemon.

At 2 slots a slot otherwise waits at each job's end for the daemon to store the end,
choose the next job, store its start and send it: ~0.3 ms of Python on one thread
for every job of every slot (bench/bounds.py: sending jobs ahead, 16-20% more jobs a
second at 2 slots). Only for a burst of short jobs on the personal daemon: the
supervisor's last job ran less than half of AHEAD_WINDOW, and the job it runs began
less than that ago.

The job is recorded as running on that supervisor and sent with its GO, as any job
(a daemon that dies leaves the same recovery: the supervisor runs what it was sent,
or gives it back and leaves its idle mark), with a deadline: the supervisor starts it
only if the job before it ends before the deadline (CLOCK_MONOTONIC, which is the
event loop's clock too). It writes TAKING on the job's report pipe first and reads
the clock after: before the deadline it starts the job, past it it writes BACK and
gives the job back. The daemon, at the deadline, reads the pipe: without TAKING the
job is back for sure (a TAKING written later meets a clock past the deadline), and
it is queued again at its place; with TAKING the next line says which way it went.
No message goes back to the supervisor, and no round trip: a job waits ahead at
most AHEAD_WINDOW, and a later job may start before it by at most as much.

Until its start is heard of, the job is listed as running, but holds no slot while
the job before it runs (the scheduler counts that one's: Member.behind), and its
start time is when it was sent (at most AHEAD_WINDOW early); a ts -k that comes for it
meanwhile, should it be given back, ends it as killed before it started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from tsd import exitreport, launch
from tsd.errors import StorageFull
from tsd.model import ExitInfo, Job
from tsd.runend import STORE_RETRY, EndTable
from tsd.scheduler import job_slots
from tsd.supervisorpool import Member

log = logging.getLogger("tsd")


class AheadLauncher(Protocol):
    """Where a supervisor for a job sent ahead comes from (tsd.spawnlink)."""

    def ahead_room(self, window: float) -> int: ...

    def take_ahead(self, window: float) -> tuple[Member, float] | None: ...

    def behind(self) -> set[int]: ...

    def forget_behind(self, job_id: int) -> None: ...


class AheadSettings(Protocol):
    """Whether this is the system service (tsd.runner.RunnerSettings): no job goes
    ahead there (a job's supervisor lives in the job's own scope)."""

    @property
    def system(self) -> bool: ...


def _window() -> float:
    """AHEAD_WINDOW: TSD_AHEAD_WINDOW (seconds; 0 sends no job ahead) or 20 ms."""
    try:
        return max(0.0, float(os.environ.get("TSD_AHEAD_WINDOW", "0.02")))
    except ValueError:
        return 0.02


AHEAD_WINDOW = _window()  # seconds: how short a burst's jobs are, how long one waits ahead
TAKING_CHECK = 1.0  # seconds between looks at a job whose TAKING came, until it resolves


class AheadJobs:
    """The runner's part for jobs sent ahead (mixed into tsd.runner.Runner)."""

    loop: asyncio.AbstractEventLoop
    table: EndTable
    _ahead: dict[int, float]  # job id -> its deadline, until its start or return is heard
    _taking: set[int]  # of those, the ones whose supervisor wrote TAKING
    _acks: dict[int, launch.Launched]
    _reports: dict[int, int]
    _requeued: Callable[[], None]
    _terminals: dict[int, tuple[int, tuple[int, int]]]
    _killed: set[int]
    _early: dict[int, exitreport.ExitReport]
    settings: AheadSettings
    launcher: AheadLauncher

    def _close_report(self, job_id: int) -> None:
        raise NotImplementedError

    def _report_readable(self, job_id: int, fd: int) -> None:
        raise NotImplementedError

    def _job_ended(self, job_id: int) -> None:
        raise NotImplementedError

    def _started(self, job_id: int, signal_held: bool = True) -> None:
        raise NotImplementedError

    def start(
        self, job: Job, gpu_ids: tuple[int, ...], ahead: tuple[Member, float] | None = None
    ) -> None:
        raise NotImplementedError

    def send_ahead(self, next_jobs: Callable[[int], list[Job]], total_slots: int) -> None:
        """Send queued jobs ahead, in order, each to a supervisor whose short job runs:
        as many as there are such supervisors, of the jobs `next_jobs(n)` names (up to
        n: the queue's next ones that may go, tsd.eligibility.may_go_ahead), unless
        the jobs that run, those sent ahead apart, hold more than `total_slots` (a
        lowered ts -S: none goes ahead until it holds)."""
        if self.settings.system or not AHEAD_WINDOW:
            return
        room = self.launcher.ahead_room(AHEAD_WINDOW)
        if not room:
            return
        behind = self.not_started()
        started = self.table.running.items()
        if sum(job_slots(j.spec) for i, j in started if i not in behind) > total_slots:
            return
        for job in next_jobs(room):
            if job.id in self._terminals:
                return  # a ts -n job: it starts with its terminal, the usual way
            taken = self.launcher.take_ahead(AHEAD_WINDOW)
            if taken is None:
                return
            self.start(job, (), taken)

    def not_started(self) -> set[int]:
        """The jobs sent ahead whose job before them runs on: recorded as running, they
        hold no slot (the scheduler does not count them, tsd.dispatch)."""
        return self.launcher.behind() if self._ahead else set()

    def _sent_ahead(self, job_id: int, until: float) -> None:
        """The job went ahead with this deadline: look at it then."""
        self._ahead[job_id] = until
        self.loop.call_at(until, self._deadline, job_id)

    def _heard_ahead(self, job_id: int, fields: Mapping[str, str]) -> bool:
        """What a supervisor said on a job sent ahead: TAKING, BACK, or its start (its
        pid, output or end). True when the job is given back (its pipe is closed)."""
        if launch.BACK in fields:
            self._give_back(job_id)
            return True
        if launch.TAKING in fields:
            self._taking.add(job_id)
        if fields.keys() - {launch.TAKING}:
            self._ahead.pop(job_id, None)
            self._taking.discard(job_id)
        return False

    def _deadline(self, job_id: int) -> None:
        until = self._ahead.get(job_id)
        if until is None:
            return  # its start or its return was heard of
        if job_id not in self.table.running:  # it ended (its supervisor died), or its
            self._ahead.pop(job_id, None)  # launch was not stored: nothing to give back
            self._taking.discard(job_id)
            return
        if self.loop.time() < until:  # the loop may call a little early
            self.loop.call_at(until, self._deadline, job_id)
            return
        fd = self._reports.get(job_id)
        if fd is not None and job_id not in self._taking:
            self._report_readable(job_id, fd)  # past the deadline: a TAKING is there now
        if job_id in self._taking:
            # Its next line says which way the clock went; looked at again until then.
            self.loop.call_later(TAKING_CHECK, self._deadline, job_id)
        elif job_id in self._ahead:
            self._give_back(job_id)

    def _give_back(self, job_id: int) -> None:
        """The job never started: queued again at its place. Its supervisor sends no
        end for it (nothing to answer) and says IDLE for it; a TAKING or BACK it still
        writes fails on the closed pipe."""
        log.info("job %d given back by its supervisor (the job before it ran on): queued"
                 " again", job_id)
        self._ahead.pop(job_id, None)
        self._taking.discard(job_id)
        self._acks.pop(job_id, None)
        self.launcher.forget_behind(job_id)
        self._close_report(job_id)
        if job_id in self._killed:
            # ts -k came for it (it was listed as running): it ends so, never run.
            self._early[job_id] = exitreport.ExitReport(
                exit=ExitInfo(signal=signal.SIGTERM, note="killed before it started"),
                end=time.time(),
            )
            self._job_ended(job_id)
            return
        self._started(job_id, signal_held=False)
        self._requeue_ahead(job_id)

    def _requeue_ahead(self, job_id: int) -> None:
        if job_id not in self.table.running:
            return
        try:
            self.table.requeue(job_id)
        except StorageFull as exc:
            log.warning("job %d given back; queued again once space returns: %s", job_id, exc)
            self.loop.call_later(STORE_RETRY, self._requeue_ahead, job_id)
            return
        self._requeued()
