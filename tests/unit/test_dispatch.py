"""The dispatcher applies the scheduler's verdicts to the job table, and cascades -W skips."""

from __future__ import annotations

from unit.daemon_fakes import Events, FakeStore, spec

from tsd.config import Config
from tsd.dispatch import Dispatcher
from tsd.jobtable import JobTable
from tsd.model import DependMode, ExitInfo, Gpu, Job, JobState, UnmanagedUse
from tsd.policy import Policy
from tsd.scheduler import GpuRoom


class FakeMonitor:
    """tsd.dispatch.Gpus: a picture that is fresh or not, as the test says."""

    def __init__(self, free: tuple[int, ...] | None = (0, 1), fresh: bool = True) -> None:
        self._free = free
        self.fresh = fresh
        self.requests = 0
        self.polling: float | None = None

    def request(self, max_age: float) -> bool:
        self.requests += 1
        return self.fresh

    def cached(self) -> tuple[tuple[Gpu, ...] | None, str]:
        return None, "" if self._free is not None else "NVML is down"

    def pool(self) -> tuple[int, ...] | None:
        return (0, 1)

    def free(
        self, held: dict[int, int], tsd_pids: set[int], threshold: float
    ) -> tuple[int, ...] | None:
        if self._free is None:
            return None
        return tuple(i for i in self._free if i not in held)

    def busy(self, held: dict[int, int], tsd_pids: set[int], threshold: float) -> dict[int, str]:
        return {1: "used by pid 99 (carol), 1.0 GiB"}

    def rooms(self) -> dict[int, GpuRoom] | None:
        return None if self._free is None else {}

    def unmanaged(self) -> tuple[UnmanagedUse, ...]:
        return ()

    def arm_poll(self, seconds: float) -> None:
        self.polling = seconds

    def stop_poll(self) -> None:
        self.polling = None


class Rig:
    def __init__(self, slots: int = 2, monitor: FakeMonitor | None = None) -> None:
        self.store = FakeStore()
        self.table = JobTable(self.store, Events(), lambda: 1000)
        self.policy = Policy(Config(slots=slots), self.store, system=False)
        self.gpus = monitor or FakeMonitor()
        self.started: list[tuple[int, tuple[int, ...]]] = []
        self.dispatcher = Dispatcher(self.table, self.policy, self.gpus, self.start, lambda: 5.0)

    def start(self, job: Job, gpu_ids: tuple[int, ...]) -> None:
        self.started.append((job.id, gpu_ids))
        self.table.begin_run(job, gpu_ids, ())
        self.table.launched(job.id, 4000 + job.id, 1, None)

    def finish(self, job_id: int, code: int) -> None:
        ended = self.table.finish(job_id, ExitInfo(code=code), None, None)
        assert ended is not None
        self.dispatcher.job_ended(ended)


def test_schedule_starts_jobs_up_to_the_slot_count_in_queue_order() -> None:
    rig = Rig(slots=2)
    ids = [rig.table.add(1000, "alice", spec()).id for _ in range(3)]
    rig.dispatcher.schedule()
    assert rig.started == [(ids[0], ()), (ids[1], ())]
    assert rig.table.pending == [ids[2]]


def test_a_job_end_frees_its_slot_for_the_next_one() -> None:
    rig = Rig(slots=1)
    a, b = (rig.table.add(1000, "alice", spec()).id for _ in range(2))
    rig.dispatcher.schedule()
    rig.finish(a, 0)
    assert [s[0] for s in rig.started] == [a, b]


def test_a_failed_dependency_skips_w_jobs_transitively_but_not_d_jobs() -> None:
    rig = Rig(slots=1)
    first = rig.table.add(1000, "alice", spec()).id
    w1 = rig.table.add(1000, "alice", spec(depends=(first,), depend_mode=DependMode.SUCCESS)).id
    w2 = rig.table.add(1000, "alice", spec(depends=(w1,), depend_mode=DependMode.SUCCESS)).id
    d = rig.table.add(1000, "alice", spec(depends=(first,))).id
    rig.dispatcher.schedule()
    rig.finish(first, 1)
    assert rig.table.jobs[w1].state is JobState.SKIPPED
    assert rig.table.jobs[w2].state is JobState.SKIPPED
    assert rig.table.jobs[w2].wait_reason == f"job {w1} did not succeed"
    assert [s[0] for s in rig.started] == [first, d]
    assert rig.table.dependents == {}


