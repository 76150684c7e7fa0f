"""GpuWatch: peaks made durable as they rise, sampling only while it tells something, and
the fair-share charge of GPU use outside tsd (the real Store, hand-written sampler)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from tsd.gpuusage import ProcOwner
from tsd.gpuwatch import GpuWatch
from tsd.model import Gpu, GpuProcess, Job, JobSpec, JobState, UnmanagedUse
from tsd.store import Store

GIB = 1 << 30


class Sampler:
    def __init__(self) -> None:
        self.outside: tuple[UnmanagedUse, ...] = ()
        self.armed: float | None = None
        self.nvml_missing: str | None = None

    def unmanaged(self) -> tuple[UnmanagedUse, ...]:
        return self.outside

    def absent(self) -> str | None:
        return self.nvml_missing

    def arm_sample(self, seconds: float) -> None:
        self.armed = seconds

    def stop_sample(self) -> None:
        self.armed = None


def gpu_job(store: Store) -> Job:
    spec = JobSpec(command=("true",), cwd="/", env=(), gpus=1, gpu_mem=1024)
    job = store.add_job(1000, "alice", spec, 1, 0.0)
    return replace(job, state=JobState.RUNNING, gpu_ids=(0,), pid=50)


def picture(used: int, pid: int = 50) -> tuple[Gpu, ...]:
    return (Gpu(0, "u0", "A100", 80 * GIB, used, (GpuProcess(pid, used, "alice"),), 40),)


def test_the_peak_is_stored_as_it_rises_and_read_back_by_a_new_watch(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    job = gpu_job(store)
    running = [job]
    sampler = Sampler()
    watch = GpuWatch(store, lambda: running, sampler, lambda: 5.0, always=False)
    owners = {50: ProcOwner(1000, job.id)}
    watch.on_sample(picture(3 * GIB), owners)
    watch.on_sample(picture(GIB), owners)
    shown = watch.annotate(job)
    assert (shown.gpu_mem_peak, shown.gpu_mem_now, shown.gpu_util_now) == (3072, 1024, 40)
    assert sampler.armed == 5.0  # a GPU job runs: keep sampling
    running.clear()
    watch.job_ended(job)
    assert sampler.armed is None  # nothing to sample any more
    finished = replace(job, state=JobState.FINISHED)
    assert watch.annotate(finished).gpu_mem_now is None
    again = GpuWatch(Store(tmp_path / "state.db"), list, Sampler(), lambda: 5.0, always=False)
    assert again.annotate(finished).gpu_mem_peak == 3072
    store.delete([job.id])
    assert Store(tmp_path / "state.db").gpu_peaks() == {}


def test_outside_use_is_charged_in_gpu_seconds_and_keeps_the_sampling_going(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    sampler = Sampler()
    charged: list[Mapping[int, float]] = []
    now = [100.0]
    watch = GpuWatch(store, list, sampler, lambda: 5.0, always=False,
                     charge=charged.append, clock=lambda: now[0])  # fmt: skip
    sampler.outside = (UnmanagedUse(pid=9, uid=1001, user="bob", gpus=(0, 1), memory_mib=1),)
    owners = {9: ProcOwner(1001, None)}
    watch.on_sample(picture(GIB, pid=9), owners)
    assert charged == []  # the first sample has no period before it
    assert sampler.armed == 5.0
    now[0] += 5.0
    watch.on_sample(picture(GIB, pid=9), owners)
    assert charged == [{1001: 10.0}]
    now[0] += 3600.0  # a gap is not use anyone saw: at most two periods count
    watch.on_sample(picture(GIB, pid=9), owners)
    assert charged[-1] == {1001: 20.0}
    sampler.outside = ()
    watch.on_sample(picture(0, pid=9), {})
    assert sampler.armed is None


def test_the_system_service_samples_while_nvml_exists(tmp_path: Path) -> None:
    sampler = Sampler()
    watch = GpuWatch(Store(tmp_path / "s.db"), list, sampler, lambda: 2.0, always=True)
    watch.rearm()
    assert sampler.armed == 2.0
    sampler.nvml_missing = "NVML library libnvidia-ml.so.1 not found"
    watch.rearm()
    assert sampler.armed is None


def test_a_cpu_jobs_end_leaves_the_sampling_as_it_was_without_scanning_the_running_jobs(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    job = gpu_job(store)
    asked: list[int] = []

    def holding() -> list[Job]:
        asked.append(1)
        return [job]

    sampler = Sampler()
    watch = GpuWatch(store, holding, sampler, lambda: 5.0, always=False)
    watch.rearm()
    assert sampler.armed == 5.0 and len(asked) == 1
    cpu_only = replace(job, id=job.id + 1, gpu_ids=())
    watch.job_ended(cpu_only)
    assert sampler.armed == 5.0 and len(asked) == 1  # the GPU job still runs: still sampled
    watch.job_ended(job)
    assert len(asked) == 2  # a GPU job's end asks again
