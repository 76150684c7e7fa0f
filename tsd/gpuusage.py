"""Who uses the GPUs: NVML's processes mapped to tsd jobs, per-job figures, unmanaged use.

Pure rules over an NVML snapshot and facts about its processes (tsd.gpuprocs
reads those from /proc). A process belongs to a tsd job when it runs in the
job's scope (system service: its cgroup path holds `tsd-job-<id>.scope`) or
descends from the job's supervisor (personal daemon: the supervisor is a
child subreaper, so even daemonised grandchildren stay below it). Any other
process on a GPU is unmanaged: GPU use that bypassed the queue, charged to the
user who runs it. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tsd.model import Gpu, UnmanagedUse

_SCOPE = re.compile(r"/tsd-job-([0-9]+)\.scope(?:/|$)")
MAX_DEPTH = 256  # parent links followed at most: a process tree is never this deep
MIB = 1 << 20


@dataclass(frozen=True)
class ProcOwner:
    """What /proc says of one GPU process: its owner and the tsd job it belongs to."""

    uid: int | None  # None: gone, or hidden from the daemon (another PID namespace)
    job: int | None  # None: not in any tsd job


@dataclass(frozen=True)
class JobGpuUse:
    """A running job's GPU use in one sample."""

    memory_mib: int  # its processes' NVML memory, summed over its GPUs
    utilization: int | None  # mean device utilisation of the GPUs it holds


def job_of_cgroup(text: str) -> int | None:
    """The tsd job whose scope holds a process, from its /proc/<pid>/cgroup text."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        match = _SCOPE.search(path)
        if match:
            return int(match.group(1))
    return None


def job_of_tree(
    pid: int, parent_of: Callable[[int], int | None], supervisors: Mapping[int, int]
) -> int | None:
    """The job whose supervisor `pid` descends from (or is), following parent links."""
    current: int | None = pid
    for _ in range(MAX_DEPTH):
        if current is None or current <= 1:
            return None
        job = supervisors.get(current)
        if job is not None:
            return job
        current = parent_of(current)
    return None


def owned_pids(owners: Mapping[int, ProcOwner]) -> set[int]:
    """The GPU processes that belong to tsd jobs."""
    return {pid for pid, owner in owners.items() if owner.job is not None}


def job_use(
    gpus: Sequence[Gpu], owners: Mapping[int, ProcOwner], holding: Mapping[int, Sequence[int]]
) -> dict[int, JobGpuUse]:
    """Each running GPU job's memory and utilisation.

    `holding`: job id -> the GPU indices it holds. Memory is what NVML reports
    for the job's processes (on any GPU: a job that strays off its GPUs still
    uses memory); utilisation is the mean device utilisation of its GPUs, which
    on a shared GPU includes its neighbours' work (NVML has no per-process figure).
    """
    memory: dict[int, int] = {job: 0 for job in holding}
    for gpu in gpus:
        for proc in gpu.processes:
            owner = owners.get(proc.pid)
            if owner is None or owner.job is None:
                continue
            memory[owner.job] = memory.get(owner.job, 0) + (proc.used_memory or 0)
    util = {gpu.index: gpu.utilization for gpu in gpus}
    out: dict[int, JobGpuUse] = {}
    for job, used in memory.items():
        readings = [util.get(i) for i in holding.get(job, ())]
        known = [r for r in readings if r is not None]
        mean = round(sum(known) / len(known)) if known else None
        out[job] = JobGpuUse(memory_mib=used // MIB, utilization=mean)
    return out


def unmanaged(
    gpus: Sequence[Gpu], owners: Mapping[int, ProcOwner], visible: Iterable[int] | None = None
) -> tuple[UnmanagedUse, ...]:
    """Processes on GPUs that no tsd job started, one entry per pid, by pid.

    `visible` (None: all) limits it to the GPUs tsd manages: a process on a GPU
    tsd never hands out takes nothing from tsd's users.
    """
    pool = None if visible is None else set(visible)
    found: dict[int, tuple[list[int], int, str | None]] = {}
    for gpu in gpus:
        if pool is not None and gpu.index not in pool:
            continue
        for proc in gpu.processes:
            owner = owners.get(proc.pid)
            if owner is not None and owner.job is not None:
                continue
            on, used, user = found.get(proc.pid, ([], 0, proc.user))
            on.append(gpu.index)
            found[proc.pid] = (on, used + (proc.used_memory or 0), user or proc.user)
    return tuple(
        UnmanagedUse(
            pid=pid,
            uid=None if pid not in owners else owners[pid].uid,
            user=user,
            gpus=tuple(sorted(set(on))),
            memory_mib=used // MIB,
        )
        for pid, (on, used, user) in sorted(found.items())
    )


def outside_gpus(uses: Iterable[UnmanagedUse]) -> dict[int, int]:
    """uid -> how many GPUs that user's unmanaged processes occupy (each GPU once)."""
    per_user: dict[int, set[int]] = {}
    for use in uses:
        if use.uid is not None:
            per_user.setdefault(use.uid, set()).update(use.gpus)
    return {uid: len(gpus) for uid, gpus in per_user.items()}


def unmanaged_usage(uses: Iterable[UnmanagedUse], seconds: float) -> dict[int, float]:
    """GPU-seconds per uid that unmanaged use adds over one sample period of `seconds`.

    The one place fair share learns of GPU use outside the queue: each GPU a
    user's unmanaged processes occupy counts as held for the whole period.
    """
    return {uid: n * max(0.0, seconds) for uid, n in outside_gpus(uses).items()}


def hold_reasons(uses: Iterable[UnmanagedUse]) -> dict[int, str]:
    """uid -> why that user's GPU jobs wait, under `gpu.unmanaged: hold`."""
    firsts: dict[int, UnmanagedUse] = {}
    for use in uses:
        if use.uid is not None and use.uid not in firsts:
            firsts[use.uid] = use
    return {
        uid: (
            f"held while you use GPU {','.join(map(str, use.gpus))} outside tsd "
            f"(pid {use.pid}; gpu.unmanaged: hold)"
        )
        for uid, use in firsts.items()
    }
