"""The runner: turns a scheduled job into a supervised process, and its end into a record.

For each job it builds the launch plan, has the supervisor forked (by the
spawner, tsd.spawnlink, or tsd.launch directly), on
the system service puts it into its systemd scope, and only then lets it run.
It follows each job by its report pipe (command pid, output path, then the
exit report itself or end of file once its file is written: a reused
supervisor stays alive; tsd.reportpipe), or by its supervisor's pidfd after a
restart, reads the exit report the supervisor leaves, and ends jobs on request
(SIGTERM through the scope, SIGKILL after the grace period as a backstop).

D-Bus and NVML calls block (starting a scope waits up to 10 s for systemd), so
they run in the daemon's worker threads; their results are applied on the loop.
A job whose launch is under way already holds its slots and GPUs in the job
table. It is recorded as running (with its supervisor, in its scope) before it
may run: `go` is sent once that record is committed (tsd.store's group
commit; without waiting for its fsync, see tsd.groupcommit's `after_write`); a
supervisor that is never told to go (the daemon died first) leaves an
"aborted" report, and the job goes back to the queue. A job's end is acted on
(exit report removed, waiters woken) once the end is on disk; the next job may
be chosen in the same group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tsd import exitreport, launch, spawnlink, userdb
from tsd.ahead import AheadJobs, AheadLauncher
from tsd.config import Config
from tsd.errors import StorageFull, WrongState
from tsd.gpu import GpuUnavailable
from tsd.jobplan import EnvSource, GpuSource, device_fence, launch_plan
from tsd.model import ExitInfo, Job, JobLimits, JobState
from tsd.reportpipe import PipeWatch, ReportPipes
from tsd.runend import STORE_RETRY, EndRecorder
from tsd.runend import EndReason as EndReason
from tsd.supervisorpool import Member

log = logging.getLogger("tsd")
_USERS = userdb.UserDb()  # job owners' passwd entries, each asked once a second at most

KILL_BACKSTOP = 10.0  # seconds past the grace before the daemon SIGKILLs a stuck job itself

_T = TypeVar("_T")


class ScopeManager(Protocol):
    """systemd job scopes (tsd.scope.SystemdScopes); blocking calls."""

    def start(
        self,
        job_id: int,
        uid: int,
        pids: Sequence[int],
        limits: JobLimits,
        devices: Sequence[str] | None = None,
        description: str = "",
    ) -> str: ...

    def kill(self, unit: str, sig: int) -> bool: ...

    def stop(self, unit: str) -> None: ...

    def occupied(self, unit: str, uid: int, besides: int | None = None) -> bool: ...


class Launcher(AheadLauncher, Protocol):
    """Forks supervisors (tsd.launch), itself or through the spawner (tsd.spawnlink);
    and for jobs sent ahead (tsd.ahead), hands out reused ones."""

    def start(self) -> None: ...

    def spawn(self, plan: launch.LaunchPlan) -> launch.Launched: ...

    def start_time(self, pid: int) -> int | None: ...

    def close(self) -> None: ...

    def spawn_on(self, member: Member, plan: launch.LaunchPlan) -> launch.Launched: ...


class ProcessWatch(Protocol):
    """Calls back once a process has exited."""

    def watch(self, pid: int, on_exit: Callable[[], None], pidfd: int | None = None) -> bool: ...

    def forget(self, pid: int) -> None: ...


class JobTableView(Protocol):
    """The job table as the runner uses it (tsd.jobtable.JobTable)."""

    running: dict[int, Job]

    def get(self, job_id: int) -> Job | None: ...

    def begin_run(self, job: Job, gpu_ids: tuple[int, ...], uuids: tuple[str, ...]) -> Job: ...

    def launched(
        self, job_id: int, supervisor_pid: int, supervisor_start: int | None, unit: str | None
    ) -> Job: ...

    def end_launch(self, job_id: int, exit: ExitInfo) -> Job: ...

    def requeue(
        self, job_id: int, failed: ExitInfo | None = None, notice: str | None = None
    ) -> Job: ...

    def move_front(self, job: Job) -> Job: ...

    def unlaunch(self, job_id: int) -> Job | None: ...

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None: ...

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None: ...

    def report(
        self, job_id: int, pid: int | None, output: str | None, out_seen: bool,
        save: bool = True,
    ) -> None: ...

    def finish(
        self, job_id: int, exit: ExitInfo, end: float | None, output: str | None,
        lazy: bool = False,
    ) -> Job | None: ...

    def end_pending(
        self, job: Job, state: JobState, exit: ExitInfo, wait_reason: str | None = None
    ) -> Job: ...



class ForkLauncher:
    """Supervisors forked from the daemon itself (tsd.launch), /proc for a pid's start time."""

    def start(self) -> None:
        """Nothing to start."""

    def close(self) -> None:
        """Nothing to stop."""

    def spawn(self, plan: launch.LaunchPlan) -> launch.Launched:
        """Fork the supervisor (it waits for go)."""
        return launch.spawn(plan)

    def start_time(self, pid: int) -> int | None:
        """The pid's kernel start time, None when it is gone."""
        return launch.proc_start_time(pid)

    def ahead_room(self, window: float) -> int:
        """None here: no supervisor is reused, so none takes a job ahead."""
        return 0

    def take_ahead(self, window: float) -> tuple[Member, float] | None:
        """None: no supervisor here is reused, so none takes a job ahead."""
        return None

    def behind(self) -> set[int]:
        """None: no job goes ahead here."""
        return set()

    def forget_behind(self, job_id: int) -> None:
        """Nothing to forget."""

    def spawn_on(self, member: Member, plan: launch.LaunchPlan) -> launch.Launched:
        """Never called (take_ahead gives no supervisor)."""
        raise OSError("no reused supervisors")


