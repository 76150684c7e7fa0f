"""Hand-written fakes of the daemon's adapters, for unit tests of its parts.

Each fake implements one of the `typing.Protocol`s the parts declare (named in
its docstring); none forks, talks to systemd or NVML, or touches a database.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from tsd import launch
from tsd.errors import StorageFull
from tsd.gpu import GpuUnavailable
from tsd.gpumonitor import GpuReader
from tsd.model import Gpu, Job, JobLimits, JobSpec, JobState

# Pids no fake process has: far above any pid this machine hands out in a test run.
FAKE_PID_BASE = 3_900_000


def spec(*command: str, **kw: object) -> JobSpec:
    """A job spec with sensible defaults for tests."""
    return JobSpec(command=command or ("true",), cwd="/", env=(), **kw)  # type: ignore[arg-type]


class FakeStore:
    """tsd.jobtable.JobStore, policy.SettingStore, runner.EnvSource, handlers.UserSettings."""

    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self.rows: dict[int, Job] = {j.id: j for j in jobs}
        self.next_id = max(self.rows, default=0) + 1
        self.settings: dict[str, str] = {}
        self.users: dict[int, dict[str, str]] = {}
        self.envs: dict[int, tuple[tuple[str, str], ...]] = {}
        self.writes = 0
        self.usage: dict[str, tuple[float, float]] = {}

    def add_job(self, uid: int, user: str, spec: JobSpec, order: int, enqueue_time: float) -> Job:
        job = Job(
            id=self.next_id, uid=uid, user=user, spec=replace(spec, env=()),
            state=JobState.QUEUED, order=order, enqueue_time=enqueue_time,
        )
        self.envs[job.id] = spec.env
        self.next_id += 1
        self.rows[job.id] = job
        self.writes += 1
        return job

    def add_jobs(
        self, uid: int, user: str, specs: list[tuple[JobSpec, int]], enqueue_time: float,
        state: JobState = JobState.QUEUED, reorder: Mapping[int, int] | None = None,
        array: bool = False,
    ) -> list[Job]:
        jobs = []
        for spec, order in specs:
            if array:
                spec = replace(spec, array_job=jobs[0].id if jobs else self.next_id)
            job = replace(self.add_job(uid, user, spec, order, enqueue_time), state=state)
            self.rows[job.id] = job
            jobs.append(job)
        for job_id, key in (reorder or {}).items():
            self.rows[job_id] = replace(self.rows[job_id], order=key)
        self.writes += 1 - len(specs)  # one transaction
        return jobs

    # Group commit (tsd.store.Store): every write here is durable at once.
    pending = False

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None:
        ok()

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None:
        ok()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        pass

    def before_commit(self, fn: Callable[[], None]) -> bool:
        return False  # no group is ever open: the caller runs it now

    def save(self, *jobs: Job) -> None:
        for job in jobs:
            assert job.id in self.rows, f"save of unknown job {job.id}"
            self.rows[job.id] = job
        self.writes += 1

    def save_run(self, job: Job, slot_seconds: float, gpu_seconds: float) -> None:
        self.save(job)
        slots, gpus = self.usage.get(job.user, (0.0, 0.0))
        self.usage[job.user] = (slots + slot_seconds, gpus + gpu_seconds)

    def usage_totals(self) -> dict[str, tuple[float, float]]:
        return dict(self.usage)

    def delete(self, ids: Iterable[int]) -> None:
        for job_id in ids:
            self.rows.pop(job_id, None)
        self.writes += 1

    def load_all(self) -> list[Job]:
        return [self.rows[i] for i in sorted(self.rows)]

    def env_of(self, job_id: int) -> tuple[tuple[str, str], ...]:
        return self.envs.get(job_id, ())

    def get_setting(self, key: str) -> str | None:
        return self.settings.get(key)

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self.settings.pop(key, None)
        else:
            self.settings[key] = value

    def user_settings(self, uid: int) -> dict[str, str]:
        return dict(self.users.get(uid, {}))

    def set_user_setting(self, uid: int, key: str, value: str | None) -> None:
        mine = self.users.setdefault(uid, {})
        if value is None:
            mine.pop(key, None)
        else:
            mine[key] = value


class Events:
    """tsd.jobtable.JobEvents: records what the table announced."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.finals: list[Job] = []
        self.rooms = 0

    def started(self, job_id: int) -> None:
        self.starts.append(job_id)

    def ended(self, job_id: int, final: Job | None = None) -> None:
        self.ends.append(job_id)
        if final is not None:
            self.finals.append(final)

    def room(self) -> None:
        self.rooms += 1


