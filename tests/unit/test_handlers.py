"""Request handlers answer typed responses that encode to the wire shapes `ts` reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
from unit.daemon_fakes import FakeNvml, FakeStore, gpu, spec

from tsd import framing, handlers, protocol
from tsd.config import Config
from tsd.dispatch import Dispatcher
from tsd.errors import NeverFits, PermissionDenied, QueueFull, WrongState
from tsd.gpu import GpuUnavailable
from tsd.gpumonitor import GpuMonitor
from tsd.jobtable import JobTable
from tsd.jobview import JobView, views_of_pieces
from tsd.model import ExitInfo, Gpu, Job, JobSpec, UserLimits
from tsd.policy import Policy
from tsd.waiters import Waiters

ALICE = (1, 1000, 1000)  # SO_PEERCRED: pid, uid, gid
BOB = (2, 2000, 2000)


class FakeRunner:
    """tsd.handlers.Killer, and a stand-in for the runner's start: jobs just run."""

    def __init__(self, table: JobTable) -> None:
        self.table = table
        self.killed: list[int] = []

    def start(self, job: Job, gpu_ids: tuple[int, ...]) -> None:
        self.table.begin_run(job, gpu_ids, ())
        self.table.launched(job.id, 4000 + job.id, 1, None)

    def kill(self, job: Job) -> None:
        self.killed.append(job.id)

    def terminals_held(self, uid: int) -> int:
        return 0

    def hold_terminal(self, job: Job, fds: tuple[int, int]) -> None:
        raise AssertionError("no ts -n terminal in these tests")

    def sweep_terminals(self) -> None:
        pass


class Rig:
    def __init__(self, config: Config, system: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.store = FakeStore()
        self.waiters = Waiters(loop)
        self.table = JobTable(self.store, self.waiters, lambda: 1000)
        self.policy = Policy(config, self.store, system, resolve=lambda c, uid: c.defaults)
        self.nvml = FakeNvml([gpu(0), gpu(1, used_gib=15)])
        self.gpus = GpuMonitor(loop, None, lambda: None, lambda: None, lambda: self.nvml)
        self.runner = FakeRunner(self.table)
        self.dispatcher = Dispatcher(
            self.table, self.policy, self.gpus, self.runner.start, lambda: 5.0
        )
        self.stopped = 0
        self.events: list[dict[str, Any]] = []
        self.parts = handlers.Parts(
            system=system, my_uid=1000, table=self.table, policy=self.policy, gpus=self.gpus,
            dispatcher=self.dispatcher, runner=self.runner, waiters=self.waiters,
            settings=self.store, stop=self.stop,
        )

    def stop(self) -> None:
        self.stopped += 1

    async def send(self, event: protocol.Event) -> None:
        self.events.append(event.to_wire())

    async def call(self, req: protocol.Request, creds: tuple[int, int, int] = ALICE) -> Any:
        response = await handlers.handle(self.parts, creds, req, self.send)
        # The server writes the answer now; what the handler left for after it (a
        # submit's dispatch) runs next.
        await asyncio.sleep(0)
        return response.to_wire()

    async def submit(self, *command: str, creds: tuple[int, int, int] = ALICE, **kw: Any) -> int:
        answer = await self.call(protocol.Submit(spec=spec(*command, **kw)), creds)
        return int(answer["id"])


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def test_submit_answers_the_new_id_and_the_job_starts_when_a_slot_is_free() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        first = await rig.submit("echo", "1")
        second = await rig.submit("echo", "2")
        assert (first, second) == (1, 2)
        assert list(rig.table.running) == [first] and rig.table.pending == [second]

    run(body)


def broken_launches(rig: Rig) -> None:
    """Every launch of the rig's dispatcher raises (a bug in a launch)."""

    def broken(job: Job, gpu_ids: tuple[int, ...]) -> None:
        raise RuntimeError("a bug in a launch")

    rig.dispatcher = rig.parts.dispatcher = Dispatcher(
        rig.table, rig.policy, rig.gpus, broken, lambda: 5.0
    )


def test_a_launch_that_breaks_after_a_submit_still_answers_the_id_and_keeps_the_job() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        broken_launches(rig)
        job_id = await rig.submit("true")
        assert rig.table.pending == [job_id] and not rig.table.running

    run(body)


def test_a_launch_that_breaks_after_a_slot_change_still_answers_the_change() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0))
        job_id = await rig.submit("true")
        broken_launches(rig)
        # The pass that -S runs fails; the new count is set all the same, and says so.
        assert await rig.call(protocol.Slots(value=2)) == {"slots": 2}
        assert rig.store.settings["slots"] == "2"
        assert rig.table.pending == [job_id] and not rig.table.running

    run(body)


