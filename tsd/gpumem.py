"""--gpu-mem placement: how much of each GPU jobs that share GPUs may still take.

Pure, for tsd.scheduler (which re-exports `GpuRoom`): the room per GPU given the
running jobs, and the GPUs a job with a --gpu-mem size fits on, best first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsd.model import Job, JobSpec


@dataclass(frozen=True)
class GpuRoom:
    """One GPU's memory as --gpu-mem placement sees it, in MiB."""

    total: int
    free: int  # what NVML shows free now
    outside: int = 0  # used by processes outside tsd: counts as declared by them


def shared_room(
    running: Sequence[Job], gpu_memory: Mapping[int, GpuRoom], visible: Sequence[int] | None
) -> dict[int, tuple[int, int]]:
    """Per GPU a --gpu-mem job may go to: (MiB left under the declared sizes, MiB NVML free).

    A GPU held by a job without --gpu-mem is left out: that job has it whole.
    """
    declared: dict[int, int] = {}
    whole: set[int] = set()
    for job in running:
        for index in job.gpu_ids:
            if job.spec.gpu_mem is None:
                whole.add(index)
            else:
                declared[index] = declared.get(index, 0) + job.spec.gpu_mem
    pool = None if visible is None else set(visible)
    return {
        index: (room.total - room.outside - declared.get(index, 0), room.free)
        for index, room in gpu_memory.items()
        if index not in whole and (pool is None or index in pool)
    }


def fitting(
    room: Mapping[int, tuple[int, int]], shared: Mapping[int, int], spec: JobSpec
) -> list[int]:
    """GPUs a --gpu-mem job fits on now, best first: already shared, then least room."""
    need = spec.gpu_mem or 0
    fits = [i for i, (left, free) in room.items() if left >= need and free >= need]
    if spec.gpu_indices is not None:
        return [i for i in spec.gpu_indices if i in fits]
    return sorted(fits, key=lambda i: (i not in shared, room[i][0], i))