class PidfdWatch:
    """Process exits through pidfds on the event loop. One supervisor may be watched for
    two jobs (one it ran, one sent ahead to it: tsd.ahead): both hear of its exit."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._watches: dict[int, tuple[int, list[Callable[[], None]]]] = {}

    def watch(self, pid: int, on_exit: Callable[[], None], pidfd: int | None = None) -> bool:
        """Call `on_exit` once `pid` exits; False when it is already gone.

        `pidfd`: one already open for `pid` (this watch owns it then)."""
        watched = self._watches.get(pid)
        if watched is not None:
            if pidfd is not None:
                os.close(pidfd)
            watched[1].append(on_exit)
            return True
        fd = pidfd
        if fd is None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
        self._watches[pid] = (fd, [on_exit])
        self.loop.add_reader(fd, self._exited, pid)
        return True

    def forget(self, pid: int) -> None:
        """Stop watching `pid`."""
        watched = self._watches.pop(pid, None)
        if watched is not None:
            self.loop.remove_reader(watched[0])
            os.close(watched[0])

    def _exited(self, pid: int) -> None:
        calls = self._watches[pid][1]
        self.forget(pid)  # first: a pidfd left readable would call us forever
        for call in calls:
            call()


@dataclass(frozen=True)
class RunnerSettings:
    """What the runner needs to know of its daemon."""

    system: bool  # jobs get a scope (and a device fence) and drop privileges
    exits_dir: Path
    on_finish: str | None = None  # TS_ONFINISH of the personal daemon


class Runner(ReportPipes, EndRecorder, AheadJobs):
    """Launches jobs, watches their supervisors, records their ends, ends them on request."""

    settings: RunnerSettings
    table: JobTableView

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        settings: RunnerSettings,
        config: Callable[[], Config],
        table: JobTableView,
        env: EnvSource,
        gpus: GpuSource,
        scopes: Callable[[], ScopeManager],
        ended: Callable[[Job], None],
        requeued: Callable[[], None],
        launcher: Launcher | None = None,
        procs: ProcessWatch | None = None,
        waited: Callable[[int], bool] | None = None,
    ) -> None:
        self.loop = loop
        self._executor = executor
        self.settings = settings
        self._config = config
        self.table = table
        self._env = env
        self._gpus = gpus
        self._make_scopes = scopes
        self._scopes: ScopeManager | None = None
        self._ended = ended
        self._requeued = requeued
        self._waited = waited or _nobody
        self.launcher: Launcher = launcher or spawnlink.SpawnerLauncher()
        self.procs = procs or PidfdWatch(loop)
        self._pipes = PipeWatch(loop)
        self._reports: dict[int, int] = {}  # job id -> report pipe fd
        self._early: dict[int, exitreport.ExitReport] = {}  # reports sent on the pipe
        self._tails: dict[int, int] = {}  # job id -> pipe of an ended job, read to its EOF
        self._discard_at_eof: set[int] = set()  # recorded, but its file is still written
        self._acks: dict[int, launch.Launched] = {}  # supervisors that wait for an answer
        self._ahead: dict[int, float] = {}  # jobs sent ahead (tsd.ahead), their deadlines
        self._taking: set[int] = set()
        self._acked: set[int] = set()
        # Personal jobs whose "pid" line has not come, and the signal held for each then.
        self._unstarted: set[int] = set()
        self._held: dict[int, int] = {}
        self._watched: dict[int, int] = {}  # job id -> supervisor pid being watched
        self._kill_timers: dict[int, asyncio.TimerHandle] = {}
        self._killed: set[int] = set()  # ended by ts -k/-T: never retried (--retry)
        self._store_retries: dict[int, asyncio.TimerHandle] = {}
        self._reasons: dict[int, EndReason] = {}  # jobs the daemon ends on its own
        self._tasks: set[asyncio.Task[Any]] = set()
        # job id -> (uid, (stdout, stderr)) of a queued ts -n job: in memory only, so
        # after a restart such a job writes to /dev/null.
        self._terminals: dict[int, tuple[int, tuple[int, int]]] = {}

    @property
    def scopes(self) -> ScopeManager:
        """systemd scopes, on the system service only (pydbus loads lazily)."""
        if self._scopes is None:
            self._scopes = self._make_scopes()
        return self._scopes

    async def _offload(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _spawn_task(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ recovery

    def recover(self, running: Sequence[Job]) -> None:
        """After a restart: re-adopt live supervisors (by pid and start time), settle the
        rest. Idle marks (tsd.exitreport.mark_idle) of supervisors no running job names
        are stale; the others are read when their job settles (tsd.runend)."""
        for job in running:
            if self._supervisor_alive(job):
                log.info("job %d: re-adopted (supervisor pid %s)", job.id, job.supervisor_pid)
                self._watch(job, report_fd=None)
            else:
                self._job_ended(job.id)
        named = {(job.supervisor_pid, job.supervisor_start) for job in running}
        exits = self.settings.exits_dir
        exitreport.clear_idle_marks(exits, exitreport.idle_marks(exits) - named)
        for leftover in exits.glob("*.json"):
            try:
                job_id = int(leftover.stem)
            except ValueError:
                continue
            known = self.table.get(job_id)
            if known is None or known.state is not JobState.RUNNING:
                leftover.unlink(missing_ok=True)

    def _supervisor_alive(self, job: Job) -> bool:
        if job.supervisor_pid is None:
            return False
        if self.launcher.start_time(job.supervisor_pid) != job.supervisor_start:
            return False
        return not os.path.exists(exitreport.path(self.settings.exits_dir, job.id))

    # ------------------------------------------------------------ ts -n terminals

    def terminals_held(self, uid: int) -> int:
        """How many of this user's queued ts -n jobs hold their submitter's terminal."""
        self.sweep_terminals()
        return sum(1 for owner, _ in self._terminals.values() if owner == uid)

    def hold_terminal(self, job: Job, fds: tuple[int, int]) -> None:
        """Keep a queued ts -n job's stdout and stderr until it starts (the runner closes them)."""
        self._terminals[job.id] = (job.uid, fds)

    def sweep_terminals(self) -> None:
        """Close the terminals held for jobs that will never start (removed, skipped)."""
        for job_id in list(self._terminals):
            job = self.table.get(job_id)
            if job is None or not job.state.pending:
                _close_all(self._terminals.pop(job_id)[1])

    # ------------------------------------------------------------ starting

    def start(
        self, job: Job, gpu_ids: tuple[int, ...], ahead: tuple[Member, float] | None = None
    ) -> None:
        """Launch a pending job the dispatcher chose, on these GPUs; or `ahead` to that
        supervisor, with that deadline (tsd.ahead)."""
        held = self._terminals.pop(job.id, None)
        terminal = None if held is None else held[1]
        try:
            pw = _USERS.entry(job.uid)
        except KeyError:
            if ahead is not None:
                ahead[0].ahead_taken = False
            _close_all(terminal)
            ended = self.table.end_pending(
                job, JobState.FINISHED,
                ExitInfo(code=None, lost=True, note=f"user {job.uid} no longer exists"),
            )
            # Not from inside the dispatcher's pass that chose this job.
            self.loop.call_soon(self._ended, ended)
            return
        uuids = self._gpus.uuids(gpu_ids) if gpu_ids else ()
        job = self.table.begin_run(job, gpu_ids, uuids)
        plan = launch_plan(
            job, pw, terminal, self._env, self.settings.system, self.settings.exits_dir,
            self.settings.on_finish, self._config().kill_grace_seconds, _USERS.groups,
            None if ahead is None else ahead[1],
        )
        if self.settings.system:
            self._spawn_task(self._launch_in_scope(job, plan, gpu_ids))
            return
        launched = self._spawn(job, plan, None if ahead is None else ahead[0])
        if launched is None:
            return
        self._unstarted.add(job.id)
        try:
            job = self.table.launched(
                job.id, launched.supervisor_pid, launched.supervisor_start, None
            )
        except StorageFull as exc:
            self._not_stored(job.id, launched, None, exc)
            return
        self._go_once_stored(job, launched, None)
        if ahead is not None:
            self._sent_ahead(job.id, ahead[1])

    def _spawn(
        self, job: Job, plan: launch.LaunchPlan, member: Member | None = None
    ) -> launch.Launched | None:
        """The job's supervisor, forked (or reused); None when that failed (out of file
        descriptors or processes): the job is back in the queue then, tried again in a
        while, with the terminal of a ts -n job still held for it."""
        try:
            launched = (
                self.launcher.spawn(plan) if member is None
                else self.launcher.spawn_on(member, plan)
            )
        except OSError as exc:
            if plan.out_fds is not None:
                self._terminals[job.id] = (job.uid, plan.out_fds)
            self.table.requeue(job.id)
            log.warning("job %d not started, retrying in %.0fs: %s", job.id, STORE_RETRY, exc)
            self.loop.call_later(STORE_RETRY, self._requeued)
            return None
        _close_all(plan.out_fds)  # the supervisor has its own copies now
        return launched

    def _go_once_stored(self, job: Job, launched: launch.Launched, unit: str | None) -> None:
        """Tell the supervisor to go once the job's running record is committed (its
        fsync need not be done: tsd.groupcommit); undo the launch if rolled back."""
        self.table.after_write(
            functools.partial(self._go, job, launched),
            functools.partial(self._not_stored, job.id, launched, unit),
        )

    def _go(self, job: Job, launched: launch.Launched) -> None:
        with contextlib.suppress(OSError):  # killed (ts -k) before its go: its end tells
            launched.go()
        if launched.answer is not None:
            self._acks[job.id] = launched
        self._watch(job, launched.report_fd, launched.pidfd)
        log.debug("job %d started (supervisor %d)", job.id, launched.supervisor_pid)

    def _not_stored(
        self, job_id: int, launched: launch.Launched, unit: str | None, exc: StorageFull
    ) -> None:
        """Not durable, so it must not run: undo the launch, keep the job queued (as the
        store still has it) and try again once space may be back."""
        launched.abort()
        launched.wait()  # it exits at once: go never came
        self._started(job_id, signal_held=False)
        if unit is not None:
            self._spawn_task(self._quietly(self.scopes.stop, unit))
        self._abandon_launch(job_id, launched, exc)

    async def _launch_in_scope(
        self, job: Job, plan: launch.LaunchPlan, gpu_ids: tuple[int, ...]
    ) -> None:
        try:
            # Only a GPU job's fence asks NVML (which may block); a CPU job's is a
            # listing of /dev, made here: no worker, no hop back.
            devices = await self._offload(device_fence, self._gpus, gpu_ids) if gpu_ids else (
                device_fence(self._gpus, ()))
        except GpuUnavailable as exc:
            # NVML failed just now: the job waits for it in the queue like any other.
            self._gpus.mark_unavailable(str(exc))
            log.warning("job %d not started, GPUs unavailable: %s", job.id, exc)
            if plan.out_fds is not None:  # back in the queue, still the caller's terminal
                self._terminals[job.id] = (job.uid, plan.out_fds)
            self.table.requeue(job.id)
            self._requeued()
            return
        launched = self._spawn(job, plan)
        if launched is None:
            return
        description = f"tsd job {job.id} of {job.user}: {job.spec.command_line[:100]}"
        try:
            unit = await self._offload(
                self.scopes.start, job.id, job.uid, [launched.supervisor_pid],
                self._config().job, devices, description,
            )
        except Exception as exc:  # the scope is the job's fence: no scope, no job
            launched.abort()
            await self._offload(launched.wait)
            exitreport.discard(self.settings.exits_dir, job.id)
            os.close(launched.report_fd)
            log.error("job %d: %s", job.id, exc)
            note = f"could not start its scope: {exc}"
            self._ended(self.table.end_launch(job.id, ExitInfo(code=None, lost=True, note=note)))
            return
        try:
            job = self.table.launched(
                job.id, launched.supervisor_pid, launched.supervisor_start, unit
            )
        except StorageFull as exc:
            self._not_stored(job.id, launched, unit, exc)
            return
        self._go_once_stored(job, launched, unit)  # durable and in its scope: it may run

    def _abandon_launch(self, job_id: int, launched: launch.Launched, exc: StorageFull) -> None:
        """`launched` could not be stored: the job stays queued, tried again in a while."""
        exitreport.discard(self.settings.exits_dir, job_id)
        os.close(launched.report_fd)
        self.table.unlaunch(job_id)
        log.warning("job %d not started, retrying in %.0fs: %s", job_id, STORE_RETRY, exc)
        self.loop.call_later(STORE_RETRY, self._requeued)

    # ------------------------------------------------------------ watching

    def _watch(self, job: Job, report_fd: int | None, pidfd: int | None = None) -> None:
        """Follow a job to its end: the end of file on its report pipe when the daemon
        launched it (the supervisor closes the pipe once its exit report is written, or
        dies; a reused supervisor lives on), else the exit of its supervisor (re-adopted
        after a restart: with no daemon to serve, it exits once its job is over)."""
        if report_fd is not None:
            if pidfd is not None:
                os.close(pidfd)
            self._follow_pipe(job.id, report_fd)
            return
        assert job.supervisor_pid is not None
        if not self.procs.watch(job.supervisor_pid, lambda: self._job_ended(job.id), pidfd):
            self.loop.call_soon(self._job_ended, job.id)
            return
        self._watched[job.id] = job.supervisor_pid

    def _job_ended(self, job_id: int) -> None:
        """The job's supervisor is gone: record the report it left, or that it was lost."""
        try:
            self._settle(job_id)
        finally:
            # -W jobs it skipped (through `ended`) will never start: free their terminals.
            self.sweep_terminals()

    def _settle(self, job_id: int) -> None:
        pid = self._watched.pop(job_id, None)
        if pid is not None:
            self.procs.forget(pid)  # first: a pidfd left readable would call us forever
        self._last_words(job_id)
        self._started(job_id, signal_held=False)
        job = self.table.running.get(job_id)
        if job is None:
            # Nothing to record: its supervisor writes the file, if it waits.
            self._answer(job_id, None if self._early.pop(job_id, None) is None else launch.NAK)
            return
        if job.supervisor_pid is not None and isinstance(self.launcher, ForkLauncher):
            # Only a supervisor this daemon forked is its child; the spawner reaps
            # those it forked, and a re-adopted one was never ours.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.supervisor_pid, os.WNOHANG)
        timer = self._kill_timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        if job.unit and self.settings.system and self.scopes.occupied(
            job.unit, job.uid, besides=job.supervisor_pid
        ):
            # Something outlived the supervisor (killed before it ended them all).
            self._spawn_task(self._quietly(self.scopes.stop, job.unit))
        self._record_end(job_id)

    async def _quietly(self, fn: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(Exception):
            await self._offload(fn, *args)

    # ------------------------------------------------------------ ending

    def kill(self, job: Job, why: EndReason | None = None) -> None:
        """End a running job's whole tree: SIGTERM now, SIGKILL after the grace period."""
        if job.state is not JobState.RUNNING:
            raise WrongState(f"job {job.id} is {job.state.value}, not running")
        self._killed.add(job.id)
        if why is not None:
            self._reasons[job.id] = why
        self._signal(job.id, signal.SIGTERM)
        if job.id not in self._kill_timers:
            delay = self._config().kill_grace_seconds + KILL_BACKSTOP
            self._kill_timers[job.id] = self.loop.call_later(
                delay, self._signal, job.id, signal.SIGKILL
            )

    def _signal(self, job_id: int, sig: int) -> None:
        job = self.table.running.get(job_id)
        if job is None:
            return
        if job.unit and self.settings.system:
            self._spawn_task(self._signal_scope(job, sig))
        else:
            self._signal_supervisor(job, sig)

    async def _signal_scope(self, job: Job, sig: int) -> None:
        # KillUnit reaches every process of the scope; the supervisor handles SIGTERM
        # by ending the tree itself and recording the status.
        assert job.unit is not None
        with contextlib.suppress(Exception):
            if await self._offload(self.scopes.kill, job.unit, sig):
                return
        if job.id in self.table.running:
            self._signal_supervisor(job, sig)

    def _started(self, job_id: int, signal_held: bool = True) -> None:
        """The job's "pid" line came (or it is over): a signal held for it goes now."""
        self._unstarted.discard(job_id)
        sig = self._held.pop(job_id, None)
        job = self.table.running.get(job_id)
        if signal_held and sig is not None and job is not None:
            self._signal_supervisor(job, sig)

    def _signal_supervisor(self, job: Job, sig: int) -> None:
        if sig != signal.SIGKILL and job.id in self._unstarted:
            # A reused supervisor drops the signals pending when it takes a job (they
            # were for its previous one), and it tells its pid once it has: until then
            # the signal waits here. SIGKILL, the backstop for a stuck job, does not.
            self._held[job.id] = sig
            return
        if job.supervisor_pid and self._supervisor_alive(job):
            with contextlib.suppress(OSError):
                os.kill(job.supervisor_pid, sig)

    async def drain(self) -> None:
        """Let launches and scope calls under way finish (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop_watching(self) -> None:
        """The daemon stops (its store closes next): hear of no end, fire no timer of ours."""
        self._stop_reading_all()
        for job_id in list(self._watched):
            self.procs.forget(self._watched.pop(job_id))
        for timer in (*self._kill_timers.values(), *self._store_retries.values()):
            timer.cancel()


def _nobody(job_id: int) -> bool:
    return False


def _close_all(fds: tuple[int, ...] | None) -> None:
    for fd in fds or ():
        with contextlib.suppress(OSError):
            os.close(fd)