class FakeScopes:
    """tsd.runner.ScopeManager: remembers scopes; `fail` makes start() raise."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.started: list[tuple[int, int, list[int], list[str] | None]] = []
        self.killed: list[tuple[str, int]] = []
        self.stopped: list[str] = []
        self.start_threads: list[str] = []
        self.kill_answer = True
        self.left_over = True  # occupied(): what a job's scope still holds after it

    def unit_name(self, job_id: int) -> str:
        return f"tsd-job-{job_id}.scope"

    def start(
        self,
        job_id: int,
        uid: int,
        pids: Sequence[int],
        limits: JobLimits,
        devices: Sequence[str] | None = None,
        description: str = "",
    ) -> str:
        self.start_threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError(self.fail)
        self.started.append((job_id, uid, list(pids), None if devices is None else list(devices)))
        return self.unit_name(job_id)

    def kill(self, unit: str, sig: int) -> bool:
        self.killed.append((unit, sig))
        return self.kill_answer

    def stop(self, unit: str) -> None:
        self.stopped.append(unit)

    def occupied(self, unit: str, uid: int, besides: int | None = None) -> bool:
        return self.left_over


class FakeLauncher:
    """tsd.runner.Launcher: a "supervisor" per job with a real report pipe and a fake pid.

    No process is forked. `start_time` answers None (gone) unless `alive` holds the pid,
    so the runner never signals a fake pid.
    """

    def __init__(self) -> None:
        self.plans: dict[int, launch.LaunchPlan] = {}
        self.gone: list[int] = []
        self.aborted: list[int] = []
        self.report_w: dict[int, int] = {}  # job id -> write end of its report pipe
        self.alive: dict[int, int] = {}  # pid -> start time
        self.acks = False  # supervisors wait for the ACK of their report (launch.acks_end)
        self.ack_r: dict[int, int] = {}  # job id -> read end of its ACK pipe
        # Launched.reported calls: (job id, whether its ACK had been sent by then)
        self.real: dict[int, int] = {}  # job id -> a real process standing in as supervisor
        self.fail: OSError | None = None  # what the next spawn raises

    def pid_of(self, job_id: int) -> int:
        return self.real.get(job_id, FAKE_PID_BASE + job_id)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def spawn(self, plan: launch.LaunchPlan) -> launch.Launched:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        self.plans[plan.job_id] = plan
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.report_w[plan.job_id] = w
        job_id = plan.job_id
        answer = None
        if self.acks:
            self.ack_r[job_id], ack_w = os.pipe()
            answer = launch.answer_on(ack_w)
        return launch.Launched(
            self.pid_of(job_id), 1234,
            lambda: self.gone.append(job_id), lambda: self.aborted.append(job_id), r,
            answer=answer,
        )

    def start_time(self, pid: int) -> int | None:
        return self.alive.get(pid)

    def say(self, job_id: int, text: str) -> None:
        """The supervisor writes to its report pipe."""
        os.write(self.report_w[job_id], text.encode())

    def close_all(self) -> None:
        for fd in (*self.report_w.values(), *self.ack_r.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.report_w.clear()
        self.ack_r.clear()


class FakeProcs:
    """tsd.runner.ProcessWatch: the test decides when a process exits."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}

    def watch(self, pid: int, on_exit: Callable[[], None], pidfd: int | None = None) -> bool:
        assert pidfd is None  # fake launchers open none
        self.watched[pid] = on_exit
        return True

    def forget(self, pid: int) -> None:
        self.watched.pop(pid, None)

    def exit(self, pid: int) -> None:
        """The process `pid` exits."""
        self.watched[pid]()


class FakeNvml:
    """tsd.gpumonitor.GpuReader: a fixed picture, or a failure; counts reads and threads."""

    def __init__(self, gpus: Sequence[Gpu] = (), problem: str = "") -> None:
        self.gpus = tuple(gpus)
        self.problem = problem
        self.reads = 0
        self.threads: list[str] = []

    def snapshot(self) -> tuple[Gpu, ...]:
        self.reads += 1
        self.threads.append(threading.current_thread().name)
        if self.problem:
            raise GpuUnavailable(self.problem)
        return self.gpus

    def device_nodes(self, indices: Sequence[int]) -> list[str]:
        if self.problem:
            raise GpuUnavailable(self.problem)
        return [f"/dev/nvidia{i}" for i in indices]


def gpu(index: int, used_gib: int = 0) -> Gpu:
    """A 16 GiB GPU with `used_gib` in use."""
    return Gpu(
        index=index, uuid=f"GPU-{index}", name="Fake", memory_total=16 << 30,
        memory_used=used_gib << 30,
    )


class FakeGpuSource:
    """tsd.runner.GpuSource."""

    def __init__(self) -> None:
        self.nvml = FakeNvml()
        self.problem = ""

    @property
    def reader(self) -> GpuReader:
        return self.nvml

    def uuids(self, indices: Sequence[int]) -> tuple[str, ...]:
        return tuple(f"GPU-{i}" for i in indices)

    def mark_unavailable(self, problem: str) -> None:
        self.problem = problem
