"""The daemon's picture of the GPUs: one NVML snapshot, reused briefly, refreshed off the loop.

NVML (and the psutil lookups behind a snapshot) can take long on a busy or
failing driver, so every call runs in the daemon's worker threads and only its
result is applied on the event loop. The scheduler reads the cached picture;
when it is too old the monitor refreshes it and calls `on_refresh`, which
schedules again. NVML is polled while some job waits for a GPU, and sampled
(`arm_sample`) while GPU jobs run or GPU use outside tsd was seen, for the
jobs' GPU memory and the unmanaged-use rules. Each picture comes with the
owners of its processes (tsd.gpuprocs): which tsd job, if any, and which user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor
from typing import Protocol

from tsd.gpu import GpuUnavailable
from tsd.gpupool import busy_reasons, free_gpus
from tsd.gpuusage import MIB, ProcOwner, owned_pids, unmanaged
from tsd.model import Gpu, UnmanagedUse
from tsd.scheduler import GpuRoom

log = logging.getLogger("tsd")

Snapshot = tuple[tuple[Gpu, ...] | None, str]  # the GPUs (None: unknown), and why unknown
_STALE = float("-inf")  # the time of a picture that must be read again, however young


class GpuReader(Protocol):
    """What the monitor needs of NVML (tsd.gpu.NvmlGpus); blocking calls."""

    def snapshot(self) -> tuple[Gpu, ...]: ...

    def device_nodes(self, indices: Sequence[int]) -> list[str]: ...


Resolver = Callable[[list[int], Mapping[int, int], bool], dict[int, ProcOwner]]


def proc_resolver(pids: list[int], supervisors: Mapping[int, int], scopes: bool) -> dict[
    int, ProcOwner
]:
    """The real one: /proc (tsd.gpuprocs)."""
    from tsd.gpuprocs import resolve

    return resolve(pids, supervisors, scopes)


def nvml_reader() -> GpuReader:
    """The real NVML, through the library $TSD_NVML_LIBRARY names (tests), else the system's."""
    from tsd.gpu import NvmlGpus

    return NvmlGpus(library=os.environ.get("TSD_NVML_LIBRARY") or None)


