"""--gpu-mem placement, size parsing, and who uses a GPU (NVML process -> tsd job or user).

The placement rules are checked on `decide` directly: examples pin the
reasons, and a hypothesis property replays random streams of starts and ends
against the GPUs and checks that the declared sizes on a GPU never pass its
total and that a whole-GPU job never shares.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd.cli_options import UsageError, gpu_mem_size, parse
from tsd.cli_request import parse_argv
from tsd.configfile import parse_config
from tsd.errors import ConfigError
from tsd.gpuusage import (
    ProcOwner,
    hold_reasons,
    job_of_cgroup,
    job_of_tree,
    job_use,
    outside_gpus,
    unmanaged,
    unmanaged_usage,
)
from tsd.model import Gpu, GpuProcess, Job, JobSpec, JobState, UnmanagedUse, UserLimits
from tsd.render import gpu_memory_lines, info_text, list_text
from tsd.scheduler import DepOutcome, GpuRoom, Resources, decide, fits_problem

GIB = 1 << 30


def job(
    id: int,
    uid: int = 1000,
    *,
    gpus: int = 1,
    mem: int | None = None,
    pinned: tuple[int, ...] | None = None,
    state: JobState = JobState.QUEUED,
    gpu_ids: tuple[int, ...] = (),
) -> Job:
    spec = JobSpec(
        command=("true",), cwd="/", env=(), gpus=gpus, gpu_indices=pinned, gpu_mem=mem
    )
    return Job(
        id=id, uid=uid, user=f"u{uid}", spec=spec, state=state, order=id, enqueue_time=0.0,
        gpu_ids=gpu_ids,
    )


def resources(
    rooms: dict[int, GpuRoom],
    free: tuple[int, ...] | None = None,
    *,
    limits: UserLimits | None = None,
    outside: dict[int, int] | None = None,
    holds: dict[int, str] | None = None,
) -> Resources:
    return Resources(
        total_slots=64,
        limits=lambda uid: limits or UserLimits(),
        free_gpus=tuple(sorted(rooms)) if free is None else free,
        visible_gpus=tuple(sorted(rooms)),
        gpu_memory=rooms,
        outside_gpus=outside or {},
        gpu_holds=holds or {},
    )


def idle(n: int, total: int = 80 * 1024) -> dict[int, GpuRoom]:
    return {i: GpuRoom(total=total, free=total) for i in range(n)}


def run(pending: list[Job], running: list[Job], res: Resources) -> dict[int, tuple[int, ...]]:
    decision = decide(pending, running, lambda _: DepOutcome.GONE, res)
    return {s.job_id: s.gpu_ids for s in decision.start}


def reasons(pending: list[Job], running: list[Job], res: Resources) -> dict[int, str]:
    return dict(decide(pending, running, lambda _: DepOutcome.GONE, res).reasons)


# ------------------------------------------------------------------ placement


def test_two_gpu_mem_jobs_share_one_gpu_and_a_third_goes_to_the_next() -> None:
    starts = run([job(1, mem=30 * 1024), job(2, mem=30 * 1024), job(3, mem=30 * 1024)], [],
                 resources(idle(2)))  # fmt: skip
    assert starts == {1: (0,), 2: (0,), 3: (1,)}


def test_a_whole_gpu_job_never_lands_on_a_gpu_a_gpu_mem_job_holds() -> None:
    holder = job(1, mem=1024, state=JobState.RUNNING, gpu_ids=(0,))
    # The monitor leaves a held GPU out of the free list; one GPU, held: the job waits.
    why = reasons([job(2)], [holder], resources(idle(1), free=()))
    assert why == {2: "waiting for 1 free GPU (0 free)"}


def test_a_gpu_mem_job_never_lands_on_a_gpu_a_whole_gpu_job_holds() -> None:
    whole = job(1, state=JobState.RUNNING, gpu_ids=(0,))
    starts = run([job(2, mem=1024)], [whole], resources(idle(2), free=(1,)))
    assert starts == {2: (1,)}
    why = reasons([job(3, mem=1024)], [whole], resources(idle(1), free=()))
    assert why == {3: "waiting for 1 GPU with 1.0 GiB free (0 have it)"}


def test_nvml_free_memory_too_low_makes_a_gpu_mem_job_wait() -> None:
    rooms = {0: GpuRoom(total=80 * 1024, free=10 * 1024)}  # someone's allocation NVML shows
    assert reasons([job(1, mem=20 * 1024)], [], resources(rooms)) == {
        1: "waiting for 1 GPU with 20.0 GiB free (0 have it)"
    }
    assert run([job(1, mem=8 * 1024)], [], resources(rooms)) == {1: (0,)}


def test_outside_memory_counts_as_declared_on_its_gpu() -> None:
    rooms = {0: GpuRoom(total=80 * 1024, free=80 * 1024, outside=70 * 1024)}
    assert run([job(1, mem=20 * 1024)], [], resources(rooms)) == {}
    assert run([job(1, mem=10 * 1024)], [], resources(rooms)) == {1: (0,)}


def test_n_gpus_with_s_each_and_pinned_gpu_mem() -> None:
    starts = run([job(1, gpus=2, mem=50 * 1024)], [], resources(idle(3)))
    assert starts == {1: (0, 1)}
    pinned = job(2, gpus=1, mem=50 * 1024, pinned=(2,))
    assert run([pinned], [], resources(idle(3))) == {2: (2,)}
    shared = job(3, mem=40 * 1024, state=JobState.RUNNING, gpu_ids=(2,))
    assert reasons([pinned], [shared], resources(idle(3))) == {2: "waiting for 50.0 GiB on GPU 2"}


def test_outside_gpu_use_counts_against_the_quota_and_hold_holds() -> None:
    quota = UserLimits(max_gpus=1)
    res = resources(idle(2), free=(1,), limits=quota, outside={1000: 1})
    assert reasons([job(1)], [], res) == {1: "user quota: 1 of 1 GPUs in use (max_gpus)"}
    assert run([job(1, uid=2000)], [], res) == {1: (1,)}  # others are not charged
    held = resources(idle(2), holds={1000: "held while you use GPU 0 outside tsd"})
    assert reasons([job(1)], [], held) == {1: "held while you use GPU 0 outside tsd"}


def test_a_gpu_mem_no_gpu_can_hold_is_refused_as_never_startable() -> None:
    spec = job(1, mem=100 * 1024).spec
    totals = {0: 80 * 1024, 1: 80 * 1024}
    why = fits_problem(spec, UserLimits(), 4, 2, (0, 1), totals)
    assert why == "job needs 100.0 GiB per GPU but the largest GPU has 80.0 GiB"
    exact = replace(spec, gpu_mem=80 * 1024)
    assert fits_problem(exact, UserLimits(), 4, 2, (0, 1), totals) is None
    two = job(2, gpus=2, mem=50 * 1024).spec
    mixed = {0: 80 * 1024, 1: 40 * 1024}
    assert fits_problem(two, UserLimits(), 4, 2, (0, 1), mixed) == (
        "job needs 2 GPUs with 50.0 GiB but 1 have that"
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["start", "end"]),
            st.integers(1, 3),  # GPUs wanted
            st.one_of(st.none(), st.integers(1, 100)),  # --gpu-mem in GiB, None: whole
        ),
        max_size=30,
    )
)
def test_declared_sizes_never_pass_a_gpus_total_and_whole_gpu_jobs_never_share(
    events: list[tuple[str, int, int | None]],
) -> None:
    totals = {0: 80 * 1024, 1: 40 * 1024, 2: 80 * 1024, 3: 24 * 1024}
    running: list[Job] = []
    next_id = 1
    for kind, gpus, mem_gib in events:
        if kind == "end":
            if running:
                running.pop(0)
            continue
        held = {i for j in running for i in j.gpu_ids}
        declared = {i: 0 for i in totals}
        for r in running:
            for i in r.gpu_ids:
                declared[i] += r.spec.gpu_mem or 0
        # NVML: what the running jobs declared is in use (the worst case).
        rooms = {i: GpuRoom(total=t, free=t - declared[i]) for i, t in totals.items()}
        free = tuple(i for i in totals if i not in held)
        mem = None if mem_gib is None else mem_gib * 1024
        new = job(next_id, gpus=gpus, mem=mem)
        next_id += 1
        starts = run([new], running, resources(rooms, free=free))
        if new.id in starts:
            ids = starts[new.id]
            assert len(ids) == gpus == len(set(ids))
            running.append(replace(new, state=JobState.RUNNING, gpu_ids=ids))
        for index, total in totals.items():
            on = [r for r in running if index in r.gpu_ids]
            assert sum(r.spec.gpu_mem or 0 for r in on) <= total
            if any(r.spec.gpu_mem is None for r in on):
                assert len(on) == 1, f"a whole-GPU job shares GPU {index}: {on}"


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "mib"),
    [("20G", 20480), ("512M", 512), ("512", 512), ("1.5G", 1536), ("20GiB", 20480),
     ("2gb", 2048), ("1T", 1 << 20)],
)  # fmt: skip
def test_gpu_mem_sizes_read_as_mib(text: str, mib: int) -> None:
    assert gpu_mem_size(text) == mib


@pytest.mark.parametrize("text", ["0", "5X", "", "-1", "G", "0.4M", "20 G B"])
def test_bad_gpu_mem_sizes_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match=r"^invalid value for --gpu-mem: "):
        parse(["--gpu-mem", text, "true"])


def test_gpu_mem_alone_means_one_gpu_and_with_g_n_each() -> None:
    req = parse_argv(["--gpu-mem", "20G", "true"], {}, "/w").request
    assert req is not None and req.spec.gpus == 1 and req.spec.gpu_mem == 20480  # type: ignore[union-attr]
    req = parse_argv(["-G", "2", "--gpu_mem=1G", "true"], {}, "/w").request
    assert req.spec.gpus == 2 and req.spec.gpu_mem == 1024  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="not with -G 0"):
        parse_argv(["-G", "0", "--gpu-mem", "1G", "true"], {}, "/w")


# ------------------------------------------------------------- who uses a GPU


def test_a_process_in_a_job_scope_belongs_to_that_job() -> None:
    text = "0::/tsd.slice/tsd-u1000.slice/tsd-job-42.scope\n"
    assert job_of_cgroup(text) == 42
    assert job_of_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n") is None
    assert job_of_cgroup("0::/tsd.slice/tsd-job-7.scope/inner\n") == 7
    assert job_of_cgroup("0::/tsd-job-7.scope.d\n") is None


def test_a_process_below_a_supervisor_belongs_to_its_job() -> None:
    parents = {500: 400, 400: 300, 300: 1, 600: 1}
    supervisors = {300: 9}
    assert job_of_tree(500, parents.get, supervisors) == 9
    assert job_of_tree(300, parents.get, supervisors) == 9
    assert job_of_tree(600, parents.get, supervisors) is None
    assert job_of_tree(777, parents.get, supervisors) is None  # gone
    loop = {10: 11, 11: 10}
    assert job_of_tree(10, loop.get, {}) is None  # a cycle ends, never hangs


def _gpu(index: int, procs: list[GpuProcess], util: int | None = None) -> Gpu:
    return Gpu(index=index, uuid=f"u{index}", name="A100", memory_total=80 * GIB,
               memory_used=sum(p.used_memory or 0 for p in procs), processes=tuple(procs),
               utilization=util)  # fmt: skip


def test_job_use_sums_its_processes_and_averages_its_gpus_utilisation() -> None:
    gpus = [
        _gpu(0, [GpuProcess(10, 3 * GIB, "alice"), GpuProcess(20, GIB, "bob")], util=90),
        _gpu(1, [GpuProcess(11, GIB, "alice")], util=50),
    ]
    owners = {10: ProcOwner(1000, 5), 11: ProcOwner(1000, 5), 20: ProcOwner(1001, None)}
    use = job_use(gpus, owners, {5: (0, 1), 6: (1,)})
    assert use[5].memory_mib == 4096 and use[5].utilization == 70
    assert use[6].memory_mib == 0 and use[6].utilization == 50
    outside = unmanaged(gpus, owners)
    assert outside == (UnmanagedUse(pid=20, uid=1001, user="bob", gpus=(0,), memory_mib=1024),)
    assert unmanaged(gpus, owners, visible=(1,)) == ()


def test_outside_use_is_charged_per_gpu_and_holds_name_the_process() -> None:
    uses = [
        UnmanagedUse(pid=1, uid=7, user="bob", gpus=(0, 1), memory_mib=1),
        UnmanagedUse(pid=2, uid=7, user="bob", gpus=(1,), memory_mib=1),
        UnmanagedUse(pid=3, uid=None, user=None, gpus=(2,), memory_mib=1),
    ]
    assert outside_gpus(uses) == {7: 2}
    assert unmanaged_usage(uses, 5.0) == {7: 10.0}
    assert hold_reasons(uses) == {
        7: "held while you use GPU 0,1 outside tsd (pid 1; gpu.unmanaged: hold)"
    }


# ------------------------------------------------------------------ config


def test_gpu_unmanaged_is_show_or_hold() -> None:
    assert parse_config("").gpu.unmanaged == "show"
    assert parse_config("gpu: {unmanaged: hold}").gpu.unmanaged == "hold"
    with pytest.raises(ConfigError, match=r"line 1: gpu.unmanaged: expected show or hold"):
        parse_config("gpu: {unmanaged: kill}")
    with pytest.raises(ConfigError, match="gpu"):
        parse_config("gpu: {unmanged: hold}")


# ------------------------------------------------------------------ output


def test_ts_i_says_when_a_job_used_more_gpu_memory_than_it_declared() -> None:
    over = replace(job(1, mem=2048, state=JobState.FINISHED, gpu_ids=(0,)), gpu_mem_peak=3072)
    lines = gpu_memory_lines(over)
    assert lines == [
        "GPU memory declared: 2.0 GiB per GPU (--gpu-mem)",
        "GPU memory peak: 3.0 GiB (exceeded the 2.0 GiB declared)",
    ]
    under = replace(over, gpu_mem_peak=1024)
    assert "exceeded" not in info_text(under, 0.0)
    assert "GPU memory peak: 1.0 GiB\n" in info_text(under, 0.0)


def test_ts_l_shows_running_gpu_use_and_unmanaged_entries() -> None:
    live = replace(job(3, state=JobState.RUNNING, gpu_ids=(0,)), start_time=0.0,
                   gpu_mem_now=3174, gpu_util_now=87)  # fmt: skip
    outside = UnmanagedUse(pid=4242, uid=1001, user="bob", gpus=(1,), memory_mib=2048)
    text = list_text([live], 4, 1, show_user=True, now=1.0, unmanaged=[outside])
    rows = text.splitlines()
    assert "<3.1G 87%> true" in rows[1]
    assert rows[2].split()[:5] == ["-", "bob", "unmanaged", "pid", "4242"]
    assert rows[2].endswith("1     <2.0G> (GPU use outside tsd)")


def test_ts_l_shows_no_gpu_figures_when_nothing_was_measured() -> None:
    quiet = replace(job(4, state=JobState.RUNNING, gpu_ids=(0,)), start_time=0.0,
                    gpu_mem_now=0, gpu_util_now=None)  # fmt: skip
    assert list_text([quiet], 4, 1, now=1.0).splitlines()[1].endswith("0     true")
    idle_gpu = replace(quiet, gpu_util_now=0)
    assert list_text([idle_gpu], 4, 1, now=1.0).splitlines()[1].endswith("<0M 0%> true")
