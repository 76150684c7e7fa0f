"""Facts about the processes NVML shows on the GPUs, read from /proc (only those pids).

The daemon's GPU monitor calls `resolve` in a worker thread after each NVML
snapshot: it reads /proc/<pid>/cgroup, /proc/<pid>/stat and the owner of
/proc/<pid> for the handful of GPU processes, never scanning all of /proc.
The rules that turn these facts into owners are tsd.gpuusage's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from tsd.gpuusage import ProcOwner, job_of_cgroup, job_of_tree


def parent_of(pid: int) -> int | None:
    """The parent pid from /proc/<pid>/stat, None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The command name may hold spaces and parentheses: split after the last ")".
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return fh.read()
    except OSError:
        return ""


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def resolve(
    pids: Iterable[int], supervisors: Mapping[int, int], scopes: bool
) -> dict[int, ProcOwner]:
    """Owner and tsd job of each pid.

    `supervisors`: supervisor pid -> job id of the running jobs. `scopes`: jobs
    run in systemd scopes (the system service), so a process's cgroup names its
    job; a personal daemon follows parent links only (it may itself run inside
    some scope, which says nothing about its own jobs).
    """
    out: dict[int, ProcOwner] = {}
    for pid in set(pids):
        job = job_of_cgroup(_cgroup(pid)) if scopes else None
        if job is None:
            job = job_of_tree(pid, parent_of, supervisors)
        out[pid] = ProcOwner(uid=_uid(pid), job=job)
    return out
