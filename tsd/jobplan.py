"""What a job is launched with: its plan (tsd.launch.LaunchPlan), its environment, and
the device nodes its scope may open. A part of the runner (tsd.runner), decided from
the job, its owner's passwd entry and groups, and the daemon's settings."""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tsd import launch
from tsd.gpumonitor import GpuReader
from tsd.model import Job


class EnvSource(Protocol):
    """Where a job's environment and its user's settings are kept (tsd.store.Store)."""

    def env_of(self, job_id: int) -> tuple[tuple[str, str], ...]: ...

    def user_settings(self, uid: int) -> dict[str, str]: ...


class GpuSource(Protocol):
    """The GPU monitor as the runner uses it (tsd.gpumonitor.GpuMonitor)."""

    @property
    def reader(self) -> GpuReader: ...

    def uuids(self, indices: Sequence[int]) -> tuple[str, ...]: ...

    def mark_unavailable(self, problem: str) -> None: ...


def launch_plan(
    job: Job, pw: pwd.struct_passwd, out_fds: tuple[int, int] | None, env_source: EnvSource,
    system: bool, exits_dir: Path, daemon_on_finish: str | None, grace: float,
    groups: Callable[[str, int], tuple[int, ...]], ahead_until: float | None = None,
) -> launch.LaunchPlan:
    """The plan of `job`, owned by `pw`, on the system service or a personal daemon
    (sent ahead with its deadline `ahead_until`, tsd.ahead).

    `groups` looks up the owner's groups (tsd.userdb) where the job drops root's
    privileges; when it cannot, the job's process looks them up itself after fork
    (and fails to start if that fails too)."""
    settings = env_source.user_settings(job.uid)
    env = job_env(job, env_source.env_of(job.id), settings)
    on_finish = env.get("TS_ONFINISH") or (None if system else daemon_on_finish)
    # Root's own personal daemon runs root's jobs: nothing to drop, so they take the
    # supervisor's cheap spawn path like any user's personal jobs.
    drop = os.getuid() == 0 and (system or job.uid != 0)
    owner_groups = None
    if drop:
        with contextlib.suppress(OSError, KeyError):
            owner_groups = groups(pw.pw_name, pw.pw_gid)
    return launch.make_plan(
        job_id=job.id,
        uid=job.uid,
        gid=pw.pw_gid,
        user=pw.pw_name,
        command=job.spec.command,
        cwd=job.spec.cwd,
        env=env,
        umask=job.spec.umask,
        log_dir=settings.get("logdir") or env.get("TMPDIR") or "/tmp",
        exits_dir=str(exits_dir),
        store_output=job.spec.store_output,
        output_name=job.spec.output_name,
        gzip=job.spec.gzip,
        stderr_apart=job.spec.stderr_apart,
        timeout=job.spec.timeout,
        grace=grace,
        on_finish=on_finish,
        mail_to=(env.get("TS_MAILTO") or pw.pw_name) if job.spec.mail else None,
        drop_privileges=drop,
        groups=owner_groups,
        nofile_soft=launch.JOB_NOFILE_SOFT if system else None,
        out_fds=out_fds,  # ts -n: the submitter's terminal
        # A system job's supervisor lives in the job's scope, which goes with the job.
        reuse=not system,
        ack_on_go=True,  # the runner answers every report that comes on the pipe
        ahead_until=ahead_until,
    )


def nvidia_nodes_present() -> bool:
    """Whether /dev holds NVIDIA GPU device nodes (nvidia0, nvidia1...): one listing,
    at C speed (a glob costs several times it, per job)."""
    return any(n.startswith("nvidia") and n[6:7].isdigit() for n in os.listdir("/dev"))


def device_fence(gpus: GpuSource, gpu_ids: tuple[int, ...]) -> list[str] | None:
    """The device nodes the job may open, None for no fence at all; with GPUs it asks
    NVML, which may block (a worker's call), without them it does not."""
    if not nvidia_nodes_present():
        return None  # no NVIDIA device nodes here: nothing to fence
    # Every job is fenced off the GPUs it was not given, a CPU job off all of
    # them: CUDA_VISIBLE_DEVICES alone is only a convention.
    return gpus.reader.device_nodes(gpu_ids) if gpu_ids else []


def job_env(
    job: Job, submitted: Sequence[tuple[str, str]], settings: Mapping[str, str]
) -> dict[str, str]:
    """A job's environment: as submitted, the user's --setenv values, and tsd's variables."""
    env = dict(submitted)
    env.update((key[4:], value) for key, value in settings.items() if key.startswith("env:"))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in job.gpu_ids)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["TS_JOBID"] = str(job.id)
    if job.spec.array_task is not None:  # --array
        env["TS_ARRAY_TASK_ID"] = str(job.spec.array_task)
        env["TS_ARRAY_JOB_ID"] = str(job.spec.array_job)
    return env
