"""The runner's reading of report pipes: what a job's supervisor tells its daemon.

A part of the runner (tsd.runner.Runner builds on `ReportPipes`). A supervisor
says "pid N" and "out PATH" once its job runs, and at the job's end either
"end REPORT" (the exit report itself, tsd.exitreport.encode) or "end -" (read
the report from its file once the pipe closes: TS_ONFINISH or mail may still
change it). A job whose report came on the pipe is recorded at once, and once
its end is committed the daemon answers ACK (tsd.launch.acks_end: on the link of
a reused supervisor, or on the go pipe), which the supervisor waits for: it
writes no exit report file then, and the pipe is closed. The ACK need not wait
for the commit's fsync (clients hearing of the end do): a committed end outlives
a crash of the daemon (the WAL is in the page cache, tsd.groupcommit), and only
a crash of the machine can lose it, which takes the supervisor, and the file it
would have written instead, with it. On a busy machine that fsync is
milliseconds away, and a supervisor waiting for it cannot take the next job.
A supervisor that gets NAK or nothing (the daemon died, or gave up on the job) writes the file;
the daemon still there reads the pipe on to its end of file and only then
removes the file, never while it may still be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from tsd import exitreport, launch


class ReportTable(Protocol):
    """The job table as report lines update it (tsd.jobtable.JobTable)."""

    def report(
        self, job_id: int, pid: int | None, output: str | None, out_seen: bool,
        save: bool = True,
    ) -> None: ...


class ReportSettings(Protocol):
    """Where supervisors leave exit reports (tsd.runner.RunnerSettings)."""

    @property
    def exits_dir(self) -> Path: ...


class PipeWatch:
    """Readable fds for the event loop through one epoll of their own, which is one
    reader of the loop's: a job's report pipe is followed for one job only, and two
    epoll_ctl calls cost a fraction of the loop's per-fd bookkeeping (a selector key
    and a handle made, and dropped, per job).

    Level-triggered, as the loop's readers are: what one call leaves unread, or a call
    that raised leaves untried, is ready again at the loop's next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = None
        self._calls: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, call: Callable[[], None]) -> None:
        """Call `call` whenever `fd` is readable, until `remove`."""
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        self._epoll.register(fd, select.EPOLLIN)
        self._calls[fd] = call

    def remove(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed: its number may come back)."""
        if self._calls.pop(fd, None) is not None and self._epoll is not None:
            self._epoll.unregister(fd)

    def close(self) -> None:
        """Watch nothing more; the epoll goes (a later `add` makes a new one)."""
        for fd in list(self._calls):
            self.remove(fd)
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _ready(self) -> None:
        if self._epoll is None:
            return
        for fd, _ in self._epoll.poll(0):
            call = self._calls.get(fd)  # None: removed by an earlier call of this turn
            if call is not None:
                call()


class ReportPipes:
    """Reads supervisors' report pipes for the runner (see the module docstring)."""

    loop: asyncio.AbstractEventLoop
    _pipes: PipeWatch  # where the report pipes are followed
    table: ReportTable
    settings: ReportSettings
    _reports: dict[int, int]  # job id -> report pipe fd
    _early: dict[int, exitreport.ExitReport]  # reports that came on the pipe
    _tails: dict[int, int]  # job id -> pipe of an ended job, read to its end of file
    _discard_at_eof: set[int]  # recorded, but the supervisor may still write the file
    _acks: dict[int, launch.Launched]  # supervisors that wait for ACK (Launched.answer)
    _acked: set[int]  # ACKed at the commit of their end, before its fsync
    _ahead: dict[int, float]  # jobs sent ahead (tsd.ahead)
    # A line on a job sent ahead (tsd.ahead.AheadJobs): True when it was given back.
    _heard_ahead: Callable[[int, Mapping[str, str]], bool]

    def _job_ended(self, job_id: int) -> None:
        """The job is over (the runner records its end)."""
        raise NotImplementedError

    def _started(self, job_id: int, signal_held: bool = True) -> None:
        """The job's supervisor said its pid: it runs the job (the runner acts on it)."""
        raise NotImplementedError

    def _follow_pipe(self, job_id: int, fd: int) -> None:
        """Read the job's report pipe as it is written; the job ends at its report or
        at the pipe's end of file, whichever comes first."""
        self._reports[job_id] = fd
        self._pipes.add(fd, lambda: self._report_readable(job_id, fd))

    def _last_words(self, job_id: int) -> None:
        """The job ended: read what its supervisor said just before, then stop reading
        the pipe (or read on to its end of file, when its report came on it)."""
        fd = self._reports.get(job_id)
        if fd is None:
            return
        if job_id not in self._early:
            self._read_report(job_id, fd)
        if job_id in self._early:
            self._tail(job_id, fd)
        else:
            self._answer(job_id, None)  # it ended without a report to acknowledge
            self._close_report(job_id)

    def _report_readable(self, job_id: int, fd: int) -> None:
        if job_id in self._tails:
            self._tail_readable(job_id, fd)
        elif self._read_report(job_id, fd):
            self._job_ended(job_id)

    def _read_report(self, job_id: int, fd: int) -> bool:
        """The supervisor's "pid N", "out PATH" and "end REPORT" lines, as they come;
        True at the end of file (the pipe is closed then) or once the report came."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_report(job_id)
            return True
        fields = launch.parse_report(data.decode(errors="replace"))
        if job_id in self._ahead and self._heard_ahead(job_id, fields):
            return False  # given back (tsd.ahead): its pipe is closed
        pid, out, end = fields.get("pid"), fields.get("out"), fields.get("end")
        report = None
        if end and end != "-" and job_id not in self._early:
            report = exitreport.decode(end)
            if report is None:
                # Not a report: its supervisor writes the file, read at the end of file.
                self._answer(job_id, launch.NAK)
        if pid is not None:
            self._started(job_id)
        if pid is not None or out is not None:
            self.table.report(
                job_id,
                int(pid) if pid and pid.isdigit() else None,
                None if out in (None, "-") else out,
                out is not None,
                # A job that ended at once tells its start with its end: one write.
                save=report is None,
            )
        if report is not None:
            self._early[job_id] = report
            waiting = self._acks.get(job_id)
            if waiting is not None and waiting.ending is not None:
                waiting.ending()  # it may take the next job ahead of its answer
            return True
        return False

    def _tail(self, job_id: int, fd: int) -> None:
        """The job ended by its report: read its pipe on to the end of file, the sign
        that the supervisor's copy of the report is written and may be removed."""
        self._reports.pop(job_id, None)
        self._tails[job_id] = fd  # the same reader goes on, to _tail_readable now

    def _tail_readable(self, job_id: int, fd: int) -> None:
        try:
            if os.read(fd, 65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._end_tail(job_id)
        if job_id in self._discard_at_eof:
            self._discard_at_eof.discard(job_id)
            exitreport.discard(self.settings.exits_dir, job_id)

    def _end_tail(self, job_id: int) -> None:
        self._stop_reading(self._tails, job_id)

    def _end_written(self, job_id: int) -> None:
        """The job's end is committed: a supervisor that sent its report and waits for
        the ACK gets it now (see the module docstring), and the pipe is done with."""
        if job_id in self._early and self._answer(job_id, launch.ACK):
            del self._early[job_id]
            self._end_tail(job_id)
            self._acked.add(job_id)

    def _discard_report(self, job_id: int) -> None:
        """The job's end is on disk: its report file, if any, may go once it is all
        written. A supervisor that sent its report was answered at the commit
        (`_end_written`, always before this): ACKed, it wrote no file; not reached (it
        is gone), its report is dropped here and the file handled as any other."""
        if job_id in self._acked:
            self._acked.discard(job_id)
            return
        self._early.pop(job_id, None)
        self._answer(job_id, None)  # it sent no report to acknowledge (or is gone)
        if job_id in self._tails:
            self._discard_at_eof.add(job_id)
        else:
            exitreport.discard(self.settings.exits_dir, job_id)

    def _answer(self, job_id: int, word: bytes | None) -> bool:
        """Answer the report of a supervisor that waits for it, once: ACK (stored), NAK
        (write the file, read then at the end of file), or None when it sent no report
        (a link to a reused supervisor carries nothing else then). True when it was
        told; False when it is gone or waits for nothing."""
        waiting = self._acks.pop(job_id, None)
        return waiting is not None and waiting.answer is not None and waiting.answer(word)

    def _stop_reading_all(self) -> None:
        """Read no pipe any more (the daemon stops): a supervisor that writes one now
        fails to, and so leaves its report durably in its file (tsd.launch)."""
        for pipes in (self._reports, self._tails):
            for job_id in list(pipes):
                self._stop_reading(pipes, job_id)
        self._pipes.close()

    def _close_report(self, job_id: int) -> None:
        self._stop_reading(self._reports, job_id)

    def _stop_reading(self, pipes: dict[int, int], job_id: int) -> None:
        fd = pipes.pop(job_id, None)
        if fd is not None:
            self._pipes.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