class GpuMonitor:
    """The GPU snapshot cache, its refresh, and the poll timer."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        visible: Callable[[], tuple[int, ...] | None],
        on_refresh: Callable[[], None],
        reader: Callable[[], GpuReader] = nvml_reader,
        supervisors: Callable[[], Mapping[int, int]] = dict,
        scopes: bool = False,
        resolver: Resolver = proc_resolver,
    ) -> None:
        self.loop = loop
        self._supervisors = supervisors  # supervisor pid -> job id of the running jobs
        self._scopes = scopes  # jobs run in systemd scopes (system service)
        self._resolver = resolver
        self._owners: dict[int, ProcOwner] = {}
        self._sample_timer: asyncio.TimerHandle | None = None
        # Called on the loop after each successful picture (tsd.gpuwatch records usage).
        self.on_sample: Callable[[tuple[Gpu, ...], Mapping[int, ProcOwner]], None] | None = None
        self._executor = executor
        self._visible = visible
        self._on_refresh = on_refresh
        self._make_reader = reader
        self._reader: GpuReader | None = None
        self._taken = _STALE
        self._gpus: tuple[Gpu, ...] | None = None
        self._problem = ""
        self._absent = False  # the last failure was "no NVML on this machine"
        self._inflight: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def reader(self) -> GpuReader:
        """NVML, loaded on first need: a CPU-only queue never touches it."""
        if self._reader is None:
            self._reader = self._make_reader()
        return self._reader

    # -- the picture

    def cached(self) -> Snapshot:
        """The last picture, however old; no NVML call."""
        return self._gpus, self._problem

    def is_fresh(self, max_age: float) -> bool:
        """Whether the picture (or the failure) is at most `max_age` seconds old."""
        known = self._gpus is not None or bool(self._problem)
        return known and time.monotonic() - self._taken <= max_age

    def request(self, max_age: float) -> bool:
        """True when the picture is fresh; else start a refresh (then `on_refresh`), False."""
        if self.is_fresh(max_age):
            return True
        self._refresh()
        return False

    async def snapshot(self, max_age: float = 0.0) -> Snapshot:
        """A picture at most `max_age` seconds old, refreshing it off the loop if needed."""
        if not self.is_fresh(max_age):
            await asyncio.shield(self._refresh())
        return self.cached()

    def expire(self, keep_problem: bool = True) -> None:
        """Make the picture stale: the next `request` or `snapshot` reads NVML again. The
        stale picture still explains (`ts -i`'s "GPU 0 used by ...", `ts -A`, metrics)
        while that read is under way; nothing is placed on it (`request` is False until
        the new one is in). Keep its problem so a failure is not logged at every poll."""
        self._taken = _STALE
        if not keep_problem:
            self._problem = ""

    def mark_unavailable(self, problem: str) -> None:
        """NVML failed outside a snapshot (device nodes): waiting jobs say why."""
        self._taken, self._gpus, self._problem = time.monotonic(), None, problem
        self._absent = False  # NVML is there; a device failed: GPU jobs wait, not refused

    def _refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._inflight = self.loop.create_task(self._read())
        return self._inflight

    def _take(self, supervisors: Mapping[int, int]) -> tuple[tuple[Gpu, ...], dict[int, ProcOwner]]:
        """In a worker: the NVML picture, and who owns each of its processes."""
        gpus = self.reader.snapshot()
        pids = sorted({p.pid for g in gpus for p in g.processes})
        return gpus, self._resolver(pids, supervisors, self._scopes) if pids else {}

    async def _read(self) -> None:
        before = self._problem
        absent = False
        owners: dict[int, ProcOwner] = {}
        try:
            supervisors = dict(self._supervisors())
            gpus: tuple[Gpu, ...] | None
            gpus, owners = await self.loop.run_in_executor(self._executor, self._take, supervisors)
            problem = ""
        except GpuUnavailable as exc:
            # The bare reason: the scheduler's wait reason and `ts -g` add their own prefix.
            gpus, problem = None, str(exc) or "NVML failed"
            absent = exc.absent
        except Exception as exc:  # a surprise from pynvml or psutil must not stall GPU jobs
            log.exception("reading the GPUs failed")
            gpus, problem = None, f"reading the GPUs failed: {exc}"
        finally:
            self._inflight = None
        if problem and problem != before:
            log.warning("GPUs unavailable: %s", problem)  # once per distinct reason
        elif not problem and before and gpus is not None:
            log.info("GPUs available again: NVML reports %d GPUs", len(gpus))
        self._taken, self._gpus, self._problem = time.monotonic(), gpus, problem
        self._owners = owners
        self._absent = absent
        if gpus is not None and self.on_sample is not None:
            try:
                self.on_sample(gpus, owners)
            except Exception:  # recording usage must never stop scheduling
                log.exception("recording GPU usage failed")
        self._on_refresh()

    # -- what the picture says

    def absent(self) -> str | None:
        """Why this machine has no GPUs at all (no NVML), or None (GPUs, or a passing failure)."""
        return self._problem if self._gpus is None and self._absent else None

    def pool(self) -> tuple[int, ...] | None:
        """The GPUs tsd may hand out (visible and present), None while unknown."""
        if self._gpus is None:
            return None
        visible = self._visible()
        return tuple(g.index for g in self._gpus if visible is None or g.index in visible)

    def free(
        self, held: Mapping[int, int], tsd_pids: Collection[int], threshold: float
    ) -> tuple[int, ...] | None:
        """Indices free for a new job now, None while NVML is down."""
        if self._gpus is None:
            return None
        pids = set(tsd_pids) | owned_pids(self._owners)
        return free_gpus(self._gpus, held, threshold, self._visible(), pids)

    def busy(
        self, held: Mapping[int, int], tsd_pids: Collection[int], threshold: float
    ) -> dict[int, str]:
        """Why each busy GPU is busy (tsd job, someone else's process, memory)."""
        if not self._gpus:
            return {}
        pids = set(tsd_pids) | owned_pids(self._owners)
        return dict(busy_reasons(self._gpus, held, threshold, pids, self._visible()))

    def owners(self) -> Mapping[int, ProcOwner]:
        """Who owns each process of the last picture."""
        return self._owners

    def unmanaged(self) -> tuple[UnmanagedUse, ...]:
        """Processes outside tsd on the GPUs tsd hands out, in the last picture."""
        if not self._gpus:
            return ()
        return unmanaged(self._gpus, self._owners, self._visible())

    def rooms(self) -> dict[int, GpuRoom] | None:
        """The pool's GPU memory for --gpu-mem placement (MiB), None while unknown."""
        if self._gpus is None:
            return None
        visible = self._visible()
        out: dict[int, GpuRoom] = {}
        for gpu in self._gpus:
            if visible is not None and gpu.index not in visible:
                continue
            outside = sum(
                p.used_memory or 0
                for p in gpu.processes
                if self._owners.get(p.pid, ProcOwner(None, None)).job is None
            )
            out[gpu.index] = GpuRoom(
                total=gpu.memory_total // MIB,
                free=max(0, gpu.memory_total - gpu.memory_used) // MIB,
                outside=outside // MIB,
            )
        return out

    def uuids(self, indices: Sequence[int]) -> tuple[str, ...]:
        """The UUIDs of these GPUs from the picture ("" where unknown)."""
        by_index = {g.index: g.uuid for g in self._gpus or ()}
        return tuple(by_index.get(i, "") for i in indices)

    # -- polling

    def arm_poll(self, seconds: float) -> None:
        """Poll again in `seconds` unless a poll is already due."""
        if self._timer is None:
            self._timer = self.loop.call_later(seconds, self._tick)

    def stop_poll(self) -> None:
        """No job waits for a GPU: an idle daemon sleeps."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        self.expire()
        self._refresh()

    # -- sampling GPU use (independent of the poll for waiting jobs)

    def arm_sample(self, seconds: float) -> None:
        """Take a fresh picture in `seconds` unless one is already due."""
        if self._sample_timer is None:
            self._sample_timer = self.loop.call_later(seconds, self._sample_tick)

    def stop_sample(self) -> None:
        """Nothing to sample (no GPU job runs, no outside use seen)."""
        if self._sample_timer is not None:
            self._sample_timer.cancel()
            self._sample_timer = None

    def _sample_tick(self) -> None:
        self._sample_timer = None
        self.expire()
        self._refresh()  # joins a read under way rather than starting a second one