def test_a_job_waiting_on_a_dependency_is_not_read_by_passes_yet_shows_why_it_waits() -> None:
    rig = Rig(slots=2)
    first = rig.table.add(1000, "alice", spec()).id
    d = rig.table.add(1000, "alice", spec(depends=(first,))).id
    rig.dispatcher.schedule()
    job = rig.table.jobs[d]
    assert job.wait_reason == ""  # no pass recorded a reason for it ...
    assert rig.dispatcher.explain(job).wait_reason == f"waiting for job {first}"  # ... shown
    rig.table.set_held(job, True)
    assert rig.dispatcher.wait_reason(rig.table.jobs[d]).startswith("held")
    rig.table.set_held(rig.table.jobs[d], False)
    late = rig.table.add(1000, "alice", spec()).id
    rig.dispatcher.schedule()  # the free slot goes to the later job
    assert [s[0] for s in rig.started] == [first, late]
    rig.finish(first, 0)
    assert [s[0] for s in rig.started] == [first, late, d]


def test_gpu_jobs_are_decided_only_on_a_fresh_nvml_picture() -> None:
    monitor = FakeMonitor(fresh=False)
    rig = Rig(monitor=monitor)
    rig.table.add(1000, "alice", spec(gpus=1))
    rig.dispatcher.schedule()
    assert rig.started == [] and monitor.requests == 1
    monitor.fresh = True
    rig.dispatcher.schedule()  # what the monitor's refresh calls
    assert rig.started == [(1, (0,))]


def test_cpu_only_queue_never_asks_for_the_gpus() -> None:
    monitor = FakeMonitor(fresh=False)
    rig = Rig(monitor=monitor)
    rig.table.add(1000, "alice", spec())
    rig.dispatcher.schedule()
    assert monitor.requests == 0 and rig.started == [(1, ())]


def test_a_job_short_of_gpus_allocates_and_arms_the_poll_until_the_queue_is_empty() -> None:
    monitor = FakeMonitor(free=(0,))
    rig = Rig(slots=4, monitor=monitor)
    a = rig.table.add(1000, "alice", spec(gpus=1)).id
    b = rig.table.add(1000, "alice", spec(gpus=1)).id
    rig.dispatcher.schedule()
    assert rig.started == [(a, (0,))]
    assert rig.table.jobs[b].state is JobState.ALLOCATING
    assert rig.store.rows[b].state is JobState.ALLOCATING
    assert monitor.polling == 5.0
    rig.table.remove(rig.table.jobs[b])
    rig.dispatcher.schedule()
    assert monitor.polling is None


def test_explain_adds_whose_processes_hold_gpus_to_an_allocating_job() -> None:
    monitor = FakeMonitor(free=())
    rig = Rig(monitor=monitor)
    job = rig.table.add(1000, "alice", spec(gpus=1))
    rig.dispatcher.schedule()
    shown = rig.dispatcher.explain(rig.table.jobs[job.id])
    assert shown.state is JobState.ALLOCATING
    assert shown.wait_reason.endswith("; GPU 1 used by pid 99 (carol), 1.0 GiB")


def test_explain_gives_jobs_the_scheduler_did_not_reach_its_one_reason() -> None:
    rig = Rig(slots=1)
    rig.table.add(1000, "alice", spec())
    rest = [rig.table.add(2000, "bob", spec()).id for _ in range(2)]
    rig.dispatcher.schedule()
    rig.dispatcher.schedule()
    assert rig.dispatcher.unvisited_reason
    assert all(rig.dispatcher.explain(rig.table.jobs[i]).wait_reason for i in rest)