def test_submit_on_a_full_queue_with_B_is_refused() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0, defaults=UserLimits(max_queued=1)))
        await rig.submit()
        with pytest.raises(QueueFull):
            await rig.call(protocol.Submit(spec=spec(), block=False))

    run(body)


def test_submit_on_a_full_queue_waits_until_room_is_made() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0, defaults=UserLimits(max_queued=1)))
        first = await rig.submit()
        blocked = asyncio.ensure_future(rig.submit())
        await asyncio.sleep(0)  # let it reach its wait
        assert not blocked.done()
        await rig.call(protocol.Remove(id=first))
        assert await asyncio.wait_for(blocked, 5) == first + 1

    run(body)


def test_submit_of_a_gpu_job_reads_nvml_off_the_loop_once() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=2))
        job = await rig.submit(gpus=1)
        assert rig.nvml.reads == 1 and rig.nvml.threads[0] != "MainThread"
        assert rig.table.running[job].gpu_ids == (0,)  # GPU 1 has too little memory free

    run(body)


class NoDriverNvml(FakeNvml):
    """A machine without the NVIDIA driver: NVML's library is not there."""

    def snapshot(self) -> tuple[Gpu, ...]:
        self.reads += 1
        raise GpuUnavailable("NVML library libnvidia-ml.so.1 not found", absent=True)


def test_gpu_job_on_a_machine_without_nvml_is_refused_at_submit_not_queued_forever() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=2))
        rig.nvml = NoDriverNvml()
        with pytest.raises(NeverFits, match=r"^job needs 1 GPU but this server has no GPUs \("):
            await rig.submit(gpus=1)
        assert not rig.table.pending and not rig.table.running
        assert await rig.submit() == 1  # CPU jobs are unaffected

    run(body)


def test_gpu_job_waits_through_a_passing_nvml_failure() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=2))
        rig.nvml.problem = "NVML failed to initialise: driver reloading"
        assert await rig.submit(gpus=1) == 1
        assert rig.table.pending == [1]

    run(body)


def test_list_streams_long_listings_in_pieces_and_ends_with_the_slot_use() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        long = "x" * 20_000
        for _ in range(60):
            await rig.submit("echo", long)
        final = await rig.call(protocol.ListJobs())
        assert rig.events and all(e["event"] == "jobs" for e in rig.events)
        shown = [j["id"] for e in rig.events for j in e["jobs"]] + [j["id"] for j in final["jobs"]]
        assert shown == list(range(1, 61))
        assert final["slots"] == 1 and final["running"] == 1

    run(body)


