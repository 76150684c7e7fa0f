"""The jobs' GPU use over time: current memory and utilisation, durable peaks, outside use.

The GPU monitor hands every fresh picture to `GpuWatch.on_sample`. From it
this records each running GPU job's memory (NVML's per-process figures for
the job's processes) and utilisation (its GPUs' device utilisation), keeps
each job's peak memory in the store as soon as it rises (so it survives a
restart and is there when the job ends), and accounts GPU use outside tsd.
It keeps the samples coming while they matter: while a GPU job runs, while
outside use was last seen, and always on the system service where NVML exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from tsd.errors import StorageFull
from tsd.gpuusage import JobGpuUse, ProcOwner, job_use, unmanaged_usage
from tsd.model import Gpu, Job, JobState, UnmanagedUse

log = logging.getLogger("tsd")


class PeakStore(Protocol):
    """Where peaks are kept (tsd.store.Store)."""

    def gpu_peaks(self) -> dict[int, int]: ...

    def set_gpu_peaks(self, peaks: dict[int, int]) -> None: ...


class Sampler(Protocol):
    """The GPU monitor as the watch uses it (tsd.gpumonitor.GpuMonitor)."""

    def unmanaged(self) -> tuple[UnmanagedUse, ...]: ...

    def absent(self) -> str | None: ...

    def arm_sample(self, seconds: float) -> None: ...

    def stop_sample(self) -> None: ...


def no_charge(gpu_seconds: Mapping[int, float]) -> None:
    """The default fair-share sink for unmanaged GPU use: nothing is charged."""


class GpuWatch:
    """Per-job GPU figures and the sampling rhythm."""

    def __init__(
        self,
        store: PeakStore,
        holding: Callable[[], Sequence[Job]],
        sampler: Sampler,
        period: Callable[[], float],
        always: bool,
        charge: Callable[[Mapping[int, float]], None] = no_charge,
        clock: Callable[[], float] = time.monotonic,
        known: Callable[[int], bool] = lambda job_id: True,
    ) -> None:
        self._store = store
        self._holding = holding
        self._sampler = sampler
        self._period = period
        self._always = always  # system service: sample even when no GPU job runs
        # Fair share's connection point: uid -> GPU-seconds of unmanaged use per sample.
        self.charge = charge
        self._clock = clock
        self._known = known  # whether a job id still exists (cleared jobs' peaks go)
        self.peaks: dict[int, int] = store.gpu_peaks()
        self._unsaved: dict[int, int] = {}
        self.live: dict[int, JobGpuUse] = {}
        self._last: float | None = None
        self._outside_seen = False

    def on_sample(self, gpus: tuple[Gpu, ...], owners: Mapping[int, ProcOwner]) -> None:
        """A fresh NVML picture: record the jobs' use, charge outside use, sample again."""
        holding = {j.id: j.gpu_ids for j in self._holding() if j.gpu_ids}
        self.live = job_use(gpus, owners, holding)
        for job_id, use in self.live.items():
            if use.memory_mib > self.peaks.get(job_id, -1):
                self.peaks[job_id] = use.memory_mib
                self._unsaved[job_id] = use.memory_mib
        self._save()
        self.forget(self._known)
        now = self._clock()
        outside = self._sampler.unmanaged()
        self._outside_seen = bool(outside)
        if self._last is not None and outside:
            # Never more than two periods: a gap (no sampling) is not use we saw.
            seconds = min(now - self._last, 2 * self._period())
            self.charge(unmanaged_usage(outside, seconds))
        self._last = now
        self.rearm()

    def _save(self) -> None:
        if not self._unsaved:
            return
        try:
            self._store.set_gpu_peaks(dict(self._unsaved))
        except StorageFull as exc:
            log.warning("GPU memory peaks not saved yet: %s", exc)  # tried at the next sample
            return
        self._unsaved.clear()

    def rearm(self) -> None:
        """Keep sampling while it tells something; call after a GPU job starts or ends."""
        gpu_jobs = any(j.gpu_ids for j in self._holding())
        keep = gpu_jobs or self._outside_seen or (self._always and self._sampler.absent() is None)
        if keep:
            self._sampler.arm_sample(self._period())
        else:
            self._sampler.stop_sample()
            self._last = None

    def job_ended(self, job: Job) -> None:
        """A job ended: its current figures go; its peak stays (saved with the next write)."""
        self.live.pop(job.id, None)
        self._save()
        if job.gpu_ids:
            # Only a GPU job's end can end the sampling; the others leave every reason
            # to sample as it was, and a rearm scans every running job (each job's end).
            self.rearm()

    def annotate(self, job: Job) -> Job:
        """The job with its GPU peak, and while it runs its current GPU memory and use."""
        peak = self.peaks.get(job.id)
        live = self.live.get(job.id) if job.state is JobState.RUNNING else None
        if peak is None and live is None:
            return job
        return replace(
            job,
            gpu_mem_peak=peak,
            gpu_mem_now=None if live is None else live.memory_mib,
            gpu_util_now=None if live is None else live.utilization,
        )

    def forget(self, keep: Callable[[int], bool]) -> None:
        """Drop the peaks of jobs no longer known (their rows go with the jobs)."""
        for job_id in [i for i in self.peaks if not keep(i)]:
            del self.peaks[job_id]
