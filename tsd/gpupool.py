"""Which GPUs are free to hand to a job: pure rules over an NVML snapshot.

A GPU is free when tsd may use it (`gpus.visible`), no tsd job holds it, no
process outside tsd runs on it, and at least `free_memory_percent` of its memory
is free (task-spooler's rule). The memory rule alone would hand a GPU that
someone else is using lightly to a job; the process rule stops that. No I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

from tsd.model import Gpu, GpuProcess

_INDEX = re.compile(r"[0-9]+")


def parse_indices(text: str) -> tuple[int, ...]:
    """GPU indices from a comma list as `-g` and CUDA_VISIBLE_DEVICES write them.

    "0,2" and "0, 2" give (0, 2), in the order written; "" gives (). Raises
    ValueError naming the bad item for anything else (words, negatives, empty
    items, repeats).
    """
    if not text.strip():
        return ()
    indices: list[int] = []
    for item in text.split(","):
        word = item.strip()
        if not _INDEX.fullmatch(word):
            what = "an empty item" if not word else f"{word!r}"
            raise ValueError(f"bad GPU list {text!r}: {what} is not a GPU index (want e.g. 0,2)")
        index = int(word)
        if index in indices:
            raise ValueError(f"bad GPU list {text!r}: GPU {index} is listed twice")
        indices.append(index)
    return tuple(indices)


def free_gpus(
    gpus: Sequence[Gpu],
    held: Collection[int],
    free_memory_percent: float,
    visible: Collection[int] | None,
    tsd_pids: Collection[int] = (),
) -> tuple[int, ...]:
    """Indices, ascending, of the GPUs a new job may get now.

    `held`: GPUs given to running tsd jobs. `visible`: the GPUs tsd may use,
    None for all. `tsd_pids`: pids of tsd jobs' processes; any other process on
    a GPU makes it busy, whatever its memory.
    """
    return tuple(
        sorted(
            gpu.index
            for gpu in gpus
            if _busy_reason(gpu, held, free_memory_percent, visible, tsd_pids) is None
        )
    )


def busy_reasons(
    gpus: Sequence[Gpu],
    held: Mapping[int, int],
    free_memory_percent: float,
    tsd_pids: Collection[int] = (),
    visible: Collection[int] | None = None,
) -> dict[int, str]:
    """Why each busy GPU is busy, one line per index (for `ts -i` and the logs).

    `held` maps a GPU index to the tsd job holding it. Free GPUs are absent; the
    GPUs it leaves out are exactly those free_gpus returns.
    """
    reasons: dict[int, str] = {}
    for gpu in gpus:
        reason = _busy_reason(gpu, held, free_memory_percent, visible, tsd_pids)
        if reason is not None:
            reasons[gpu.index] = reason
    return reasons


def _busy_reason(
    gpu: Gpu,
    held: Collection[int] | Mapping[int, int],
    free_memory_percent: float,
    visible: Collection[int] | None,
    tsd_pids: Collection[int],
) -> str | None:
    """The first rule that makes this GPU busy, as a line; None when it is free."""
    if visible is not None and gpu.index not in visible:
        return "not visible to tsd (gpus.visible)"
    if gpu.index in held:
        if isinstance(held, Mapping):
            return f"held by tsd job {held[gpu.index]}"
        return "held by a tsd job"
    foreign = [p for p in gpu.processes if p.pid not in tsd_pids]
    if foreign:
        return _foreign_reason(foreign)
    if gpu.free_percent < free_memory_percent:
        # floor, so that 89.6% free never reads as "90% free (threshold 90%)"
        return (
            f"only {math.floor(gpu.free_percent)}% memory free (threshold {free_memory_percent:g}%)"
        )
    return None


def _foreign_reason(processes: Sequence[GpuProcess]) -> str:
    # Name the biggest user: that is whom an admin would go and ask.
    top = max(processes, key=lambda p: -1 if p.used_memory is None else p.used_memory)
    line = f"used by pid {top.pid}"
    if top.user is not None:
        line += f" ({top.user})"
    if top.used_memory is not None:
        line += f", {_size(top.used_memory)}"
    others = len(processes) - 1
    if others:
        line += f", and {others} other process{'es' if others > 1 else ''}"
    return line


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes // (1 << 20)} MiB"