@pytest.fixture
def anyone_may_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several users on one daemon without a `tsd` group on this machine."""
    monkeypatch.setattr(handlers.auth, "check_may_connect", lambda *args: None)


@pytest.mark.usefixtures("anyone_may_connect")
def test_list_shows_only_the_callers_jobs_unless_A() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        await rig.submit(creds=ALICE)
        await rig.submit(creds=BOB)
        mine = await rig.call(protocol.ListJobs())
        assert [j["uid"] for j in mine["jobs"]] == [1000]
        everyone = await rig.call(protocol.ListJobs(all_users=True))
        assert sorted(j["uid"] for j in everyone["jobs"]) == [1000, 2000]

    run(body)


def rows_of(rig: Rig, final: dict[str, Any]) -> list[JobView]:
    """The listing in rows as ts reads it: every piece (events, then the final frame)."""
    pieces = [*(e for e in rig.events if e["event"] == "rows"), final]
    return views_of_pieces(framing.loads(framing.dumps(pieces)))


def test_list_in_rows_streams_long_listings_in_pieces_each_under_the_frame_limit() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        for i in range(60):
            await rig.submit("echo", f"{i}" * 20_000)
        final = await rig.call(protocol.ListJobs(rows=True))
        assert rig.events and all(e["event"] == "rows" for e in rig.events)
        assert all(len(framing.encode(e)) < protocol.MAX_FRAME for e in rig.events)
        views = rows_of(rig, final)
        assert [v.id for v in views] == list(range(1, 61))
        assert [v.command_line for v in views] == [f"echo {i}" + f"{i}" * 19_999 for i in
                                                   range(60)]  # fmt: skip
        assert {v.state for v in views[1:]} == {"queued"} and views[0].state == "running"
        assert final["slots"] == 1 and final["running"] == 1

    run(body)


@pytest.mark.usefixtures("anyone_may_connect")
def test_list_in_rows_shows_the_callers_jobs_and_with_A_others_only_redacted() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0))
        private = JobSpec(command=("alice-job",), cwd="/home/alice/private", env=())
        await rig.call(protocol.Submit(spec=private), ALICE)
        await rig.submit("bob-job", creds=BOB)
        mine = rows_of(rig, await rig.call(protocol.ListJobs(rows=True)))
        assert [(v.uid, v.cwd) for v in mine] == [(1000, "/home/alice/private")]
        rig.events.clear()
        everyone = await rig.call(protocol.ListJobs(all_users=True, rows=True), creds=BOB)
        views = rows_of(rig, everyone)
        assert [v.uid for v in views] == [1000, 2000]
        alices = views[0]
        assert alices.redacted and alices.cwd == "" and alices.command_line == "alice-job"
        assert alices.wait_reason  # what ts -A -l shows of it stays
        assert "private" not in str(everyone["same"]) + str(everyone["rows"])

    run(body)


def test_remove_of_a_running_job_is_refused_with_a_hint() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        job = await rig.submit()
        with pytest.raises(WrongState, match=f"ts -k {job}"):
            await rig.call(protocol.Remove(id=job))

    run(body)


@pytest.mark.usefixtures("anyone_may_connect")
def test_kill_all_ends_only_the_callers_running_jobs() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=2))
        mine = await rig.submit(creds=ALICE)
        await rig.submit(creds=BOB)
        assert await rig.call(protocol.KillAll()) == {"count": 1}
        assert rig.runner.killed == [mine]

    run(body)


def test_wait_streams_started_then_answers_the_final_record() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        job = await rig.submit(store_output=False)
        waiting = asyncio.ensure_future(rig.call(protocol.Wait(id=job, notify_start=True)))
        await asyncio.sleep(0)
        assert [e["event"] for e in rig.events] == ["started"]
        rig.table.finish(job, ExitInfo(code=7), None, None)
        final = await asyncio.wait_for(waiting, 5)
        assert final["job"]["exit"]["code"] == 7 and final["job"]["state"] == "finished"
        assert rig.waiters.parked() == 0

    run(body)


def test_submit_with_wait_streams_queued_then_the_final_record_of_a_forgotten_job() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        waiting = asyncio.ensure_future(
            rig.call(protocol.Submit(spec=spec(store_output=False, forget=True), wait=True))
        )
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the dispatch that follows the submit's answer
        assert rig.events == [{"event": "queued", "id": 1}]
        ended = rig.table.finish(1, ExitInfo(code=3), None, None)
        assert ended is not None
        rig.dispatcher.job_ended(ended)  # as the daemon does: the -nf job is dropped now
        final = await asyncio.wait_for(waiting, 5)
        assert final["job"]["id"] == 1 and final["job"]["exit"]["code"] == 3
        assert rig.table.get(1) is None and 1 not in rig.store.rows

    run(body)


def test_a_nf_job_over_and_forgotten_before_its_answer_went_out_answers_its_final_record() -> None:
    # Its start is committed before the answer's fsync: a quick job can end (and a -nf
    # one be forgotten) while the answer is still on its way.
    async def body() -> None:
        rig = Rig(Config(slots=1))
        real_start = rig.runner.start

        def start_and_end_at_once(job: Job, gpu_ids: tuple[int, ...]) -> None:
            real_start(job, gpu_ids)

            def over() -> None:
                ended = rig.table.finish(job.id, ExitInfo(code=4), None, None)
                assert ended is not None
                rig.dispatcher.job_ended(ended)

            asyncio.get_running_loop().call_soon(over)

        rig.dispatcher._start = start_and_end_at_once

        async def slow_send(event: protocol.Event) -> None:
            rig.events.append(event.to_wire())
            for _ in range(5):  # the socket takes a few turns: the job is over by then
                await asyncio.sleep(0)

        rig.send = slow_send  # type: ignore[method-assign]
        final = await asyncio.wait_for(
            rig.call(protocol.Submit(spec=spec(store_output=False, forget=True), wait=True)), 5
        )
        assert rig.events == [{"event": "queued", "id": 1}]
        assert final["job"]["id"] == 1 and final["job"]["exit"]["code"] == 4
        assert rig.table.get(1) is None and rig.waiters.parked() == 0

    run(body)


@pytest.mark.usefixtures("anyone_may_connect")
def test_setting_slots_on_the_system_service_is_for_admins() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1), system=True)
        with pytest.raises(PermissionDenied):
            await rig.call(protocol.Slots(value=4), creds=BOB)
        assert await rig.call(protocol.Slots()) == {"slots": 1}

    run(body)


def test_slots_and_threshold_overrides_answer_their_new_values() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        assert await rig.call(protocol.Slots(value=3)) == {"slots": 3}
        assert rig.store.settings["slots"] == "3"
        assert await rig.call(protocol.GpuFreePerc(value=50.0)) == {"value": 50.0}

    run(body)


def test_env_and_logdir_settings_answer_what_is_stored() -> None:
    async def body() -> None:
        rig = Rig(Config())
        assert await rig.call(protocol.Env("set", "A", "1")) == {"value": "1"}
        assert await rig.call(protocol.Env("get", "A")) == {"value": "1"}
        assert await rig.call(protocol.Env("unset", "A")) == {"value": None}
        assert await rig.call(protocol.LogDir("/tmp/logs")) == {"path": "/tmp/logs", "custom": True}

    run(body)


def test_gpu_status_reports_every_gpu_and_why_busy_ones_are_busy() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=2))
        job = await rig.submit(gpus=1)
        report = await rig.call(protocol.GpuStatus())
        assert [g["index"] for g in report["gpus"]] == [0, 1]
        assert report["gpus"][0]["busy"] == f"held by tsd job {job}"
        assert report["gpus"][1]["busy"].startswith("only 6% memory free")
        assert [j["id"] for j in report["jobs"]] == [job] and report["problem"] == ""

    run(body)


def test_shutdown_stops_after_answering() -> None:
    async def body() -> None:
        rig = Rig(Config())
        assert await rig.call(protocol.Shutdown()) == {}
        assert rig.stopped == 1

    run(body)


def test_a_job_being_launched_is_listed_and_cannot_be_removed_or_moved() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=1))
        rig.runner.start = lambda job, gpu_ids: rig.table.begin_run(job, gpu_ids, ()) and None
        rig.dispatcher._start = rig.runner.start
        job = await rig.submit()
        assert job in rig.table.launching
        assert [j["id"] for j in (await rig.call(protocol.ListJobs()))["jobs"]] == [job]
        for req in (protocol.Remove(id=job), protocol.Urgent(id=job)):
            with pytest.raises(WrongState):
                await rig.call(req)

    run(body)


# ------------------------------------------------------------------ job controls

ROOT = (3, 0, 0)


@pytest.mark.usefixtures("anyone_may_connect")
def test_hold_and_release_are_for_the_owner_and_admins() -> None:
    from tsd.errors import NotOwner

    async def body() -> None:
        rig = Rig(Config(slots=0))
        job = await rig.submit()
        with pytest.raises(NotOwner, match=rf"job {job} belongs to"):
            await rig.call(protocol.Hold(id=job), creds=BOB)
        await rig.call(protocol.Hold(id=job), creds=ROOT)
        assert rig.table.jobs[job].state.value == "held"
        with pytest.raises(NotOwner):
            await rig.call(protocol.Hold(id=job, release=True), creds=BOB)
        await rig.call(protocol.Hold(id=job, release=True))
        assert rig.table.jobs[job].state.value == "queued"
        with pytest.raises(WrongState, match="not held"):
            await rig.call(protocol.Hold(id=job, release=True))

    run(body)


def test_an_array_submit_answers_every_id_from_one_store_transaction() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0))
        writes = rig.store.writes
        answer = await rig.call(protocol.Submit(spec=spec(), array="2-6:2%1", hold=True))
        assert answer["ids"] == [1, 2, 3] and answer["id"] == 1
        assert rig.store.writes == writes + 1
        jobs = [rig.table.jobs[i] for i in answer["ids"]]
        assert [j.spec.array_task for j in jobs] == [2, 4, 6]
        assert {(j.spec.array_job, j.spec.array_throttle, j.state.value) for j in jobs} == {
            (1, 1, "held")
        }

    run(body)


def test_a_submit_cannot_forge_array_membership() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0))
        job = await rig.submit(array_job=7, array_task=1, array_throttle=1)
        got = rig.table.jobs[job].spec
        assert (got.array_job, got.array_task, got.array_throttle) == (None, None, None)

    run(body)


class _Slurmish:
    """tsd.engine.Cluster that accepts everything (the controls are refused before it)."""

    def check(self, spec: object, terminal: bool) -> None:
        pass

    def __init__(self) -> None:
        self.arrays: list[list[int]] = []

    async def forward(self, job: Job) -> Job:
        return job

    async def forward_array(self, jobs: Sequence[Job]) -> list[Job]:
        self.arrays.append([j.id for j in jobs])
        return list(jobs)

    async def cancel(self, job: Job) -> None:
        pass

    async def hold(self, job: Job, held: bool) -> None:
        pass


def test_an_array_under_a_cluster_engine_is_forwarded_whole_in_one_call() -> None:
    async def body() -> None:
        rig = Rig(Config(slots=0))
        cluster = _Slurmish()
        rig.parts.cluster = cluster
        answer = await rig.call(protocol.Submit(spec=spec(), array="3-5%1"))
        assert cluster.arrays == [answer["ids"]] and len(answer["ids"]) == 3
        tasks = [rig.table.jobs[i].spec.array_task for i in answer["ids"]]
        assert tasks == [3, 4, 5]

    run(body)


@pytest.mark.parametrize(
    "req",
    [
        protocol.Submit(spec=spec(retry=1)),
        protocol.Submit(spec=spec(priority=-1)),
    ],
)
def test_job_controls_are_refused_in_one_line_under_a_cluster_engine(
    req: protocol.Request,
) -> None:
    from tsd.errors import BadRequest

    async def body() -> None:
        rig = Rig(Config(slots=0))
        rig.parts.cluster = _Slurmish()
        await rig.submit()
        with pytest.raises(BadRequest, match=r"is not available with cluster\.engine: slurm"):
            await rig.call(req)
        assert len(rig.table.jobs) == 1

    run(body)


def test_get_on_a_started_job_waits_for_its_pid_and_answers_with_it() -> None:
    async def body() -> None:
        rig = Rig(Config())
        job = await rig.submit("sleep", "9")  # FakeRunner: running, its pid not told yet
        asking = asyncio.create_task(rig.call(protocol.GetJob(id=job, default="run")))
        await asyncio.sleep(0.05)
        assert not asking.done()
        rig.table.report(job, 4321, "/tmp/ts-out.x", True)
        answer = await asyncio.wait_for(asking, 1)
        assert (answer["job"]["pid"], answer["job"]["output"]) == (4321, "/tmp/ts-out.x")
        assert not rig.waiters._starts  # nobody left waiting

    run(body)


def test_get_answers_an_untold_job_as_it_is_after_the_wait_and_leaves_no_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handlers, "START_TOLD_WAIT", 0.05)

    async def body() -> None:
        rig = Rig(Config())
        job = await rig.submit("sleep", "9")
        for _ in range(3):
            answer = await rig.call(protocol.GetJob(id=job, default="run"))
            assert (answer["job"]["state"], answer["job"]["pid"]) == ("running", None)
        assert not rig.waiters._starts

    run(body)


def test_get_on_a_queued_or_told_job_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "START_TOLD_WAIT", 30.0)

    async def body() -> None:
        rig = Rig(Config(slots=1))
        running = await rig.submit("sleep", "9")
        queued = await rig.submit("sleep", "9")
        rig.table.report(running, 4321, "/tmp/ts-out.x", True)
        for job in (running, queued):
            await asyncio.wait_for(rig.call(protocol.GetJob(id=job, default="run")), 1)

    run(body)
